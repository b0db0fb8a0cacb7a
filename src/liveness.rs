//! Liveness locks: an agent is alive while a process holds its `alive.lock`.
//!
//! Not while its PID exists: PIDs wrap (at 32768 on many hosts) and a dead agent's PID soon
//! names another process. A `flock(2)` lock is released by the kernel when the last descriptor
//! of its open file is closed, which is when every process holding it has exited, however
//! it exited. So the lock answers "is anyone running as this agent?" exactly, with no stale state
//! to clean up.
//!
//! The lock is taken exclusively by the agent (or, for any program, by `shoal spawn` on its
//! behalf, handing the locked descriptor to the child; see [`AliveLock::fd`]). Anyone may ask
//! [`is_alive`], which probes with a shared lock and never blocks.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::envelope::AgentId;
use crate::layout::Layout;

/// Why a liveness lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// Another process holds the agent's lock: the agent is running already.
    #[error("agent {0} is already running (another process holds its liveness lock)")]
    Running(AgentId),
    /// The lock file could not be opened or locked.
    #[error("{}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// A held liveness lock; released when dropped (and by the kernel when the process dies).
#[derive(Debug)]
pub struct AliveLock {
    file: File,
}

impl AliveLock {
    /// Take agent `id`'s liveness lock, waiting up to `wait` for a holder to go away (a process
    /// killed a moment ago keeps its locks for a few milliseconds, and a concurrent
    /// [`is_alive`] probe holds it for microseconds).
    ///
    /// # Errors
    /// [`LivenessError::Running`] if it is still held after `wait`; [`LivenessError::Io`].
    pub fn acquire(
        layout: &Layout,
        id: &AgentId,
        wait: Duration,
    ) -> Result<AliveLock, LivenessError> {
        let path = layout.alive_lock(id);
        let io_err = |source| LivenessError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err)?;
        let give_up = Instant::now() + wait;
        let mut pause = Duration::from_micros(200);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(AliveLock { file }),
                Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => return Err(LivenessError::Running(id.clone())),
                Err(TryLockError::Error(e)) => return Err(io_err(e)),
            }
        }
    }

    /// The locked descriptor (close-on-exec): a child that inherits a copy of it (see
    /// [`crate::sys::dup_inheritable`]) holds the lock for as long as it lives, even after this
    /// handle is dropped.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether a process holds agent `id`'s liveness lock now. An agent that never ran (no lock
/// file) is not alive.
///
/// # Errors
/// The lock file exists but cannot be opened or probed.
pub fn is_alive(layout: &Layout, id: &AgentId) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(layout.alive_lock(id))
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false), // released when `file` closes
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_by_one_probed_by_all() {
        let d = crate::journal::tests::shm_dir("alive");
        let layout = Layout::new(&d, crate::LayoutKind::Jsonl);
        let id = AgentId::new("a1").unwrap();
        std::fs::create_dir_all(layout.agent_dir(&id)).unwrap();
        assert!(!is_alive(&layout, &id).unwrap(), "no lock file: never ran");
        let lock = AliveLock::acquire(&layout, &id, Duration::ZERO).unwrap();
        assert!(is_alive(&layout, &id).unwrap());
        let again = AliveLock::acquire(&layout, &id, Duration::from_millis(30));
        assert!(matches!(again, Err(LivenessError::Running(_))));
        drop(lock);
        assert!(!is_alive(&layout, &id).unwrap());
        assert!(AliveLock::acquire(&layout, &id, Duration::ZERO).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
