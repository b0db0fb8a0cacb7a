//! The receiver's state: per shard, a read cursor and the leases of delivered, unacknowledged
//! messages. Pure bookkeeping, no I/O, so it can be property-tested.
//!
//! # Format (in `state.0` / `state.1`, version 2)
//!
//! ```text
//! {"v":2,"shards":[{"read":4096,"acked_msgs":17,
//!   "leases":[{"off":3890,"len":206,"id":"msg-...","ts":1795310779123456,"n":1,"until":1795310809123}]},{}],
//!  "snapshot":[4096,0,0,0,0,0,0,0]}
//! ```
//!
//! A shard cursor leaves out its zero numbers and its empty lists: a shard nothing came to
//! is `{}`. (Version 1 wrote every field; it is read as well.)
//!
//! `snapshot`, when present, holds the shard ends the last `receive` (the bash bus's verb) read
//! up to: `clear` acknowledges exactly the messages before them.
//!
//! Invariant, per shard: every message before `read` was delivered at least once; of those, the
//! ones with a lease are unacknowledged and all others are acknowledged. Past `read`, a message
//! may already be leased (a filtered receive picked it out of order) or acknowledged (it is in
//! `done`); every other one there is undelivered. So the acknowledged prefix ends at the first
//! lease (or at `read`), and offsets only grow: reclaimed space is released by punching holes
//! below that prefix, never by moving data.

use serde::{Deserialize, Serialize};

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::envelope::{itoa, write_json_str};
use crate::store::meta::{Meta, ShardField};
use crate::store::slots::SlotState;
use crate::store::{AckReport, RecvError};

/// Receiver state format version.
pub(crate) const STATE_VERSION: u32 = 2;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// All of one inbox's receiver state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecvState {
    pub(crate) v: u32,
    pub(crate) shards: Vec<ShardCursor>,
    /// Shard ends read by the last `receive`, for `clear`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<Vec<u64>>,
    /// What was delivered of routed messages, to drop their duplicates.
    #[serde(default, flatten)]
    pub(crate) dedup: crate::store::Dedup,
}

/// One shard's cursor and leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShardCursor {
    /// Offset past the last message delivered (or acknowledged without delivery by `clear`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) read: u64,
    /// Messages acknowledged in this shard, ever.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) acked_msgs: u64,
    /// Bytes at the start of the shard already released (hole punched).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) punched: u64,
    /// Delivered, unacknowledged messages, sorted by offset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) leases: Vec<Lease>,
    /// Offsets past `read` of messages already acknowledged, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) done: Vec<u64>,
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
        self.leases
            .first()
            .map_or(self.read, |l| l.off)
            .min(self.read)
    }

    /// Lease the message at `off..off+len` (first delivery). Does not move `read`.
    pub(crate) fn lease(&mut self, off: u64, len: u64, id: String, ts: u64, until: u64) {
        let at = self.leases.partition_point(|l| l.off < off);
        debug_assert!(
            self.leases.get(at).is_none_or(|l| l.off != off),
            "leased twice"
        );
        self.leases.insert(
            at,
            Lease {
                off,
                len,
                id,
                ts,
                n: 1,
                until,
            },
        );
    }

    /// Whether the message at `off` (past `read`) is already leased or acknowledged.
    pub(crate) fn taken_ahead(&self, off: u64) -> bool {
        self.done.binary_search(&off).is_ok()
            || self.leases.binary_search_by_key(&off, |l| l.off).is_ok()
    }

    /// Move `read` past the line at `off..off+len`, which is the next one and is delivered,
    /// leased or acknowledged.
    pub(crate) fn advance(&mut self, off: u64, len: u64) {
        debug_assert!(off >= self.read);
        self.read = off + len;
        let passed = self.done.partition_point(|&d| d < self.read);
        self.done.drain(..passed);
    }

    /// Acknowledge the line at `off..off+len` without delivering it (not a message, or a
    /// duplicate). `in_order`: it is the next line, so `read` moves past it.
    pub(crate) fn consume(&mut self, off: u64, len: u64, in_order: bool) {
        self.acked_msgs += 1;
        if in_order {
            self.advance(off, len);
        } else {
            let at = self.done.partition_point(|&d| d < off);
            self.done.insert(at, off);
        }
    }

    /// Remove the leases matching `pred`, acknowledging their messages; those past `read` go
    /// to `done`. Returns the removed leases.
    fn ack_where(&mut self, mut pred: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.leases.len());
        for l in self.leases.drain(..) {
            if pred(&l) {
                taken.push(l)
            } else {
                kept.push(l)
            }
        }
        self.leases = kept;
        for l in &taken {
            self.acked_msgs += 1;
            if l.off >= self.read {
                let at = self.done.partition_point(|&d| d < l.off);
                self.done.insert(at, l.off);
            }
        }
        taken
    }

    /// Acknowledge the leased message at `off` (just delivered by this process). Returns
    /// whether there was such a lease.
    pub(crate) fn ack_at(&mut self, off: u64) -> bool {
        let Ok(i) = self.leases.binary_search_by_key(&off, |l| l.off) else {
            return false;
        };
        self.leases.remove(i);
        self.ack_unleased(off);
        true
    }

    /// Acknowledge the message at `off`, just delivered for the first time and never leased
    /// (the receive's handler took it).
    pub(crate) fn ack_unleased(&mut self, off: u64) {
        self.acked_msgs += 1;
        if off >= self.read {
            let at = self.done.partition_point(|&d| d < off);
            self.done.insert(at, off);
        }
    }

    /// Acknowledge every message before `end`: leased ones, and `unread` messages between
    /// `read` and `end` that were neither leased nor acknowledged. Returns how many.
    pub(crate) fn ack_below(&mut self, end: u64, unread: u64) -> u64 {
        let leased = self.ack_where(|l| l.off < end).len() as u64;
        let n = leased + if end > self.read { unread } else { 0 };
        self.acked_msgs += n - leased;
        if end > self.read {
            self.advance(self.read, end - self.read);
        }
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
            dedup: crate::store::Dedup::default(),
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
        thread_local! {
            /// The positions of the ids in sorted order, and which of them were found. Reused:
            /// a hub acknowledges a round's hundred ids at once, and the two hash sets this used
            /// to build were allocations big enough (2-3 KB) to make glibc consolidate its free
            /// lists each time, ~70k instructions per acknowledgement.
            static SCRATCH: std::cell::RefCell<(Vec<usize>, Vec<bool>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with(|c| {
            let (order, found) = &mut *c.borrow_mut();
            order.clear();
            order.extend(0..ids.len());
            order.sort_unstable_by(|&a, &b| ids[a].cmp(&ids[b]));
            found.clear();
            found.resize(ids.len(), false);
            // Where `id` first appears in sorted order (repeated ids share that place).
            let place = |id: &str| {
                let p = order.partition_point(|&i| ids[i].as_str() < id);
                (p < order.len() && ids[order[p]] == id).then_some(p)
            };
            let mut acked = 0;
            for c in &mut self.shards {
                acked += c
                    .ack_where(|l| match place(&l.id) {
                        Some(p) if !found[p] => {
                            found[p] = true;
                            true
                        }
                        _ => false,
                    })
                    .len();
            }
            let mut unknown: Vec<String> = Vec::new();
            for id in ids {
                if place(id).is_some_and(|p| !found[p]) && !unknown.contains(id) {
                    unknown.push(id.clone());
                }
            }
            AckReport { acked, unknown }
        })
    }

    /// Acknowledge every delivered message.
    pub(crate) fn ack_all(&mut self) -> usize {
        self.shards
            .iter_mut()
            .map(|c| c.ack_where(|_| true).len())
            .sum()
    }

    /// Make every lease expire now (the inbox's new owner takes over what a dead one held).
    pub(crate) fn expire_all(&mut self) -> usize {
        let mut n = 0;
        for l in self.shards.iter_mut().flat_map(|c| c.leases.iter_mut()) {
            l.until = 0;
            n += 1;
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
        self.v = STATE_VERSION; // saved from now on as this version writes
        Ok(self)
    }

    /// By hand: `serde_json` spends ~7,000 instructions on this per receive (the flattened
    /// `dedup` goes through its map path), about a sixth of an echo agent's whole reply.
    fn encode(&self, out: &mut Vec<u8>) {
        /// `key` (its quotes, colon and any leading comma) and a number.
        fn num(out: &mut Vec<u8>, key: &[u8], n: u64) {
            out.extend_from_slice(key);
            push_num(out, n);
        }
        num(out, b"{\"v\":", u64::from(self.v));
        out.extend_from_slice(b",\"shards\":[");
        for (i, c) in self.shards.iter().enumerate() {
            comma(out, i);
            out.push(b'{');
            // Each field present is preceded by a comma unless it is the first.
            let mut first = true;
            let mut key = |out: &mut Vec<u8>, k: &[u8]| {
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                out.extend_from_slice(k);
            };
            for (k, n) in [
                (&b"\"read\":"[..], c.read),
                (b"\"acked_msgs\":", c.acked_msgs),
                (b"\"punched\":", c.punched),
            ] {
                if n != 0 {
                    key(out, k);
                    push_num(out, n);
                }
            }
            if !c.leases.is_empty() {
                key(out, b"\"leases\":[");
                for (j, l) in c.leases.iter().enumerate() {
                    comma(out, j);
                    num(out, b"{\"off\":", l.off);
                    num(out, b",\"len\":", l.len);
                    out.extend_from_slice(b",\"id\":");
                    write_json_str(out, &l.id);
                    num(out, b",\"ts\":", l.ts);
                    num(out, b",\"n\":", u64::from(l.n));
                    num(out, b",\"until\":", l.until);
                    out.push(b'}');
                }
                out.push(b']');
            }
            if !c.done.is_empty() {
                key(out, b"\"done\":");
                nums(out, c.done.iter().copied());
            }
            out.push(b'}');
        }
        out.push(b']');
        if let Some(snap) = &self.snapshot {
            out.extend_from_slice(b",\"snapshot\":");
            nums(out, snap.iter().copied());
        }
        let d = &self.dedup;
        if !d.routed.is_empty() {
            out.extend_from_slice(b",\"routed\":{");
            for (i, (k, v)) in d.routed.iter().enumerate() {
                comma(out, i);
                write_json_str(out, k);
                num(out, b":", *v);
            }
            out.push(b'}');
        }
        if !d.ahead.is_empty() {
            out.extend_from_slice(b",\"ahead\":{");
            for (i, (k, v)) in d.ahead.iter().enumerate() {
                comma(out, i);
                write_json_str(out, k);
                out.push(b':');
                nums(out, v.iter().copied());
            }
            out.push(b'}');
        }
        if !d.fanouts.is_empty() {
            out.extend_from_slice(b",\"fanouts\":[");
            for (i, id) in d.fanouts.iter().enumerate() {
                comma(out, i);
                write_json_str(out, id);
            }
            out.push(b']');
        }
        out.push(b'}');
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

/// The `,` before every item of a list but the first (`i` counts from 0).
fn comma(out: &mut Vec<u8>, i: usize) {
    if i > 0 {
        out.push(b',');
    }
}

/// `[1,2,3]`.
fn nums(out: &mut Vec<u8>, it: impl Iterator<Item = u64>) {
    out.push(b'[');
    for (i, n) in it.enumerate() {
        comma(out, i);
        push_num(out, n);
    }
    out.push(b']');
}

/// `n` in decimal, its digits pushed one by one (a state has a few dozen numbers, mostly
/// short: a copy call per number cost more than the digits).
fn push_num(out: &mut Vec<u8>, n: u64) {
    let digits = itoa(n);
    for &d in digits.as_bytes() {
        out.push(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A model: message k of shard s sits at offset k * 10; its state is 0 unread, 1 leased,
    /// 2 acknowledged. Operations mirror what receive, filtered receive, ack and clear do.
    #[derive(Debug, Clone)]
    enum Op {
        /// A normal receive of up to n messages from the read cursor.
        Deliver(usize, usize),
        /// A filtered receive picking message k (past the cursor) out of order.
        DeliverAhead(usize, usize),
        /// A duplicate or corrupt line at k, consumed without delivery.
        Consume(usize, usize),
        AckId(usize),
        AckAll,
        Clear(usize, usize),
    }

    const PER_SHARD: usize = 12;
    const REC: u64 = 10;

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0usize..3, 1usize..5).prop_map(|(s, k)| Op::Deliver(s, k)),
                (0usize..3, 0usize..PER_SHARD).prop_map(|(s, k)| Op::DeliverAhead(s, k)),
                (0usize..3, 0usize..PER_SHARD).prop_map(|(s, k)| Op::Consume(s, k)),
                (0usize..40).prop_map(Op::AckId),
                Just(Op::AckAll),
                (0usize..3, 0usize..=PER_SHARD).prop_map(|(s, k)| Op::Clear(s, k)),
            ],
            0..80,
        )
    }

    fn id(s: usize, k: usize) -> String {
        format!("m{s}-{k}")
    }

    fn any_state() -> impl Strategy<Value = RecvState> {
        let text = "[a-z0-9\\-]{0,12}|\\PC{0,6}|[\"\\\\\\x00-\\x1f\\x7f]{0,4}";
        let lease = (
            any::<u64>(),
            any::<u64>(),
            text,
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(|(off, len, id, ts, n, until)| Lease {
                off,
                len,
                id,
                ts,
                n,
                until,
            });
        // Zeros often: the encoder leaves them out.
        let num = || prop_oneof![Just(0u64), any::<u64>()];
        let cursor = (
            num(),
            num(),
            num(),
            prop::collection::vec(lease, 0..3),
            prop::collection::vec(any::<u64>(), 0..3),
        )
            .prop_map(|(read, acked_msgs, punched, leases, done)| ShardCursor {
                read,
                acked_msgs,
                punched,
                leases,
                done,
            });
        let dedup = (
            prop::collection::btree_map(text, any::<u64>(), 0..3),
            prop::collection::btree_map(
                text,
                prop::collection::btree_set(any::<u64>(), 0..3),
                0..3,
            ),
            prop::collection::vec_deque(text, 0..3),
        )
            .prop_map(|(routed, ahead, fanouts)| crate::store::Dedup {
                routed,
                ahead,
                fanouts,
            });
        (
            any::<u32>(),
            prop::collection::vec(cursor, 0..4),
            prop::option::of(prop::collection::vec(any::<u64>(), 0..4)),
            dedup,
        )
            .prop_map(|(v, shards, snapshot, dedup)| RecvState {
                v,
                shards,
                snapshot,
                dedup,
            })
    }

    #[test]
    fn acknowledging_many_ids_takes_each_once_and_lists_the_unknown_in_order() {
        let mut st = RecvState::new(3);
        for (s, off, id) in [
            (0, 0, "b"),
            (0, 10, "a"),
            (1, 0, "c"),
            (2, 0, "a"),
            (2, 10, "d"),
        ] {
            st.shards[s].lease(off, 10, id.to_owned(), 1, 0);
            st.shards[s].read = off + 10;
        }
        let ids = ["x", "a", "c", "x", "a", "b", "y"].map(String::from);
        let r = st.ack_ids(&ids);
        // "a" is leased twice (a copy): one of them goes.
        assert_eq!(r.acked, 3);
        assert_eq!(r.unknown, ["x", "y"]);
        let left: Vec<&str> = st
            .shards
            .iter()
            .flat_map(|c| c.leases.iter().map(|l| l.id.as_str()))
            .collect();
        assert_eq!(left, ["a", "d"]);
        let r = st.ack_ids(&[]);
        assert_eq!((r.acked, r.unknown.len()), (0, 0));
    }

    #[test]
    fn shards_leave_out_zeros_and_version_1_states_are_read() {
        let mut st = RecvState::new(3);
        st.shards[1].read = 206;
        st.shards[1].acked_msgs = 1;
        let mut out = Vec::new();
        st.encode(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"v":2,"shards":[{},{"read":206,"acked_msgs":1},{}]}"#
        );
        // Version 1 wrote every field.
        let v1 = r#"{"v":1,"shards":[{"read":0,"acked_msgs":0,"punched":0,"leases":[]},{"read":206,"acked_msgs":1,"punched":0,"leases":[]},{"read":0,"acked_msgs":0,"punched":0,"leases":[]}]}"#;
        let mut read: RecvState = serde_json::from_str(v1).unwrap();
        read.v = STATE_VERSION;
        assert_eq!(read, st);
    }

    proptest! {
        /// The hand-written encoder writes what serde_json writes, byte for byte, and it
        /// reads back as the same state.
        #[test]
        fn encoder_matches_serde(st in any_state()) {
            let mut mine = Vec::new();
            st.encode(&mut mine);
            let theirs = serde_json::to_vec(&st).unwrap();
            prop_assert_eq!(String::from_utf8_lossy(&mine), String::from_utf8_lossy(&theirs));
            prop_assert_eq!(serde_json::from_slice::<RecvState>(&mine).unwrap(), st);
        }

        /// Cursor arithmetic: the acknowledged prefix never passes an unacknowledged message,
        /// acked_msgs counts each message once, read never moves backwards, and a normal
        /// receive never hands out a message already leased or acknowledged out of order.
        #[test]
        fn cursors_agree_with_a_model(ops in ops()) {
            let mut st = RecvState::new(3);
            let mut model = [[0u8; PER_SHARD]; 3];
            for op in ops {
                match op {
                    Op::Deliver(s, n) => {
                        let c = &mut st.shards[s];
                        let mut handed = 0;
                        while handed < n {
                            let k = (c.read / REC) as usize;
                            if k >= PER_SHARD { break; }
                            if c.taken_ahead(k as u64 * REC) {
                                prop_assert!(model[s][k] != 0);
                                c.advance(k as u64 * REC, REC);
                                continue;
                            }
                            prop_assert_eq!(model[s][k], 0, "handing out a taken message");
                            c.lease(k as u64 * REC, REC, id(s, k), k as u64, 0);
                            c.advance(k as u64 * REC, REC);
                            model[s][k] = 1;
                            handed += 1;
                        }
                    }
                    Op::DeliverAhead(s, k) => {
                        let c = &mut st.shards[s];
                        let off = k as u64 * REC;
                        if off >= c.read && !c.taken_ahead(off) {
                            prop_assert_eq!(model[s][k], 0);
                            c.lease(off, REC, id(s, k), k as u64, 0);
                            model[s][k] = 1;
                        }
                    }
                    Op::Consume(s, k) => {
                        let c = &mut st.shards[s];
                        let off = k as u64 * REC;
                        if off >= c.read && !c.taken_ahead(off) {
                            prop_assert_eq!(model[s][k], 0);
                            let in_order = off == c.read;
                            c.consume(off, REC, in_order);
                            model[s][k] = 2;
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
                        let end = k as u64 * REC;
                        let c = &mut st.shards[s];
                        let read_k = (c.read / REC) as usize;
                        // Undelivered messages between read and end (what clear counts).
                        let unread = (read_k..k).filter(|&j| model[s][j] == 0).count() as u64;
                        let expect = model[s][..k].iter().filter(|&&m| m != 2).count() as u64;
                        let before = c.read;
                        prop_assert_eq!(c.ack_below(end, unread), expect);
                        prop_assert!(c.read >= before);
                        for m in &mut model[s][..k] { *m = 2; }
                    }
                }
                for (s, c) in st.shards.iter().enumerate() {
                    let acked = model[s].iter().filter(|&&m| m == 2).count() as u64;
                    prop_assert_eq!(c.acked_msgs, acked);
                    let first_unacked = model[s].iter().position(|&m| m != 2).unwrap_or(PER_SHARD) as u64 * REC;
                    prop_assert_eq!(c.acked_prefix(), first_unacked.min(c.read));
                    prop_assert!(c.leases.windows(2).all(|w| w[0].off < w[1].off));
                    prop_assert!(c.done.windows(2).all(|w| w[0] < w[1]));
                    prop_assert!(c.done.iter().all(|&d| d >= c.read));
                    for (k, &m) in model[s].iter().enumerate() {
                        let off = k as u64 * REC;
                        let leased = c.leases.iter().any(|l| l.off == off);
                        prop_assert_eq!(leased, m == 1, "lease of {}-{}", s, k);
                        if off >= c.read {
                            prop_assert_eq!(c.done.contains(&off), m == 2, "done of {}-{}", s, k);
                        }
                    }
                }
            }
        }
    }
}
