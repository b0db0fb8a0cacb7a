//! A raw inotify watch on one directory, waited on with `poll(2)` and a timeout.
//!
//! Raw inotify, not the `notify` crate: measured 19 us p50 wake-up against 50 us
//! (linux-facts.md). inotify is a hint, not a count: after every wake the caller rereads its
//! inbox from its cursor; an `IN_Q_OVERFLOW` is just another wake.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// One inotify instance watching one directory for files written, created or moved in.
#[derive(Debug)]
pub struct DirWatch {
    inotify: Inotify,
}

/// Why a [`DirWatch`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The per-user limit on inotify instances or watches is reached (`EMFILE`/`ENOSPC`);
    /// the caller falls back to a wake-up path that needs no instance.
    #[error("inotify limit reached")]
    Exhausted(#[source] io::Error),
    /// Any other failure.
    #[error("inotify")]
    Other(#[source] io::Error),
}

impl DirWatch {
    /// Watch `dir` for `IN_MODIFY | IN_CREATE | IN_MOVED_TO`: an append to a shard, or a
    /// message file renamed in. (Not `IN_CLOSE_WRITE`: a short-lived sender closing its files
    /// would wake the receiver a second time for nothing.)
    ///
    /// # Errors
    /// [`WatchError::Exhausted`] past `fs.inotify.max_user_instances` (128 per user by default).
    pub fn new(dir: &Path) -> Result<DirWatch, WatchError> {
        let classify = |e: nix::Error| match e {
            nix::Error::EMFILE | nix::Error::ENOSPC | nix::Error::ENFILE => {
                WatchError::Exhausted(io::Error::from(e))
            }
            other => WatchError::Other(io::Error::from(other)),
        };
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(classify)?;
        inotify
            .add_watch(
                dir,
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .map_err(classify)?;
        Ok(DirWatch { inotify })
    }

    /// Block until an event arrives or `timeout` passes; drain all queued events.
    /// Returns `true` if anything arrived.
    ///
    /// # Errors
    /// A `poll(2)` or `read(2)` failure other than `EINTR`.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let t = match timeout {
            None => PollTimeout::NONE,
            // Round up: a sub-millisecond timeout must not become a busy poll(0).
            Some(d) => {
                PollTimeout::try_from(d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            Ok(0) => Ok(false),
            Ok(_) => {
                self.drain()?;
                Ok(true)
            }
            Err(nix::Error::EINTR) => Ok(true),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Discard queued events without blocking: one read of up to 4 KiB of events. Events
    /// left over (a burst larger than that) only cause one more, harmless, check of the inbox.
    fn drain(&self) -> io::Result<()> {
        match self.inotify.read_events() {
            Ok(_) | Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}
