//! Every path under a root is built here, and nowhere else.
//!
//! # On-disk layout, format version 1
//!
//! ```text
//! <root>/                          mode 0700, owned by the user
//!   .shoal-format                  version marker and root settings (JSON, see crate::root)
//!   agents/<id>/                   one directory per agent ("jsonl" layout)
//!     inbox/shard-00.jsonl ...     the inbox: N append-only JSONL shard files (envelopes)
//!     meta                         shared-memory table: shard lengths, sequence numbers, doorbell
//!     state.0, state.1             the receiver's cursors and leases: two preallocated slots,
//!                                  the meta table says which one is current (see store::jsonl)
//!     recv.lock                    flock(2) held while the receiver state is read and rewritten
//!     .staging-*, .trash-*         transient: agents are created and removed by rename
//! ```
//!
//! Agent ids are validated ([`AgentId`]) before they reach this module, so every path built here
//! stays inside the root.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::envelope::AgentId;

/// Name of the version marker file in a root.
pub const MARKER: &str = ".shoal-format";

/// Which on-disk layout a root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    /// Sharded JSONL inboxes (the default).
    Jsonl,
    /// One file per message, as the bash `message-bus.sh` wrote them.
    Compat,
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayoutKind::Jsonl => "jsonl",
            LayoutKind::Compat => "compat",
        })
    }
}

impl std::str::FromStr for LayoutKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(LayoutKind::Jsonl),
            "compat" => Ok(LayoutKind::Compat),
            other => Err(format!(
                "unknown layout {other:?} (expected jsonl or compat)"
            )),
        }
    }
}

/// Path builder for one root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The version marker.
    pub fn marker(&self) -> PathBuf {
        self.root.join(MARKER)
    }

    /// A temporary name for writing the marker before linking it into place.
    pub fn marker_tmp(&self, nonce: u64) -> PathBuf {
        self.root.join(format!("{MARKER}.tmp-{nonce:016x}"))
    }

    /// The directory holding all agents.
    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// One agent's directory.
    pub fn agent_dir(&self, id: &AgentId) -> PathBuf {
        self.agents_dir().join(id.as_str())
    }

    /// A fresh directory an agent is assembled in before it is renamed into place.
    pub fn staging_dir(&self, id: &AgentId, nonce: u64) -> PathBuf {
        self.agents_dir()
            .join(format!(".staging-{id}-{nonce:016x}"))
    }

    /// Where an agent is renamed to before it is deleted, so it disappears at once.
    pub fn trash_dir(&self, id: &AgentId, nonce: u64) -> PathBuf {
        self.agents_dir().join(format!(".trash-{id}-{nonce:016x}"))
    }

    /// The inbox directory of an agent directory (staged or in place).
    pub fn inbox_in(agent_dir: &Path) -> PathBuf {
        agent_dir.join("inbox")
    }

    /// Shard `i` of the inbox in `agent_dir`.
    pub fn shard_in(agent_dir: &Path, i: usize) -> PathBuf {
        Self::inbox_in(agent_dir).join(format!("shard-{i:02}.jsonl"))
    }

    /// The meta file in `agent_dir`.
    pub fn meta_in(agent_dir: &Path) -> PathBuf {
        agent_dir.join("meta")
    }

    /// An agent's inbox directory.
    pub fn inbox_dir(&self, id: &AgentId) -> PathBuf {
        Self::inbox_in(&self.agent_dir(id))
    }

    /// Shard `i` of an agent's inbox.
    pub fn shard(&self, id: &AgentId, i: usize) -> PathBuf {
        Self::shard_in(&self.agent_dir(id), i)
    }

    /// An agent's meta file.
    pub fn meta(&self, id: &AgentId) -> PathBuf {
        Self::meta_in(&self.agent_dir(id))
    }

    /// Receiver state slot `i` (0 or 1) in `agent_dir`.
    pub fn state_in(agent_dir: &Path, i: usize) -> PathBuf {
        agent_dir.join(if i == 0 { "state.0" } else { "state.1" })
    }

    /// The receiver lock in `agent_dir`.
    pub fn recv_lock_in(agent_dir: &Path) -> PathBuf {
        agent_dir.join("recv.lock")
    }

    /// Receiver state slot `i` of an agent.
    pub fn state(&self, id: &AgentId, i: usize) -> PathBuf {
        Self::state_in(&self.agent_dir(id), i)
    }

    /// The receiver lock.
    pub fn recv_lock(&self, id: &AgentId) -> PathBuf {
        Self::recv_lock_in(&self.agent_dir(id))
    }
}
