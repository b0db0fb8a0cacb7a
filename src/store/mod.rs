//! Inbox stores: the on-disk layouts behind one trait.
//!
//! [`Store`] is what the bus programs against. [`JsonlStore`] (sharded JSONL inboxes) is the
//! recommended implementation; a second layout, one file per message as the bash bus wrote
//! them, implements the same trait, and one conformance suite runs against both.
//!
//! # Delivery model
//!
//! At-least-once. A received message is *leased* to the receiver until it is acknowledged; a
//! lease that expires makes the message deliverable again, with its delivery count raised by one.
//! Acknowledged bytes are reclaimed. A send over the inbox quota fails; nothing is evicted.

pub mod compat;
pub mod jsonl;
pub(crate) mod meta;
pub(crate) mod slots;

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::envelope::{AgentId, Draft, Envelope, InvalidType, PayloadError};
use crate::wake::WakeTarget;

pub use compat::CompatStore;
pub use jsonl::JsonlStore;

/// Per-agent settings fixed when the agent is created (and updatable by re-running `init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentSettings {
    /// Shard files in the inbox.
    pub shards: u32,
    /// Quota: most unconsumed messages.
    pub quota_msgs: u64,
    /// Quota: most unconsumed bytes.
    pub quota_bytes: u64,
}

/// The result of a successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message id, as printed by `shoal send`.
    pub id: String,
    /// Its per-(from, to) sequence number.
    pub seq: u64,
}

/// Which messages a receive hands out: only those for which the function returns `true`;
/// the others are left as they are, for a later receive.
#[derive(Clone, Copy)]
pub struct Filter<'a>(pub &'a (dyn Fn(&Envelope) -> bool + Sync));

impl std::fmt::Debug for Filter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filter(..)")
    }
}

/// What to receive.
#[derive(Debug, Clone, Copy)]
pub struct RecvRequest<'a> {
    /// At most this many messages.
    pub max: usize,
    /// Lease length: unacknowledged messages are delivered again after it.
    pub lease: Duration,
    /// Hand out only matching messages (a reply, a barrier's release, ...).
    pub filter: Option<Filter<'a>>,
}

/// Messages handed out by one receive.
#[derive(Debug, Default)]
pub struct Batch {
    /// Envelopes, oldest first, each with `delivery` set.
    pub messages: Vec<Envelope>,
    /// Lines that were not valid envelopes and were skipped (and counted as consumed).
    pub corrupt: u64,
    /// Routed messages dropped as duplicates of ones already delivered (see [`Dedup`]).
    pub duplicates: u64,
    /// Milliseconds since the epoch at which the earliest outstanding lease expires, if any:
    /// a waiting receiver must look again by then even if nothing new arrives.
    pub next_expiry_ms: Option<u64>,
}

/// Which messages to acknowledge.
#[derive(Debug, Clone, Copy)]
pub enum AckTarget<'a> {
    /// These message ids.
    Ids(&'a [String]),
    /// Every message delivered and not yet acknowledged.
    AllDelivered,
}

/// The result of an acknowledgement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Messages acknowledged.
    pub acked: usize,
    /// Ids that were not outstanding (never delivered, already acknowledged, or unknown).
    pub unknown: Vec<String>,
}

/// How full an inbox is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Messages stored and not yet acknowledged.
    pub msgs: u64,
    /// Bytes not yet reclaimed.
    pub bytes: u64,
}

/// What removing an agent discarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Unacknowledged messages that were in its inbox.
    pub inbox: u64,
    /// Messages it had sent.
    pub sent: u64,
}

/// Why a send failed. The message was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No agent with that id (run `shoal init` first).
    #[error("unknown recipient {0}: no such agent (create it with `shoal init {0}`)")]
    UnknownRecipient(AgentId),
    /// The payload was rejected.
    #[error(transparent)]
    InvalidPayload(#[from] PayloadError),
    /// The message type was rejected.
    #[error(transparent)]
    InvalidType(#[from] InvalidType),
    /// The recipient's inbox is at its quota; consume (and ack) messages, or raise the quota.
    #[error(
        "inbox of {to} is full: {pending_msgs} messages / {pending_bytes} bytes unconsumed, quota \
         {quota_msgs} messages / {quota_bytes} bytes; nothing was evicted, retry later"
    )]
    QuotaExceeded {
        /// The recipient.
        to: AgentId,
        /// Unconsumed messages now.
        pending_msgs: u64,
        /// Unconsumed bytes now.
        pending_bytes: u64,
        /// Quota in messages.
        quota_msgs: u64,
        /// Quota in bytes.
        quota_bytes: u64,
    },
    /// The filesystem is full (`ENOSPC`). Nothing partial was left; stored messages are intact.
    #[error("{path}: no space left on device; message not sent (stored messages are intact)", path = .path.display())]
    StoreFull {
        /// The file that could not grow.
        path: PathBuf,
    },
    /// The recipient has had messages from more distinct senders than its sequence table holds.
    #[error(
        "inbox of {to} tracks sequence numbers for at most {capacity} distinct senders; {from} would exceed it"
    )]
    TooManySenders {
        /// The recipient.
        to: AgentId,
        /// The new sender.
        from: AgentId,
        /// Table capacity.
        capacity: usize,
    },
    /// Any other I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Why receiving, acknowledging or inspecting an inbox failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// No agent with that id.
    #[error("unknown agent {0}: no such inbox (create it with `shoal init {0}`)")]
    UnknownAgent(AgentId),
    /// The receiver state file could not be understood.
    #[error("{path}: corrupt receiver state: {detail}", path = .path.display())]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The filesystem is full; the receiver state could not be saved, nothing was handed out.
    #[error("{path}: no space left on device (nothing was delivered or acknowledged)", path = .path.display())]
    StoreFull {
        /// The file that could not be written.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Why creating or removing an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The filesystem is full.
    #[error("{path}: no space left on device", path = .path.display())]
    StoreFull {
        /// The path concerned.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl AgentError {
    /// A mapper from an I/O error at `path`; the path is only copied if an error happens.
    pub(crate) fn at<P: AsRef<std::path::Path>>(path: P) -> impl FnOnce(io::Error) -> AgentError {
        move |source| {
            let path = path.as_ref().to_owned();
            if crate::sys::is_no_space(&source) {
                AgentError::StoreFull { path }
            } else {
                AgentError::Io { path, source }
            }
        }
    }
}

impl RecvError {
    /// A mapper from an I/O error at `path`; the path is only copied if an error happens.
    pub(crate) fn at<P: AsRef<std::path::Path>>(path: P) -> impl FnOnce(io::Error) -> RecvError {
        move |source| {
            let path = path.as_ref().to_owned();
            if crate::sys::is_no_space(&source) {
                RecvError::StoreFull { path }
            } else {
                RecvError::Io { path, source }
            }
        }
    }
}

impl SendError {
    /// A mapper from an I/O error at `path`; the path is only copied if an error happens.
    pub(crate) fn at<P: AsRef<std::path::Path>>(path: P) -> impl FnOnce(io::Error) -> SendError {
        move |source| {
            let path = path.as_ref().to_owned();
            if crate::sys::is_no_space(&source) {
                SendError::StoreFull { path }
            } else {
                SendError::Io { path, source }
            }
        }
    }
}

/// An inbox layout. Every method is safe to call from many threads and many processes at once.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Create an agent and its empty inbox. Returns `false` if it already existed (its quota is
    /// then updated to `settings`, its messages untouched).
    ///
    /// # Errors
    /// [`AgentError`].
    fn create_agent(&self, id: &AgentId, settings: &AgentSettings) -> Result<bool, AgentError>;

    /// Whether the agent exists.
    fn agent_exists(&self, id: &AgentId) -> bool;

    /// Remove an agent and everything in its inbox. `None` if it did not exist.
    ///
    /// # Errors
    /// [`AgentError`].
    fn remove_agent(&self, id: &AgentId) -> Result<Option<Removed>, AgentError>;

    /// All agents, sorted.
    ///
    /// # Errors
    /// [`AgentError`].
    fn agents(&self) -> Result<Vec<AgentId>, AgentError>;

    /// Store one message in `draft.to`'s inbox, giving it the next sequence number of
    /// (`draft.from`, `draft.to`).
    ///
    /// # Errors
    /// [`SendError`]; the message is not stored.
    fn append(&self, draft: Draft<'_>) -> Result<Receipt, SendError>;

    /// Lease up to `req.max` deliverable messages (new ones, and ones whose lease expired),
    /// oldest first. Returns an empty batch when there are none; never blocks. Counts as a
    /// heartbeat (see [`Store::heartbeat`]).
    ///
    /// # Errors
    /// [`RecvError`]; nothing is leased.
    fn receive(&self, id: &AgentId, req: &RecvRequest<'_>) -> Result<Batch, RecvError>;

    /// Receive and handle in one step: `handle` runs on the selected messages while the
    /// receiver lock is held; if it returns `true` they are acknowledged in the same state
    /// update (one save instead of a lease and an acknowledgement), else they stay leased. If
    /// the process dies inside `handle`, nothing was recorded and the messages are delivered
    /// again at once. `handle` may send messages (never to take this inbox's receiver lock).
    ///
    /// # Errors
    /// [`RecvError`]; if it fails after `handle` returned `true`, the messages were handled
    /// but not acknowledged, and will be delivered again.
    fn consume(
        &self,
        id: &AgentId,
        req: &RecvRequest<'_>,
        handle: &mut dyn FnMut(&[Envelope]) -> bool,
    ) -> Result<Batch, RecvError>;

    /// Hold the inbox's receiver lock for as long as this process lives: for a long-running
    /// consumer that owns its inbox (an agent's own loop, a hub). Each receive then skips
    /// taking the lock. Other processes receiving from this inbox wait until this one exits.
    ///
    /// # Errors
    /// [`RecvError`].
    fn own_receiver(&self, id: &AgentId) -> Result<(), RecvError>;

    /// Make every outstanding lease of the inbox expire now, so its messages can be delivered
    /// again at once. For the inbox's only consumer taking over from a dead predecessor (a
    /// restarted hub): it knows the old leases are held by no one. Returns how many.
    ///
    /// # Errors
    /// [`RecvError`].
    fn expire_leases(&self, id: &AgentId) -> Result<usize, RecvError>;

    /// Acknowledge messages: they are never delivered again and their space is reclaimed.
    ///
    /// # Errors
    /// [`RecvError`].
    fn ack(&self, id: &AgentId, target: AckTarget<'_>) -> Result<AckReport, RecvError>;

    /// Every unacknowledged message (leased or not), oldest first, without leasing any; remembers
    /// what it returned for [`Store::clear`]. The bash bus's `receive`.
    ///
    /// # Errors
    /// [`RecvError`].
    fn peek_all(&self, id: &AgentId) -> Result<Vec<Envelope>, RecvError>;

    /// Acknowledge exactly what the last [`Store::peek_all`] returned, or everything stored now
    /// if there was none. Returns how many messages were removed. The bash bus's `clear`.
    ///
    /// # Errors
    /// [`RecvError`].
    fn clear(&self, id: &AgentId) -> Result<u64, RecvError>;

    /// Unacknowledged messages and bytes in the inbox.
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`] if there is no such agent.
    fn depth(&self, id: &AgentId) -> Result<Depth, RecvError>;

    /// How many messages the agent has sent (the bash bus's `count <id> outbox`).
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`] if there is no such agent.
    fn sent_count(&self, id: &AgentId) -> Result<u64, RecvError>;

    /// What a receiver waits on to learn of new messages.
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`] if there is no such agent.
    fn wake_target(&self, id: &AgentId) -> Result<WakeTarget, RecvError>;

    /// Record that the agent is alive and working now (its sends are recorded by
    /// [`Store::append`], its receives by [`Store::receive`] and [`Store::consume`]; the bus
    /// calls this on every acknowledgement).
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`] if there is no such agent.
    fn heartbeat(&self, id: &AgentId) -> Result<(), RecvError>;

    /// When the agent last did something, and since when messages wait for it.
    ///
    /// # Errors
    /// [`RecvError::UnknownAgent`] if there is no such agent.
    fn activity(&self, id: &AgentId) -> Result<Activity, RecvError>;
}

/// A supervisor's view of one agent's meta table: its activity and pending messages, read from
/// a shared mapping that holds no file descriptor once opened. Either layout.
#[derive(Debug)]
pub struct Probe {
    words: std::sync::Arc<crate::sys::shared::SharedWords>,
    shards: usize,
}

impl Probe {
    /// Map agent `id`'s meta table; `None` if there is no such agent.
    ///
    /// # Errors
    /// The meta file cannot be opened or is not one.
    pub fn open(layout: &crate::layout::Layout, id: &AgentId) -> io::Result<Option<Probe>> {
        Ok(meta::Meta::open(&layout.meta(id))?.map(|m| {
            let (words, shards) = m.words();
            Probe { words, shards }
        }))
    }

    /// As [`Store::activity`].
    pub fn activity(&self) -> Activity {
        Activity::from_words(meta::activity_of(&self.words))
    }

    /// Messages stored and not acknowledged, from the table's counters (exact for the JSONL
    /// layout; in the compat layout files a script removed itself are still counted).
    pub fn pending(&self) -> Depth {
        let (msgs, bytes) = meta::pending_of(&self.words, self.shards);
        Depth { msgs, bytes }
    }
}

/// An agent's recent activity, from its meta table (see [`Store::activity`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Its last send, receive, acknowledgement or heartbeat, in ms since the epoch.
    pub last_ms: Option<u64>,
    /// When the first message arrived after that, in ms since the epoch.
    pub waiting_since_ms: Option<u64>,
    /// Whether a receiver is asleep on its doorbell now (a waiting agent, ready to receive).
    pub asleep: bool,
}

impl Activity {
    pub(crate) fn from_meta(m: &meta::Meta) -> Activity {
        Activity::from_words(m.activity())
    }

    fn from_words((last, since, sleepers): (u64, u64, u32)) -> Activity {
        Activity {
            last_ms: (last != 0).then_some(last),
            waiting_since_ms: (since != 0).then_some(since),
            asleep: sleepers != 0,
        }
    }

    /// Whether an agent with `depth` waiting is stalled at `now_ms`: messages wait and it has
    /// done nothing for `after` since the later of its last activity and the first of them
    /// arriving. (An agent idle for an hour whose first message arrived a second ago is not
    /// stalled; one that took a message and went quiet is, once `after` passes.)
    pub fn stalled(&self, depth: &Depth, now_ms: u64, after: Duration) -> bool {
        let clock = self
            .last_ms
            .unwrap_or(0)
            .max(self.waiting_since_ms.unwrap_or(0));
        depth.msgs > 0 && now_ms.saturating_sub(clock) > after.as_millis() as u64
    }

    /// Milliseconds since the last activity at `now_ms` (`None`: never active).
    pub fn idle_ms(&self, now_ms: u64) -> Option<u64> {
        self.last_ms.map(|t| now_ms.saturating_sub(t))
    }
}

/// FNV-1a, for the small per-process maps keyed by agent id on the send path (SipHash's
/// flood resistance buys nothing for ids this process chose to talk to).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A `HashMap` keyed by agent id, hashed with [`Fnv`].
pub(crate) type IdMap<V> =
    std::collections::HashMap<AgentId, V, std::hash::BuildHasherDefault<Fnv>>;

/// The shard a sender's messages to one recipient go to: FNV-1a of the sender id, modulo the
/// shard count. Stable across processes and versions, so one (from, to) pair always shares one
/// shard and one lock, which is what keeps its messages in order.
pub fn shard_of(from: &AgentId, shards: u32) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in from.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as usize
}

/// What a receiver has had of forwarded messages, to drop the duplicates that at-least-once
/// forwarding by hubs can produce (a hub restarted after forwarding a message but before
/// acknowledging it forwards it again). Messages a sender wrote straight into the inbox
/// (`route` absent or naming only the sender) are never repeated by the store and not tracked.
///
/// * A routed point-to-point message keeps the sequence number it got from its sender for its
///   recipient, and one (from, to) pair always travels one path in order; so a routed message
///   whose sequence is not above the highest one delivered in order for its pair is a
///   duplicate. The key is the pair, `<from>/<to>` (no agent id contains `/`): a hub forwarding
///   one sender's messages to several recipients sees several sequences from that sender.
/// * A filtered receive can deliver a message while an older one of the same pair is left in
///   the inbox: the high-water mark then stays below the one left, and the message delivered
///   ahead of it is remembered by sequence until the mark passes it.
/// * Copies of a broadcast carry the broadcast's id: the last ids seen are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dedup {
    /// Highest routed sequence delivered, per pair, with every lower one delivered too.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub routed: std::collections::BTreeMap<String, u64>,
    /// Routed sequences delivered above the high-water mark (ahead of an older message
    /// still waiting), per pair.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ahead: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
    /// Ids of the last broadcast copies delivered.
    #[serde(default, skip_serializing_if = "std::collections::VecDeque::is_empty")]
    pub fanouts: std::collections::VecDeque<String>,
}

/// Broadcast ids remembered per receiver. A hub writes a copy again only for broadcasts it had
/// not acknowledged when it died: those it was fanning out and the requests of rounds still
/// collecting, normally one or two. Every id is written with each state save, so the memory
/// is what every receive of a broadcast pays for: an echo agent answering a round's request
/// ran 52k instructions per message keeping 64 ids, 30k keeping 16, against 17k for a plain
/// request (`scripts/echo-footprint.sh --hybrid`); 21.6k against 14.6k since strings are
/// checked for escapes a word at a time, 19.8k against 12.7k with the compact state (v2).
/// Past it, a copy written again is delivered twice, never dropped.
const FANOUT_MEMORY: usize = 16;
/// Sequences delivered ahead remembered per pair (the oldest are forgotten past this).
const AHEAD_MEMORY: usize = 4096;

impl Dedup {
    /// Whether `e` duplicates a forwarded message already delivered; if not, remember it as
    /// delivered. `older_waiting`: a routed message of the same pair with a lower sequence is
    /// still in the inbox, undelivered (a filter left it).
    pub fn seen(&mut self, e: &Envelope, older_waiting: bool) -> bool {
        if !forwarded(e) {
            return false; // written by its sender: the store never duplicates those
        }
        let Some((key, seq)) = Dedup::key(e) else {
            // A broadcast copy: by id.
            if self.fanouts.iter().any(|id| *id == e.id) {
                return true;
            }
            if self.fanouts.len() >= FANOUT_MEMORY {
                let extra = self.fanouts.len() + 1 - FANOUT_MEMORY;
                self.fanouts.drain(..extra);
            }
            self.fanouts.push_back(e.id.clone());
            return false;
        };
        let key = key.as_str();
        let hw = self.routed.get(key).copied().unwrap_or(0);
        if seq <= hw {
            return true;
        }
        if let Some(ahead) = self.ahead.get_mut(key) {
            if ahead.contains(&seq) {
                return true;
            }
            if older_waiting {
                if ahead.len() == AHEAD_MEMORY {
                    ahead.pop_first();
                }
                ahead.insert(seq);
                return false;
            }
            ahead.retain(|&s| s > seq);
            if ahead.is_empty() {
                self.ahead.remove(key);
            }
        } else if older_waiting {
            self.ahead.entry(key.to_owned()).or_default().insert(seq);
            return false;
        }
        match self.routed.get_mut(key) {
            Some(hw) => *hw = seq,
            None => {
                self.routed.insert(key.to_owned(), seq);
            }
        }
        false
    }

    /// What [`Dedup::seen`] tracks `e` by, if by sequence: its pair's key and its sequence.
    /// `None` for a message written by its sender, and for a broadcast copy (tracked by id).
    pub fn key(e: &Envelope) -> Option<(String, u64)> {
        if !forwarded(e) || e.fanout.is_some() {
            return None;
        }
        let mut key = String::with_capacity(e.from.len() + 1 + e.to.len());
        key.push_str(&e.from);
        key.push('/');
        key.push_str(&e.to);
        Some((key, e.seq))
    }
}

/// Whether a hub wrote `e` (it names more than its sender in `route`).
fn forwarded(e: &Envelope) -> bool {
    e.route.as_ref().is_some_and(|r| r.len() > 1)
}

/// The routed messages one receive left in the inbox (its filter did not want them): the
/// lowest sequence per [`Dedup::key`], for [`Dedup::seen`]'s `older_waiting`.
#[derive(Debug, Default)]
pub(crate) struct LeftBehind(Vec<(String, u64)>);

impl LeftBehind {
    /// `e` stays in the inbox.
    pub(crate) fn note(&mut self, e: &Envelope) {
        let Some((key, seq)) = Dedup::key(e) else {
            return;
        };
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, s)) => *s = (*s).min(seq),
            None => self.0.push((key, seq)),
        }
    }

    /// Whether an older message of `e`'s pair was left.
    pub(crate) fn older_than(&self, e: &Envelope) -> bool {
        if self.0.is_empty() {
            return false;
        }
        Dedup::key(e).is_some_and(|(key, seq)| self.0.iter().any(|(k, s)| *k == key && *s < seq))
    }
}

/// `mkdir` mode 0700 exactly, whatever the umask.
pub(crate) fn mkdir_private(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(0o700).create(path)?;
    crate::sys::set_mode(&File::open(path)?, 0o700)
}

/// Create an empty file mode 0600 exactly; fails if it exists.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    crate::sys::set_mode(&f, 0o600)?;
    Ok(f)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    crate::envelope::now_micros() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(from: &str, seq: u64) -> Envelope {
        let line = format!(
            r#"{{"v":1,"id":"msg-1-{seq}","from":"{from}","to":"b","type":"t","seq":{seq},"ts":1,"route":["{from}","hub"],"payload":0}}"#
        );
        Envelope::parse(line.as_bytes()).unwrap()
    }

    #[test]
    fn dedup_drops_copies_in_order_and_ahead_and_forgets_past_its_memory() {
        let mut d = Dedup::default();
        assert!(!d.seen(&routed("a", 1), false));
        assert!(d.seen(&routed("a", 1), false), "a copy of a delivered one");
        // 3 delivered while 2 waits: the mark stays at 1.
        assert!(!d.seen(&routed("a", 3), true));
        assert!(!d.seen(&routed("a", 2), false), "the one left is still new");
        assert!(
            d.seen(&routed("a", 3), false),
            "a copy of the one delivered ahead"
        );
        assert!(!d.seen(&routed("a", 4), false));
        assert_eq!(d.routed["a/b"], 4);
        assert!(
            !d.ahead.contains_key("a/b"),
            "passed by the mark: forgotten"
        );
        // Sequences delivered ahead are remembered up to AHEAD_MEMORY per sender.
        let base = 10;
        for k in 0..=AHEAD_MEMORY as u64 {
            assert!(!d.seen(&routed("a", base + 1 + k), true));
        }
        assert_eq!(d.ahead["a/b"].len(), AHEAD_MEMORY);
        assert!(
            !d.seen(&routed("a", base + 1), false),
            "the oldest was forgotten"
        );
        assert!(d.seen(&routed("a", base + 2), false));
    }

    fn copy(from: &str, hub: &str, id: u64) -> Envelope {
        let line = format!(
            r#"{{"v":1,"id":"msg-1-{id}","from":"{from}","to":"b","type":"t","seq":{id},"ts":1,"route":["{from}","{hub}"],"fanout":"t","payload":0}}"#
        );
        Envelope::parse(line.as_bytes()).unwrap()
    }

    #[test]
    fn dedup_drops_broadcast_copies_by_id_within_its_memory() {
        let mut d = Dedup::default();
        assert!(!d.seen(&copy("c", "h1", 1), false));
        assert!(d.seen(&copy("c", "h1", 1), false), "written again");
        assert!(
            d.seen(&copy("c", "h2", 1), false),
            "same broadcast, another hub"
        );
        for id in 2..=FANOUT_MEMORY as u64 + 1 {
            assert!(!d.seen(&copy("c", "h1", id), false));
        }
        assert_eq!(d.fanouts.len(), FANOUT_MEMORY);
        assert!(
            !d.seen(&copy("c", "h1", 1), false),
            "forgotten: delivered again"
        );
        assert!(d.routed.is_empty() && d.ahead.is_empty());
        // A state saved by a build that kept more ids shrinks back to the memory.
        d.fanouts.extend((100..164).map(|i| format!("msg-1-{i}")));
        assert!(!d.seen(&copy("c", "h1", 500), false));
        assert_eq!(d.fanouts.len(), FANOUT_MEMORY);
        assert_eq!(d.fanouts.back().unwrap(), "msg-1-500");
    }

    /// A hub forwarding one sender's messages to two of its members sees two sequences from
    /// that sender, one per recipient: neither may pass for a copy of the other.
    #[test]
    fn dedup_keys_routed_messages_by_pair() {
        let to = |to: &str, seq: u64| {
            let line = format!(
                r#"{{"v":1,"id":"msg-2-{to}{seq}","from":"a","to":"{to}","type":"t","seq":{seq},"ts":1,"route":["a","hub"],"payload":0}}"#
            );
            Envelope::parse(line.as_bytes()).unwrap()
        };
        let mut d = Dedup::default();
        for seq in 1..=3 {
            assert!(!d.seen(&to("x", seq), false));
        }
        assert!(!d.seen(&to("y", 1), false), "y's first, not x's");
        assert!(d.seen(&to("x", 2), false));
        assert_eq!(d.routed["a/x"], 3);
        assert_eq!(d.routed["a/y"], 1);
    }

    #[test]
    fn dedup_ignores_what_a_sender_wrote_itself() {
        let mut d = Dedup::default();
        let line = r#"{"v":1,"id":"msg-1-1","from":"a","to":"hub","type":"t","seq":5,"ts":1,"route":["a"],"fanout":"t","payload":0}"#;
        let e = Envelope::parse(line.as_bytes()).unwrap();
        assert!(!d.seen(&e, false));
        assert!(
            !d.seen(&e, false),
            "never repeated by the store: not tracked"
        );
        assert_eq!(d, Dedup::default(), "nothing kept for it");
    }
}
