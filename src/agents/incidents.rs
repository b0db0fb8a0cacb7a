//! The incident log: one JSON line per thing a supervisor had to do or notice.
//!
//! # Record format, version 1
//!
//! Appended to `incidents.jsonl` in the root through the torn-tail-safe append
//! ([`crate::journal`]); readers skip lines that do not parse.
//!
//! ```json
//! {"v":1,"timestamp":"2026-12-01T22:49:38.123Z","ts_ms":1796165378123,"kind":"crash",
//!  "agent":"agent-0003","pid":4242,"exit_code":1,"restarts":2,"detail":"exited with status 1"}
//! ```
//!
//! | field | type | meaning |
//! |-------|------|---------|
//! | `v` | 1 | record version |
//! | `timestamp` | string | ISO-8601 UTC with milliseconds |
//! | `ts_ms` | integer | the same instant, ms since the epoch |
//! | `kind` | string | see [`Kind`] |
//! | `agent` | string, optional | the agent concerned |
//! | `pid` | integer, optional | its process |
//! | `exit_code`, `signal` | integer, optional | how it ended (crash) |
//! | `restarts` | integer, optional | restarts so far |
//! | `attempt` | integer, optional | consecutive failures, 1 for the first (backoff) |
//! | `delay_ms` | integer, optional | the backoff delay chosen |
//! | `value` | number, optional | the measured value (CPU headroom %, idle ms of a stalled agent) |
//! | `detail` | string | a sentence for humans |

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::journal::Journal;

/// Record version written by this build.
pub const VERSION: u32 = 1;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Starts paused: CPU headroom below the target (`value`: headroom %).
    Throttle,
    /// A process could not be started (`detail`: the error); it is retried after `delay_ms`.
    SpawnFailed,
    /// An agent exited with a failure status or was killed by a signal it was not sent by us.
    Crash,
    /// A delay before the next try: `delay_ms`, after `attempt` consecutive failures.
    Backoff,
    /// An agent was started again (`restarts` so far).
    Restart,
    /// An agent crashed more often than allowed and is not restarted again.
    GaveUp,
    /// Messages wait and the agent has shown no activity for `value` ms.
    Stalled,
    /// A stalled agent is active again.
    Recovered,
    /// An agent did not stop within the grace period after SIGTERM and was sent SIGKILL.
    Killed,
}

impl Kind {
    /// The name used in the record and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Throttle => "throttle",
            Kind::SpawnFailed => "spawn_failed",
            Kind::Crash => "crash",
            Kind::Backoff => "backoff",
            Kind::Restart => "restart",
            Kind::GaveUp => "gave_up",
            Kind::Stalled => "stalled",
            Kind::Recovered => "recovered",
            Kind::Killed => "killed",
        }
    }
}

/// One incident record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Record version.
    pub v: u32,
    /// ISO-8601 UTC time with milliseconds.
    pub timestamp: String,
    /// The same, in ms since the epoch.
    pub ts_ms: u64,
    /// What happened.
    pub kind: Kind,
    /// The agent concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Its process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Restarts so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// Consecutive failures (1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Backoff delay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// A measured value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// For humans.
    pub detail: String,
}

impl Incident {
    /// A record of `kind` at `ts_ms` with no optional fields.
    pub fn new(kind: Kind, ts_ms: u64, detail: impl Into<String>) -> Incident {
        Incident {
            v: VERSION,
            timestamp: crate::sys::iso8601_utc(ts_ms),
            ts_ms,
            kind,
            agent: None,
            pid: None,
            exit_code: None,
            signal: None,
            restarts: None,
            attempt: None,
            delay_ms: None,
            value: None,
            detail: detail.into(),
        }
    }
}

/// The incident log of one root.
#[derive(Debug)]
pub struct IncidentLog {
    journal: Journal,
}

impl IncidentLog {
    /// Open (creating) the log at `path`.
    ///
    /// # Errors
    /// The open error.
    pub fn open(path: &Path) -> io::Result<IncidentLog> {
        Ok(IncidentLog {
            journal: Journal::open(path, true)?,
        })
    }

    /// Append one record.
    ///
    /// # Errors
    /// The append error (a full filesystem among them).
    pub fn record(&self, incident: &Incident) -> io::Result<()> {
        let mut line = serde_json::to_vec(incident).map_err(io::Error::other)?;
        line.push(b'\n');
        self.journal
            .append(&line)
            .map(|_| ())
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        self.journal.path()
    }
}

/// Every readable record of the log at `path`, oldest first, and how many lines were skipped
/// as unreadable. A missing log has none.
///
/// # Errors
/// The read error.
pub fn read(path: &Path) -> io::Result<(Vec<Incident>, usize)> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let (mut out, mut bad) = (Vec::new(), 0);
    // Only complete lines: a record being written has no newline yet.
    let complete = match memchr::memrchr(b'\n', &text) {
        Some(i) => &text[..=i],
        None => &[][..],
    };
    for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Incident>(line) {
            Ok(i) => out.push(i),
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_skipped() {
        let d = crate::journal::tests::shm_dir("incidents");
        let p = d.join("incidents.jsonl");
        let log = IncidentLog::open(&p).unwrap();
        let mut i = Incident::new(Kind::Crash, 1_795_310_779_123, "exited with status 1");
        i.agent = Some("a1".into());
        i.exit_code = Some(1);
        log.record(&i).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"not json\n{\"v\":1,"))
            .unwrap();
        let (got, bad) = read(&p).unwrap();
        assert_eq!(got, vec![i]);
        assert_eq!(
            bad, 1,
            "the torn tail is not a line yet; the garbage line is skipped"
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("{\"v\":1,\"timestamp\":\"2026-11-22T01:26:19.123Z\""));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
