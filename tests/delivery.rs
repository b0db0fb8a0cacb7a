//! Delivery guarantees with many real processes: exactly-once with acknowledgement, per-sender
//! order and sequence numbers, nothing lost when a receiver is killed, unique message ids.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::TestRoot;
use serde_json::Value;

/// Start `shoal send <from> <to> t --stdin` fed with `n` payloads `{"from":..,"i":k}`.
fn spawn_bulk_sender(t: &TestRoot, from: &str, to: &str, n: usize) -> Child {
    let mut child = t
        .cmd(&["send", from, to, "t", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::with_capacity(n * 32);
    for i in 1..=n {
        input.push_str(&format!("{{\"from\":\"{from}\",\"i\":{i}}}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    child
}

/// Receive with `recv --wait --ack` processes until `want` messages arrived (or a watchdog
/// of 120 s passes without progress). Returns every parsed line, in order of receipt.
fn receive_all(t: &TestRoot, id: &str, want: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(want);
    let mut last_progress = Instant::now();
    while got.len() < want {
        let o = t.run(&[
            "recv",
            id,
            "--wait",
            "--ack",
            "--timeout",
            "2s",
            "--max",
            "1000",
        ]);
        match common::code(&o) {
            0 => {
                got.extend(common::parse_lines(&common::stdout(&o)));
                last_progress = Instant::now();
            }
            124 => {}
            c => panic!("recv exited {c}: {}", common::stderr(&o)),
        }
        assert!(
            last_progress.elapsed() < Duration::from_secs(120),
            "watchdog: only {} of {want} messages after 120 s without progress",
            got.len()
        );
    }
    got
}

#[test]
fn r2_eight_senders_ten_thousand_each_exactly_once_in_order() {
    let t = TestRoot::new("eight");
    t.ok(&[
        "init",
        "bob",
        "--quota-msgs",
        "1000000",
        "--quota-bytes",
        "1g",
    ]);
    const SENDERS: usize = 8;
    const EACH: usize = 10_000;
    let senders: Vec<Child> = (0..SENDERS)
        .map(|s| spawn_bulk_sender(&t, &format!("s{s}"), "bob", EACH))
        .collect();
    let got = receive_all(&t, "bob", SENDERS * EACH);
    for mut c in senders {
        let status = c.wait().unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "a sender failed: {err}");
    }
    // Nothing more arrives, and the inbox is empty.
    let o = t.run(&["recv", "bob"]);
    assert_eq!(common::stdout(&o), "", "more messages than were sent");
    assert_eq!(t.ok(&["count", "bob"]).trim(), "0");

    assert_eq!(got.len(), SENDERS * EACH);
    let ids: HashSet<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), SENDERS * EACH, "a message was delivered twice");
    let mut next: HashMap<String, u64> = HashMap::new();
    for m in &got {
        let from = m["from"].as_str().unwrap().to_owned();
        let seq = m["seq"].as_u64().unwrap();
        let expected = next.entry(from.clone()).or_insert(1);
        assert_eq!(seq, *expected, "sender {from}: out of order or gap");
        assert_eq!(
            m["payload"]["i"].as_u64().unwrap(),
            seq,
            "payload does not match sequence"
        );
        assert_eq!(m["payload"]["from"].as_str().unwrap(), from);
        assert_eq!(m["delivery"].as_u64().unwrap(), 1);
        *expected += 1;
    }
    assert_eq!(next.len(), SENDERS);
    assert!(next.values().all(|&n| n == EACH as u64 + 1));
}

#[test]
fn r2_concurrent_cli_senders_on_one_pair_get_consecutive_sequences() {
    let t = TestRoot::new("pair");
    t.ok(&["init", "bob"]);
    const PROCS: usize = 16;
    const EACH: usize = 25;
    let handles: Vec<_> = (0..PROCS)
        .map(|p| {
            let cmds: Vec<_> = (0..EACH)
                .map(|i| {
                    t.cmd(&[
                        "send",
                        "alice",
                        "bob",
                        "t",
                        &format!("{{\"p\":{p},\"i\":{i}}}"),
                    ])
                })
                .collect();
            std::thread::spawn(move || {
                for mut c in cmds {
                    let o = c.output().unwrap();
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let got = common::parse_lines(&t.ok(&["recv", "bob", "--max", "10000", "--ack"]));
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    let expect: Vec<u64> = (1..=(PROCS * EACH) as u64).collect();
    assert_eq!(
        seqs, expect,
        "sequence numbers must be 1..N in delivery order"
    );
    // Each process's own sends stay in the order it made them.
    let mut last: HashMap<u64, i64> = HashMap::new();
    for m in &got {
        let p = m["payload"]["p"].as_u64().unwrap();
        let i = m["payload"]["i"].as_i64().unwrap();
        let prev = last.insert(p, i).unwrap_or(-1);
        assert!(i > prev, "process {p}: message {i} delivered after {prev}");
    }
}

#[test]
fn r2_receiver_killed_100_times_loses_nothing() {
    let t = TestRoot::new("kill");
    t.ok(&["init", "bob", "--quota-msgs", "1000000"]);
    const SENDERS: usize = 4;
    const EACH: usize = 2_500;
    let total = SENDERS * EACH;
    let mut senders: Vec<Child> = (0..SENDERS)
        .map(|s| spawn_bulk_sender(&t, &format!("k{s}"), "bob", EACH))
        .collect();

    // id -> deliveries seen; ids a receiver printed and then acknowledged (it exited 0).
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut acked: HashSet<String> = HashSet::new();

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    while kills < 100 {
        // Short leases so killed batches come back quickly.
        let mut child = t
            .cmd(&[
                "recv",
                "bob",
                "--wait",
                "--ack",
                "--timeout",
                "5s",
                "--max",
                "40",
                "--lease",
                "150ms",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 4000));
        let killed = child.kill().is_ok();
        let status = child.wait().unwrap();
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let clean = status.success();
        record(&out, clean, &mut seen, &mut acked);
        if killed && !clean {
            kills += 1;
        }
    }
    for s in &mut senders {
        assert!(s.wait().unwrap().success());
    }
    // Drain what is left, including leases that expire after the kills, until the inbox is
    // empty. (A receiver killed after acknowledging but before exiting counts as unclean here,
    // so "acknowledged" is known only for clean exits; emptiness is the real end condition.)
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = t.run(&[
            "recv",
            "bob",
            "--wait",
            "--ack",
            "--timeout",
            "1s",
            "--max",
            "1000",
        ]);
        let c = common::code(&o);
        assert!(matches!(c, 0 | 124), "{}", common::stderr(&o));
        record(&o.stdout, c == 0, &mut seen, &mut acked);
        if c == 124 && t.ok(&["count", "bob"]).trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watchdog: {} of {total} seen",
            seen.len()
        );
    }
    assert_eq!(seen.len(), total, "every message was delivered");
    let mut redelivered = 0;
    for (id, deliveries) in &seen {
        // Delivery counts only grow. The first one seen may be above 1: a receiver can be
        // killed after leasing a batch and before printing it.
        assert!(
            deliveries.windows(2).all(|w| w[1] > w[0]),
            "{id}: {deliveries:?}"
        );
        redelivered += usize::from(deliveries.len() > 1 || deliveries[0] > 1);
    }
    eprintln!(
        "{total} messages, 100 receivers killed, {redelivered} delivered more than once (all unacknowledged before)"
    );
    assert_eq!(t.ok(&["count", "bob"]).trim(), "0");
}

/// Account for one receiver's output. A killed receiver may have printed half a line: only
/// complete lines count. `clean_exit`: the receiver acknowledged what it printed.
fn record(
    out: &[u8],
    clean_exit: bool,
    seen: &mut HashMap<String, Vec<u64>>,
    acked: &mut HashSet<String>,
) {
    let text = String::from_utf8_lossy(out);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    for m in common::parse_lines(complete) {
        let id = m["id"].as_str().unwrap().to_owned();
        assert!(
            !acked.contains(&id),
            "message {id} delivered again after it was acknowledged"
        );
        seen.entry(id.clone())
            .or_default()
            .push(m["delivery"].as_u64().unwrap());
        if clean_exit {
            acked.insert(id);
        }
    }
}

#[test]
fn r2_one_million_ids_from_256_processes_are_unique() {
    let t = TestRoot::new("ids");
    const PROCS: usize = 256;
    const EACH: usize = 3_907; // 256 * 3907 = 1,000,192
    let names: Vec<String> = (0..PROCS).map(|p| format!("r{p}")).collect();
    let mut args = vec!["init"];
    args.extend(names.iter().map(String::as_str));
    t.ok(&args);
    // Start every sender before reading any output, so all 256 run at once.
    let payloads = "{}\n".repeat(EACH);
    let mut children = Vec::new();
    for name in &names {
        let mut c = t
            .cmd(&["send", "a", name, "t", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let p = payloads.clone();
        std::thread::spawn(move || stdin.write_all(p.as_bytes()).unwrap());
        let out = c.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::BufReader::new(out).read_to_string(&mut s).unwrap();
            s
        });
        children.push((c, reader));
    }
    let mut ids = HashSet::with_capacity(PROCS * EACH);
    for (mut c, reader) in children {
        assert!(c.wait().unwrap().success());
        for id in reader.join().unwrap().lines() {
            assert!(id.starts_with("msg-"), "{id}");
            let mut parts = id.splitn(3, '-');
            parts.next();
            assert!(parts.next().unwrap().bytes().all(|b| b.is_ascii_digit()));
            assert!(parts.next().unwrap().bytes().all(|b| b.is_ascii_digit()));
            assert!(ids.insert(id.to_owned()), "duplicate id {id}");
        }
    }
    assert_eq!(ids.len(), PROCS * EACH);
}
