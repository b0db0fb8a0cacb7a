//! Operating-system calls, and every `unsafe` block in the crate.
//!
//! Nothing above this module calls `libc` directly. Each mechanism that has a fallback can be
//! forced from the environment (see [`crate::wake`]) so tests exercise both paths.

pub mod futex;
pub mod inotify;
pub mod shared;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

/// The effective user id of this process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether `path` lives on a tmpfs (`statfs` magic `TMPFS_MAGIC`).
///
/// # Errors
/// The `statfs(2)` error, e.g. `ENOENT`.
pub fn is_tmpfs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Free the pages of `file` in `[offset, offset + len)` without changing its size
/// (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`). Reads of the range return zeros afterwards.
///
/// # Errors
/// `EOPNOTSUPP` on filesystems without hole punching; callers treat that as "keep the bytes".
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::FallocateFlags as F;
    if len == 0 {
        return Ok(());
    }
    nix::fcntl::fallocate(
        file.as_fd(),
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(io::Error::from)
}

/// Reserve backing pages for `[offset, offset + len)` of `file` (plain `fallocate`), so that a
/// later store through a shared mapping cannot fault with `SIGBUS` on a full tmpfs.
///
/// # Errors
/// `ENOSPC` when the filesystem is full: the caller turns it into a clean error instead of a crash.
pub fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    nix::fcntl::fallocate(
        file.as_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(io::Error::from)
}

/// Make `file` at least `len` bytes long with its pages allocated (plain `fallocate`).
///
/// # Errors
/// `ENOSPC` when the filesystem is full.
pub fn grow(file: &File, len: u64) -> io::Result<()> {
    nix::fcntl::fallocate(
        file.as_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len as i64,
    )
    .map_err(io::Error::from)
}

/// Bytes actually allocated to `file` (`st_blocks * 512`), as opposed to its logical size.
///
/// # Errors
/// The `fstat(2)` error.
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

/// 64 random bits from the kernel (`getrandom(2)`).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which lives across
        // the call; getrandom writes at most that many bytes.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom cannot fail on Linux >= 3.17 once the pool is initialised; fall back to
            // something unpredictable enough for an id suffix rather than aborting a send.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            return t ^ (u64::from(std::process::id()) << 32);
        }
    }
    u64::from_ne_bytes(buf)
}

/// Set the mode of an open file or directory exactly (`fchmod(2)`), whatever the umask was.
///
/// # Errors
/// The `fchmod(2)` error.
pub fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Whether an error is "no space left on device" (`ENOSPC`) or "disk quota exceeded" (`EDQUOT`).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Local wall-clock time of day as `HH:MM:SS` (the bash bus's log timestamp, `date +%H:%M:%S`).
pub fn local_hms() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: `tm` is a plain C struct for which all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant.
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        let s = now.rem_euclid(86_400);
        return format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Rename `from` to `to`, failing with `AlreadyExists` rather than replacing an existing `to`
/// (`renameat2(RENAME_NOREPLACE)`): a message file is never overwritten.
///
/// # Errors
/// `AlreadyExists` if `to` exists; otherwise the `renameat2(2)` error.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: `rusage` is a plain C struct for which all-zero bytes are valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time process `pid` has run so far, from `/proc/<pid>/schedstat` (the scheduler's own
/// count in nanoseconds; the tick-sampled times of `/proc/<pid>/stat` miss processes that run
/// for microseconds at a time). `None` if the process or the file is not there.
pub fn process_cpu_time(pid: u32) -> Option<std::time::Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns = text.split_whitespace().next()?.parse().ok()?;
    Some(std::time::Duration::from_nanos(ns))
}

/// Raise this process's soft limit on open files to its hard limit: a coordinator talking to
/// a thousand inboxes keeps a couple of descriptors open for each.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Make the child `cmd` starts die (SIGKILL) when the thread that starts it ends, so a
/// benchmark or spawner killed outright leaves no processes behind. If the parent is already
/// gone when the child gets there, the child exits at once.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// A copy of `fd` without close-on-exec: every process started while it is open inherits it
/// (every descriptor shoal opens itself is close-on-exec). Close it as soon as the child is
/// started.
///
/// # Errors
/// The `fcntl(2)` error.
pub fn dup_inheritable(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD on a descriptor the caller owns; the result is a new descriptor we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly duplicated descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// For a shoal process started directly by `shoal spawn` (`SHOAL_SPAWNER_PID` names its
/// parent): die (SIGKILL) when the spawner dies. The spawner starts agents without running code
/// between fork and exec, so the agent sets this itself; other programs are covered by the
/// spawner's guardian.
pub fn die_with_spawner() {
    let Some(spawner) =
        std::env::var_os("SHOAL_SPAWNER_PID").and_then(|v| v.to_str()?.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: getppid, kill(pid, 0) and prctl have no memory-safety preconditions.
    unsafe {
        if libc::getppid() != spawner {
            // Started by an agent (its guardian covers it), or orphaned: the spawner died
            // between starting us and now. Then we must not run on.
            if libc::kill(spawner, 0) != 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            {
                libc::_exit(1);
            }
            return;
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != spawner {
            libc::_exit(1); // the spawner died before the request took effect
        }
    }
}

/// Milliseconds since the Unix epoch from the kernel's coarse clock: it lags the precise clock
/// by up to a scheduler tick (4 ms here, 10 ms at most) but reads no time-stamp counter, which
/// is slow in some virtual machines (here, perf put the precise clock at ~7 % of an echo
/// agent's CPU in a 1000-agent round, for ~6 readings per message). For heartbeats and lease
/// deadlines, which count in seconds.
pub fn now_ms_coarse() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r != 0 {
        return crate::envelope::now_micros() / 1000;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// `ms` since the epoch as ISO-8601 UTC with milliseconds: `2026-12-01T22:49:38.123Z`.
pub fn iso8601_utc(ms: u64) -> String {
    let mut out = Vec::with_capacity(24);
    push_iso8601_utc(&mut out, ms);
    String::from_utf8(out).unwrap_or_default() // ASCII digits and separators only
}

/// [`iso8601_utc`] appended to `out`, without going through `fmt` (every metric record
/// carries one).
pub fn push_iso8601_utc(out: &mut Vec<u8>, ms: u64) {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let digits = |out: &mut Vec<u8>, n: u64, width: u32| {
        for k in (0..width).rev() {
            out.push(b'0' + (n / 10u64.pow(k) % 10) as u8);
        }
    };
    digits(out, y as u64, 4);
    out.push(b'-');
    digits(out, m as u64, 2);
    out.push(b'-');
    digits(out, d as u64, 2);
    out.push(b'T');
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, rem % 3600 / 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'.');
    digits(out, ms % 1000, 3);
    out.push(b'Z');
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn iso8601() {
        assert_eq!(super::iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::iso8601_utc(1_795_310_779_123),
            "2026-11-22T01:26:19.123Z"
        );
        assert_eq!(
            super::iso8601_utc(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
