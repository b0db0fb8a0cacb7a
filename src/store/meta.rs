//! The inbox meta file: a small shared-memory table every sender and the receiver map.
//!
//! # Layout (format version 1, native byte order, all fields atomics)
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SHOALMT1"
//!      8     4  version (1)
//!     12     4  shard count
//!     16     4  doorbell word (futex)            -- rung by every sender after its append
//!     20     4  doorbell sleepers                -- FUTEX_WAKE only when non-zero
//!     24     8  messages this agent has sent     -- `count <id> outbox`
//!     32     8  sequence slots in use
//!     40     8  bytes of the slot area backed by fallocate
//!     48     8  quota: unconsumed messages
//!     56     8  quota: unconsumed bytes
//!     64     8  removed flag (set under every shard lock before the agent is deleted)
//!     72     8  receiver state pointer: generation (31 bits) | current slot (1 bit) | length (32 bits)
//!     80     8  last activity, ms since the epoch: the agent's last send, receive, ack or
//!               heartbeat (0: none yet)
//!     88     8  waiting since, ms since the epoch: when the first message arrived after the
//!               last activity (0: none yet); with the field above it tells a stalled agent
//!  128+64s      shard s: len, writing, msgs appended, acked bytes, acked msgs (5 x u64)
//!   4096+128i   sequence slot i: id length (u64), id (64 bytes), last sequence (u64)
//! ```
//!
//! **Shard length, no syscall.** A writer holding shard `s`'s flock sets `writing`, appends, then
//! stores the new `len` and clears `writing`. The next writer therefore knows the file's length
//! and that it ends in `\n` without `lseek` or `pread`; if it finds `writing` still set, the last
//! writer died mid-append, and it falls back to reading the length and repairing the tail.
//!
//! **Sequences.** All messages of one (from, to) pair go to one shard, so the pair's slot is only
//! ever updated under that shard's lock. Slots are allocated once per sender under the meta
//! file's own flock and never move.
//!
//! **Activity.** The two activity words were reserved (zero) in the first files of this version:
//! zero reads as "never", so older files stay valid. Both are plain stores, no lock: an agent is
//! *stalled* when messages wait and `now - max(activity, waiting since)` passes a threshold (see
//! [`Meta::activity`]).
//!
//! **No SIGBUS.** The file is sparse (2 MiB + 4 KiB); pages are reserved with `fallocate` before
//! the first store to them, so a full tmpfs gives a clean `ENOSPC` instead of a crash.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::envelope::{AgentId, MAX_ID_LEN};
use crate::store::AgentSettings;
use crate::sys::shared::SharedWords;
use crate::wake::Doorbell;

const MAGIC: u64 = u64::from_le_bytes(*b"SHOALMT1");
const VERSION: u32 = 1;
const PAGE: u64 = 4096;

const VERSION_OFF: usize = 8;
const SHARDS_OFF: usize = 12;
const BELL_OFF: usize = 16;
const WAITERS_OFF: usize = 20;
const SENT_OFF: usize = 24;
const SLOTS_USED_OFF: usize = 32;
const SLOTS_BACKED_OFF: usize = 40;
const QUOTA_MSGS_OFF: usize = 48;
const QUOTA_BYTES_OFF: usize = 56;
const REMOVED_OFF: usize = 64;
const STATE_PTR_OFF: usize = 72;
const ACTIVITY_OFF: usize = 80;
const WAITING_SINCE_OFF: usize = 88;

const SHARD_BASE: usize = 128;
const SHARD_STRIDE: usize = 64;
const SLOT_BASE: usize = PAGE as usize;
const SLOT_SIZE: usize = 128;
/// Distinct senders one inbox can track sequence numbers for.
pub(crate) const SLOT_CAPACITY: usize = 16_384;
/// Size of the (sparse) meta file.
pub(crate) const META_LEN: usize = SLOT_BASE + SLOT_CAPACITY * SLOT_SIZE;

/// Per-shard fields, in the order of the table above.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ShardField {
    Len = 0,
    Writing = 8,
    Msgs = 16,
    AckedBytes = 24,
    AckedMsgs = 32,
}

/// A mapped meta file.
#[derive(Debug)]
pub(crate) struct Meta {
    file: File,
    words: Arc<SharedWords>,
    shards: usize,
    alloc: Mutex<()>,
}

/// Why a sequence slot could not be had.
#[derive(Debug)]
pub(crate) enum SlotError {
    Full,
    Io(io::Error),
}

impl Meta {
    /// Create and initialise a meta file at `path` (in a staging directory: nobody else sees it).
    pub(crate) fn create(path: &Path, settings: &AgentSettings) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        crate::sys::set_mode(&file, 0o600)?;
        file.set_len(META_LEN as u64)?;
        // Back the header page and the first page of slots now; later slot pages on demand.
        crate::sys::reserve(&file, 0, 2 * PAGE)?;
        let words = SharedWords::map(&file, META_LEN)?;
        words.u32_at(VERSION_OFF).store(VERSION, Ordering::Relaxed);
        words
            .u32_at(SHARDS_OFF)
            .store(settings.shards, Ordering::Relaxed);
        words
            .u64_at(SLOTS_BACKED_OFF)
            .store(PAGE, Ordering::Relaxed);
        words
            .u64_at(QUOTA_MSGS_OFF)
            .store(settings.quota_msgs, Ordering::Relaxed);
        words
            .u64_at(QUOTA_BYTES_OFF)
            .store(settings.quota_bytes, Ordering::Relaxed);
        words.u64_at(0).store(MAGIC, Ordering::Release);
        Ok(())
    }

    /// Map an existing meta file; `Ok(None)` if there is none.
    pub(crate) fn open(path: &Path) -> io::Result<Option<Meta>> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < META_LEN as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "meta file is truncated",
            ));
        }
        let words = Arc::new(SharedWords::map(&file, META_LEN)?);
        if words.u64_at(0).load(Ordering::Acquire) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "meta file has a bad magic number",
            ));
        }
        let version = words.u32_at(VERSION_OFF).load(Ordering::Relaxed);
        if version != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("meta file version {version} is not {VERSION}"),
            ));
        }
        let shards = words.u32_at(SHARDS_OFF).load(Ordering::Relaxed) as usize;
        if shards == 0 || SHARD_BASE + shards * SHARD_STRIDE > SLOT_BASE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "meta file has a bad shard count",
            ));
        }
        Ok(Some(Meta {
            file,
            words,
            shards,
            alloc: Mutex::new(()),
        }))
    }

    /// The mapping alone, for reading activity and pending counts: holds no descriptor (a
    /// supervisor watching a thousand agents must not need a thousand).
    pub(crate) fn words(&self) -> (Arc<SharedWords>, usize) {
        (Arc::clone(&self.words), self.shards)
    }

    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    pub(crate) fn shard(&self, s: usize, field: ShardField) -> &AtomicU64 {
        assert!(s < self.shards);
        self.words
            .u64_at(SHARD_BASE + s * SHARD_STRIDE + field as usize)
    }

    /// Which receiver state slot is current, how long its content is, and a generation that
    /// changes with every save (so a process may reuse its cached copy while it is unchanged).
    /// One word, so that switching to a newly written slot is a single atomic store.
    pub(crate) fn state_ptr(&self) -> &AtomicU64 {
        self.words.u64_at(STATE_PTR_OFF)
    }

    pub(crate) fn sent(&self) -> &AtomicU64 {
        self.words.u64_at(SENT_OFF)
    }

    pub(crate) fn removed(&self) -> bool {
        self.words.u64_at(REMOVED_OFF).load(Ordering::Acquire) != 0
    }

    pub(crate) fn mark_removed(&self) {
        self.words.u64_at(REMOVED_OFF).store(1, Ordering::Release);
    }

    pub(crate) fn quota(&self) -> (u64, u64) {
        (
            self.words.u64_at(QUOTA_MSGS_OFF).load(Ordering::Relaxed),
            self.words.u64_at(QUOTA_BYTES_OFF).load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_quota(&self, msgs: u64, bytes: u64) {
        self.words
            .u64_at(QUOTA_MSGS_OFF)
            .store(msgs, Ordering::Relaxed);
        self.words
            .u64_at(QUOTA_BYTES_OFF)
            .store(bytes, Ordering::Relaxed);
    }

    /// The agent did something (sent, received, acknowledged, or said it is alive) at `now_ms`.
    pub(crate) fn touch(&self, now_ms: u64) {
        self.words
            .u64_at(ACTIVITY_OFF)
            .store(now_ms, Ordering::Relaxed);
    }

    /// A message arrived at `now_ms`: start the waiting clock unless it already runs, i.e.
    /// unless a message arrived since the agent's last activity. Two senders racing both store
    /// about `now`, which is as good.
    pub(crate) fn note_arrival(&self, now_ms: u64) {
        let since = self.words.u64_at(WAITING_SINCE_OFF);
        if since.load(Ordering::Relaxed) <= self.words.u64_at(ACTIVITY_OFF).load(Ordering::Relaxed)
        {
            since.store(now_ms, Ordering::Relaxed);
        }
    }

    /// (last activity, waiting since, receivers asleep on the doorbell); times in ms since the
    /// epoch, 0 for never.
    pub(crate) fn activity(&self) -> (u64, u64, u32) {
        activity_of(&self.words)
    }

    pub(crate) fn doorbell(&self) -> Doorbell {
        Doorbell::new(Arc::clone(&self.words), BELL_OFF, WAITERS_OFF)
    }

    /// Unconsumed messages and bytes across all shards, from the mirrors.
    pub(crate) fn pending(&self) -> (u64, u64) {
        pending_of(&self.words, self.shards)
    }

    /// The last sequence number of slot `i`.
    pub(crate) fn seq(&self, i: usize) -> &AtomicU64 {
        self.words.u64_at(SLOT_BASE + i * SLOT_SIZE + 72)
    }

    /// The slot of sender `from`, allocating one if it has none.
    pub(crate) fn slot_for(&self, from: &AgentId) -> Result<usize, SlotError> {
        let key = id_words(from);
        let used = self.words.u64_at(SLOTS_USED_OFF).load(Ordering::Acquire) as usize;
        if let Some(i) = self.find(&key, 0, used) {
            return Ok(i);
        }
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        self.file.lock().map_err(SlotError::Io)?;
        let r = self.allocate(&key, used);
        let _ = self.file.unlock();
        r
    }

    fn allocate(&self, key: &[u64; 9], scanned: usize) -> Result<usize, SlotError> {
        let used = self.words.u64_at(SLOTS_USED_OFF).load(Ordering::Acquire) as usize;
        if let Some(i) = self.find(key, scanned, used) {
            return Ok(i); // another process allocated it meanwhile
        }
        if used >= SLOT_CAPACITY {
            return Err(SlotError::Full);
        }
        let end = (used + 1) * SLOT_SIZE;
        let backed = self.words.u64_at(SLOTS_BACKED_OFF).load(Ordering::Acquire) as usize;
        if end > backed {
            let grow = PAGE as usize * 4;
            crate::sys::reserve(&self.file, (SLOT_BASE + backed) as u64, grow as u64)
                .map_err(SlotError::Io)?;
            self.words
                .u64_at(SLOTS_BACKED_OFF)
                .store((backed + grow) as u64, Ordering::Release);
        }
        let base = SLOT_BASE + used * SLOT_SIZE;
        for (w, v) in key.iter().enumerate().skip(1) {
            self.words.u64_at(base + w * 8).store(*v, Ordering::Relaxed);
        }
        self.words.u64_at(base + 72).store(0, Ordering::Relaxed);
        self.words.u64_at(base).store(key[0], Ordering::Release);
        self.words
            .u64_at(SLOTS_USED_OFF)
            .store(used as u64 + 1, Ordering::Release);
        Ok(used)
    }

    fn find(&self, key: &[u64; 9], from: usize, to: usize) -> Option<usize> {
        (from..to).find(|&i| {
            let base = SLOT_BASE + i * SLOT_SIZE;
            (0..9).all(|w| self.words.u64_at(base + w * 8).load(Ordering::Acquire) == key[w])
        })
    }
}

/// (last activity, waiting since, doorbell sleepers) of a mapped table.
pub(crate) fn activity_of(words: &SharedWords) -> (u64, u64, u32) {
    (
        words.u64_at(ACTIVITY_OFF).load(Ordering::Relaxed),
        words.u64_at(WAITING_SINCE_OFF).load(Ordering::Relaxed),
        words.u32_at(WAITERS_OFF).load(Ordering::Relaxed),
    )
}

/// Unconsumed (messages, bytes) of a mapped table with `shards` shards, from the mirrors.
pub(crate) fn pending_of(words: &SharedWords, shards: usize) -> (u64, u64) {
    let (mut msgs, mut bytes) = (0u64, 0u64);
    for s in 0..shards {
        let ld = |f: ShardField| {
            words
                .u64_at(SHARD_BASE + s * SHARD_STRIDE + f as usize)
                .load(Ordering::Acquire)
        };
        msgs += ld(ShardField::Msgs).saturating_sub(ld(ShardField::AckedMsgs));
        bytes += ld(ShardField::Len).saturating_sub(ld(ShardField::AckedBytes));
    }
    (msgs, bytes)
}

/// A sender id as the slot stores it: its length, then its bytes zero-padded to 64.
fn id_words(id: &AgentId) -> [u64; 9] {
    let mut bytes = [0u8; MAX_ID_LEN];
    bytes[..id.as_str().len()].copy_from_slice(id.as_str().as_bytes());
    let mut out = [0u64; 9];
    out[0] = id.as_str().len() as u64;
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        out[i + 1] = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_found_again_and_distinct() {
        let d = crate::journal::tests::shm_dir("meta");
        let p = d.join("meta");
        Meta::create(
            &p,
            &AgentSettings {
                shards: 4,
                quota_msgs: 10,
                quota_bytes: 20,
            },
        )
        .unwrap();
        let m = Meta::open(&p).unwrap().unwrap();
        let a = AgentId::new("alice").unwrap();
        let b = AgentId::new("alicf").unwrap();
        let ia = m.slot_for(&a).unwrap();
        let ib = m.slot_for(&b).unwrap();
        assert_ne!(ia, ib);
        m.seq(ia).store(7, Ordering::SeqCst);
        let m2 = Meta::open(&p).unwrap().unwrap();
        assert_eq!(m2.slot_for(&a).unwrap(), ia);
        assert_eq!(m2.seq(ia).load(Ordering::SeqCst), 7);
        assert_eq!(m2.quota(), (10, 20));
        // Many senders: slot pages are reserved as they are needed.
        for i in 0..200 {
            let id = AgentId::new(&format!("w{i}")).unwrap();
            let s = m.slot_for(&id).unwrap();
            assert_eq!(m2.slot_for(&id).unwrap(), s);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
