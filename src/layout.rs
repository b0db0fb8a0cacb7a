//! Every path under a root is built here, and nowhere else.
//!
//! # On-disk layout, format version 1
//!
//! The `jsonl` layout (the default):
//!
//! ```text
//! <root>/                          mode 0700, owned by the user
//!   .shoal-format                  version marker and root settings (JSON, see crate::root)
//!   agents/<id>/                   one directory per agent
//!     inbox/shard-00.jsonl ...     the inbox: N append-only JSONL shard files (envelopes)
//!     meta                         shared-memory table: shard lengths, sequence numbers, doorbell
//!     state.0, state.1             the receiver's cursors and leases: two preallocated slots,
//!                                  the meta table says which one is current (see store::slots)
//!     recv.lock                    flock(2) held while the receiver state is read and rewritten
//!   agents/.staging-*, .trash-*    transient: agents are created and removed by rename
//!   topology.json                  teams and hubs, when planned (see crate::coord::topology)
//!   .shoal-topology.lock           flock held while the topology changes
//!   metrics/shard-00.jsonl ...     metric records (JSONL, see crate::obs::metrics), and
//!   metrics/shard-NN.<ms>-<pid>.jsonl   shards rotated away by size, pruned by age
//!   incidents.jsonl                spawner incidents: throttles, crashes, restarts, stalls
//!                                  (JSONL, see crate::agents::incidents)
//!   spawner.json                   the running (or last) spawner's view of its agents
//!                                  (see crate::agents::status)
//!   .shoal-spawner.lock            flock held by the spawner while it runs
//! ```
//!
//! The `compat` layout, the bash `message-bus.sh` layout that scripts read directly:
//!
//! ```text
//! <root>/
//!   .shoal-format
//!   <id>/inbox/<msg-id>.json       one message per file, in the bash bus's format
//!   <id>/inbox/.lock               flock(2) held while a message is added (as the bash bus did)
//!   <id>/outbox/                   kept empty: shoal counts sent messages instead of copying them
//!   <id>/.shoal/meta, state.0, state.1, recv.lock   as above
//!   .shoal-topology.json           teams and hubs, when planned
//!   .shoal-incidents.jsonl, .shoal-spawner.json, .shoal-spawner.lock   as above
//!   .shoal-metrics/                as metrics/ above
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
    kind: LayoutKind,
}

impl Layout {
    /// Paths under `root`, laid out as `kind`.
    pub fn new(root: impl Into<PathBuf>, kind: LayoutKind) -> Layout {
        Layout {
            root: root.into(),
            kind,
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The layout kind.
    pub fn kind(&self) -> LayoutKind {
        self.kind
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
        match self.kind {
            LayoutKind::Jsonl => self.root.join("agents"),
            LayoutKind::Compat => self.root.clone(),
        }
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

    /// Where shoal keeps an agent's own files (meta table, receiver state and lock).
    pub fn internals_in(&self, agent_dir: &Path) -> PathBuf {
        match self.kind {
            LayoutKind::Jsonl => agent_dir.to_owned(),
            LayoutKind::Compat => agent_dir.join(".shoal"),
        }
    }

    /// The inbox directory of an agent directory (staged or in place).
    pub fn inbox_in(&self, agent_dir: &Path) -> PathBuf {
        agent_dir.join("inbox")
    }

    /// The outbox directory (compat layout).
    pub fn outbox_in(&self, agent_dir: &Path) -> PathBuf {
        agent_dir.join("outbox")
    }

    /// The lock a message is added under (compat layout): `inbox/.lock`, as the bash bus.
    pub fn inbox_lock_in(&self, agent_dir: &Path) -> PathBuf {
        self.inbox_in(agent_dir).join(".lock")
    }

    /// Shard `i` of the inbox in `agent_dir` (jsonl layout).
    pub fn shard_in(&self, agent_dir: &Path, i: usize) -> PathBuf {
        self.inbox_in(agent_dir).join(format!("shard-{i:02}.jsonl"))
    }

    /// The file of message `msg_id` in the inbox in `agent_dir` (compat layout).
    pub fn message_in(&self, agent_dir: &Path, msg_id: &str) -> PathBuf {
        self.inbox_in(agent_dir).join(format!("{msg_id}.json"))
    }

    /// The temporary name a message is written under before it is renamed into the inbox
    /// (compat layout). It starts with a dot and does not end in `.json`, so no script globbing
    /// `inbox/*.json` ever sees it.
    pub fn message_tmp_in(&self, agent_dir: &Path, msg_id: &str) -> PathBuf {
        self.inbox_in(agent_dir).join(format!(".{msg_id}.json.tmp"))
    }

    /// The meta file in `agent_dir`.
    pub fn meta_in(&self, agent_dir: &Path) -> PathBuf {
        self.internals_in(agent_dir).join("meta")
    }

    /// Receiver state slot `i` (0 or 1) in `agent_dir`.
    pub fn state_in(&self, agent_dir: &Path, i: usize) -> PathBuf {
        self.internals_in(agent_dir)
            .join(if i == 0 { "state.0" } else { "state.1" })
    }

    /// The receiver lock in `agent_dir`.
    pub fn recv_lock_in(&self, agent_dir: &Path) -> PathBuf {
        self.internals_in(agent_dir).join("recv.lock")
    }

    /// An agent's inbox directory.
    pub fn inbox_dir(&self, id: &AgentId) -> PathBuf {
        self.inbox_in(&self.agent_dir(id))
    }

    /// An agent's meta file.
    pub fn meta(&self, id: &AgentId) -> PathBuf {
        self.meta_in(&self.agent_dir(id))
    }

    /// The lock a process running as this agent holds while it lives (a hub, later any agent).
    pub fn alive_lock(&self, id: &AgentId) -> PathBuf {
        self.internals_in(&self.agent_dir(id)).join("alive.lock")
    }

    /// The topology (teams and hubs).
    pub fn topology(&self) -> PathBuf {
        self.root.join(match self.kind {
            LayoutKind::Jsonl => "topology.json",
            LayoutKind::Compat => ".shoal-topology.json",
        })
    }

    /// Temporary name the topology is written under before the rename.
    pub fn topology_tmp(&self) -> PathBuf {
        self.root.join(".shoal-topology.json.tmp")
    }

    /// The metrics directory (16 JSONL shards by default, and their rotated files).
    pub fn metrics_dir(&self) -> PathBuf {
        self.root.join(match self.kind {
            LayoutKind::Jsonl => "metrics",
            LayoutKind::Compat => ".shoal-metrics",
        })
    }

    /// The spawner's incident log.
    pub fn incidents(&self) -> PathBuf {
        self.root.join(match self.kind {
            LayoutKind::Jsonl => "incidents.jsonl",
            LayoutKind::Compat => ".shoal-incidents.jsonl",
        })
    }

    /// The spawner's status file.
    pub fn spawner_status(&self) -> PathBuf {
        self.root.join(match self.kind {
            LayoutKind::Jsonl => "spawner.json",
            LayoutKind::Compat => ".shoal-spawner.json",
        })
    }

    /// Temporary name the spawner's status is written under before the rename.
    pub fn spawner_status_tmp(&self) -> PathBuf {
        self.root.join(".shoal-spawner.json.tmp")
    }

    /// Held by a running spawner (one per root).
    pub fn spawner_lock(&self) -> PathBuf {
        self.root.join(".shoal-spawner.lock")
    }

    /// Held while the topology is read and rewritten.
    pub fn topology_lock(&self) -> PathBuf {
        self.root.join(".shoal-topology.lock")
    }
}
