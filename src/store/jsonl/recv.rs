//! The receive side: leasing, acknowledging, the bash bus's `receive`/`clear`, and reclaiming.
//!
//! Every operation runs under the agent's receiver lock (`recv.lock`, flock). The state lives in
//! two preallocated slot files: a save writes the slot that is *not* current, then switches the
//! meta table's state pointer (slot, length, generation) with one atomic store. A receiver
//! killed at any point leaves either the old or the new state, so messages it had not
//! acknowledged are delivered again and nothing is lost; and since the slots' space is reserved
//! when the agent is created, receiving keeps working on a full filesystem.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use crate::store::meta::ShardField;

use super::state::RecvState;

use super::Inbox;
use crate::envelope::Envelope;
use crate::journal::{self, Line};
use crate::store::{AckReport, AckTarget, Batch, RecvError, RecvRequest};

/// Bytes read from one shard per receive, beyond which the rest waits for the next call.
const READ_BUDGET: usize = 4 << 20;
/// Release acknowledged space once this much has accumulated (or the shard is drained).
const PUNCH_STEP: u64 = 64 * 1024;
const PAGE: u64 = 4096;

/// Where shard `s`'s complete lines end, if the meta table knows for sure (no writer is
/// mid-append). `writing` is read first: a writer stores the new length before clearing it.
fn complete_end(inbox: &Inbox, s: usize) -> Option<u64> {
    let writing = inbox
        .meta
        .shard(s, ShardField::Writing)
        .load(Ordering::Acquire);
    (writing == 0).then(|| inbox.meta.shard(s, ShardField::Len).load(Ordering::Acquire))
}

/// Complete lines of one shard from its read cursor, consumed in file order by the merge.
struct Pending {
    arena: Vec<u8>,
    lines: Vec<(u64, usize, usize)>, // (offset, start in arena, length without newline)
    next: usize,
    head: Option<Envelope>,
    /// What became of each line popped, in file order.
    outcomes: Vec<(u64, u64, Outcome)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Already leased or acknowledged out of order: nothing to do.
    TakenAhead,
    /// Not an envelope, or a duplicate: acknowledged without delivery.
    Consumed,
    /// Left for another receive (the filter did not want it).
    Left,
    /// Leased now.
    Delivered,
}

thread_local! {
    /// Each thread's per-shard buffers and list of first deliveries, reused from one receive to
    /// the next: a receive then allocates nothing for its reading (a fresh kilobyte-sized
    /// vector per call made the allocator consolidate its free lists every time).
    static SCRATCH: std::cell::RefCell<(Vec<Pending>, Vec<u8>, Vec<Fresh>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new()))
    };
}

/// A message delivered for the first time by this receive, not leased yet.
struct Fresh {
    shard: usize,
    off: u64,
    len: u64,
    ts: u64,
    /// Its place in the batch.
    at: usize,
}

impl Pending {
    fn empty() -> Pending {
        Pending {
            arena: Vec::new(),
            lines: Vec::new(),
            next: 0,
            head: None,
            outcomes: Vec::new(),
        }
    }

    /// Refill with shard `s`'s complete lines from `from` (at most `limit`); `buf` is scratch.
    fn fill(
        &mut self,
        inbox: &Inbox,
        s: usize,
        from: u64,
        limit: usize,
        buf: &mut Vec<u8>,
    ) -> Result<(), RecvError> {
        self.arena.clear();
        self.lines.clear();
        self.next = 0;
        self.head = None;
        self.outcomes.clear();
        let known_end = complete_end(inbox, s);
        if known_end.is_some_and(|end| end <= from) {
            return Ok(()); // nothing new: no system call
        }
        let j = inbox
            .shard(s)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        journal::read_lines(
            j.file(),
            from,
            READ_BUDGET,
            known_end,
            buf,
            |l: Line<'_>| {
                if self.lines.len() >= limit {
                    return false;
                }
                self.lines.push((l.offset, self.arena.len(), l.bytes.len()));
                self.arena.extend_from_slice(l.bytes);
                true
            },
        )
        .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        Ok(())
    }

    fn line(&self, i: usize) -> (u64, &[u8]) {
        let (off, start, len) = self.lines[i];
        (off, &self.arena[start..start + len])
    }

    fn pop(&mut self, outcome: Outcome) {
        let (off, _, len) = self.lines[self.next];
        self.outcomes.push((off, len as u64 + 1, outcome));
        self.next += 1;
        self.head = None;
    }
}

/// What to do with the messages selected, before the state is saved.
pub(super) type Handler<'h> = Option<&'h mut dyn FnMut(&[Envelope]) -> bool>;

pub(super) fn receive(
    inbox: &Inbox,
    req: &RecvRequest<'_>,
    mut handle: Handler<'_>,
) -> Result<Batch, RecvError> {
    // Every receive counts as a heartbeat (an agent waiting for work is not stalled); one
    // clock reading serves it, the check below and the leases (the coarse clock: all three
    // count in seconds).
    let now = crate::sys::now_ms_coarse();
    inbox.meta.touch(now);
    if req.filter.is_none()
        && let Some(next_expiry_ms) = nothing_new(inbox, now)
    {
        // No lock, no system call; the caller still learns when the next lease runs out.
        return Ok(Batch {
            next_expiry_ms,
            ..Batch::default()
        });
    }
    let mut req = *req;
    loop {
        match receive_once(inbox, &req, now, &mut handle) {
            // A bigger batch needs a bigger state; on a full filesystem, hand out fewer
            // messages rather than none (the slot's reserved space holds a few leases).
            Err(RecvError::StoreFull { .. }) if req.max > 1 => req.max /= 2,
            other => return other,
        }
    }
}

/// If this process's cached state (still current) shows nothing to deliver (no shard longer
/// than its read cursor, no lease due), the time the next lease expires. Answers without a
/// system call; `None` when there may be something, or when unsure.
fn nothing_new(inbox: &Inbox, now: u64) -> Option<Option<u64>> {
    inbox
        .recv
        .peek_cached(&inbox.meta, |st| {
            let next = st.next_expiry();
            let idle = next.is_none_or(|e| e > now)
                && st
                    .shards
                    .iter()
                    .enumerate()
                    .all(|(s, c)| complete_end(inbox, s).is_some_and(|end| end <= c.read));
            idle.then_some(next)
        })
        .flatten()
}

fn receive_once(
    inbox: &Inbox,
    req: &RecvRequest<'_>,
    now: u64,
    handle: &mut Handler<'_>,
) -> Result<Batch, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let mut st = g.load()?;
    let until = now + req.lease.as_millis() as u64;
    let wanted = |e: &Envelope| req.filter.is_none_or(|f| (f.0)(e));
    let mut batch = Batch::default();
    let mut changed = false;
    // Redelivered messages (their leases exist), as (shard, offset).
    let mut redelivered: Vec<(usize, u64)> = Vec::new();
    // Lowest sequence of a routed message left undelivered by the filter, per sender: a later
    // one from that sender delivered now is ahead of it (see `Dedup`).
    let mut left = crate::store::LeftBehind::default();

    // Expired leases that the filter wants, per shard in file order: they go out before the
    // shard's new lines. A shard holds each sender's messages in the order they were numbered,
    // and that order must hold on redelivery too: send times can disagree with it (one sender
    // id in two processes takes its times before the lock), and a hub forwarding by time
    // would pass a pair's messages on out of sequence, where the receiver drops the older one
    // as a copy.
    let mut expired: Vec<VecDeque<(u64, Envelope)>> = Vec::new();
    let mut n_expired = 0usize;
    let mut rec = Vec::new();
    for (s, i) in st.expired(now) {
        let lease = &st.shards[s].leases[i];
        let j = inbox
            .shard(s)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        journal::read_record(j.file(), lease.off, lease.len, &mut rec)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        if let Ok(e) = Envelope::parse(rec.strip_suffix(b"\n").unwrap_or(&rec))
            && wanted(&e)
        {
            if expired.len() <= s {
                expired.resize_with(s + 1, VecDeque::new);
            }
            expired[s].push_back((lease.off, e));
            n_expired += 1;
        }
    }
    for q in &mut expired {
        q.make_contiguous().sort_by_key(|(off, _)| *off);
    }
    let waiting = |expired: &[VecDeque<(u64, Envelope)>], s: usize| {
        expired.get(s).is_some_and(|q| !q.is_empty())
    };

    // New lines per shard. With a filter, unwanted lines are skipped over, so read further.
    let limit = if req.filter.is_some() {
        usize::MAX
    } else {
        req.max
    };
    let (mut shards, mut buf, mut fresh) = SCRATCH.with(|c| std::mem::take(&mut *c.borrow_mut()));
    fresh.clear();
    shards.resize_with(st.shards.len(), Pending::empty);
    // Only the shards with new lines are touched from here on (`active`, one bit each): a
    // receiver woken for one message then works on one shard's scratch, not on all of them
    // (each untouched one is a few cache lines that are cold at every wake-up).
    let mut active = 0u64;
    for (s, c) in st.shards.iter().enumerate() {
        if complete_end(inbox, s).is_some_and(|end| end <= c.read) {
            continue; // nothing new: no system call, scratch left as it is
        }
        shards[s].fill(inbox, s, c.read, limit, &mut buf)?;
        if !shards[s].lines.is_empty() {
            active |= 1 << s;
        }
    }
    let n_shards = st.shards.len();
    let active_shards = move || (0..n_shards).filter(move |s| active & (1 << s) != 0);

    while batch.messages.len() < req.max {
        // Bring each shard's head to the next line that could be delivered.
        for s in active_shards() {
            let p = &mut shards[s];
            while p.head.is_none() && p.next < p.lines.len() {
                let (off, bytes) = p.line(p.next);
                let c = &st.shards[s];
                if off >= c.read && c.taken_ahead(off) {
                    p.pop(Outcome::TakenAhead);
                    continue;
                }
                match Envelope::parse(bytes) {
                    Ok(e) if !wanted(&e) => {
                        left.note(&e);
                        p.pop(Outcome::Left);
                    }
                    Ok(e) => p.head = Some(e),
                    Err(_) => {
                        batch.corrupt += 1;
                        p.pop(Outcome::Consumed);
                    }
                }
            }
        }
        let new_min = active_shards()
            .filter(|&s| n_expired == 0 || !waiting(&expired, s))
            .filter_map(|s| shards[s].head.as_ref().map(|e| (e.ts, s)))
            .min();
        let old_min = if n_expired == 0 {
            None
        } else {
            (0..expired.len())
                .filter_map(|s| expired[s].front().map(|(_, e)| (e.ts, s)))
                .min()
        };
        match (old_min, new_min) {
            (Some(o), n) if n.is_none_or(|n| o <= n) => {
                let Some((off, mut e)) = expired[o.1].pop_front() else {
                    break;
                };
                n_expired -= 1;
                let s = o.1;
                let c = &mut st.shards[s];
                if let Some(l) = c.leases.iter_mut().find(|l| l.off == off) {
                    l.n += 1;
                    l.until = until;
                    e.delivery = Some(l.n);
                    batch.messages.push(e);
                    redelivered.push((s, off));
                    changed = true;
                }
            }
            (_, Some((_, s))) => {
                let p = &mut shards[s];
                let Some(mut e) = p.head.take() else { break };
                let (off, bytes) = p.line(p.next);
                let len = bytes.len() as u64 + 1;
                if st.dedup.seen(&e, left.older_than(&e)) {
                    batch.duplicates += 1;
                    p.pop(Outcome::Consumed);
                } else {
                    // Leased below, once it is known whether the handler takes it.
                    fresh.push(Fresh {
                        shard: s,
                        off,
                        len,
                        ts: e.ts,
                        at: batch.messages.len(),
                    });
                    e.delivery = Some(1);
                    batch.messages.push(e);
                    p.pop(Outcome::Delivered);
                }
                changed = true;
            }
            _ => break,
        }
    }
    // Move each cursor over the lines dealt with, as far as they are contiguous; past a line
    // left for later, consumed lines are remembered in `done` and deliveries are out-of-order
    // leases.
    for s in active_shards() {
        let p = &shards[s];
        let c = &mut st.shards[s];
        let mut in_order = true;
        for &(off, len, outcome) in &p.outcomes {
            match outcome {
                Outcome::Left => in_order = false,
                Outcome::Consumed => {
                    c.consume(off, len, in_order);
                    changed = true;
                }
                Outcome::TakenAhead | Outcome::Delivered if in_order => {
                    c.advance(off, len);
                    changed = true;
                }
                Outcome::TakenAhead | Outcome::Delivered => {}
            }
        }
    }
    // Keep the buffers for the next receive, unless a big batch made them big.
    const KEEP: usize = 1 << 20;
    if buf.capacity() <= KEEP && shards.iter().all(|p| p.arena.capacity() <= KEEP) {
        SCRATCH.with(|c| {
            let mut c = c.borrow_mut();
            (c.0, c.1) = (shards, buf);
        });
    }
    // A handler that takes the messages has them acknowledged in the same save: one state
    // update instead of a lease and an acknowledgement (and no lease is made for a message
    // delivered for the first time). If this process dies in the handler, nothing was saved
    // and the messages are delivered again at once.
    let mut acked = false;
    if let Some(h) = handle.as_mut()
        && !batch.messages.is_empty()
        && h(&batch.messages)
    {
        for &(s, off) in &redelivered {
            st.shards[s].ack_at(off);
        }
        for f in &fresh {
            st.shards[f.shard].ack_unleased(f.off);
        }
        acked = true;
    } else {
        for f in &fresh {
            let id = batch.messages[f.at].id.clone();
            st.shards[f.shard].lease(f.off, f.len, id, f.ts, until);
        }
    }
    if fresh.capacity() * std::mem::size_of::<Fresh>() <= KEEP {
        SCRATCH.with(|c| c.borrow_mut().2 = fresh);
    }
    batch.next_expiry_ms = st.next_expiry();
    if changed {
        g.save(st)?;
        if acked {
            g.with_cached(|st| reclaim(inbox, st));
        }
    } else {
        g.keep(st);
    }
    Ok(batch)
}

/// Make every lease expire now (see [`crate::store::Store::expire_leases`]).
pub(super) fn expire_leases(inbox: &Inbox) -> Result<usize, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let mut st = g.load()?;
    let n = st.expire_all();
    if n > 0 {
        g.save(st)?;
    } else {
        g.keep(st);
    }
    Ok(n)
}

pub(super) fn ack(inbox: &Inbox, target: AckTarget<'_>) -> Result<AckReport, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let mut st = g.load()?;
    let report = match target {
        AckTarget::Ids(ids) => st.ack_ids(ids),
        AckTarget::AllDelivered => AckReport {
            acked: st.ack_all(),
            unknown: Vec::new(),
        },
    };
    if report.acked > 0 {
        g.save(st)?;
        g.with_cached(|st| reclaim(inbox, st));
    } else {
        g.keep(st);
    }
    Ok(report)
}

/// Every unacknowledged message, leased or not, oldest first; remembers the shard ends it read
/// so that `clear` removes exactly these.
pub(super) fn peek_all(inbox: &Inbox) -> Result<Vec<Envelope>, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let st = g.load()?;
    let mut out: Vec<(u64, usize, u64, Envelope)> = Vec::new();
    let mut ends = Vec::with_capacity(st.shards.len());
    let mut buf = Vec::new();
    for (s, c) in st.shards.iter().enumerate() {
        let j = inbox
            .shard(s)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        let mut leased = c.leases.iter().map(|l| l.off).peekable();
        let end = journal::read_lines(
            j.file(),
            c.acked_prefix(),
            usize::MAX,
            complete_end(inbox, s),
            &mut buf,
            |l| {
                while leased.next_if(|&o| o < l.offset).is_some() {}
                let is_leased = leased.next_if_eq(&l.offset).is_some();
                let unacked =
                    is_leased || (l.offset >= c.read && c.done.binary_search(&l.offset).is_err());
                if unacked && let Ok(e) = Envelope::parse(l.bytes) {
                    out.push((e.ts, s, l.offset, e));
                }
                true
            },
        )
        .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        ends.push(end);
    }
    let mut st = st;
    st.snapshot = Some(ends);
    g.save(st)?;
    out.sort_by_key(|(ts, s, off, _)| (*ts, *s, *off));
    Ok(out.into_iter().map(|(_, _, _, e)| e).collect())
}

/// Acknowledge what the last `peek_all` returned (or everything stored now); returns the count.
pub(super) fn clear(inbox: &Inbox) -> Result<u64, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let mut st = g.load()?;
    let ends = st.snapshot.take();
    let mut total = 0;
    let mut buf = Vec::new();
    for s in 0..st.shards.len() {
        let j = inbox
            .shard(s)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        let read = st.shards[s].read;
        let limit = ends.as_ref().and_then(|e| e.get(s).copied());
        // Count (and find the end of) the not-yet-delivered messages up to the limit; those
        // already leased or acknowledged out of order are not among them.
        let mut unread = 0u64;
        let cursor = &st.shards[s];
        let end = journal::read_lines(
            j.file(),
            read,
            usize::MAX,
            complete_end(inbox, s),
            &mut buf,
            |l| {
                if limit.is_some_and(|lim| l.offset >= lim) {
                    return false;
                }
                if !cursor.taken_ahead(l.offset) {
                    unread += 1;
                }
                true
            },
        )
        .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        // A snapshot taken before later receives may end behind the read cursor: then only
        // the leases below it are acknowledged.
        let end = match limit {
            Some(lim) if lim <= read => lim,
            _ => end,
        };
        total += st.shards[s].ack_below(end, unread);
    }
    g.save(st)?;
    g.with_cached(|st| reclaim(inbox, st));
    Ok(total)
}

/// Release the pages of each shard's acknowledged prefix. The page holding the prefix's last
/// newline is kept: a writer repairing a torn tail scans back to it.
///
/// Only ever called on a state already saved: bytes are released after the acknowledgement
/// that frees them is durable. (Punching first, a receiver killed before saving would leave
/// the old state, with those messages still leased and their bytes gone.) The new `punched`
/// is saved with the next change; until then a restarted receiver punches the same range
/// again, which is harmless.
fn reclaim(inbox: &Inbox, st: &mut RecvState) {
    for (s, c) in st.shards.iter_mut().enumerate() {
        let prefix = c.acked_prefix();
        if prefix == 0 {
            continue;
        }
        let target = (prefix - 1) / PAGE * PAGE;
        if target <= c.punched {
            continue;
        }
        let drained = c.leases.is_empty();
        if target - c.punched < PUNCH_STEP && !drained {
            continue;
        }
        let Ok(j) = inbox.shard(s) else { continue };
        // EOPNOTSUPP (not tmpfs) just means the bytes stay: correctness does not depend on it.
        if crate::sys::punch_hole(j.file(), c.punched, target - c.punched).is_ok() {
            c.punched = target;
        }
    }
}
