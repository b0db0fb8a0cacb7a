//! A shared, writable mapping of a small file, accessed only through atomics.
//!
//! Many processes map the same meta file. Rust's memory model has no notion of another process,
//! so every access goes through `AtomicU32`/`AtomicU64` at aligned offsets: the hardware gives
//! those the same guarantees across processes as across threads.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::MmapRaw;

/// A `MAP_SHARED` read-write mapping of the first `len` bytes of a file.
#[derive(Debug)]
pub struct SharedWords {
    map: MmapRaw,
}

impl SharedWords {
    /// Map the first `len` bytes of `file` (which must be at least that long) shared.
    ///
    /// # Errors
    /// The `mmap(2)` error.
    ///
    /// # Notes
    /// A store to a page the filesystem has not allocated yet faults with `SIGBUS` when the
    /// filesystem is full. Callers reserve pages with [`crate::sys::reserve`] before writing to them.
    pub fn map(file: &File, len: usize) -> io::Result<SharedWords> {
        let map = memmap2::MmapOptions::new().len(len).map_raw(file)?;
        Ok(SharedWords { map })
    }

    /// The 64-bit word at byte offset `off`.
    ///
    /// # Panics
    /// If `off` is not 8-aligned or the word does not fit in the mapping: a layout bug.
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.map.len(),
            "bad u64 offset {off}"
        );
        // SAFETY: the mapping is page-aligned, `off` is 8-aligned and in bounds (checked above),
        // and lives as long as `self`. Every process touches these bytes only through atomics.
        unsafe { &*(self.map.as_mut_ptr().add(off) as *const AtomicU64) }
    }

    /// The 32-bit word at byte offset `off`.
    ///
    /// # Panics
    /// If `off` is not 4-aligned or the word does not fit in the mapping: a layout bug.
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.map.len(),
            "bad u32 offset {off}"
        );
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        unsafe { &*(self.map.as_mut_ptr().add(off) as *const AtomicU32) }
    }
}

// SAFETY: the mapping is only accessed through atomics; sharing it between threads is what it is for.
unsafe impl Sync for SharedWords {}
// SAFETY: the raw mapping has no thread affinity.
unsafe impl Send for SharedWords {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn two_mappings_of_one_file_see_each_other() {
        let dir = crate::journal::tests::shm_dir("shared");
        let path = dir.join("words");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(4096).unwrap();
        let a = SharedWords::map(&f, 4096).unwrap();
        let f2 = File::options().read(true).write(true).open(&path).unwrap();
        let b = SharedWords::map(&f2, 4096).unwrap();
        a.u64_at(8).store(42, Ordering::SeqCst);
        assert_eq!(b.u64_at(8).load(Ordering::SeqCst), 42);
        b.u32_at(4).fetch_add(3, Ordering::SeqCst);
        assert_eq!(a.u32_at(4).load(Ordering::SeqCst), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
