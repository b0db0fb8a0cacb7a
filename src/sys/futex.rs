//! Process-shared futex wait and wake on a 32-bit word in a shared file mapping.
//!
//! The word lives in an inbox's meta file, mapped by every process that sends to or waits on
//! that inbox. The futexes are *not* `FUTEX_PRIVATE_FLAG`: the kernel keys them by inode and
//! offset, so mappings in different processes meet. No file descriptor and no inotify instance
//! is spent per waiter, which is how 1000 agents under one user can all block at once
//! (performance-anchors.md, "wake-up paths that cost no inotify instance").

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// What ended a [`wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Woken by [`wake`], or the word no longer held the expected value, or a signal arrived.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Block while `*word == expected`, for at most `timeout` (forever when `None`).
///
/// Returns at once when the word already differs, which is what makes the
/// "read word, check inbox, wait" sequence free of lost wake-ups.
///
/// # Errors
/// Any futex error other than `EAGAIN` (value changed), `EINTR` and `ETIMEDOUT`.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<Wait> {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned 32-bit atomic for the duration of the call (the caller's
    // mapping outlives it); `ts_ptr` is null or points at a timespec on this stack frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r == 0 {
        return Ok(Wait::Woken);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Wait::Woken),
        Some(libc::ETIMEDOUT) => Ok(Wait::TimedOut),
        _ => Err(e),
    }
}

/// Wake every process blocked in [`wait`] on `word`. Returns how many were woken.
pub fn wake_all(word: &AtomicU32) -> usize {
    // SAFETY: `word` is a valid, aligned 32-bit atomic; FUTEX_WAKE only reads the address as a key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    r.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    #[test]
    fn wait_returns_at_once_when_value_differs() {
        let w = AtomicU32::new(5);
        assert_eq!(
            wait(&w, 4, Some(Duration::from_secs(10))).unwrap(),
            Wait::Woken
        );
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(5);
        assert_eq!(
            wait(&w, 5, Some(Duration::from_millis(20))).unwrap(),
            Wait::TimedOut
        );
    }

    #[test]
    fn wake_releases_a_waiter() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        let t = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 0 {
                wait(&w2, 0, Some(Duration::from_secs(30))).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(1, Ordering::SeqCst);
        wake_all(&w);
        t.join().unwrap();
    }
}
