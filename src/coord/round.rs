//! Broadcast, gather rounds, request/reply and barriers.
//!
//! # Message types used
//!
//! | type | payload | meaning |
//! |---|---|---|
//! | (any, with `fanout`) | the broadcast's | a broadcast; to a hub: fan out to its team |
//! | (any, with `gather`) | the request's | the request of a round: reply with `reply_to` = its id |
//! | `gather.batch` | `{"request": id, "team": name, "replies": [envelope, ...], "missing": [id, ...]}` | a hub's aggregate of its team's replies (`reply_to` = the request's id) |
//! | `barrier.arrive` / `barrier.release` | `{"barrier": name}` | barrier traffic to / from its leader |

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::Mesh;
use super::topology::Hop;
use crate::bus::{RecvOptions, SendOptions, Wait};
use crate::envelope::{AgentId, Envelope, Gather, Payload, now_micros};
use crate::store::{AgentError, Filter, RecvError, SendError};
use crate::wake::{Waiter, WakeMode};

/// How long a gathering coordinator, or a hub collecting its team's replies, lets replies pile
/// up after the first before taking those there (it takes them at once when every reply it
/// waits for is there).
pub const GATHER_NUDGE: Duration = Duration::from_millis(1);

/// The type of a hub's aggregate of replies.
pub const BATCH_TYPE: &str = "gather.batch";

/// Why a coordination primitive failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// A send failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// Receiving failed.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// Listing or creating agents failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// No team of that name.
    #[error("no team {0} in the topology")]
    UnknownTeam(String),
    /// A barrier was not reached by every member in time.
    #[error("barrier {name}: timed out waiting for {missing:?}")]
    BarrierTimeout {
        /// The barrier.
        name: String,
        /// Members that did not arrive (or, for a member, the leader's release).
        missing: Vec<AgentId>,
    },
    /// The barrier's member list does not include the caller.
    #[error("{me} is not a member of barrier {name}")]
    NotAMember {
        /// The caller.
        me: AgentId,
        /// The barrier.
        name: String,
    },
    /// A hub is already running for this team.
    #[error("a hub for team {0} is already running")]
    HubRunning(String),
    /// I/O around a hub's lock.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What a broadcast did.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// The broadcast's id (every copy carries it).
    pub id: String,
    /// Messages the sender itself wrote: one per team's hub, one per agent in no team.
    pub sent: usize,
    /// Every agent it is for.
    pub recipients: Vec<AgentId>,
}

/// The result of a gather round.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// The request's id.
    pub request: String,
    /// Agents asked.
    pub expected: Vec<AgentId>,
    /// One reply per agent that answered (the first one, if it answered twice).
    pub replies: BTreeMap<AgentId, Envelope>,
    /// Agents that did not answer in time.
    pub missing: Vec<AgentId>,
    /// From the request to the last reply (or the timeout).
    pub elapsed: Duration,
    /// Messages the coordinator received for the round (batches count once).
    pub messages: usize,
}

impl RoundReport {
    /// Whether every agent answered.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

#[derive(Deserialize)]
struct BatchPayload {
    replies: Vec<Envelope>,
}

impl Mesh {
    /// The agents a broadcast from `from` reaches: members of `team` (or of every team, plus
    /// the agents in no team), never hubs, never the sender.
    ///
    /// # Errors
    /// [`CoordError::UnknownTeam`]; listing agents can fail.
    pub fn audience(&self, from: &AgentId, team: Option<&str>) -> Result<Vec<AgentId>, CoordError> {
        let topo = self.topology();
        let mut out: Vec<AgentId> = match team {
            Some(name) => topo
                .team(name)
                .ok_or_else(|| CoordError::UnknownTeam(name.to_owned()))?
                .members
                .clone(),
            None => {
                let hubs: BTreeSet<&AgentId> = topo.hubs().collect();
                self.bus()
                    .store()
                    .agents()?
                    .into_iter()
                    .filter(|a| !hubs.contains(a))
                    .collect()
            }
        };
        out.retain(|a| a != from);
        out.sort();
        Ok(out)
    }

    /// One message to every agent (or every member of `team`). In a hybrid topology the
    /// sender writes one message per team, to its hub, which fans it out; agents in no team
    /// get theirs directly. Every copy carries the same id.
    ///
    /// # Errors
    /// [`CoordError`]; a hub that does not exist is an unknown recipient.
    pub fn broadcast(
        &self,
        from: &AgentId,
        kind: &str,
        payload: &Payload,
        team: Option<&str>,
        gather: Option<Gather>,
    ) -> Result<Broadcast, CoordError> {
        let recipients = self.audience(from, team)?;
        let id = self.bus().next_id();
        let topo = self.topology();
        let mut sent = 0;
        let route = [from.to_string()];
        if topo.is_hybrid() {
            let teams: Vec<_> = match team {
                Some(name) => topo.team(name).into_iter().collect(),
                None => topo.teams.iter().collect(),
            };
            for t in &teams {
                let opts = SendOptions {
                    id: Some(&id),
                    fanout: Some(t.name.as_str()),
                    gather,
                    route: Some(&route),
                    ..SendOptions::default()
                };
                self.bus().send_with(from, &t.hub, kind, payload, &opts)?;
                sent += 1;
            }
            for a in recipients.iter().filter(|a| topo.team_of(a).is_none()) {
                self.direct_copy(from, a, kind, payload, &id, gather)?;
                sent += 1;
            }
        } else {
            for a in &recipients {
                self.direct_copy(from, a, kind, payload, &id, gather)?;
                sent += 1;
            }
        }
        Ok(Broadcast {
            id,
            sent,
            recipients,
        })
    }

    fn direct_copy(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &Payload,
        id: &str,
        gather: Option<Gather>,
    ) -> Result<(), SendError> {
        let opts = SendOptions {
            id: Some(id),
            fanout: Some("*"),
            gather,
            ..SendOptions::default()
        };
        self.bus()
            .send_with(from, to, kind, payload, &opts)
            .map(|_| ())
    }

    /// A coordination round: send a request to every agent (or to `team`), collect one reply
    /// from each until `timeout`. Agents answer with `reply_to` set to the request's id; in a
    /// hybrid topology hubs collect their team's replies and send them up as one
    /// [`BATCH_TYPE`] message each.
    ///
    /// # Errors
    /// [`CoordError`]. Missing replies are not an error: see [`RoundReport::missing`].
    pub fn gather(
        &self,
        from: &AgentId,
        kind: &str,
        payload: &Payload,
        team: Option<&str>,
        timeout: Duration,
    ) -> Result<RoundReport, CoordError> {
        let mut waiter = None;
        self.gather_with(from, kind, payload, team, timeout, &mut waiter)
    }

    /// [`Mesh::gather`] reusing a waiter across rounds.
    ///
    /// # Errors
    /// As [`Mesh::gather`].
    pub fn gather_with(
        &self,
        from: &AgentId,
        kind: &str,
        payload: &Payload,
        team: Option<&str>,
        timeout: Duration,
        waiter: &mut Option<crate::wake::Waiter>,
    ) -> Result<RoundReport, CoordError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let gather = Gather {
            deadline: now_micros() / 1000 + timeout.as_millis() as u64,
        };
        // A futex waiter: its doorbell count says how many messages arrived.
        if waiter.as_ref().is_none_or(|w| w.rings().is_none()) {
            let target = self.bus().store().wake_target(from)?;
            *waiter = Some(
                Waiter::new(&target, WakeMode::Futex).map_err(RecvError::at(&target.watch_dir))?,
            );
        }
        let Some(bell) = waiter.as_mut() else {
            unreachable!("set above")
        };
        let mut mark = bell.rings().unwrap_or(0);
        let b = self.broadcast(from, kind, payload, team, Some(gather))?;
        let expected: BTreeSet<AgentId> = b.recipients.iter().cloned().collect();
        // Where each agent's reply comes from: its hub (one aggregate for the team), or itself.
        let topo = self.topology();
        let source: BTreeMap<&AgentId, AgentId> = expected
            .iter()
            .map(|a| match topo.route(a, from) {
                Hop::Via(hub) => (a, hub),
                Hop::Direct => (a, a.clone()),
            })
            .collect();
        // Messages still to come: one per source with an agent missing, counted down as
        // replies come in.
        let mut missing_of: BTreeMap<&AgentId, usize> = BTreeMap::new();
        for s in source.values() {
            *missing_of.entry(s).or_default() += 1;
        }
        let mut outstanding = missing_of.len();
        let mut replies: BTreeMap<AgentId, Envelope> = BTreeMap::new();
        let mut messages = 0;
        let request = b.id.clone();
        let wanted = move |e: &Envelope| e.reply_to.as_deref() == Some(request.as_str());
        let mut finished = start;
        // Replies cannot come before the request: the count started before it was sent.
        while replies.len() < expected.len() && Instant::now() < deadline {
            if !self.wait_for_arrivals(outstanding, mark, deadline, bell)? {
                break;
            }
            mark = bell.rings().unwrap_or(0);
            let opts = RecvOptions {
                max: usize::MAX,
                wait: Wait::No,
                filter: Some(Filter(&wanted)),
                ..RecvOptions::default()
            };
            // Replies are taken and acknowledged in one state update, then counted.
            let got =
                self.bus()
                    .consume_with(from, &opts, &mut None, &mut |_: &[Envelope]| true)?;
            messages += got.len();
            let mut tally = |r: Envelope| {
                record(&expected, &mut replies, r, |a| {
                    if let Some(n) = missing_of.get_mut(&source[a]) {
                        *n -= 1;
                        if *n == 0 {
                            outstanding -= 1;
                        }
                    }
                });
            };
            for m in got {
                if m.kind == BATCH_TYPE {
                    let replies = crate::envelope::batch_replies(m.payload.get()).or_else(|| {
                        serde_json::from_str::<BatchPayload>(m.payload.get())
                            .ok()
                            .map(|b| b.replies)
                    });
                    replies.into_iter().flatten().for_each(&mut tally);
                } else {
                    tally(m);
                }
                finished = Instant::now();
            }
        }
        let missing: Vec<AgentId> = expected
            .iter()
            .filter(|a| !replies.contains_key(*a))
            .cloned()
            .collect();
        let elapsed = if missing.is_empty() {
            finished - start
        } else {
            start.elapsed()
        };
        // The round as metrics.sh's helpers recorded it, for `metrics summary` and alerts.
        let n = expected.len().max(1) as f64;
        let tags = [("agent", from.as_str()), ("team", team.unwrap_or("all"))];
        let bus = self.bus();
        let records = [
            ("coordination.time", elapsed.as_secs_f64() * 1000.0, "ms"),
            (
                "coordination.delivery_rate",
                replies.len() as f64 * 100.0 / n,
                "percent",
            ),
            (
                "coordination.error_rate",
                missing.len() as f64 * 100.0 / n,
                "percent",
            ),
            ("coordination.agents", expected.len() as f64, "count"),
            ("coordination.messages", messages as f64, "count"),
        ];
        bus.record_metrics(&records, &tags);
        Ok(RoundReport {
            request: b.id,
            expected: b.recipients,
            replies,
            missing,
            elapsed,
            messages,
        })
    }

    /// Send a request and wait for its reply (a message with `reply_to` = the request's id),
    /// leaving every other message in the inbox alone. `None` if `timeout` passes.
    ///
    /// # Errors
    /// [`CoordError`].
    pub fn request(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &Payload,
        timeout: Duration,
    ) -> Result<Option<Envelope>, CoordError> {
        let sent = self.send(from, to, kind, payload, &SendOptions::default())?;
        let id = sent.id;
        let wanted = |e: &Envelope| e.reply_to.as_deref() == Some(id.as_str());
        let opts = RecvOptions {
            max: 1,
            wait: Wait::For(timeout),
            filter: Some(Filter(&wanted)),
            ..RecvOptions::default()
        };
        let reply = self.bus().recv(from, &opts)?.into_iter().next();
        if let Some(r) = &reply {
            self.bus().ack(from, std::slice::from_ref(&r.id))?;
        }
        Ok(reply)
    }

    /// Wait until every member of `members` (which includes `me`) has reached barrier `name`.
    /// The smallest id leads: the others tell it they arrived and wait for its release; it
    /// waits for them all, then releases them.
    ///
    /// # Errors
    /// [`CoordError::BarrierTimeout`] naming who did not arrive; [`CoordError::NotAMember`].
    pub fn barrier(
        &self,
        me: &AgentId,
        name: &str,
        members: &[AgentId],
        timeout: Duration,
    ) -> Result<(), CoordError> {
        let set: BTreeSet<&AgentId> = members.iter().collect();
        if !set.contains(me) {
            return Err(CoordError::NotAMember {
                me: me.clone(),
                name: name.to_owned(),
            });
        }
        let Some(&leader) = set.iter().next() else {
            return Ok(());
        };
        let body = Payload::from_serialize(&serde_json::json!({ "barrier": name }), usize::MAX)
            .map_err(SendError::from)?;
        let is = |kind: &'static str| {
            move |e: &Envelope| {
                e.kind == kind
                    && serde_json::from_str::<serde_json::Value>(e.payload.get())
                        .ok()
                        .and_then(|v| v.get("barrier").and_then(|b| b.as_str()).map(|b| b == name))
                        == Some(true)
            }
        };
        let deadline = Instant::now() + timeout;
        if me != leader {
            self.send(me, leader, "barrier.arrive", &body, &SendOptions::default())?;
            let release = is("barrier.release");
            if self.wait_for(me, &release, deadline)?.is_empty() {
                return Err(CoordError::BarrierTimeout {
                    name: name.to_owned(),
                    missing: vec![leader.clone()],
                });
            }
            return Ok(());
        }
        let mut waiting: BTreeSet<AgentId> = set
            .iter()
            .filter(|a| **a != me)
            .map(|a| (*a).clone())
            .collect();
        let arrive = is("barrier.arrive");
        while !waiting.is_empty() {
            let got = self.wait_for(me, &arrive, deadline)?;
            if got.is_empty() {
                return Err(CoordError::BarrierTimeout {
                    name: name.to_owned(),
                    missing: waiting.into_iter().collect(),
                });
            }
            for m in got {
                if let Ok(a) = AgentId::new(&m.from) {
                    waiting.remove(&a);
                }
            }
        }
        for a in set.iter().filter(|a| **a != me) {
            self.send(me, a, "barrier.release", &body, &SendOptions::default())?;
        }
        Ok(())
    }

    /// Sleep until `want` messages have arrived in `id`'s inbox since the doorbell's count
    /// was `mark`, or some have and [`GATHER_NUDGE`] has passed, or `deadline`. Woken by every
    /// arrival, it reads only the doorbell's count: a round's replies are then taken in one
    /// receive (one state update) instead of one receive each. Returns false at the deadline
    /// with nothing new.
    fn wait_for_arrivals(
        &self,
        want: usize,
        mark: u32,
        deadline: Instant,
        bell: &mut Waiter,
    ) -> Result<bool, CoordError> {
        let mut since: Option<Instant> = None;
        loop {
            bell.prepare();
            let arrived = bell
                .rings()
                .map_or(usize::MAX, |r| r.wrapping_sub(mark) as usize);
            let now = Instant::now();
            if arrived > 0 && since.is_none() {
                since = Some(now);
            }
            let nudged = since.is_some_and(|t| now - t >= GATHER_NUDGE);
            if arrived >= want.max(1) || nudged || now >= deadline {
                bell.disarm();
                return Ok(arrived > 0);
            }
            let mut sleep = deadline - now;
            if let Some(t) = since {
                sleep = sleep.min(GATHER_NUDGE - (now - t));
            }
            bell.wait(Some(sleep))
                .map_err(RecvError::at(self.bus().root().path()))?;
        }
    }

    /// Receive (and acknowledge) messages matching `filter` until `deadline`; empty on timeout.
    fn wait_for(
        &self,
        me: &AgentId,
        filter: &(dyn Fn(&Envelope) -> bool + Sync),
        deadline: Instant,
    ) -> Result<Vec<Envelope>, CoordError> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Vec::new());
        }
        let opts = RecvOptions {
            max: 4096,
            wait: Wait::For(deadline - now),
            filter: Some(Filter(filter)),
            ..RecvOptions::default()
        };
        let got = self.bus().recv(me, &opts)?;
        if !got.is_empty() {
            let ids: Vec<String> = got.iter().map(|m| m.id.clone()).collect();
            self.bus().ack(me, &ids)?;
        }
        Ok(got)
    }
}

/// Keep `r` if it is the first reply of an agent in `expected`, telling `first` which agent.
fn record(
    expected: &BTreeSet<AgentId>,
    replies: &mut BTreeMap<AgentId, Envelope>,
    r: Envelope,
    first: impl FnOnce(&AgentId),
) {
    if let Ok(a) = AgentId::new(&r.from)
        && expected.contains(&a)
        && let std::collections::btree_map::Entry::Vacant(v) = replies.entry(a)
    {
        first(v.key());
        v.insert(r);
    }
}
