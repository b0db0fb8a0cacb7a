//! Running agents: the spawner, the process governor, incidents, and what `shoal ps` shows.
//!
//! This layer sits on [`crate::bus`] (and the [`crate::liveness`] locks): it starts programs as
//! agents and watches them through the root. Nothing below it knows it exists.
//!
//! * [`spawner`]: start N agent processes, supervise, restart, stop, leave nothing behind.
//! * [`governor`]: the pacing knobs (AF_* variables), backoff, CPU headroom.
//! * [`incidents`]: the JSONL incident log (format version 1).
//! * [`status`]: the spawner's status file (format version 1).
//! * [`ps`]: every agent of a root with its state, from locks, inboxes and the status file.

pub mod governor;
pub mod incidents;
pub mod ps;
pub mod spawner;
pub mod status;
