//! What the bus records about itself, with no code from the user: per agent, messages sent,
//! received, acknowledged, redelivered and rejected (by reason), send-to-receive latency, and
//! inbox depth.
//!
//! Counting must cost next to nothing on a path that sends a message in about 1.6 us, so counts
//! go to a per-thread table (no lock, no atomic) and are folded into one record per metric and
//! agent per interval (1 s): `bus.sent`, `bus.received`, `bus.acked`, `bus.redelivered` (unit
//! `count`), `bus.rejected` (tagged with `reason`), `bus.latency` (ms, at most 256 samples per
//! interval and process), `coordination.queue_depth` (the inbox depth a receiver last saw). A
//! thread's table is folded in every 256 operations once the interval has passed, before a
//! receiver goes to sleep once it has passed, when the thread ends, and when the last handle
//! on the bus is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::envelope::AgentId;
use crate::layout::Layout;
use crate::obs::metrics::{Emitter, MetricsOptions};

/// How often counts become records.
const INTERVAL: Duration = Duration::from_secs(1);
/// Latency samples kept per interval and process.
const MAX_LATENCY_SAMPLES: usize = 256;

/// A counted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A message sent.
    Sent,
    /// A message received.
    Received,
    /// A message acknowledged.
    Acked,
    /// A message received again after its lease expired.
    Redelivered,
    /// A send refused, for this reason.
    Rejected(&'static str),
}

impl Event {
    fn metric(self) -> &'static str {
        match self {
            Event::Sent => "bus.sent",
            Event::Received => "bus.received",
            Event::Acked => "bus.acked",
            Event::Redelivered => "bus.redelivered",
            Event::Rejected(_) => "bus.rejected",
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    counts: HashMap<(AgentId, Event), u64>,
    latency: Vec<(AgentId, f64)>,
    depth: HashMap<AgentId, u64>,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    layout: Layout,
    emitter: Mutex<Option<Emitter>>,
    totals: Mutex<Totals>,
    published: Mutex<Instant>,
}

/// The bus's counters (one per opened bus; clones share it).
#[derive(Debug)]
pub struct BusCounters {
    shared: Arc<Shared>,
}

/// A thread's unpublished counts.
struct Local {
    owner: u64,
    shared: Weak<Shared>,
    counts: Vec<((AgentId, Event), u64)>,
    /// Samples per agent (an agent's id is not copied per sample).
    latency: Vec<(AgentId, Vec<f64>)>,
    depth: Vec<(AgentId, u64)>,
    ops: u32,
    since: Instant,
}

impl Local {
    fn fold(&mut self) {
        if let Some(s) = self.shared.upgrade() {
            let mut t = s.totals.lock().unwrap_or_else(|e| e.into_inner());
            for (k, n) in self.counts.drain(..) {
                *t.counts.entry(k).or_default() += n;
            }
            let room = MAX_LATENCY_SAMPLES.saturating_sub(t.latency.len());
            let samples = self
                .latency
                .drain(..)
                .flat_map(|(a, ms)| ms.into_iter().map(move |m| (a.clone(), m)));
            t.latency.extend(samples.take(room));
            for (a, d) in self.depth.drain(..) {
                t.depth.insert(a, d);
            }
        }
        self.counts.clear();
        self.latency.clear();
        self.depth.clear();
        self.ops = 0;
        self.since = Instant::now();
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.fold(); // the thread ends: hand its counts over
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

impl BusCounters {
    /// Counters for the bus of `layout`'s root.
    pub fn new(layout: &Layout) -> BusCounters {
        static IDS: AtomicU64 = AtomicU64::new(1);
        BusCounters {
            shared: Arc::new(Shared {
                id: IDS.fetch_add(1, Ordering::Relaxed),
                layout: layout.clone(),
                emitter: Mutex::new(None),
                totals: Mutex::new(Totals::default()),
                published: Mutex::new(Instant::now()),
            }),
        }
    }

    fn with_local(&self, f: impl FnOnce(&mut Local)) {
        let _ = LOCAL.try_with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_none_or(|l| l.owner != self.shared.id) {
                if let Some(mut old) = cell.take() {
                    old.fold();
                }
                *cell = Some(Local {
                    owner: self.shared.id,
                    shared: Arc::downgrade(&self.shared),
                    counts: Vec::new(),
                    latency: Vec::new(),
                    depth: Vec::new(),
                    ops: 0,
                    since: Instant::now(),
                });
            }
            let Some(l) = cell.as_mut() else {
                return;
            };
            f(l);
            l.ops += 1;
            if l.ops.is_multiple_of(256) && l.since.elapsed() >= INTERVAL {
                l.fold();
                drop(cell);
                self.publish(false);
            }
        });
    }

    /// Count `n` events of `agent`.
    pub fn count(&self, agent: &AgentId, event: Event, n: u64) {
        if n == 0 {
            return;
        }
        self.with_local(|l| {
            // The agent of the last operation first: one comparison on the common path.
            if let Some(e) = l
                .counts
                .iter_mut()
                .rev()
                .find(|e| e.0.1 == event && e.0.0 == *agent)
            {
                e.1 += n;
            } else {
                l.counts.push(((agent.clone(), event), n));
            }
        });
    }

    /// What a receive returned: counts, redeliveries, latency samples and the depth left.
    /// `sent_at_us`: each message's send time and delivery count.
    pub fn received(
        &self,
        agent: &AgentId,
        sent_at_us: impl Iterator<Item = (u64, u32)> + Clone,
        now_us: u64,
        depth: Option<u64>,
    ) {
        let (n, redelivered) = sent_at_us
            .clone()
            .fold((0, 0), |(n, r), (_, d)| (n + 1, r + u64::from(d > 1)));
        if n == 0 && depth.is_none() {
            return;
        }
        self.count(agent, Event::Received, n);
        self.count(agent, Event::Redelivered, redelivered);
        self.with_local(|l| {
            let mut room =
                MAX_LATENCY_SAMPLES.saturating_sub(l.latency.iter().map(|e| e.1.len()).sum());
            for (ts, _) in sent_at_us.filter(|&(_, d)| d == 1) {
                if room == 0 {
                    break;
                }
                room -= 1;
                let ms = now_us.saturating_sub(ts) as f64 / 1000.0;
                match l.latency.iter_mut().rev().find(|e| e.0 == *agent) {
                    Some(e) => e.1.push(ms),
                    None => l.latency.push((agent.clone(), vec![ms])),
                }
            }
            if let Some(d) = depth {
                match l.depth.iter_mut().find(|e| e.0 == *agent) {
                    Some(e) => e.1 = d,
                    None => l.depth.push((agent.clone(), d)),
                }
            }
        });
    }

    /// Write records now, in one append (low-frequency events: a coordination round's five
    /// figures), each as (metric, value, unit) with the same tags.
    pub fn record(&self, records: &[(&str, f64, &str)], tags: &[(&str, &str)]) {
        let mut em = self
            .shared
            .emitter
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let emitter = em.get_or_insert_with(|| new_emitter(&self.shared.layout));
        for (metric, value, unit) in records {
            let _ = emitter.emit(metric, *value, unit, tags);
        }
        let _ = emitter.flush();
    }

    /// If the interval passed (or `now`), fold this thread's counts in and write them out.
    pub fn publish(&self, now: bool) {
        self.publish_if(now, Instant::now());
    }

    /// [`BusCounters::publish`] if the interval passed by `now` (a clock reading the caller
    /// has anyway: a receiver calls this before every sleep).
    pub fn publish_at(&self, now: Instant) {
        self.publish_if(false, now);
    }

    fn publish_if(&self, force: bool, now: Instant) {
        let s = &self.shared;
        {
            // Checked first: most of the time there is nothing to do (a thread's counts stay
            // in the thread until the interval ends).
            let mut last = s.published.lock().unwrap_or_else(|e| e.into_inner());
            if !force && now.saturating_duration_since(*last) < INTERVAL {
                return;
            }
            *last = now;
        }
        let _ = LOCAL.try_with(|cell| {
            if let Ok(mut c) = cell.try_borrow_mut()
                && let Some(l) = c.as_mut().filter(|l| l.owner == self.shared.id)
            {
                l.fold();
            }
        });
        let t = std::mem::take(&mut *s.totals.lock().unwrap_or_else(|e| e.into_inner()));
        if t.counts.is_empty() && t.latency.is_empty() && t.depth.is_empty() {
            return;
        }
        let mut em = s.emitter.lock().unwrap_or_else(|e| e.into_inner());
        let emitter = em.get_or_insert_with(|| new_emitter(&s.layout));
        for ((agent, event), n) in &t.counts {
            let a = agent.as_str();
            let _ = match event {
                Event::Rejected(reason) => emitter.emit(
                    event.metric(),
                    *n as f64,
                    "count",
                    &[("agent", a), ("reason", reason)],
                ),
                _ => emitter.emit(event.metric(), *n as f64, "count", &[("agent", a)]),
            };
        }
        for (agent, ms) in &t.latency {
            let _ = emitter.emit("bus.latency", *ms, "ms", &[("agent", agent.as_str())]);
        }
        for (agent, d) in &t.depth {
            let _ = emitter.emit(
                "coordination.queue_depth",
                *d as f64,
                "count",
                &[("agent", agent.as_str())],
            );
        }
        let _ = emitter.flush();
    }
}

impl Drop for BusCounters {
    fn drop(&mut self) {
        self.publish(true);
    }
}

/// The emitter of the bus's records: flushed by its owner, no background thread (a `shoal
/// send` process must not pay for starting one).
fn new_emitter(layout: &Layout) -> Emitter {
    let agent = std::env::var("SHOAL_AGENT_ID").ok();
    Emitter::new(
        layout,
        agent.as_deref(),
        MetricsOptions {
            flusher: false,
            ..MetricsOptions::default()
        },
    )
}

/// The reason a send was refused, as the `reason` tag of `bus.rejected`.
pub fn reject_reason(e: &crate::store::SendError) -> &'static str {
    use crate::store::SendError as E;
    match e {
        E::UnknownRecipient(_) => "unknown_recipient",
        E::InvalidPayload(_) => "invalid_payload",
        E::InvalidType(_) => "invalid_type",
        E::QuotaExceeded { .. } => "quota",
        E::StoreFull { .. } => "store_full",
        E::TooManySenders { .. } => "too_many_senders",
        E::Io { .. } => "io",
    }
}
