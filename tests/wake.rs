//! Wake-ups: hundreds of waiting receivers under one user, past the inotify instance limit,
//! are all woken by a broadcast; every wake mechanism delivers.

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::TestRoot;

/// Whether process `pid` holds an inotify instance.
fn has_inotify(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| l.to_string_lossy().contains("inotify"))
}

/// Whether process `pid` is asleep in a wait (poll for inotify, futex for the doorbell).
fn is_blocked(pid: u32) -> bool {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next());
    state == Some("S")
        && ["poll", "futex", "nanosleep"]
            .iter()
            .any(|w| wchan.contains(w))
}

fn wait_until_blocked(children: &[Child]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let blocked = children.iter().filter(|c| is_blocked(c.id())).count();
        if blocked == children.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "watchdog: only {blocked} of {} receivers blocked after 60 s",
            children.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start `n` receivers blocked in `recv --wait`, broadcast one message to each, check every one
/// of them prints its message. Returns how many used inotify.
fn broadcast_wakes_all(tag: &str, layout: &str, n: usize, wake: Option<&str>) -> usize {
    let t = TestRoot::new(tag);
    let ids: Vec<String> = (0..n).map(|i| format!("w{i:04}")).collect();
    let mut args = vec!["--layout", layout, "init"];
    args.extend(ids.iter().map(String::as_str));
    t.ok(&args);
    let children: Vec<Child> = ids
        .iter()
        .map(|id| {
            let mut c = t.cmd(&["recv", id, "--wait", "--timeout", "120s", "--ack"]);
            if let Some(w) = wake {
                c.env("SHOAL_WAKE", w);
            }
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until_blocked(&children);
    let with_inotify = children.iter().filter(|c| has_inotify(c.id())).count();
    // Broadcast: one message to every receiver.
    for id in &ids {
        t.ok(&["send", "coord", id, "wake", &format!("{{\"to\":\"{id}\"}}")]);
    }
    for (mut c, id) in children.into_iter().zip(&ids) {
        let status = c.wait().unwrap();
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "receiver {id} exited {status}: {err}");
        let msgs = common::parse_lines(&out);
        assert_eq!(msgs.len(), 1, "receiver {id}: {out}");
        assert_eq!(msgs[0]["payload"]["to"], id.as_str());
    }
    with_inotify
}

/// One test, run in sequence: forcing inotify needs instances the 300-waiter case uses up.
#[test]
fn r2_waiters_are_woken_by_every_mechanism_and_past_the_inotify_limit() {
    for (mode, expect_inotify) in [("inotify", true), ("futex", false), ("poll", false)] {
        let inotify = broadcast_wakes_all(&format!("mode-{mode}"), "jsonl", 20, Some(mode));
        assert_eq!(
            inotify == 20,
            expect_inotify,
            "SHOAL_WAKE={mode}: {inotify} of 20 on inotify"
        );
    }
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(128);
    // Default on jsonl: the doorbell, no inotify instance at all.
    assert_eq!(broadcast_wakes_all("auto-jsonl", "jsonl", 20, None), 0);
    // Default on compat: inotify while instances last, then the doorbell.
    let inotify = broadcast_wakes_all("w300", "compat", 300, None);
    eprintln!(
        "300 waiters: {inotify} on inotify, {} on the futex doorbell (limit {limit} per user)",
        300 - inotify
    );
    if limit < 300 {
        assert!(inotify <= limit, "more inotify instances than the limit?");
        assert!(
            inotify < 300,
            "with {limit} instances per user, some waiters must use the doorbell"
        );
    }
}
