//! The recommended store: each inbox is N append-only JSONL shard files on tmpfs.
//!
//! A sender appends to the shard chosen by its own id ([`crate::store::shard_of`]), under that
//! shard's `flock`, so concurrent senders rarely contend and each (from, to) pair stays in order.
//! The receiver reads every shard from its cursors, merging by send time. See [`meta`] for the
//! shared table that lets a send cost one `flock`, one `write` and one unlock, and [`state`] for
//! the receiver's leases.

mod recv;
mod send;
pub(crate) mod state;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use crate::envelope::{AgentId, Draft, Envelope};
use crate::journal::Journal;
use crate::layout::Layout;
use crate::store::{
    AckReport, AckTarget, AgentError, AgentSettings, Batch, Depth, IdMap, Receipt, RecvError,
    RecvRequest, Removed, SendError, Store,
};
use crate::wake::WakeTarget;

use super::meta::{self, Meta};
use super::slots::{self, SlotPaths, Slots};
use super::{create_private_file, mkdir_private};

/// Sharded JSONL inboxes under one root.
#[derive(Debug)]
pub struct JsonlStore {
    /// Distinguishes store instances in per-thread caches.
    instance: u64,
    layout: Layout,
    inboxes: Mutex<IdMap<Arc<Inbox>>>,
    /// The last listing of the agents directory, reused while the directory is unchanged.
    listing: Mutex<Option<Listing>>,
}

/// A listing of the agents directory and what identified the directory's state when it was
/// taken: its inode, modification time and change time. Nobody can set the change time (setting
/// the modification time moves it), so a directory whose old time was put back is not
/// mistaken for the one listed.
#[derive(Debug)]
struct Listing {
    key: (u64, u64, i64, i64, i64, i64),
    ids: Vec<AgentId>,
}

/// How long after the agents directory last changed a listing of it may be reused. Agents come
/// and go by renames in that directory, each setting its modification time from a clock that
/// may run up to a tick (1-10 ms) behind the system's: a listing taken this long after the
/// last change can tell any later change by the time.
const LISTING_SETTLED: std::time::Duration = std::time::Duration::from_millis(100);

/// The same on a filesystem whose times look whole-second (no nanoseconds), where a change
/// later in the same second would keep the time.
const LISTING_SETTLED_COARSE: std::time::Duration = std::time::Duration::from_secs(2);

/// One agent's open inbox: its meta mapping and lazily opened shard files. Cached per process.
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    meta: Meta,
    bell: crate::wake::Doorbell,
    shards: Vec<OnceLock<Journal>>,
    /// Threads of one process share one open file, and `flock` does not exclude them from each
    /// other: this mutex does.
    append_locks: Vec<Mutex<()>>,
    /// Sender id -> sequence slot, so a slot is looked up once per process.
    slots: Mutex<IdMap<usize>>,
    /// The receiver state (cursors and leases) and its lock.
    recv: Slots<state::RecvState>,
    layout: Layout,
}

impl Inbox {
    fn open(layout: &Layout, id: &AgentId) -> io::Result<Option<Inbox>> {
        let dir = layout.agent_dir(id);
        let recv = Slots::new(slot_paths(layout, &dir));
        let Some(meta) = Meta::open(&layout.meta_in(&dir))? else {
            return Ok(None);
        };
        let n = meta.shards();
        Ok(Some(Inbox {
            dir,
            bell: meta.doorbell(),
            meta,
            shards: (0..n).map(|_| OnceLock::new()).collect(),
            append_locks: (0..n).map(|_| Mutex::new(())).collect(),
            slots: Mutex::new(IdMap::default()),
            recv,
            layout: layout.clone(),
        }))
    }

    fn shard_path(&self, s: usize) -> PathBuf {
        self.layout.shard_in(&self.dir, s)
    }

    /// Shard `s`, opened on first use.
    fn shard(&self, s: usize) -> io::Result<&Journal> {
        if let Some(j) = self.shards[s].get() {
            return Ok(j);
        }
        let j = Journal::open(&self.shard_path(s), false)?; // once per shard per process
        Ok(self.shards[s].get_or_init(|| j))
    }

    fn slot(&self, from: &AgentId) -> Result<usize, meta::SlotError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&i) = slots.get(from) {
            return Ok(i);
        }
        let i = self.meta.slot_for(from)?;
        slots.insert(from.clone(), i);
        Ok(i)
    }
}

impl JsonlStore {
    /// The store of the root laid out by `layout`.
    pub fn new(layout: Layout) -> JsonlStore {
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        JsonlStore {
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            layout,
            inboxes: Mutex::new(IdMap::default()),
            listing: Mutex::new(None),
        }
    }

    /// The open inbox of `id`, or `None` if there is no such agent. A cached inbox whose agent
    /// was removed (by any process) is dropped and looked up again.
    pub(crate) fn inbox(&self, id: &AgentId) -> io::Result<Option<Arc<Inbox>>> {
        let mut map = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ib) = map.get(id) {
            if !ib.meta.removed() {
                return Ok(Some(Arc::clone(ib)));
            }
            map.remove(id);
        }
        match Inbox::open(&self.layout, id)? {
            Some(ib) => {
                let ib = Arc::new(ib);
                map.insert(id.clone(), Arc::clone(&ib));
                Ok(Some(ib))
            }
            None => Ok(None),
        }
    }

    fn existing(&self, id: &AgentId) -> Result<Arc<Inbox>, RecvError> {
        self.inbox(id)
            .map_err(|e| RecvError::at(self.layout.agent_dir(id))(e))?
            .ok_or_else(|| RecvError::UnknownAgent(id.clone()))
    }

    fn assemble(&self, dir: &Path, settings: &AgentSettings) -> Result<(), AgentError> {
        mkdir_private(dir).map_err(AgentError::at(dir))?;
        let inbox = self.layout.inbox_in(dir);
        mkdir_private(&inbox).map_err(AgentError::at(&inbox))?;
        for s in 0..settings.shards as usize {
            let p = self.layout.shard_in(dir, s);
            create_private_file(&p).map_err(AgentError::at(&p))?;
        }
        // The receiver's files exist from the start, their space reserved, so that receiving
        // and acknowledging keep working when the filesystem is full.
        slots::create(&slot_paths(&self.layout, dir))?;
        let m = self.layout.meta_in(dir);
        Meta::create(&m, settings).map_err(AgentError::at(&m))
    }
}

/// Where an agent's receiver files are.
pub(crate) fn slot_paths(layout: &Layout, agent_dir: &Path) -> SlotPaths {
    SlotPaths {
        lock: layout.recv_lock_in(agent_dir),
        slots: [layout.state_in(agent_dir, 0), layout.state_in(agent_dir, 1)],
    }
}

impl Store for JsonlStore {
    fn create_agent(&self, id: &AgentId, settings: &AgentSettings) -> Result<bool, AgentError> {
        let agents = self.layout.agents_dir();
        match mkdir_private(&agents) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(AgentError::at(&agents)(e)),
        }
        let update = |ib: Arc<Inbox>| {
            ib.meta.set_quota(settings.quota_msgs, settings.quota_bytes);
            false
        };
        if let Some(ib) = self
            .inbox(id)
            .map_err(|e| AgentError::at(self.layout.agent_dir(id))(e))?
        {
            return Ok(update(ib));
        }
        let staging = self.layout.staging_dir(id, crate::sys::random_u64());
        if let Err(e) = self.assemble(&staging, settings) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        let dest = self.layout.agent_dir(id);
        match fs::rename(&staging, &dest) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) {
                    // Another process created it first: same outcome as if we had.
                    match self.inbox(id).map_err(AgentError::at(&dest))? {
                        Some(ib) => Ok(update(ib)),
                        None => Err(AgentError::at(&dest)(e)),
                    }
                } else {
                    Err(AgentError::at(&dest)(e))
                }
            }
        }
    }

    fn agent_exists(&self, id: &AgentId) -> bool {
        matches!(self.inbox(id), Ok(Some(_)))
    }

    fn remove_agent(&self, id: &AgentId) -> Result<Option<Removed>, AgentError> {
        let dir = self.layout.agent_dir(id);
        let Some(ib) = self.inbox(id).map_err(AgentError::at(&dir))? else {
            return Ok(None);
        };
        let depth = self.depth(id).unwrap_or_default();
        let removed = Removed {
            inbox: depth.msgs,
            sent: ib.meta.sent().load(Ordering::Relaxed),
        };
        {
            // Hold every shard lock while flagging removal: a sender that gets a lock after this
            // sees the flag and reports an unknown recipient instead of writing into the void.
            let mut guards = Vec::new();
            for s in 0..ib.meta.shards() {
                let m = ib.append_locks[s].lock().unwrap_or_else(|e| e.into_inner());
                let j = ib.shard(s).map_err(AgentError::at(ib.shard_path(s)))?;
                let g = j.lock().map_err(AgentError::at(ib.shard_path(s)))?;
                guards.push((m, g));
            }
            ib.meta.mark_removed();
            ib.bell.ring();
        }
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let trash = self.layout.trash_dir(id, crate::sys::random_u64());
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::at(&dir)(e)),
        }
        fs::remove_dir_all(&trash).map_err(AgentError::at(&trash))?;
        Ok(Some(removed))
    }

    /// Coordinators list the agents every round: while the directory has not changed since a
    /// settled listing, that listing is the answer (one `stat` instead of reading 1000 entries).
    fn agents(&self) -> Result<Vec<AgentId>, AgentError> {
        let dir = self.layout.agents_dir();
        let now = std::time::SystemTime::now(); // before the stat: see `LISTING_SETTLED`
        let (mtime, key) = match fs::metadata(&dir).and_then(|m| {
            use std::os::unix::fs::MetadataExt;
            let key = (
                m.dev(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            );
            Ok((m.modified()?, key))
        }) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AgentError::at(&dir)(e)),
        };
        let mut cached = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = cached.as_ref().filter(|l| l.key == key) {
            return Ok(l.ids.clone());
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AgentError::at(&dir)(e)),
        };
        // Agents appear and vanish by rename, complete: every directory with a valid id is one
        // (staging and trash directories start with a dot).
        let mut out: Vec<AgentId> = entries
            .filter_map(Result::ok)
            .filter_map(|e| AgentId::new(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        let whole_seconds = mtime
            .duration_since(std::time::UNIX_EPOCH)
            .is_ok_and(|t| t.subsec_nanos() == 0);
        let margin = if whole_seconds {
            LISTING_SETTLED_COARSE
        } else {
            LISTING_SETTLED
        };
        // The later of the two times: a change stamps both.
        let ctime = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(key.4).unwrap_or(0),
                u32::try_from(key.5).unwrap_or(0),
            );
        let settled = now
            .duration_since(mtime.max(ctime))
            .is_ok_and(|age| age >= margin);
        *cached = settled.then(|| Listing {
            key,
            ids: out.clone(),
        });
        Ok(out)
    }

    fn append(&self, draft: Draft<'_>) -> Result<Receipt, SendError> {
        send::append(self, draft)
    }

    fn receive(&self, id: &AgentId, req: &RecvRequest<'_>) -> Result<Batch, RecvError> {
        recv::receive(&*self.existing(id)?, req, None)
    }

    fn consume(
        &self,
        id: &AgentId,
        req: &RecvRequest<'_>,
        handle: &mut dyn FnMut(&[Envelope]) -> bool,
    ) -> Result<Batch, RecvError> {
        recv::receive(&*self.existing(id)?, req, Some(handle))
    }

    fn own_receiver(&self, id: &AgentId) -> Result<(), RecvError> {
        self.existing(id)?.recv.own()
    }

    fn expire_leases(&self, id: &AgentId) -> Result<usize, RecvError> {
        recv::expire_leases(&*self.existing(id)?)
    }

    fn ack(&self, id: &AgentId, target: AckTarget<'_>) -> Result<AckReport, RecvError> {
        recv::ack(&*self.existing(id)?, target)
    }

    fn peek_all(&self, id: &AgentId) -> Result<Vec<Envelope>, RecvError> {
        recv::peek_all(&*self.existing(id)?)
    }

    fn clear(&self, id: &AgentId) -> Result<u64, RecvError> {
        recv::clear(&*self.existing(id)?)
    }

    fn depth(&self, id: &AgentId) -> Result<Depth, RecvError> {
        let (msgs, bytes) = self.existing(id)?.meta.pending();
        Ok(Depth { msgs, bytes })
    }

    fn sent_count(&self, id: &AgentId) -> Result<u64, RecvError> {
        Ok(self.existing(id)?.meta.sent().load(Ordering::Relaxed))
    }

    fn heartbeat(&self, id: &AgentId) -> Result<(), RecvError> {
        self.existing(id)?.meta.touch(crate::store::now_ms());
        Ok(())
    }

    fn activity(&self, id: &AgentId) -> Result<crate::store::Activity, RecvError> {
        Ok(crate::store::Activity::from_meta(&self.existing(id)?.meta))
    }

    fn wake_target(&self, id: &AgentId) -> Result<WakeTarget, RecvError> {
        let ib = self.existing(id)?;
        Ok(WakeTarget {
            watch_dir: self.layout.inbox_in(&ib.dir),
            doorbell: ib.bell.clone(),
            outside_writers: false,
        })
    }
}
