//! Storage edge cases: a full filesystem, and senders killed in the middle of a write.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::TestRoot;

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: &Path, size: &str) -> Option<SmallTmpfs> {
        if !common::is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipped: mount -t tmpfs failed (no CAP_SYS_ADMIN here?)");
            return None;
        }
        Some(SmallTmpfs(at.to_owned()))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Every shard file of `agent` ends in a newline and every line is a valid envelope.
fn assert_no_partial_records(root: &Path, agent: &str) -> usize {
    let mut lines = 0;
    for e in std::fs::read_dir(root.join("agents").join(agent).join("inbox")).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        // Acknowledged space may have been released (reads as zeros): skip leading NULs.
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        let live = &bytes[start..];
        if live.is_empty() {
            continue;
        }
        assert_eq!(
            live.last(),
            Some(&b'\n'),
            "a shard ends in a partial record"
        );
        for l in live.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let l = match l.iter().position(|&b| b != 0) {
                Some(i) => &l[i..],
                None => continue,
            };
            serde_json::from_slice::<serde_json::Value>(l).unwrap_or_else(|e| {
                panic!("torn or corrupt line ({e}): {}", String::from_utf8_lossy(l))
            });
            lines += 1;
        }
    }
    lines
}

/// Total logical size of `agent`'s shard files.
fn inbox_len(root: &Path, agent: &str) -> u64 {
    std::fs::read_dir(root.join("agents").join(agent).join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Whether any shard of `agent` ends in a partial record right now.
fn shard_is_torn(root: &Path, agent: &str) -> bool {
    std::fs::read_dir(root.join("agents").join(agent).join("inbox"))
        .unwrap()
        .any(|e| {
            let b = std::fs::read(e.unwrap().path()).unwrap();
            !b.is_empty() && b.last() != Some(&b'\n')
        })
}

#[test]
fn r2_full_tmpfs_fails_the_send_cleanly_and_keeps_everything_readable() {
    let t = TestRoot::new("enospc");
    let Some(mnt) = SmallTmpfs::mount(&t.dir().join("mnt"), "1m") else {
        return;
    };
    let root = mnt.0.join("root");
    let run = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .arg("--root")
            .arg(&root)
            .args(args)
            .env_remove("SHOAL_ROOT")
            .env_remove("MESSAGE_BASE_DIR")
            .output()
            .unwrap()
    };
    assert!(
        run(&["init", "bob", "--quota-bytes", "1g"])
            .status
            .success()
    );
    // 20 KB payloads until the filesystem is full.
    let payload = format!("{{\"fill\":\"{}\"}}", "x".repeat(20_000));
    let mut sent = Vec::new();
    let err = loop {
        let o = run(&["send", "alice", "bob", "fill", &payload]);
        if !o.status.success() {
            break o;
        }
        sent.push(common::stdout(&o).trim().to_owned());
        assert!(sent.len() < 1000, "a 1 MiB tmpfs never filled up");
    };
    assert_eq!(common::code(&err), 1);
    assert!(
        common::stderr(&err).contains("no space left"),
        "unexpected error: {}",
        common::stderr(&err)
    );
    assert!(!sent.is_empty());
    assert_eq!(
        assert_no_partial_records(&root, "bob"),
        sent.len(),
        "no partial record is left"
    );

    // Everything stored stays readable, on the full filesystem: receive, count, recv, ack.
    let o = run(&["count", "bob"]);
    assert_eq!(common::stdout(&o).trim(), sent.len().to_string());
    let o = run(&["receive", "bob"]);
    assert!(
        o.status.success(),
        "receive on a full tmpfs: {}",
        common::stderr(&o)
    );
    let arr: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let got: Vec<&str> = arr.iter().map(|m| m["msg_id"].as_str().unwrap()).collect();
    assert_eq!(got, sent.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(&["recv", "bob", "--max", "1000", "--ack"]);
    assert!(
        o.status.success(),
        "recv --ack on a full tmpfs: {}",
        common::stderr(&o)
    );
    assert_eq!(common::parse_lines(&common::stdout(&o)).len(), sent.len());

    // Creating an agent on the full filesystem fails cleanly, leaving no half-made agent.
    // (Acknowledged space was released above, so fill the disk again first.)
    let filler = mnt.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let o = run(&["init", "carol"]);
    assert_eq!(
        common::code(&o),
        1,
        "init on a full tmpfs: {}",
        common::stderr(&o)
    );
    let agents: Vec<String> = std::fs::read_dir(root.join("agents"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !agents.iter().any(|a| a != "bob"),
        "left behind: {agents:?}"
    );

    // Once there is room again, sending works.
    std::fs::remove_file(&filler).unwrap();
    let o = run(&["send", "alice", "bob", "after", "{}"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(common::stdout(&run(&["count", "bob"])).trim(), "1");
}

#[test]
fn r2_senders_killed_mid_write_leave_no_torn_record() {
    let t = TestRoot::new("torn");
    t.ok(&[
        "init",
        "bob",
        "--quota-bytes",
        "4g",
        "--quota-msgs",
        "100000",
    ]);
    // Messages of 1 MiB: a SIGKILL during the write() tears them on tmpfs most of the time.
    let line = format!("{{\"big\":\"{}\"}}\n", "y".repeat(1 << 20));
    let mut printed: Vec<String> = Vec::new();
    let mut torn = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    while torn < 5 && kills < 200 {
        kills += 1;
        let mut c = t
            .cmd(&[
                "send",
                "killed",
                "bob",
                "big",
                "--stdin",
                "--max-payload",
                "2m",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let input = line.repeat(8);
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        // Wait until the sender is writing (the inbox grows), then kill it at a random point.
        let before = inbox_len(&t.root(), "bob");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while inbox_len(&t.root(), "bob") == before {
            assert!(
                std::time::Instant::now() < deadline,
                "watchdog: the sender never wrote"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut stdout = c.stdout.take().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 2000));
        let _ = c.kill();
        c.wait().unwrap();
        let _ = writer.join();
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        printed.extend(out.lines().map(str::to_owned));
        if shard_is_torn(&t.root(), "bob") {
            torn += 1;
        }
        // Another sender on the same shard repairs whatever tail was torn.
        t.ok(&["send", "killed", "bob", "small", "{\"after\":true}"]);
    }
    eprintln!(
        "{kills} senders killed, {torn} left a torn record behind (repaired by the next send)"
    );
    assert!(
        torn > 0,
        "no kill landed mid-write: the test proved nothing"
    );
    let stored = assert_no_partial_records(&t.root(), "bob");
    let mut received = Vec::new();
    loop {
        let o = t.run(&["recv", "bob", "--ack", "--max", "50"]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let batch = common::parse_lines(&common::stdout(&o));
        if batch.is_empty() {
            break;
        }
        received.extend(batch);
    }
    assert_eq!(
        received.len(),
        stored,
        "the receiver gets exactly the complete records"
    );
    let ids: std::collections::HashSet<&str> =
        received.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in &printed {
        assert!(
            ids.contains(id.as_str()),
            "{id} was reported sent but never delivered"
        );
    }
    // The pair's sequence numbers only increase (a killed send may leave a gap, never a repeat).
    let seqs: Vec<u64> = received
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequence went backwards: {seqs:?}"
    );
}
