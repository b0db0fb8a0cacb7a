//! Wake-ups: a waiting receiver sleeps until a sender's append wakes it.
//!
//! Two mechanisms:
//!
//! * **futex doorbell** (the default for the jsonl layout): a 32-bit word and a waiter count in
//!   the inbox's shared meta file. Every sender rings it after its append; the ring costs one
//!   atomic add, plus a `FUTEX_WAKE` only when someone sleeps on it. It costs no file
//!   descriptor and no inotify instance, so 300 or 1000 waiters under one user all wake.
//! * **inotify** on the agent's inbox directory (the default for the compat layout, whose
//!   message files scripts also write directly, without ringing): every new file is an event,
//!   delivered in ~20 us. It costs one inotify instance per waiting process, and Linux allows
//!   128 per user by default; past that, waiters fall back to the doorbell.
//!
//! On jsonl inboxes the doorbell was measured faster in coordination rounds (708 agents: about
//! 4 % per round; compare `SHOAL_WAKE=inotify shoal bench round --agents 708 --topology flat`
//! with the default): no inotify event per append, two system calls fewer per wake.
//! A third mode, polling with backoff (1 ms to 50 ms), exists as a last resort and for tests.
//! `SHOAL_WAKE=inotify|futex|poll` forces one mechanism (default `auto`, as above).
//!
//! inotify is a hint, not a count: after any wake the receiver rereads its inbox from its cursor.
//! Neither path loses a wake-up, because the waiter is armed *before* the inbox is checked.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::sys::futex;
use crate::sys::inotify::{DirWatch, WatchError};
use crate::sys::shared::SharedWords;

/// The doorbell of one inbox: a futex word and a count of sleepers, in its shared meta file.
#[derive(Debug, Clone)]
pub struct Doorbell {
    words: Arc<SharedWords>,
    bell: usize,
    waiters: usize,
}

impl Doorbell {
    /// The doorbell at byte offsets `bell` and `waiters` of a shared mapping.
    pub fn new(words: Arc<SharedWords>, bell: usize, waiters: usize) -> Doorbell {
        // Check the offsets once, here, rather than on every ring.
        let _ = words.u32_at(bell);
        let _ = words.u32_at(waiters);
        Doorbell {
            words,
            bell,
            waiters,
        }
    }

    /// Tell waiters something arrived. Costs one atomic add; a `FUTEX_WAKE` only if someone sleeps.
    pub fn ring(&self) {
        let bell = self.words.u32_at(self.bell);
        bell.fetch_add(1, Ordering::SeqCst);
        if self.words.u32_at(self.waiters).load(Ordering::SeqCst) > 0 {
            futex::wake_all(bell);
        }
    }
}

/// What a receiver waits on: its inbox directory (for inotify) and its doorbell.
#[derive(Debug, Clone)]
pub struct WakeTarget {
    /// Directory whose writes mean "new messages".
    pub watch_dir: PathBuf,
    /// The inbox's doorbell.
    pub doorbell: Doorbell,
    /// Whether programs other than shoal write messages into `watch_dir` (the compat layout,
    /// which scripts write directly): only they need inotify, since every shoal sender rings
    /// the doorbell.
    pub outside_writers: bool,
}

/// Which wake-up mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WakeMode {
    /// The futex doorbell where only shoal writes the inbox (jsonl: as fast as inotify, with
    /// no per-user instance limit and no event per write); inotify where scripts write it too
    /// (compat), falling back to the doorbell when instances run out.
    #[default]
    Auto,
    /// inotify only (fails past the instance limit).
    Inotify,
    /// The futex doorbell.
    Futex,
    /// Polling with backoff.
    Poll,
}

impl WakeMode {
    /// The mode named by `SHOAL_WAKE`, or [`WakeMode::Auto`].
    ///
    /// # Errors
    /// A message naming the accepted values, for an unknown one.
    pub fn from_env() -> Result<WakeMode, String> {
        match std::env::var("SHOAL_WAKE").ok().as_deref() {
            None | Some("") | Some("auto") => Ok(WakeMode::Auto),
            Some("inotify") => Ok(WakeMode::Inotify),
            Some("futex") => Ok(WakeMode::Futex),
            Some("poll") => Ok(WakeMode::Poll),
            Some(other) => Err(format!(
                "SHOAL_WAKE={other:?} is not one of auto, inotify, futex, poll"
            )),
        }
    }
}

/// A receiver's wait: create it, then loop `prepare` -> check the inbox -> `wait` (or `disarm`
/// when the check found something).
#[derive(Debug)]
pub struct Waiter {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Inotify(DirWatch),
    /// `armed`: this waiter is counted in the doorbell's sleepers. It is counted only from
    /// `prepare` to the end of `wait`, so a receiver busy working costs senders nothing.
    Futex {
        bell: Doorbell,
        seen: u32,
        armed: bool,
    },
    Poll {
        delay: Duration,
    },
}

impl Waiter {
    /// A waiter on `target`. Anything appended after the next [`Waiter::prepare`] wakes the
    /// following [`Waiter::wait`].
    ///
    /// # Errors
    /// With [`WakeMode::Inotify`], the inotify error; other modes do not fail.
    pub fn new(target: &WakeTarget, mode: WakeMode) -> io::Result<Waiter> {
        let futex = || Kind::Futex {
            bell: target.doorbell.clone(),
            seen: 0,
            armed: false,
        };
        let kind = match mode {
            // Any inotify failure (limit reached, or an odd filesystem) falls back to the futex.
            WakeMode::Auto if !target.outside_writers => futex(),
            WakeMode::Auto => {
                DirWatch::new(&target.watch_dir).map_or_else(|_| futex(), Kind::Inotify)
            }
            WakeMode::Inotify => {
                Kind::Inotify(DirWatch::new(&target.watch_dir).map_err(|e| match e {
                    WatchError::Exhausted(e) | WatchError::Other(e) => e,
                })?)
            }
            WakeMode::Futex => futex(),
            WakeMode::Poll => Kind::Poll {
                delay: Duration::from_millis(1),
            },
        };
        Ok(Waiter { kind })
    }

    /// Which mechanism this waiter uses: `"inotify"`, `"futex"` or `"poll"`.
    pub fn mechanism(&self) -> &'static str {
        match self.kind {
            Kind::Inotify(_) => "inotify",
            Kind::Futex { .. } => "futex",
            Kind::Poll { .. } => "poll",
        }
    }

    /// How many times the doorbell has rung (a wrapping count of appends to the inbox), for a
    /// futex waiter; `None` for the other mechanisms. A receiver can tell from it how many
    /// messages arrived since it last looked, without reading the inbox.
    pub fn rings(&self) -> Option<u32> {
        match &self.kind {
            Kind::Futex { bell, .. } => Some(bell.words.u32_at(bell.bell).load(Ordering::SeqCst)),
            _ => None,
        }
    }

    /// Arm: call right before each check of the inbox.
    pub fn prepare(&mut self) {
        if let Kind::Futex { bell, seen, armed } = &mut self.kind {
            if !*armed {
                bell.words
                    .u32_at(bell.waiters)
                    .fetch_add(1, Ordering::SeqCst);
                *armed = true;
            }
            *seen = bell.words.u32_at(bell.bell).load(Ordering::SeqCst);
        }
    }

    /// The check found messages: stop counting as a sleeper, and reset the poll backoff.
    pub fn disarm(&mut self) {
        match &mut self.kind {
            Kind::Futex { bell, armed, .. } if *armed => {
                bell.words
                    .u32_at(bell.waiters)
                    .fetch_sub(1, Ordering::SeqCst);
                *armed = false;
            }
            Kind::Poll { delay } => *delay = Duration::from_millis(1),
            _ => {}
        }
    }

    /// Sleep until woken or `timeout` passes (`None`: no limit). May return early; the caller
    /// rechecks its inbox either way.
    ///
    /// # Errors
    /// A failing `poll(2)`/futex call.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match &mut self.kind {
            Kind::Inotify(w) => w.wait(timeout).map(|_| ()),
            Kind::Futex { bell, seen, .. } => {
                futex::wait(bell.words.u32_at(bell.bell), *seen, timeout).map(|_| ())
            }
            Kind::Poll { delay } => {
                let d = timeout.map_or(*delay, |t| t.min(*delay));
                std::thread::sleep(d);
                *delay = (*delay * 2).min(Duration::from_millis(50));
                Ok(())
            }
        };
        if let Kind::Futex { bell, armed, .. } = &mut self.kind
            && *armed
        {
            bell.words
                .u32_at(bell.waiters)
                .fetch_sub(1, Ordering::SeqCst);
            *armed = false;
        }
        r
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Kind::Futex {
            bell, armed: true, ..
        } = &self.kind
        {
            bell.words
                .u32_at(bell.waiters)
                .fetch_sub(1, Ordering::SeqCst);
        }
    }
}
