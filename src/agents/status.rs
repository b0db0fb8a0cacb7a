//! The spawner's status file: what it started, as it last saw it.
//!
//! # Format, version 1
//!
//! `spawner.json` in the root, replaced atomically (write a temporary file, rename) at most a
//! few times a second while something changes, and at exit. `shoal ps` reads it to add process
//! ids, restarts and exit statuses to what the root itself tells (liveness locks, inboxes).
//!
//! ```json
//! {"v":1,"pid":4100,"started_ms":1796165378000,"updated_ms":1796165379000,"running":true,
//!  "command":["python3","worker.py"],"stall_after_ms":60000,
//!  "agents":[{"id":"agent-0000","team":"team-000","hub":false,"state":"running","pid":4107,
//!             "restarts":0,"crashes":0,"started_ms":1796165378010}]}
//! ```
//!
//! `running` is true while the spawner runs; a spawner killed outright leaves it true, which is
//! why readers also check the spawner's lock ([`spawner_running`]). Agent `state` is one of
//! `pending`, `starting`, `running`, `backoff` (waiting to restart), `stopping`, `exited`,
//! `crashed`, `failed` (could not be started or gave up); `exit_code` or `signal` tell how the
//! last process ended.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

/// Format version written by this build.
pub const VERSION: u32 = 1;

/// One agent as the spawner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Agent id.
    pub id: String,
    /// Its team, if the topology has teams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Whether this is a hub the spawner runs (`shoal hub`).
    #[serde(default)]
    pub hub: bool,
    /// See the module documentation.
    pub state: String,
    /// The current (or last) process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Times it was restarted.
    pub restarts: u32,
    /// Times it crashed.
    pub crashes: u32,
    /// When its current (or last) process started, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Exit status of its last process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended its last process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnerStatus {
    /// Format version.
    pub v: u32,
    /// The spawner's process id.
    pub pid: u32,
    /// When it started, ms since the epoch.
    pub started_ms: u64,
    /// When this was written.
    pub updated_ms: u64,
    /// Whether the spawner was running when it wrote this.
    pub running: bool,
    /// The agents' command.
    pub command: Vec<String>,
    /// Its stall threshold.
    pub stall_after_ms: u64,
    /// Every agent and hub it runs.
    pub agents: Vec<AgentStatus>,
}

impl SpawnerStatus {
    /// Replace the status file of `layout` with this.
    ///
    /// # Errors
    /// The write or rename error.
    pub fn save(&self, layout: &Layout) -> io::Result<()> {
        let tmp = layout.spawner_status_tmp();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let mut text = serde_json::to_vec(self).map_err(io::Error::other)?;
        text.push(b'\n');
        f.write_all(&text)?;
        drop(f);
        std::fs::rename(&tmp, layout.spawner_status())
    }

    /// The status file of `layout`; `None` if no spawner ever ran there.
    ///
    /// # Errors
    /// Unreadable, or not a status file of a version this build reads.
    pub fn load(layout: &Layout) -> io::Result<Option<SpawnerStatus>> {
        let path = layout.spawner_status();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let s: SpawnerStatus = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a spawner status file: {e}", path.display()),
            )
        })?;
        if s.v != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: status format version {} (this build reads {VERSION})",
                    path.display(),
                    s.v
                ),
            ));
        }
        Ok(Some(s))
    }
}

/// The lock a spawner holds while it runs: one spawner per root.
#[derive(Debug)]
pub struct SpawnerLock {
    _file: File,
}

impl SpawnerLock {
    /// Take the root's spawner lock.
    ///
    /// # Errors
    /// `WouldBlock` if another spawner holds it; the open error.
    pub fn acquire(layout: &Layout) -> io::Result<SpawnerLock> {
        let file = open_lock(layout, true)?;
        match file.try_lock() {
            Ok(()) => Ok(SpawnerLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Whether a spawner runs on this root now.
///
/// # Errors
/// The lock file cannot be opened.
pub fn spawner_running(layout: &Layout) -> io::Result<bool> {
    // Looking must not create the lock file: `shoal ps` changes nothing in the root.
    let file = match open_lock(layout, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn open_lock(layout: &Layout, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(layout.spawner_lock())
}
