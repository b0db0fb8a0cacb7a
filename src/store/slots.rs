//! Receiver state persistence shared by every layout: two preallocated slot files and a
//! pointer word in the meta table.
//!
//! A save writes the slot that is *not* current, then switches the meta table's state pointer
//! (generation, slot, length) with one atomic store. A receiver killed at any point leaves the
//! old or the new state, never a mix. The slots' space is reserved when the agent is created, so
//! receiving and acknowledging keep working on a full filesystem. Everything happens under the
//! receiver lock (`recv.lock`, flock) plus a mutex for this process's threads, and the state
//! last read or written is cached until another process moves the pointer.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::meta::Meta;
use crate::store::RecvError;

/// Space reserved for each state slot when an agent is created.
pub(crate) const SLOT_INITIAL: u64 = 16 * 1024;

const PTR_LEN_MASK: u64 = 0xffff_ffff;
const PTR_SLOT_BIT: u64 = 1 << 32;
const PTR_GEN_SHIFT: u32 = 33;

/// A receiver state kept in slots.
pub(crate) trait SlotState: Serialize + DeserializeOwned + Sized {
    /// The state of an inbox nothing was ever received from.
    fn fresh(meta: &Meta) -> Self;
    /// Check a state read from `path` (version, shape) before it is used.
    ///
    /// # Errors
    /// [`RecvError::CorruptState`].
    fn checked(self, meta: &Meta, path: &Path) -> Result<Self, RecvError>;
    /// Mirror what senders need to know (acknowledged counts) into the meta table.
    fn publish(&self, _meta: &Meta) {}
    /// The state as JSON, appended to `out`; the bytes must be what `serde_json` writes for
    /// it (a state type on a hot path writes them by hand, and proves it by a test).
    fn encode(&self, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(out, self); // into a Vec: cannot fail
    }
}

/// The paths of an agent's receiver files.
#[derive(Debug, Clone)]
pub(crate) struct SlotPaths {
    pub(crate) lock: PathBuf,
    pub(crate) slots: [PathBuf; 2],
}

/// Create the receiver lock and both slots (in a staging directory), their space reserved.
pub(crate) fn create(paths: &SlotPaths) -> Result<(), crate::store::AgentError> {
    use crate::store::AgentError;
    super::create_private_file(&paths.lock).map_err(AgentError::at(&paths.lock))?;
    for p in &paths.slots {
        let f = super::create_private_file(p).map_err(AgentError::at(p))?;
        crate::sys::grow(&f, SLOT_INITIAL).map_err(AgentError::at(p))?;
    }
    Ok(())
}

#[derive(Debug)]
struct Files {
    lock: fs::File,
    slots: [fs::File; 2],
}

#[derive(Debug)]
struct Cache<T> {
    state: Option<(u64, T)>,
    /// Reused for serializing the state.
    buf: Vec<u8>,
    capacity: [u64; 2],
    /// Each slot mapped shared (its whole capacity), made on the first save: a save is then a
    /// copy into the page instead of a `pwrite` (one system call less per receive).
    maps: [Option<memmap2::MmapRaw>; 2],
    /// This process holds the receiver lock for good (see [`Slots::own`]).
    owned: bool,
}

/// One agent's receiver state store.
#[derive(Debug)]
pub(crate) struct Slots<T> {
    paths: SlotPaths,
    files: OnceLock<Files>,
    cache: Mutex<Cache<T>>,
}

/// The receiver lock, held for one read-modify-write of the state.
pub(crate) struct Guard<'a, T> {
    cache: MutexGuard<'a, Cache<T>>,
    files: &'a Files,
    paths: &'a SlotPaths,
    meta: &'a Meta,
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        if !self.cache.owned {
            let _ = self.files.lock.unlock();
        }
    }
}

fn open_rw(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

impl<T: SlotState> Slots<T> {
    pub(crate) fn new(paths: SlotPaths) -> Slots<T> {
        Slots {
            paths,
            files: OnceLock::new(),
            cache: Mutex::new(Cache {
                state: None,
                buf: Vec::new(),
                capacity: [0; 2],
                maps: [None, None],
                owned: false,
            }),
        }
    }

    /// Look at this process's cached state without the receiver lock, if it is still current
    /// (no process saved since). For quick "anything new?" checks; `None` when there is no
    /// current cached copy.
    pub(crate) fn peek_cached<R>(&self, meta: &Meta, f: impl FnOnce(&T) -> R) -> Option<R> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = meta.state_ptr().load(Ordering::Acquire);
        match &cache.state {
            Some((cached, st)) if *cached == ptr => Some(f(st)),
            _ => None,
        }
    }

    /// The files, opened on first use.
    fn files(&self, cache: &mut Cache<T>) -> Result<&Files, RecvError> {
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let p = &self.paths;
        let files = Files {
            lock: open_rw(&p.lock).map_err(RecvError::at(&p.lock))?,
            slots: [
                open_rw(&p.slots[0]).map_err(RecvError::at(&p.slots[0]))?,
                open_rw(&p.slots[1]).map_err(RecvError::at(&p.slots[1]))?,
            ],
        };
        for (i, f) in files.slots.iter().enumerate() {
            cache.capacity[i] = f.metadata().map_err(RecvError::at(&p.slots[i]))?.len();
        }
        Ok(self.files.get_or_init(|| files))
    }

    /// Take the receiver lock (opening the files on first use).
    pub(crate) fn lock<'a>(&'a self, meta: &'a Meta) -> Result<Guard<'a, T>, RecvError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let files = self.files(&mut cache)?;
        if !cache.owned {
            files
                .lock
                .lock()
                .map_err(|e| RecvError::at(&self.paths.lock)(e))?;
        }
        Ok(Guard {
            cache,
            files,
            paths: &self.paths,
            meta,
        })
    }

    /// Take the receiver lock for as long as this process lives: a long-running consumer
    /// that owns its inbox then skips two system calls per receive. Another process that
    /// receives from this inbox waits until this one exits. Waits for the lock if another
    /// process holds it.
    pub(crate) fn own(&self) -> Result<(), RecvError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.owned {
            return Ok(());
        }
        let files = self.files(&mut cache)?;
        files
            .lock
            .lock()
            .map_err(|e| RecvError::at(&self.paths.lock)(e))?;
        cache.owned = true;
        Ok(())
    }
}

impl<T: SlotState> Guard<'_, T> {
    /// The state: this process's cached copy if the pointer has not moved since, else read
    /// from the current slot. The cache is emptied; [`Guard::save`] or [`Guard::keep`] refills it.
    pub(crate) fn load(&mut self) -> Result<T, RecvError> {
        let ptr = self.meta.state_ptr().load(Ordering::Acquire);
        if let Some((cached, st)) = self.cache.state.take()
            && cached == ptr
        {
            return Ok(st);
        }
        self.read(ptr)
    }

    /// The state the pointer `ptr` designates, read from its slot. Apart from the cached path
    /// of [`Guard::load`] (most of whose size is the state's parser), so that the code every
    /// receive runs stays small.
    #[cold]
    #[inline(never)]
    fn read(&self, ptr: u64) -> Result<T, RecvError> {
        let len = (ptr & PTR_LEN_MASK) as usize;
        if len == 0 {
            return Ok(T::fresh(self.meta)); // never saved
        }
        let slot = usize::from(ptr & PTR_SLOT_BIT != 0);
        let path = &self.paths.slots[slot];
        let mut bytes = vec![0u8; len];
        self.files.slots[slot]
            .read_exact_at(&mut bytes, 0)
            .map_err(RecvError::at(path))?;
        let st = serde_json::from_slice::<T>(&bytes).map_err(|e| RecvError::CorruptState {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        st.checked(self.meta, path)
    }

    /// Write the state into the slot that is not current, make it current with one atomic
    /// store, publish its mirrors, and keep it cached.
    pub(crate) fn save(&mut self, st: T) -> Result<(), RecvError> {
        let mut bytes = std::mem::take(&mut self.cache.buf);
        bytes.clear();
        st.encode(&mut bytes);
        let cur = self.meta.state_ptr().load(Ordering::Acquire);
        let slot = usize::from(cur & PTR_SLOT_BIT == 0);
        let path = &self.paths.slots[slot];
        if bytes.len() as u64 > PTR_LEN_MASK {
            return Err(RecvError::CorruptState {
                path: path.clone(),
                detail: format!("state of {} bytes is too large", bytes.len()),
            });
        }
        let file = &self.files.slots[slot];
        if bytes.len() as u64 > self.cache.capacity[slot] {
            let cap = (bytes.len() as u64).next_power_of_two();
            crate::sys::grow(file, cap).map_err(RecvError::at(path))?;
            self.cache.capacity[slot] = cap;
            self.cache.maps[slot] = None; // too short now
        }
        if self.cache.maps[slot].is_none() {
            // The slot's space is reserved (`create`, `grow`), so stores to the mapping
            // cannot fault on a full filesystem.
            let map = memmap2::MmapOptions::new()
                .len(self.cache.capacity[slot] as usize)
                .map_raw(file)
                .map_err(RecvError::at(path))?;
            self.cache.maps[slot] = Some(map);
        }
        if let Some(map) = &self.cache.maps[slot] {
            // SAFETY: the mapping is `capacity` >= `bytes.len()` bytes long and lives as long
            // as the cache; this slot is not the current one, and only the holder of the
            // receiver lock (this process) writes slots, so nothing else writes these bytes.
            // Readers in other processes read it with `pread` only after the pointer below
            // switches to it (release store).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_mut_ptr(), bytes.len()) };
        }
        let generation = ((cur >> PTR_GEN_SHIFT) + 1) & ((1 << 31) - 1);
        let ptr = (generation << PTR_GEN_SHIFT)
            | if slot == 1 { PTR_SLOT_BIT } else { 0 }
            | bytes.len() as u64;
        self.meta.state_ptr().store(ptr, Ordering::Release);
        st.publish(self.meta);
        self.cache.state = Some((ptr, st));
        self.cache.buf = bytes;
        Ok(())
    }

    /// Change the cached copy without saving it: for bookkeeping that may lag behind on disk
    /// (it is saved with the next change, and redoing it is harmless).
    pub(crate) fn with_cached(&mut self, f: impl FnOnce(&mut T)) {
        if let Some((_, st)) = self.cache.state.as_mut() {
            f(st);
        }
    }

    /// Put an unchanged state back in the cache.
    pub(crate) fn keep(&mut self, st: T) {
        self.cache.state = Some((self.meta.state_ptr().load(Ordering::Acquire), st));
    }
}
