//! The receive side: leasing, acknowledging, the bash bus's `receive`/`clear`, and reclaiming.
//!
//! Every operation runs under the agent's receiver lock (`recv.lock`, flock). The state lives in
//! two preallocated slot files: a save writes the slot that is *not* current, then switches the
//! meta table's state pointer (slot, length, generation) with one atomic store. A receiver
//! killed at any point leaves either the old or the new state, so messages it had not
//! acknowledged are delivered again and nothing is lost; and since the slots' space is reserved
//! when the agent is created, receiving keeps working on a full filesystem.

use std::sync::atomic::Ordering;

use crate::store::meta::ShardField;
use crate::store::now_ms;

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

/// Complete lines of one shard from its read cursor, held until the merge takes them.
struct Pending {
    arena: Vec<u8>,
    lines: Vec<(u64, usize, usize)>, // (offset, start in arena, length without newline)
    next: usize,
    head: Option<Envelope>,
}

impl Pending {
    fn read(inbox: &Inbox, s: usize, from: u64, max: usize) -> Result<Pending, RecvError> {
        let mut p = Pending {
            arena: Vec::new(),
            lines: Vec::new(),
            next: 0,
            head: None,
        };
        let known_end = complete_end(inbox, s);
        if known_end.is_some_and(|end| end <= from) {
            return Ok(p); // nothing new: no system call
        }
        let j = inbox
            .shard(s)
            .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        let mut buf = Vec::new();
        journal::read_lines(
            j.file(),
            from,
            READ_BUDGET,
            known_end,
            &mut buf,
            |l: Line<'_>| {
                if p.lines.len() >= max {
                    return false;
                }
                p.lines.push((l.offset, p.arena.len(), l.bytes.len()));
                p.arena.extend_from_slice(l.bytes);
                true
            },
        )
        .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
        Ok(p)
    }

    fn line(&self, i: usize) -> (u64, &[u8]) {
        let (off, start, len) = self.lines[i];
        (off, &self.arena[start..start + len])
    }
}

pub(super) fn receive(inbox: &Inbox, req: &RecvRequest) -> Result<Batch, RecvError> {
    let mut g = inbox.recv.lock(&inbox.meta)?;
    let mut st = g.load()?;
    let now = now_ms();
    let until = now + req.lease.as_millis() as u64;
    let mut batch = Batch::default();
    let mut changed = false;

    let expired = st.expired(now);
    let mut next_expired = 0;
    let mut shards: Vec<Pending> = Vec::with_capacity(st.shards.len());
    for (s, c) in st.shards.iter().enumerate() {
        shards.push(Pending::read(inbox, s, c.read, req.max)?);
    }
    let mut redelivered: Vec<(usize, usize)> = Vec::new();
    let mut rec = Vec::new();

    while batch.messages.len() < req.max {
        // Parse each shard's head (skipping lines that are not envelopes).
        for (s, p) in shards.iter_mut().enumerate() {
            while p.head.is_none() && p.next < p.lines.len() {
                let (off, bytes) = p.line(p.next);
                match Envelope::parse(bytes) {
                    Ok(e) => p.head = Some(e),
                    Err(_) => {
                        st.shards[s].skip_line(off, bytes.len() as u64 + 1);
                        p.next += 1;
                        batch.corrupt += 1;
                        changed = true;
                    }
                }
            }
        }
        let new_min = shards
            .iter()
            .enumerate()
            .filter_map(|(s, p)| p.head.as_ref().map(|e| (e.ts, s)))
            .min();
        let old_min = expired
            .get(next_expired)
            .map(|&(s, i)| (st.shards[s].leases[i].ts, s));
        match (old_min, new_min) {
            (Some(o), n) if n.is_none_or(|n| o <= n) => {
                let (s, i) = expired[next_expired];
                next_expired += 1;
                let lease = &st.shards[s].leases[i];
                let j = inbox
                    .shard(s)
                    .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
                journal::read_record(j.file(), lease.off, lease.len, &mut rec)
                    .map_err(|e| RecvError::at(inbox.shard_path(s))(e))?;
                match Envelope::parse(rec.strip_suffix(b"\n").unwrap_or(&rec)) {
                    Ok(mut e) => {
                        e.delivery = Some(lease.n + 1);
                        batch.messages.push(e);
                        redelivered.push((s, i));
                    }
                    Err(_) => batch.corrupt += 1, // cannot happen for a record we parsed before
                }
            }
            (_, Some((_, s))) => {
                let p = &mut shards[s];
                let (off, bytes) = p.line(p.next);
                let len = bytes.len() as u64 + 1;
                p.next += 1;
                let mut e = p
                    .head
                    .take()
                    .unwrap_or_else(|| unreachable!("head parsed above"));
                st.shards[s].lease_new(off, len, e.id.clone(), e.ts, until);
                e.delivery = Some(1);
                batch.messages.push(e);
                changed = true;
            }
            (None, None) | (Some(_), None) => break,
        }
    }
    for (s, i) in redelivered {
        let l = &mut st.shards[s].leases[i];
        l.n += 1;
        l.until = until;
        changed = true;
    }
    batch.next_expiry_ms = st.next_expiry();
    if changed {
        g.save(st)?;
    } else {
        g.keep(st);
    }
    Ok(batch)
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
        reclaim(inbox, &mut st);
        g.save(st)?;
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
                let unacked = l.offset >= c.read || leased.next_if_eq(&l.offset).is_some();
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
        // Count (and find the end of) the not-yet-delivered messages up to the limit.
        let mut unread = 0u64;
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
                unread += 1;
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
    reclaim(inbox, &mut st);
    g.save(st)?;
    Ok(total)
}

/// Release the pages of each shard's acknowledged prefix. The page holding the prefix's last
/// newline is kept: a writer repairing a torn tail scans back to it.
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
