//! The hub of a team: forwards routed messages, fans broadcasts out to its team, and collects
//! its team's replies to a round into one message upward.
//!
//! Forwarding is at-least-once: a message is acknowledged only after it was written to its
//! next hop, and a round's request and replies only after the aggregate went up. A hub killed
//! at any point loses nothing: the restarted hub takes the hub's lock, makes its predecessor's
//! leases expire, and gets those messages again; whatever it forwards twice, receivers drop by
//! id or sequence (see [`crate::store::Dedup`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Mesh;
use super::round::{BATCH_TYPE, CoordError, GATHER_NUDGE};
use super::topology::Hop;
use crate::bus::{RecvOptions, SendOptions, Wait};
use crate::envelope::{AgentId, Envelope, Payload, now_micros};
use crate::liveness::{AliveLock, LivenessError};

/// Messages a hub takes per receive.
const BATCH: usize = 1024;
/// A hub's leases: long, because a restarted hub expires its predecessor's at once.
const LEASE: Duration = Duration::from_secs(600);
/// How long a starting hub waits for a predecessor's lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Largest aggregate a hub sends up.
const MAX_BATCH_PAYLOAD: usize = 64 << 20;

/// A round the hub is collecting replies for.
struct Pending {
    coordinator: AgentId,
    expect: Rc<BTreeSet<String>>,
    replies: BTreeMap<String, Envelope>,
    /// Message ids held (not acknowledged) until the aggregate is sent: the request and replies.
    hold: Vec<String>,
    /// When to send what there is, milliseconds since the epoch (a little before the deadline).
    flush_at: u64,
}

/// Per coordinator, the members whose replies to its rounds the hub collects.
type Collects = HashMap<AgentId, Rc<BTreeSet<String>>>;

/// What a hub did, for its caller to report.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubStats {
    /// Messages forwarded to their next hop.
    pub forwarded: u64,
    /// Copies written by fan-out.
    pub fanned_out: u64,
    /// Aggregates sent up.
    pub batches: u64,
    /// Leases taken over from a previous hub at start.
    pub taken_over: usize,
}

/// Run the hub of `team` until `stop` is set (checked at least every `poll`).
///
/// # Errors
/// [`CoordError::HubRunning`] if another process runs this hub; [`CoordError::UnknownTeam`];
/// bus errors.
pub fn run(
    mesh: &Mesh,
    team: &str,
    stop: &AtomicBool,
    poll: Option<Duration>,
) -> Result<HubStats, CoordError> {
    let t = mesh
        .topology()
        .team(team)
        .ok_or_else(|| CoordError::UnknownTeam(team.to_owned()))?
        .clone();
    let me = t.hub.clone();
    let bus = mesh.bus();
    bus.init(&me)?;
    // A predecessor killed a moment ago still holds the lock until the kernel has torn it down
    // (a few milliseconds): wait for it a little before concluding a live hub runs.
    let _alive = AliveLock::acquire(bus.root().layout(), &me, LOCK_WAIT).map_err(|e| match e {
        LivenessError::Running(_) => CoordError::HubRunning(team.to_owned()),
        LivenessError::Io { path, source } => CoordError::Io { path, source },
    })?;
    bus.store().own_receiver(&me)?; // the hub is its inbox's only consumer
    let mut stats = HubStats {
        taken_over: bus.store().expire_leases(&me)?,
        ..HubStats::default()
    };
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    // Whose replies to a coordinator's rounds this hub collects: the same for every round of
    // that coordinator while the hub runs (its topology is read once, at start).
    let mut collects = Collects::new();
    let mut waiter = None;
    let target = bus.store().wake_target(&me)?;
    // The futex doorbell, not inotify: senders ring it after updating the counters this wait
    // reads, whereas inotify fires inside their write, before the counters move (a hub woken
    // that way could read "nothing new" and sleep through the last reply of a round).
    let mut bell =
        crate::wake::Waiter::new(&target, crate::wake::WakeMode::Futex).map_err(|source| {
            CoordError::Io {
                path: target.watch_dir.clone(),
                source,
            }
        })?;
    while !stop.load(Ordering::Relaxed) {
        wait_for_work(mesh, &me, &pending, &mut bell, poll)?;
        let opts = RecvOptions {
            max: BATCH,
            lease: LEASE,
            wait: Wait::No,
            ..RecvOptions::default()
        };
        let got = bus.recv_with(&me, &opts, &mut waiter)?;
        let mut done: Vec<String> = Vec::new();
        for m in got {
            handle(
                mesh,
                &t,
                &me,
                m,
                (&mut pending, &mut collects),
                &mut done,
                &mut stats,
            )?;
        }
        let now_ms = now_micros() / 1000;
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.flush_at <= now_ms || p.replies.len() >= p.expect.len())
            .map(|(k, _)| k.clone())
            .collect();
        for request in due {
            if let Some(p) = pending.remove(&request) {
                flush(mesh, &t, &me, &request, p, &mut done, &mut stats)?;
            }
        }
        if !done.is_empty() {
            bus.ack(&me, &done)?;
        }
    }
    Ok(stats)
}

/// While rounds are pending, wake on each arrival but receive only when enough unread
/// messages are there to complete them (or a millisecond has passed since the first one, so
/// other traffic is not held up, or a round's time is up): a hub then takes its team's replies in one receive, and
/// saves its state once, instead of once per reply.
fn wait_for_work(
    mesh: &Mesh,
    me: &AgentId,
    pending: &BTreeMap<String, Pending>,
    bell: &mut crate::wake::Waiter,
    poll: Option<Duration>,
) -> Result<(), CoordError> {
    let held: usize = pending.values().map(|p| p.hold.len()).sum();
    let missing: usize = pending
        .values()
        .map(|p| p.expect.len() - p.replies.len())
        .sum();
    let next_flush = pending.values().map(|p| p.flush_at).min();
    let mut since: Option<std::time::Instant> = None;
    loop {
        bell.prepare();
        let unread = (mesh.bus().depth(me)?.msgs as usize).saturating_sub(held);
        let now_ms = now_micros() / 1000;
        let due = next_flush.is_some_and(|f| f <= now_ms);
        if unread > 0 && since.is_none() {
            since = Some(std::time::Instant::now());
        }
        let nudged = since.is_some_and(|t| t.elapsed() >= GATHER_NUDGE);
        if due || (unread > 0 && (pending.is_empty() || unread >= missing || nudged)) {
            bell.disarm();
            return Ok(());
        }
        let mut timeout = next_flush.map(|f| Duration::from_millis(f - now_ms));
        if let Some(t) = since {
            let left = GATHER_NUDGE.saturating_sub(t.elapsed());
            timeout = Some(timeout.map_or(left, |x| x.min(left)));
        }
        if let Some(p) = poll {
            timeout = Some(timeout.map_or(p, |t| t.min(p)));
        }
        let woke_at = std::time::Instant::now();
        bell.wait(timeout).map_err(|source| CoordError::Io {
            path: mesh.bus().root().path().to_owned(),
            source,
        })?;
        if poll.is_some_and(|p| woke_at.elapsed() >= p) {
            return Ok(());
        }
    }
}

fn handle(
    mesh: &Mesh,
    team: &super::topology::Team,
    me: &AgentId,
    m: Envelope,
    (pending, collects): (&mut BTreeMap<String, Pending>, &mut Collects),
    done: &mut Vec<String>,
    stats: &mut HubStats,
) -> Result<(), CoordError> {
    let bus = mesh.bus();
    let from = AgentId::new(&m.from).map_err(|_| bad_sender(&m))?;
    // A reply the hub collects for a round is only held: nothing to copy for it.
    if let Some(r) = m.reply_to.as_deref()
        && m.to != me.as_str()
        && let Some(p) = pending.get_mut(r)
        && p.coordinator.as_str() == m.to
        && p.expect.contains(&m.from)
    {
        p.hold.push(m.id.clone());
        p.replies.entry(m.from.clone()).or_insert(m);
        return Ok(());
    }
    // Checked when it was first sent: passed on as it is.
    let payload = Payload::from_received(&m.payload);
    let mut route = m.route.clone().unwrap_or_else(|| vec![m.from.clone()]);
    route.push(me.to_string());
    if m.to == me.as_str() {
        if m.fanout.is_some() {
            // A broadcast for the team: one copy per member, same id.
            for member in team.members.iter().filter(|a| **a != from) {
                let opts = SendOptions {
                    id: Some(&m.id),
                    ts: Some(m.ts),
                    route: Some(&route),
                    fanout: m.fanout.as_deref(),
                    gather: m.gather,
                    reply_to: m.reply_to.as_deref(),
                    ..SendOptions::default()
                };
                bus.send_with(&from, member, &m.kind, &payload, &opts)?;
                stats.fanned_out += 1;
            }
            // The replies this hub collects: its members' whose way to the coordinator goes
            // through it (not those of a coordinator's own team, nor any with direct delivery
            // between teams).
            let expect = match m.gather {
                Some(_) => Rc::clone(collects.entry(from.clone()).or_insert_with(|| {
                    Rc::new(
                        team.members
                            .iter()
                            .filter(|a| **a != from)
                            .filter(|a| matches!(mesh.topology().route(a, &from), Hop::Via(h) if h == *me))
                            .map(|a| a.to_string())
                            .collect(),
                    )
                })),
                None => Rc::default(),
            };
            if let Some(g) = m.gather.filter(|_| !expect.is_empty()) {
                let now_ms = now_micros() / 1000;
                // Send up a little before the deadline, so the coordinator has it in time.
                let margin = (g.deadline.saturating_sub(now_ms) / 10).clamp(2, 100);
                let entry = pending.entry(m.id.clone()).or_insert_with(|| Pending {
                    coordinator: from.clone(),
                    expect,
                    replies: BTreeMap::new(),
                    hold: Vec::new(),
                    flush_at: g.deadline.saturating_sub(margin),
                });
                entry.hold.push(m.id.clone());
            } else {
                done.push(m.id.clone());
            }
        } else {
            done.push(m.id.clone()); // nothing for a hub to do with a plain message to itself
        }
        return Ok(());
    }
    // Forward one hop on, keeping id, time and sequence.
    let to = AgentId::new(&m.to).map_err(|_| bad_sender(&m))?;
    let hop = mesh.topology().forward(me, &to);
    let via = match &hop {
        Hop::Direct => None,
        Hop::Via(h) => Some(h),
    };
    let opts = SendOptions {
        id: Some(&m.id),
        ts: Some(m.ts),
        seq: Some(m.seq),
        route: Some(&route),
        via,
        reply_to: m.reply_to.as_deref(),
        fanout: m.fanout.as_deref(),
        gather: m.gather,
    };
    bus.send_with(&from, &to, &m.kind, &payload, &opts)?;
    stats.forwarded += 1;
    done.push(m.id);
    Ok(())
}

fn flush(
    mesh: &Mesh,
    team: &super::topology::Team,
    me: &AgentId,
    request: &str,
    p: Pending,
    done: &mut Vec<String>,
    stats: &mut HubStats,
) -> Result<(), CoordError> {
    let payload = Payload::from_written(
        aggregate(request, team.name.as_str(), &p.replies, &p.expect),
        MAX_BATCH_PAYLOAD,
    )
    .map_err(crate::store::SendError::from)?;
    let opts = SendOptions {
        reply_to: Some(request),
        ..SendOptions::default()
    };
    mesh.bus()
        .send_with(me, &p.coordinator, BATCH_TYPE, &payload, &opts)?;
    stats.batches += 1;
    done.extend(p.hold);
    Ok(())
}

/// The aggregate's payload: `{"request":..,"team":..,"replies":[..],"missing":[..]}`, each
/// reply as it was stored (see `docs/`), written by hand: serializing a 100-member team's
/// replies through serde was an eighth of a hub's work in a round.
fn aggregate(
    request: &str,
    team: &str,
    replies: &BTreeMap<String, Envelope>,
    expect: &BTreeSet<String>,
) -> String {
    use crate::envelope::write_json_str;
    let mut out = Vec::with_capacity(64 + replies.len() * 256);
    out.extend_from_slice(b"{\"request\":");
    write_json_str(&mut out, request);
    out.extend_from_slice(b",\"team\":");
    write_json_str(&mut out, team);
    out.extend_from_slice(b",\"replies\":[");
    for (i, r) in replies.values().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        r.write_stored(&mut out);
    }
    out.extend_from_slice(b"],\"missing\":[");
    for (i, a) in expect
        .iter()
        .filter(|a| !replies.contains_key(*a))
        .enumerate()
    {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, a);
    }
    out.extend_from_slice(b"]}");
    // Only text went in, so the lossy conversion never replaces anything.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn bad_sender(m: &Envelope) -> CoordError {
    CoordError::Send(crate::store::SendError::Io {
        path: std::path::PathBuf::from(&m.id),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "message with an invalid agent id",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as an echo agent stores it, and as a hub receives it (with a delivery count).
    fn reply(from: &str, payload: &str) -> Envelope {
        let line = format!(
            "{{\"v\":1,\"id\":\"msg-1-{from}\",\"from\":\"{from}\",\"to\":\"coord\",\"type\":\"ping.reply\",\"seq\":3,\"ts\":17,\"reply_to\":\"msg-1-0\",\"payload\":{payload}}}"
        );
        let mut e = Envelope::parse(line.as_bytes()).unwrap();
        e.delivery = Some(2);
        e
    }

    #[test]
    fn aggregates_are_json_read_back_the_short_way_and_the_general_way_alike() {
        let mut replies = BTreeMap::new();
        for (from, payload) in [
            ("a1", "{}"),
            ("a2", "{\"text\":\"a \\\"q\\\" é\",\"n\":[1,2.5,null]}"),
            ("a3", "\"s\""),
        ] {
            replies.insert(from.to_owned(), reply(from, payload));
        }
        // A type that needs escaping: that reply is written escaped, and read the general way.
        replies.get_mut("a3").unwrap().kind = "t\"\n".to_owned();
        let expect: BTreeSet<String> = ["a1", "a2", "a3", "a4", "a5"].map(String::from).into();
        let text = aggregate("msg-1-0", "team-\"x\"", &replies, &expect);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["request"], "msg-1-0");
        assert_eq!(v["team"], "team-\"x\"");
        assert_eq!(v["missing"], serde_json::json!(["a4", "a5"]));
        assert_eq!(v["replies"].as_array().unwrap().len(), 3);
        assert!(v["replies"][0].get("delivery").is_none(), "stored form");
        assert_eq!(v["replies"][2]["type"], "t\"\n");
        // The coordinator's reading: the short way only for the plain team name...
        assert!(
            crate::envelope::batch_replies(&text).is_none(),
            "escaped team"
        );
        let plain = aggregate("msg-1-0", "team-x", &replies, &expect);
        // ...where the escaped type in one reply sends the whole batch the general way.
        assert!(
            crate::envelope::batch_replies(&plain).is_none(),
            "escaped type"
        );
        replies.get_mut("a3").unwrap().kind = "t".to_owned();
        let plain = aggregate("msg-1-0", "team-x", &replies, &expect);
        let fast = crate::envelope::batch_replies(&plain).expect("written shape");
        #[derive(serde::Deserialize)]
        struct General {
            replies: Vec<Envelope>,
        }
        let general: General = serde_json::from_str(&plain).unwrap();
        assert_eq!(fast.len(), 3);
        for (f, g) in fast.iter().zip(&general.replies) {
            assert_eq!(f.to_line(), g.to_line());
        }
        // Empty lists, and damage.
        let none = aggregate("r", "t", &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(crate::envelope::batch_replies(&none).unwrap().len(), 0);
        for bad in [
            plain.replacen("\"missing\":[", "\"missing\": [", 1),
            plain.replacen("]}", "]} ", 1),
            plain.replacen("{\"request\"", "{\"extra\":1,\"request\"", 1),
            plain[..plain.len() - 1].to_owned(),
        ] {
            assert!(crate::envelope::batch_replies(&bad).is_none(), "{bad}");
        }
    }
}
