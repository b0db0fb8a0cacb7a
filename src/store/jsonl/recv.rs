//! The receive side: leasing, acknowledging, the bash bus's `receive`/`clear`, and reclaiming.
//!
//! Every operation runs under the agent's receiver lock (`recv.lock`, flock). The state lives in
//! two preallocated slot files: a save writes the slot that is *not* current, then switches the
//! meta table's state pointer (slot, length, generation) with one atomic store. A receiver
//! killed at any point leaves either the old or the new state, so messages it had not
//! acknowledged are delivered again and nothing is lost; and since the slots' space is reserved
//! when the agent is created, receiving keeps working on a full filesystem.

use std::fs;
use std::io;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use super::meta::ShardField;

use super::state::{RecvState, STATE_VERSION};
use std::os::unix::fs::FileExt;

use super::Inbox;
use crate::envelope::Envelope;
use crate::journal::{self, Line};
use crate::layout::Layout;
use crate::store::{AckReport, AckTarget, Batch, RecvError, RecvRequest};

/// Bytes read from one shard per receive, beyond which the rest waits for the next call.
const READ_BUDGET: usize = 4 << 20;
/// Release acknowledged space once this much has accumulated (or the shard is drained).
const PUNCH_STEP: u64 = 64 * 1024;
const PAGE: u64 = 4096;

/// Space reserved for each state slot when an agent is created.
pub(crate) const STATE_SLOT_INITIAL: u64 = 16 * 1024;

/// The receiver lock file and the two state slots.
#[derive(Debug)]
pub(crate) struct RecvFiles {
    lock: fs::File,
    slots: [fs::File; 2],
}

/// This process's copy of the receiver state, and the known sizes of the slot files.
#[derive(Debug, Default)]
pub(crate) struct RecvCache {
    state: Option<(u64, RecvState)>,
    capacity: [u64; 2],
}

/// The receiver lock, held for one read-modify-write of the state.
struct RecvGuard<'a> {
    cache: MutexGuard<'a, RecvCache>,
    files: &'a RecvFiles,
}

impl Drop for RecvGuard<'_> {
    fn drop(&mut self) {
        let _ = self.files.lock.unlock();
    }
}

fn open_rw(path: &std::path::Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn lock<'a>(inbox: &'a Inbox, layout: &Layout) -> Result<RecvGuard<'a>, RecvError> {
    let mut cache = inbox.recv_cache.lock().unwrap_or_else(|e| e.into_inner());
    let files = match inbox.recv_files.get() {
        Some(f) => f,
        None => {
            let lock = layout.recv_lock(&inbox.id);
            let s0 = layout.state(&inbox.id, 0);
            let s1 = layout.state(&inbox.id, 1);
            let files = RecvFiles {
                lock: open_rw(&lock).map_err(RecvError::at(&lock))?,
                slots: [
                    open_rw(&s0).map_err(RecvError::at(&s0))?,
                    open_rw(&s1).map_err(RecvError::at(&s1))?,
                ],
            };
            for (i, f) in files.slots.iter().enumerate() {
                cache.capacity[i] = f
                    .metadata()
                    .map_err(RecvError::at(layout.state(&inbox.id, i)))?
                    .len();
            }
            inbox.recv_files.get_or_init(|| files)
        }
    };
    files
        .lock
        .lock()
        .map_err(|e| RecvError::at(layout.recv_lock(&inbox.id))(e))?;
    Ok(RecvGuard { cache, files })
}

const PTR_LEN_MASK: u64 = 0xffff_ffff;
const PTR_SLOT_BIT: u64 = 1 << 32;
const PTR_GEN_SHIFT: u32 = 33;

/// The receiver state: this process's cached copy if the state pointer has not moved since,
/// else read from the current slot. The cache is emptied; [`save`] or [`keep`] refills it.
fn load(inbox: &Inbox, layout: &Layout, g: &mut RecvGuard<'_>) -> Result<RecvState, RecvError> {
    let ptr = inbox.meta.state_ptr().load(Ordering::Acquire);
    if let Some((cached, st)) = g.cache.state.take()
        && cached == ptr
    {
        return Ok(st);
    }
    let shards = inbox.meta.shards();
    let len = (ptr & PTR_LEN_MASK) as usize;
    if len == 0 {
        return Ok(RecvState::new(shards)); // never saved
    }
    let slot = usize::from(ptr & PTR_SLOT_BIT != 0);
    let path = layout.state(&inbox.id, slot);
    let mut bytes = vec![0u8; len];
    g.files.slots[slot]
        .read_exact_at(&mut bytes, 0)
        .map_err(RecvError::at(&path))?;
    let mut st =
        serde_json::from_slice::<RecvState>(&bytes).map_err(|e| RecvError::CorruptState {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    if st.v > STATE_VERSION {
        return Err(RecvError::CorruptState {
            path,
            detail: format!("state version {} is newer than {STATE_VERSION}", st.v),
        });
    }
    if st.shards.len() > shards {
        return Err(RecvError::CorruptState {
            path,
            detail: format!("{} shards in state, {shards} in the inbox", st.shards.len()),
        });
    }
    st.shards.resize_with(shards, Default::default);
    Ok(st)
}

/// Write the state into the slot that is not current, then make it current with one atomic
/// store, and keep it cached.
fn save(
    inbox: &Inbox,
    layout: &Layout,
    g: &mut RecvGuard<'_>,
    st: RecvState,
) -> Result<(), RecvError> {
    let bytes = serde_json::to_vec(&st).unwrap_or_default();
    let cur = inbox.meta.state_ptr().load(Ordering::Acquire);
    let slot = usize::from(cur & PTR_SLOT_BIT == 0);
    let path = || layout.state(&inbox.id, slot);
    if bytes.len() as u64 > PTR_LEN_MASK {
        return Err(RecvError::CorruptState {
            path: path(),
            detail: format!("state of {} bytes is too large", bytes.len()),
        });
    }
    let file = &g.files.slots[slot];
    if bytes.len() as u64 > g.cache.capacity[slot] {
        let cap = (bytes.len() as u64).next_power_of_two();
        crate::sys::grow(file, cap).map_err(|e| RecvError::at(path())(e))?;
        g.cache.capacity[slot] = cap;
    }
    file.write_all_at(&bytes, 0)
        .map_err(|e| RecvError::at(path())(e))?;
    let generation = ((cur >> PTR_GEN_SHIFT) + 1) & ((1 << 31) - 1);
    let ptr = (generation << PTR_GEN_SHIFT)
        | if slot == 1 { PTR_SLOT_BIT } else { 0 }
        | bytes.len() as u64;
    inbox.meta.state_ptr().store(ptr, Ordering::Release);
    inbox.publish(&st);
    g.cache.state = Some((ptr, st));
    Ok(())
}

/// Put an unchanged state back in the cache.
fn keep(inbox: &Inbox, g: &mut RecvGuard<'_>, st: RecvState) {
    g.cache.state = Some((inbox.meta.state_ptr().load(Ordering::Acquire), st));
}

/// Where shard `s`'s complete lines end, if the meta table knows for sure (no writer is
/// mid-append). `writing` is read first: a writer stores the new length before clearing it.
fn complete_end(inbox: &Inbox, s: usize) -> Option<u64> {
    let writing = inbox
        .meta
        .shard(s, ShardField::Writing)
        .load(Ordering::Acquire);
    (writing == 0).then(|| inbox.meta.shard(s, ShardField::Len).load(Ordering::Acquire))
}

pub(super) fn now_ms() -> u64 {
    crate::envelope::now_micros() / 1000
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

pub(super) fn receive(
    inbox: &Inbox,
    layout: &Layout,
    req: &RecvRequest,
) -> Result<Batch, RecvError> {
    let mut g = lock(inbox, layout)?;
    let mut st = load(inbox, layout, &mut g)?;
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
        save(inbox, layout, &mut g, st)?;
    } else {
        keep(inbox, &mut g, st);
    }
    Ok(batch)
}

pub(super) fn ack(
    inbox: &Inbox,
    layout: &Layout,
    target: AckTarget<'_>,
) -> Result<AckReport, RecvError> {
    let mut g = lock(inbox, layout)?;
    let mut st = load(inbox, layout, &mut g)?;
    let report = match target {
        AckTarget::Ids(ids) => st.ack_ids(ids),
        AckTarget::AllDelivered => AckReport {
            acked: st.ack_all(),
            unknown: Vec::new(),
        },
    };
    if report.acked > 0 {
        reclaim(inbox, &mut st);
        save(inbox, layout, &mut g, st)?;
    } else {
        keep(inbox, &mut g, st);
    }
    Ok(report)
}

/// Every unacknowledged message, leased or not, oldest first; remembers the shard ends it read
/// so that `clear` removes exactly these.
pub(super) fn peek_all(inbox: &Inbox, layout: &Layout) -> Result<Vec<Envelope>, RecvError> {
    let mut g = lock(inbox, layout)?;
    let st = load(inbox, layout, &mut g)?;
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
    save(inbox, layout, &mut g, st)?;
    out.sort_by_key(|(ts, s, off, _)| (*ts, *s, *off));
    Ok(out.into_iter().map(|(_, _, _, e)| e).collect())
}

/// Acknowledge what the last `peek_all` returned (or everything stored now); returns the count.
pub(super) fn clear(inbox: &Inbox, layout: &Layout) -> Result<u64, RecvError> {
    let mut g = lock(inbox, layout)?;
    let mut st = load(inbox, layout, &mut g)?;
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
    save(inbox, layout, &mut g, st)?;
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
