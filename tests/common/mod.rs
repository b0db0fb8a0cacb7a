//! Shared test utilities: a fresh root under /dev/shm per test, and the real binary.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The `shoal` binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}

/// A fresh directory under /dev/shm (tmpfs), removed when dropped. `root()` is where the test's
/// shoal root lives (not created until a command creates it).
pub struct TestRoot {
    dir: PathBuf,
}

impl TestRoot {
    pub fn new(tag: &str) -> TestRoot {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = PathBuf::from(format!(
            "/dev/shm/shoal-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestRoot { dir }
    }

    /// The scratch directory (parent of the root).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shoal root inside the scratch directory.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// `shoal --root <root> <args>`, with the environment cleared of shoal variables.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--root").arg(self.root()).args(args);
        for v in [
            "SHOAL_ROOT",
            "MESSAGE_BASE_DIR",
            "SHOAL_WAKE",
            "SHOAL_MAX_PAYLOAD",
            "SHOAL_BASH_LOGS",
            "SHOAL_AGENT_ID",
            "SHOAL_SPAWNER_PID",
            "SHOAL_LAYOUT",
        ] {
            c.env_remove(v);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Run a command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "shoal {args:?} failed ({:?}): {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Exit code, panicking with stderr if the process was killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by signal: {}", String::from_utf8_lossy(&o.stderr)))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether this process runs as root (some tests need it and skip, saying so, otherwise).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Parse `shoal recv` output: one JSON object per line.
pub fn parse_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Every regular file and directory under `p`, with its mode bits.
pub fn modes_under(p: &Path) -> Vec<(PathBuf, u32, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![p.to_owned()];
    while let Some(d) = stack.pop() {
        let md = std::fs::symlink_metadata(&d).unwrap();
        out.push((d.clone(), md.permissions().mode() & 0o7777, md.is_dir()));
        if md.is_dir() {
            for e in std::fs::read_dir(&d).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}
