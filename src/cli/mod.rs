//! Command implementations. Each family has a file; none holds logic a library user would miss.

pub(crate) mod bench;
pub(crate) mod bench_spawn;
pub(crate) mod bus;
pub(crate) mod coord;
pub(crate) mod demo;
pub(crate) mod metrics;
pub(crate) mod spawn;
pub(crate) mod verbs;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal::root::{self, Root, RootError, RootOptions};
use shoal::{Bus, LayoutKind, RecvError, SendError};

/// Child processes a command started: killed and reaped when it returns, and (through
/// [`Children::bind`]) killed by the kernel if the command itself is killed.
pub(crate) struct Children(pub(crate) Vec<std::process::Child>);

impl Children {
    /// Make the process `cmd` will start die with this one.
    pub(crate) fn bind(cmd: &mut std::process::Command) {
        shoal::sys::die_with_parent(cmd);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Exit statuses, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Exit {
    /// Success.
    Ok = 0,
    /// Any error, bad arguments included.
    Failure = 1,
    /// The recipient's inbox is at its quota (`EX_TEMPFAIL`): retry later.
    QuotaExceeded = 75,
    /// A coordination round ended with agents missing.
    Incomplete = 3,
    /// `recv --wait --timeout` passed without a message (as `timeout(1)`).
    Timeout = 124,
    /// Stopped by SIGHUP (128 + 1, as a shell reports it).
    Hangup = 129,
    /// Stopped by SIGINT (128 + 2).
    Interrupted = 130,
    /// Stopped by SIGTERM (128 + 15).
    Terminated = 143,
}

/// Everything a command needs from the command line's global options.
pub(crate) struct Ctx {
    root_flag: Option<PathBuf>,
    bash_logs: bool,
    layout: Option<LayoutKind>,
}

impl Ctx {
    pub(crate) fn new(
        root_flag: Option<PathBuf>,
        bash_logs: bool,
        layout: Option<LayoutKind>,
    ) -> Ctx {
        Ctx {
            root_flag,
            bash_logs,
            layout,
        }
    }

    /// The root path chosen by flag or environment.
    pub(crate) fn root_path(&self) -> PathBuf {
        root::resolve(self.root_flag.as_deref())
    }

    /// Open the root, creating it if `create`; print its warnings.
    pub(crate) fn root(&self, create: bool) -> Result<Root, RootError> {
        let r = Root::open_with(
            &self.root_path(),
            &RootOptions {
                create: create.then_some(self.layout.unwrap_or(LayoutKind::Jsonl)),
                expect: None,
                // Asking for compat explicitly (as the message-bus.sh shim does) takes over a
                // directory the bash bus left behind.
                adopt_bash_bus: self.layout == Some(LayoutKind::Compat),
            },
        )?;
        for w in r.warnings() {
            self.warn(w);
        }
        Ok(r)
    }

    /// Open the bus (creating the root if `create`).
    pub(crate) fn bus(&self, create: bool) -> anyhow::Result<Bus> {
        Ok(Bus::open(self.root(create)?)?)
    }

    /// An informational line on stderr (only in bash-log mode, as the bash bus logs everything).
    pub(crate) fn log(&self, msg: &str) {
        if self.bash_logs {
            let _ = writeln!(
                io::stderr(),
                "[{}] [MESSAGE-BUS] {msg}",
                shoal::sys::local_hms()
            );
        }
    }

    /// A warning on stderr.
    pub(crate) fn warn(&self, msg: &str) {
        if self.bash_logs {
            let _ = writeln!(
                io::stderr(),
                "[{}] [MESSAGE-BUS] WARN: {msg}",
                shoal::sys::local_hms()
            );
        } else {
            let _ = writeln!(io::stderr(), "shoal: warning: {msg}");
        }
    }

    /// An error on stderr.
    pub(crate) fn error(&self, msg: &str) {
        if self.bash_logs {
            let _ = writeln!(
                io::stderr(),
                "[{}] [MESSAGE-BUS] ERROR: {msg}",
                shoal::sys::local_hms()
            );
        } else {
            let _ = writeln!(io::stderr(), "shoal: error: {msg}");
        }
    }

    /// Report the command's outcome and pick the exit status.
    pub(crate) fn finish(&self, result: anyhow::Result<Exit>) -> Exit {
        match result {
            Ok(code) => code,
            Err(e) => {
                if is_broken_pipe(&e) {
                    return Exit::Ok; // the reader went away: not our failure
                }
                self.error(&format!("{e:#}"));
                exit_for(&e)
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

fn exit_for(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(SendError::QuotaExceeded { .. }) = cause.downcast_ref::<SendError>() {
            return Exit::QuotaExceeded;
        }
    }
    Exit::Failure
}

/// Parse a duration: `250us`, `100ms`, `30s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 30s, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?} (use us, ms, s, m or h)"
            ));
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a byte size: `4096`, `64k`, `1m`, `2g` (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?} (examples: 4096, 64k, 1m)"))
}

/// Whether an error means "no such agent" (or no root at all).
pub(crate) fn is_unknown_agent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<RecvError>(),
            Some(RecvError::UnknownAgent(_))
        ) || matches!(c.downcast_ref::<RootError>(), Some(RootError::Missing(_)))
    })
}

/// Write to stdout, treating a closed pipe as the end of the command.
pub(crate) fn out(text: &str) -> io::Result<()> {
    let mut o = io::stdout().lock();
    o.write_all(text.as_bytes())?;
    o.flush()
}

pub(crate) fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("lots").is_err());
    }
}
