//! The API agents program against: open a root, create agents, send, receive (with waiting),
//! acknowledge.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::envelope::{AgentId, Draft, Envelope, IdGen, Payload, now_micros, validate_type};
use crate::layout::LayoutKind;
use crate::root::{Root, RootError};
use crate::store::{
    AckReport, AckTarget, AgentError, AgentSettings, CompatStore, Depth, JsonlStore, Receipt,
    RecvError, RecvRequest, Removed, SendError, Store,
};
use crate::wake::{Waiter, WakeMode};

/// Default lease: an unacknowledged message is delivered again after 30 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How long [`Bus::recv`] may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Return at once, possibly with nothing.
    No,
    /// Block until at least one message is available.
    Forever,
    /// Block for at most this long.
    For(Duration),
}

/// Options for receiving.
#[derive(Debug, Clone, Copy)]
pub struct RecvOptions<'a> {
    /// At most this many messages.
    pub max: usize,
    /// Lease length (see [`DEFAULT_LEASE`]).
    pub lease: Duration,
    /// Whether to block when nothing is there.
    pub wait: Wait,
    /// Receive only matching messages, leaving the others for later (a reply, a release).
    pub filter: Option<crate::store::Filter<'a>>,
}

impl Default for RecvOptions<'_> {
    fn default() -> Self {
        RecvOptions {
            max: 1000,
            lease: DEFAULT_LEASE,
            wait: Wait::No,
            filter: None,
        }
    }
}

/// Optional fields of a message, and how it travels.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendOptions<'a> {
    /// Id of the message this one answers.
    pub reply_to: Option<&'a str>,
    /// Route travelled so far.
    pub route: Option<&'a [String]>,
    /// Broadcast team (`*` for all): see [`Envelope::fanout`].
    pub fanout: Option<&'a str>,
    /// Coordination round context: see [`Envelope::gather`].
    pub gather: Option<crate::envelope::Gather>,
    /// Write the message to this agent's inbox (the next hop, a hub) instead of the recipient's.
    pub via: Option<&'a AgentId>,
    /// Forwarding: keep this id instead of making a new one.
    pub id: Option<&'a str>,
    /// Forwarding: keep this send time (microseconds).
    pub ts: Option<u64>,
    /// Forwarding: keep this sequence number. A message sent with `via` and no `seq` gets the
    /// next number of the (from, to) pair, as a direct one would.
    pub seq: Option<u64>,
}

/// Why a bus could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The root was refused.
    #[error(transparent)]
    Root(#[from] RootError),
    /// `SHOAL_WAKE` names no mechanism.
    #[error("{0}")]
    BadWakeMode(String),
}

/// A handle on one root's message bus. Cheap to clone; share it between threads.
///
/// # Examples
/// ```
/// # let dir = std::path::PathBuf::from(format!("/dev/shm/shoal-doc-bus-{}", std::process::id()));
/// use shoal::{AgentId, Bus, RecvOptions};
/// let bus = Bus::create(&dir)?;
/// let (alice, bob) = (AgentId::new("alice")?, AgentId::new("bob")?);
/// bus.init(&bob)?;
/// let sent = bus.send_str(&alice, &bob, "hello", r#"{"n":1}"#)?;
/// let got = bus.recv(&bob, &RecvOptions::default())?;
/// assert_eq!(got[0].id, sent.id);
/// assert_eq!(got[0].payload.get(), r#"{"n":1}"#);
/// bus.ack(&bob, &[sent.id])?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: Root,
    store: Box<dyn Store>,
    wake: WakeMode,
    max_payload: usize,
    ids: IdGen,
    /// What the bus records about itself (`None`: metrics off, `SHOAL_METRICS=0`).
    counters: Option<crate::obs::counters::BusCounters>,
}

impl Bus {
    /// A bus over an opened root.
    ///
    /// # Errors
    /// [`OpenError::BadWakeMode`] for a bad `SHOAL_WAKE`.
    pub fn open(root: Root) -> Result<Bus, OpenError> {
        let metrics = !matches!(
            std::env::var("SHOAL_METRICS").as_deref(),
            Ok("0" | "off" | "false" | "no")
        );
        Bus::open_with_metrics(root, metrics)
    }

    /// [`Bus::open`], with the bus's own metrics (sent, received, acknowledged, rejected,
    /// latency, depth per agent: see [`crate::obs::counters`]) on or off, whatever
    /// `SHOAL_METRICS` says.
    ///
    /// # Errors
    /// As [`Bus::open`].
    pub fn open_with_metrics(root: Root, metrics: bool) -> Result<Bus, OpenError> {
        let store: Box<dyn Store> = match root.config().layout {
            LayoutKind::Jsonl => Box::new(JsonlStore::new(root.layout().clone())),
            LayoutKind::Compat => Box::new(CompatStore::new(root.layout().clone())),
        };
        let wake = WakeMode::from_env().map_err(OpenError::BadWakeMode)?;
        let counters = metrics.then(|| crate::obs::counters::BusCounters::new(root.layout()));
        Ok(Bus {
            inner: Arc::new(Inner {
                max_payload: root.config().max_payload,
                root,
                store,
                wake,
                ids: IdGen::new(),
                counters,
            }),
        })
    }

    /// Open the root at `path`, creating it (JSONL layout) if needed.
    ///
    /// # Errors
    /// As [`Root::create`] and [`Bus::open`].
    pub fn create(path: &Path) -> Result<Bus, OpenError> {
        Bus::open(Root::create(path, LayoutKind::Jsonl)?)
    }

    /// The default root ([`crate::root::resolve`]), created if needed.
    ///
    /// # Errors
    /// As [`Bus::create`].
    pub fn open_default() -> Result<Bus, OpenError> {
        Bus::create(&crate::root::resolve(None))
    }

    /// The root.
    pub fn root(&self) -> &Root {
        &self.inner.root
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// A new message id (for a message sent as several copies, like a broadcast).
    pub fn next_id(&self) -> String {
        self.inner.ids.next(now_micros() / 1_000_000)
    }

    /// The payload cap applied by [`Bus::send_str`] and [`Bus::send_json`].
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    /// The settings a new agent gets: the root's defaults.
    pub fn default_settings(&self) -> AgentSettings {
        let c = self.inner.root.config();
        AgentSettings {
            shards: c.shards,
            quota_msgs: c.quota_msgs,
            quota_bytes: c.quota_bytes,
        }
    }

    /// Create an agent (idempotent). Returns whether it was created now.
    ///
    /// # Errors
    /// [`AgentError`].
    pub fn init(&self, id: &AgentId) -> Result<bool, AgentError> {
        self.inner.store.create_agent(id, &self.default_settings())
    }

    /// Create an agent with explicit settings; an existing agent gets the new quota.
    ///
    /// # Errors
    /// [`AgentError`].
    pub fn init_with(&self, id: &AgentId, settings: &AgentSettings) -> Result<bool, AgentError> {
        self.inner.store.create_agent(id, settings)
    }

    /// Remove an agent and its inbox. `None` if it did not exist.
    ///
    /// # Errors
    /// [`AgentError`].
    pub fn remove(&self, id: &AgentId) -> Result<Option<Removed>, AgentError> {
        self.inner.store.remove_agent(id)
    }

    /// Send a validated payload.
    ///
    /// # Errors
    /// [`SendError`]: unknown recipient, invalid type, quota exceeded (nothing evicted), full
    /// filesystem (nothing partial stored).
    pub fn send(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &Payload,
    ) -> Result<Receipt, SendError> {
        self.send_with(from, to, kind, payload, &SendOptions::default())
    }

    /// Send with optional fields (reply-to, route).
    ///
    /// # Errors
    /// As [`Bus::send`].
    pub fn send_with(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &Payload,
        opts: &SendOptions<'_>,
    ) -> Result<Receipt, SendError> {
        validate_type(kind)?;
        let ts = opts.ts.unwrap_or_else(now_micros);
        let draft = Draft {
            id: opts
                .id
                .map_or_else(|| self.inner.ids.next(ts / 1_000_000), str::to_owned),
            from,
            to,
            kind,
            ts,
            payload,
            reply_to: opts.reply_to,
            route: opts.route,
            fanout: opts.fanout,
            gather: opts.gather,
            via: opts.via,
            seq: opts.seq,
        };
        let r = self.inner.store.append(draft);
        // A forwarded message (it carries its sequence number) was counted when it was sent.
        if let (Some(c), None) = (&self.inner.counters, opts.seq) {
            use crate::obs::counters::{Event, reject_reason};
            match &r {
                Ok(_) => c.count(from, Event::Sent, 1),
                Err(e) => c.count(from, Event::Rejected(reject_reason(e)), 1),
            }
        }
        r
    }

    /// Send a payload given as JSON text (validated against the payload cap).
    ///
    /// # Errors
    /// As [`Bus::send`], plus [`SendError::InvalidPayload`].
    pub fn send_str(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &str,
    ) -> Result<Receipt, SendError> {
        let p = Payload::parse(payload, self.inner.max_payload)?;
        self.send(from, to, kind, &p)
    }

    /// Send any serializable value as the payload.
    ///
    /// # Errors
    /// As [`Bus::send_str`].
    pub fn send_json<T: serde::Serialize + ?Sized>(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &T,
    ) -> Result<Receipt, SendError> {
        let p = Payload::from_serialize(payload, self.inner.max_payload)?;
        self.send(from, to, kind, &p)
    }

    /// Receive, waiting as `opts.wait` says. Messages stay leased until acknowledged.
    /// An empty result after waiting means the timeout passed.
    ///
    /// # Errors
    /// [`RecvError`].
    pub fn recv(&self, id: &AgentId, opts: &RecvOptions<'_>) -> Result<Vec<Envelope>, RecvError> {
        let mut waiter = None;
        self.recv_with(id, opts, &mut waiter)
    }

    /// [`Bus::recv`] reusing a waiter across calls (what a long-running receiver does).
    ///
    /// # Errors
    /// As [`Bus::recv`].
    pub fn recv_with(
        &self,
        id: &AgentId,
        opts: &RecvOptions<'_>,
        waiter: &mut Option<Waiter>,
    ) -> Result<Vec<Envelope>, RecvError> {
        self.wait_loop(id, opts, waiter, &mut |store, req| store.receive(id, req))
    }

    /// Receive and handle in one step (see [`Store::consume`]): `handle` gets each batch while
    /// the receiver lock is held, and if it returns `true` the batch is acknowledged with the
    /// same state update. Waits as `opts.wait` says; returns the batch handled (empty after a
    /// timeout).
    ///
    /// # Errors
    /// As [`Bus::recv`].
    pub fn consume_with(
        &self,
        id: &AgentId,
        opts: &RecvOptions<'_>,
        waiter: &mut Option<Waiter>,
        handle: &mut dyn FnMut(&[Envelope]) -> bool,
    ) -> Result<Vec<Envelope>, RecvError> {
        let mut acked = false;
        let got = self.wait_loop(id, opts, waiter, &mut |store, req| {
            store.consume(id, req, &mut |batch: &[Envelope]| {
                acked = handle(batch);
                acked
            })
        })?;
        if acked && let Some(c) = &self.inner.counters {
            c.count(id, crate::obs::counters::Event::Acked, got.len() as u64);
        }
        Ok(got)
    }

    /// Fetch (receive or consume) until something comes, the deadline passes, or (without
    /// waiting) once.
    fn wait_loop(
        &self,
        id: &AgentId,
        opts: &RecvOptions<'_>,
        waiter: &mut Option<Waiter>,
        fetch: &mut dyn FnMut(
            &dyn Store,
            &RecvRequest<'_>,
        ) -> Result<crate::store::Batch, RecvError>,
    ) -> Result<Vec<Envelope>, RecvError> {
        let store = &*self.inner.store;
        let req = RecvRequest {
            max: opts.max.max(1),
            lease: opts.lease,
            filter: opts.filter,
        };
        // Every receive counts as a heartbeat: the store notes it (see `Store::heartbeat`).
        let deadline = match opts.wait {
            Wait::No => {
                let got = fetch(store, &req)?.messages;
                self.note_received(id, &got);
                return Ok(got);
            }
            Wait::Forever => None,
            Wait::For(d) => Some(Instant::now() + d),
        };
        if waiter.is_none() {
            let target = store.wake_target(id)?;
            let w =
                Waiter::new(&target, self.inner.wake).map_err(RecvError::at(&target.watch_dir))?;
            *waiter = Some(w);
        }
        let Some(w) = waiter.as_mut() else {
            unreachable!("waiter set above")
        };
        loop {
            w.prepare();
            let batch = match fetch(store, &req) {
                Ok(b) => b,
                Err(e) => {
                    w.disarm();
                    return Err(e);
                }
            };
            if !batch.messages.is_empty() {
                w.disarm();
                self.note_received(id, &batch.messages);
                return Ok(batch.messages);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                w.disarm();
                return Ok(Vec::new());
            }
            // Sleep until the deadline, or until the earliest lease expires (nothing is written
            // when a lease runs out, so nothing would wake us).
            let mut sleep = deadline.map(|d| d - now);
            if let Some(exp) = batch.next_expiry_ms {
                // Lease deadlines are set from the coarse clock (see `sys::now_ms_coarse`).
                let until =
                    Duration::from_millis(exp.saturating_sub(crate::sys::now_ms_coarse()) + 1);
                sleep = Some(sleep.map_or(until, |s| s.min(until)));
            }
            if let Some(c) = &self.inner.counters {
                c.publish_at(now); // counts reach the metrics before a long sleep
            }
            w.wait(sleep)
                .map_err(RecvError::at(self.inner.root.path()))?;
        }
    }

    /// Acknowledge messages by id.
    ///
    /// # Errors
    /// [`RecvError`].
    pub fn ack(&self, id: &AgentId, ids: &[String]) -> Result<AckReport, RecvError> {
        self.inner.store.heartbeat(id)?;
        let r = self.inner.store.ack(id, AckTarget::Ids(ids))?;
        self.note_acked(id, &r);
        Ok(r)
    }

    fn note_acked(&self, id: &AgentId, r: &AckReport) {
        if let Some(c) = &self.inner.counters {
            c.count(id, crate::obs::counters::Event::Acked, r.acked as u64);
        }
    }

    /// Count what a receive returned, with latency samples and (JSONL layout: it is read from
    /// the shared table) the depth left.
    fn note_received(&self, id: &AgentId, got: &[Envelope]) {
        let Some(c) = &self.inner.counters else {
            return;
        };
        if got.is_empty() {
            return;
        }
        let stamps = got.iter().map(|e| (e.ts, e.delivery.unwrap_or(1)));
        let depth = (self.inner.root.config().layout == LayoutKind::Jsonl)
            .then(|| self.inner.store.depth(id).ok().map(|d| d.msgs))
            .flatten();
        c.received(id, stamps, now_micros(), depth);
    }

    /// Acknowledge every delivered, unacknowledged message.
    ///
    /// # Errors
    /// [`RecvError`].
    pub fn ack_all(&self, id: &AgentId) -> Result<AckReport, RecvError> {
        self.inner.store.heartbeat(id)?;
        let r = self.inner.store.ack(id, AckTarget::AllDelivered)?;
        self.note_acked(id, &r);
        Ok(r)
    }

    /// Record one metric now, if the bus's metrics are on (see [`crate::obs::metrics`]).
    pub fn record_metric(&self, metric: &str, value: f64, unit: &str, tags: &[(&str, &str)]) {
        self.record_metrics(&[(metric, value, unit)], tags);
    }

    /// Record several metrics, each (metric, value, unit), with the same tags, in one append.
    pub fn record_metrics(&self, records: &[(&str, f64, &str)], tags: &[(&str, &str)]) {
        if let Some(c) = &self.inner.counters {
            c.record(records, tags);
        }
    }

    /// Say that an agent is alive and working (for an agent busy with something other than
    /// the bus; its sends, receives and acknowledgements count already).
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`].
    pub fn heartbeat(&self, id: &AgentId) -> Result<(), RecvError> {
        self.inner.store.heartbeat(id)
    }

    /// When an agent last did something, and since when messages wait for it.
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`].
    pub fn activity(&self, id: &AgentId) -> Result<crate::store::Activity, RecvError> {
        self.inner.store.activity(id)
    }

    /// Unacknowledged messages and bytes in an inbox.
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`].
    pub fn depth(&self, id: &AgentId) -> Result<Depth, RecvError> {
        self.inner.store.depth(id)
    }

    /// The wake-up mechanism receivers of this bus use.
    pub fn wake_mode(&self) -> WakeMode {
        self.inner.wake
    }
}
