//! The receiver's state: per shard, a read cursor and the leases of delivered, unacknowledged
//! messages. Pure bookkeeping, no I/O, so it can be property-tested.
//!
//! # Format (in `state.0` / `state.1`, version 1)
//!
//! ```text
//! {"v":1,"shards":[{"read":4096,"acked_msgs":17,"punched":0,
//!   "leases":[{"off":3890,"len":206,"id":"msg-...","ts":1795310779123456,"n":1,"until":1795310809123}]}],
//!  "snapshot":[4096,0,0,0,0,0,0,0]}
//! ```
//!
//! `snapshot`, when present, holds the shard ends the last `receive` (the bash bus's verb) read
//! up to: `clear` acknowledges exactly the messages before them.
//!
//! Invariant, per shard: every message before `read` was delivered at least once; of those, the
//! ones with a lease are unacknowledged and all others are acknowledged. So the acknowledged
//! prefix ends at the first lease (or at `read`), and offsets only grow: reclaimed space is
//! released by punching holes below that prefix, never by moving data.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::store::meta::{Meta, ShardField};
use crate::store::slots::SlotState;
use crate::store::{AckReport, RecvError};

/// Receiver state format version.
pub(crate) const STATE_VERSION: u32 = 1;

/// All of one inbox's receiver state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecvState {
    pub(crate) v: u32,
    pub(crate) shards: Vec<ShardCursor>,
    /// Shard ends read by the last `receive`, for `clear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<Vec<u64>>,
}

/// One shard's cursor and leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShardCursor {
    /// Offset past the last message delivered (or acknowledged without delivery by `clear`).
    pub(crate) read: u64,
    /// Messages acknowledged in this shard, ever.
    pub(crate) acked_msgs: u64,
    /// Bytes at the start of the shard already released (hole punched).
    #[serde(default)]
    pub(crate) punched: u64,
    /// Delivered, unacknowledged messages, sorted by offset.
    #[serde(default)]
    pub(crate) leases: Vec<Lease>,
}

/// A delivered, unacknowledged message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    /// Offset of the record in the shard.
    pub(crate) off: u64,
    /// Length of the record, newline included.
    pub(crate) len: u64,
    /// Message id.
    pub(crate) id: String,
    /// The message's send time (orders redeliveries with new messages).
    pub(crate) ts: u64,
    /// Deliveries so far.
    pub(crate) n: u32,
    /// When the lease expires, milliseconds since the epoch.
    pub(crate) until: u64,
}

impl ShardCursor {
    /// End of the acknowledged prefix.
    pub(crate) fn acked_prefix(&self) -> u64 {
        self.leases.first().map_or(self.read, |l| l.off)
    }

    /// Record the delivery of a new message at `off..off+len`.
    pub(crate) fn lease_new(&mut self, off: u64, len: u64, id: String, ts: u64, until: u64) {
        debug_assert!(off >= self.read, "new message behind the read cursor");
        self.leases.push(Lease {
            off,
            len,
            id,
            ts,
            n: 1,
            until,
        });
        self.read = off + len;
    }

    /// Step over a line that is not a message (counted as consumed).
    pub(crate) fn skip_line(&mut self, off: u64, len: u64) {
        debug_assert!(off >= self.read);
        self.read = off + len;
        self.acked_msgs += 1;
    }

    /// Acknowledge every message before `end`: leased ones, and `unread` messages between
    /// `read` and `end` that were never delivered. Returns how many were acknowledged.
    pub(crate) fn ack_below(&mut self, end: u64, unread: u64) -> u64 {
        let before = self.leases.len();
        self.leases.retain(|l| l.off >= end);
        let n = (before - self.leases.len()) as u64 + if end > self.read { unread } else { 0 };
        self.read = self.read.max(end);
        self.acked_msgs += n;
        n
    }
}

impl RecvState {
    /// Fresh state for `shards` shards.
    pub(crate) fn new(shards: usize) -> RecvState {
        RecvState {
            v: STATE_VERSION,
            shards: vec![ShardCursor::default(); shards],
            snapshot: None,
        }
    }

    /// Earliest lease expiry.
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.shards
            .iter()
            .flat_map(|s| s.leases.iter().map(|l| l.until))
            .min()
    }

    /// Leases whose time is up at `now_ms`, as (shard, index), oldest message first.
    pub(crate) fn expired(&self, now_ms: u64) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = self
            .shards
            .iter()
            .enumerate()
            .flat_map(|(s, c)| {
                c.leases
                    .iter()
                    .enumerate()
                    .filter(move |(_, l)| l.until <= now_ms)
                    .map(move |(i, _)| (s, i))
            })
            .collect();
        out.sort_by_key(|&(s, i)| (self.shards[s].leases[i].ts, s, self.shards[s].leases[i].off));
        out
    }

    /// Acknowledge the messages with these ids.
    pub(crate) fn ack_ids(&mut self, ids: &[String]) -> AckReport {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut found: HashSet<String> = HashSet::new();
        for c in &mut self.shards {
            let before = c.leases.len();
            c.leases.retain(|l| {
                if wanted.contains(l.id.as_str()) && !found.contains(&l.id) {
                    found.insert(l.id.clone());
                    false
                } else {
                    true
                }
            });
            c.acked_msgs += (before - c.leases.len()) as u64;
        }
        let mut unknown: Vec<String> = Vec::new();
        for id in ids {
            if !found.contains(id) && !unknown.contains(id) {
                unknown.push(id.clone());
            }
        }
        AckReport {
            acked: found.len(),
            unknown,
        }
    }

    /// Acknowledge every delivered message.
    pub(crate) fn ack_all(&mut self) -> usize {
        let mut n = 0;
        for c in &mut self.shards {
            n += c.leases.len();
            c.acked_msgs += c.leases.len() as u64;
            c.leases.clear();
        }
        n
    }
}

impl SlotState for RecvState {
    fn fresh(meta: &Meta) -> Self {
        RecvState::new(meta.shards())
    }

    fn checked(mut self, meta: &Meta, path: &Path) -> Result<Self, RecvError> {
        let shards = meta.shards();
        let bad = |detail: String| RecvError::CorruptState {
            path: path.to_owned(),
            detail,
        };
        if self.v > STATE_VERSION {
            return Err(bad(format!(
                "state version {} is newer than {STATE_VERSION}",
                self.v
            )));
        }
        if self.shards.len() > shards {
            return Err(bad(format!(
                "{} shards in state, {shards} in the inbox",
                self.shards.len()
            )));
        }
        self.shards.resize_with(shards, Default::default);
        Ok(self)
    }

    /// Mirror the acknowledged prefix and count of each shard (for quotas and `count`).
    fn publish(&self, meta: &Meta) {
        for (s, c) in self.shards.iter().enumerate().take(meta.shards()) {
            meta.shard(s, ShardField::AckedBytes)
                .store(c.acked_prefix(), Ordering::Release);
            meta.shard(s, ShardField::AckedMsgs)
                .store(c.acked_msgs, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A model: each message is (shard, off, len, id); the state must agree with a plain set.
    #[derive(Debug, Clone)]
    enum Op {
        Deliver(usize, usize),
        AckId(usize),
        AckAll,
        Clear(usize, usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0usize..3, 1usize..5).prop_map(|(s, k)| Op::Deliver(s, k)),
                (0usize..40).prop_map(Op::AckId),
                Just(Op::AckAll),
                (0usize..3, 0usize..13).prop_map(|(s, k)| Op::Clear(s, k)),
            ],
            0..60,
        )
    }

    proptest! {
        /// Cursor arithmetic: the acknowledged prefix never passes an unacknowledged message,
        /// acked_msgs counts each message once, and read never moves backwards.
        #[test]
        fn cursors_agree_with_a_model(ops in ops()) {
            const PER_SHARD: usize = 12;
            let rec_len = 10u64;
            let mut st = RecvState::new(3);
            // Model: per message (shard, k): state 0 = unread, 1 = leased, 2 = acked.
            let mut model = [[0u8; PER_SHARD]; 3];
            let id = |s: usize, k: usize| format!("m{s}-{k}");
            for op in ops {
                match op {
                    Op::Deliver(s, n) => {
                        for _ in 0..n {
                            let k = (st.shards[s].read / rec_len) as usize;
                            if k >= PER_SHARD { break; }
                            st.shards[s].lease_new(k as u64 * rec_len, rec_len, id(s, k), k as u64, 0);
                            model[s][k] = 1;
                        }
                    }
                    Op::AckId(x) => {
                        let (s, k) = (x % 3, x / 3 % PER_SHARD);
                        let r = st.ack_ids(&[id(s, k)]);
                        let was_leased = model[s][k] == 1;
                        prop_assert_eq!(r.acked, usize::from(was_leased));
                        if was_leased { model[s][k] = 2; }
                    }
                    Op::AckAll => {
                        let leased = model.iter().flatten().filter(|&&m| m == 1).count();
                        prop_assert_eq!(st.ack_all(), leased);
                        for m in model.iter_mut().flatten() { if *m == 1 { *m = 2; } }
                    }
                    Op::Clear(s, k) => {
                        let end = k as u64 * rec_len;
                        let read_k = (st.shards[s].read / rec_len) as usize;
                        let unread = k.saturating_sub(read_k) as u64;
                        let expect = model[s][..k].iter().filter(|&&m| m != 2).count() as u64;
                        let before = st.shards[s].read;
                        prop_assert_eq!(st.shards[s].ack_below(end, unread), expect);
                        prop_assert!(st.shards[s].read >= before);
                        for m in &mut model[s][..k] { *m = 2; }
                    }
                }
                for (s, c) in st.shards.iter().enumerate() {
                    let acked = model[s].iter().filter(|&&m| m == 2).count() as u64;
                    prop_assert_eq!(c.acked_msgs, acked);
                    let first_unacked = model[s].iter().position(|&m| m != 2).unwrap_or(PER_SHARD) as u64 * rec_len;
                    prop_assert_eq!(c.acked_prefix(), first_unacked.min(c.read));
                    prop_assert!(c.leases.windows(2).all(|w| w[0].off < w[1].off));
                }
            }
        }
    }
}
