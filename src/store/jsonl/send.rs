//! The send path: one `flock`, one `write`, one unlock, in the common case.

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use super::{Inbox, JsonlStore};
use crate::envelope::{AgentId, Draft, itoa};
use crate::journal::AppendError;
use crate::store::meta::{ShardField, SlotError};
use crate::store::{Receipt, SendError, shard_of};

thread_local! {
    /// Reused encoding buffers: the line up to its sequence number, and the rest.
    static BUFS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// The last (from, to) pair this thread sent on, resolved: senders mostly repeat a pair, and
    /// this spares them three locked map lookups per message.
    static LAST: RefCell<Option<Resolved>> = const { RefCell::new(None) };
}

/// A (from, to) pair resolved against one store.
#[derive(Clone)]
struct Resolved {
    store: u64,
    from: AgentId,
    to: AgentId,
    inbox: Arc<Inbox>,
    slot: usize,
    /// The sender's own inbox (for its sent counter), if it is an agent; `checked` is when that
    /// was looked up, in microseconds.
    sender: Option<Arc<Inbox>>,
    checked: u64,
}

/// The inbox of `to` and the sequence slot of `from` in it, from this thread's cache when the
/// pair repeats.
fn resolve(
    store: &JsonlStore,
    from: &AgentId,
    to: &AgentId,
    now_us: u64,
) -> Result<(Arc<Inbox>, usize), SendError> {
    let cached = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|r| {
                r.store == store.instance
                    && r.from == *from
                    && r.to == *to
                    && !r.inbox.meta.removed()
            })
            .map(|r| (Arc::clone(&r.inbox), r.slot))
    });
    if let Some(hit) = cached {
        return Ok(hit);
    }
    let inbox = store
        .inbox(to)
        .map_err(|e| SendError::at(store.layout.agent_dir(to))(e))?
        .ok_or_else(|| SendError::UnknownRecipient(to.clone()))?;
    let slot = inbox.slot(from).map_err(|e| match e {
        SlotError::Full => SendError::TooManySenders {
            to: to.clone(),
            from: from.clone(),
            capacity: crate::store::meta::SLOT_CAPACITY,
        },
        SlotError::Io(e) => SendError::at(store.layout.meta_in(&inbox.dir))(e),
    })?;
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        match l.as_mut() {
            // Same sender, another recipient (a fan-out): its own inbox is already known, and
            // the recipient's id is copied into the buffer that held the last one.
            Some(r) if r.store == store.instance && r.from == *from => {
                r.to.clone_from(to);
                r.inbox = Arc::clone(&inbox);
                r.slot = slot;
            }
            _ => {
                *l = Some(Resolved {
                    store: store.instance,
                    from: from.clone(),
                    to: to.clone(),
                    inbox: Arc::clone(&inbox),
                    slot,
                    sender: store.inbox(from).ok().flatten(),
                    checked: now_us,
                })
            }
        }
    });
    Ok((inbox, slot))
}

/// Where a message's sequence number comes from.
enum SeqSource {
    /// Already given (a forwarded message).
    Given(u64),
    /// The next number of the (from, to) pair, in this inbox's table, slot `.1`.
    Next(Arc<Inbox>, usize),
}

/// Count one message sent by `d.from`, if it is an agent (senders need not be one). A sender
/// found to have no agent is looked up again after a second, not on every send.
fn count_sent(store: &JsonlStore, d: &Draft<'_>) {
    const RECHECK_US: u64 = 1_000_000;
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        let Some(r) = l
            .as_mut()
            .filter(|r| r.store == store.instance && r.from == *d.from)
        else {
            return;
        };
        let stale = r.sender.as_ref().is_none_or(|s| s.meta.removed());
        if stale && d.ts.saturating_sub(r.checked) >= RECHECK_US {
            r.sender = store.inbox(d.from).ok().flatten();
            r.checked = d.ts;
        }
        if let Some(s) = r.sender.as_ref().filter(|s| !s.meta.removed()) {
            s.meta.sent().fetch_add(1, Ordering::Relaxed);
            s.meta.touch(d.ts / 1000);
        }
    });
}

pub(super) fn append(store: &JsonlStore, d: Draft<'_>) -> Result<Receipt, SendError> {
    // A routed message is written to the next hop, but numbered in the recipient's table, so
    // the pair's sequence is the same whichever way it travels. All of one sender's routed
    // messages to one recipient go through the same first hop and shard lock, which keeps
    // numbering and order together.
    let (inbox, seq_source) = match (d.seq, d.via) {
        (Some(given), _) => {
            let target = d.target();
            let inbox = store
                .inbox(target)
                .map_err(|e| SendError::at(store.layout.agent_dir(target))(e))?
                .ok_or_else(|| SendError::UnknownRecipient(target.clone()))?;
            (inbox, SeqSource::Given(given))
        }
        (None, None) => {
            let (inbox, slot) = resolve(store, d.from, d.to, d.ts)?;
            (Arc::clone(&inbox), SeqSource::Next(inbox, slot))
        }
        (None, Some(via)) => {
            let (fin, slot) = resolve(store, d.from, d.to, d.ts)?;
            let hop = store
                .inbox(via)
                .map_err(|e| SendError::at(store.layout.agent_dir(via))(e))?
                .ok_or_else(|| SendError::UnknownRecipient(via.clone()))?;
            (hop, SeqSource::Next(fin, slot))
        }
    };
    let meta = &inbox.meta;
    let s = shard_of(d.from, meta.shards() as u32);
    let journal = inbox
        .shard(s)
        .map_err(|e| SendError::at(inbox.shard_path(s))(e))?;

    let seq = BUFS.with(|cell| {
        let (line, suffix) = &mut *cell.borrow_mut();
        d.encode_parts(line, suffix); // all formatting happens before the lock

        let _m = inbox.append_locks[s]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut g = journal.lock().map_err(SendError::at(journal.path()))?;
        if meta.removed() {
            return Err(SendError::UnknownRecipient(d.target().clone()));
        }
        let field = |f| meta.shard(s, f);
        let seq_cell = match &seq_source {
            SeqSource::Given(_) => None,
            SeqSource::Next(ib, slot) => Some(ib.meta.seq(*slot)),
        };
        let seq = match (&seq_source, seq_cell) {
            (SeqSource::Given(n), _) => *n,
            (_, Some(c)) => c.load(Ordering::Acquire) + 1,
            (_, None) => unreachable!("a numbered source has a cell"),
        };
        line.extend_from_slice(itoa(seq).as_bytes());
        line.extend_from_slice(suffix);
        let (pending_msgs, pending_bytes) = meta.pending();
        let (quota_msgs, quota_bytes) = meta.quota();
        if pending_msgs + 1 > quota_msgs || pending_bytes + line.len() as u64 > quota_bytes {
            return Err(SendError::QuotaExceeded {
                to: d.target().clone(),
                pending_msgs,
                pending_bytes,
                quota_msgs,
                quota_bytes,
            });
        }
        let trusted = (field(ShardField::Writing).load(Ordering::Acquire) == 0)
            .then(|| field(ShardField::Len).load(Ordering::Acquire));
        // The sequence is stored before the write: a sender killed mid-append leaves a gap in the
        // pair's sequence, never a duplicate.
        if let Some(c) = seq_cell {
            c.store(seq, Ordering::Release);
        }

        field(ShardField::Writing).store(1, Ordering::Release);
        match g.append(line, trusted) {
            Ok(a) => {
                if trusted.is_none() {
                    // A writer died mid-append: its record may have completed. Count whole lines
                    // between what the table knew and where this record starts.
                    let known = field(ShardField::Len).load(Ordering::Acquire);
                    let extra = count_lines(journal.file(), known, a.start).unwrap_or(0);
                    field(ShardField::Msgs).fetch_add(extra, Ordering::AcqRel);
                }
                field(ShardField::Len).store(a.end, Ordering::Release);
                field(ShardField::Msgs).fetch_add(1, Ordering::AcqRel);
                field(ShardField::Writing).store(0, Ordering::Release);
                Ok(seq)
            }
            Err(e) => {
                // The file was cut back; `Writing` stays set so the next writer re-reads the
                // length from the file rather than trusting the table.
                if let Some(c) = seq_cell {
                    c.store(seq - 1, Ordering::Release);
                }
                Err(match e {
                    AppendError::NoSpace { path } => SendError::StoreFull { path },
                    AppendError::Io { path, source } => SendError::Io { path, source },
                    AppendError::NotALine => SendError::Io {
                        path: journal.path().to_owned(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "record spans lines",
                        ),
                    },
                })
            }
        }
    })?;
    inbox.meta.note_arrival(d.ts / 1000);
    inbox.bell.ring();
    if d.seq.is_none() {
        count_sent(store, &d); // a forwarded message was counted when it was sent
    }
    Ok(Receipt { id: d.id, seq })
}

/// Newlines in `file[from..to)`.
fn count_lines(file: &std::fs::File, from: u64, to: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    if to <= from {
        return Ok(0);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let (mut pos, mut n) = (from, 0u64);
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..want], pos)?;
        n += memchr::memchr_iter(b'\n', &buf[..want]).count() as u64;
        pos += want as u64;
    }
    Ok(n)
}
