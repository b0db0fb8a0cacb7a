//! What the benchmarks share.

use std::path::PathBuf;

/// A fresh directory on tmpfs, removed on drop.
pub(crate) struct ShmDir(pub(crate) PathBuf);

impl ShmDir {
    pub(crate) fn new(tag: &str) -> ShmDir {
        let p = PathBuf::from(format!("/dev/shm/shoal-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        ShmDir(p)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
