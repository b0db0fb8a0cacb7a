//! At-least-once delivery through the CLI: `recv` leases, redelivery after a lease expires
//! (with the delivery count raised), `ack` by id and `--all`, `recv --ack`, `--max`, blocking
//! `recv --wait` (woken by a send, by a lease expiring, with every wake mechanism), reclaiming
//! acknowledged space, and lease state shared between processes.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::TestRoot;
use serde_json::Value;

/// `shoal send`, returning the message id.
fn send(t: &TestRoot, from: &str, to: &str, payload: &str) -> String {
    t.ok(&["send", from, to, "t", payload])
        .trim_end()
        .to_owned()
}

/// `shoal recv <args>` (must succeed), parsed.
fn recv(t: &TestRoot, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["recv"];
    a.extend_from_slice(args);
    common::parse_lines(&t.ok(&a))
}

fn ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

fn deliveries(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .map(|m| m["delivery"].as_u64().unwrap())
        .collect()
}

/// The envelope without its delivery count.
fn without_delivery(m: &Value) -> Value {
    let mut m = m.clone();
    m.as_object_mut().unwrap().remove("delivery");
    m
}

fn count(t: &TestRoot, id: &str) -> String {
    t.ok(&["count", id])
}

/// Wait for `child` to exit, collecting its output as it goes (so a full pipe never blocks
/// it); kill it and fail after `secs` seconds.
fn finish(child: Child, secs: u64, what: &str) -> Output {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(o) => o,
        Err(_) => {
            // Our own child, not yet reaped (the waiting thread still holds it).
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let o = rx.recv().unwrap();
            panic!(
                "watchdog: {what} still running after {secs} s; stderr: {}",
                common::stderr(&o)
            );
        }
    }
}

#[test]
fn r2_recv_without_ack_leases_and_redelivers() {
    let t = TestRoot::new("l-lease");
    t.ok(&["init", "b"]);

    // While the lease holds, a second recv gets nothing.
    let m0 = send(&t, "a", "b", r#"{"p":0}"#);
    let got = recv(&t, &["b", "--lease", "1h"]);
    assert_eq!(ids(&got), [m0.as_str()]);
    assert_eq!(deliveries(&got), [1]);
    let o = t.run(&["recv", "b"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(
        common::stdout(&o),
        "",
        "a leased message was delivered again"
    );
    assert_eq!(count(&t, "b"), "1\n", "leased is not consumed");
    t.ok(&["ack", "b", &m0]);

    // After a short lease the same messages come back, delivery 2 then 3, oldest first, from
    // two senders (two shards).
    let m1 = send(&t, "a", "b", r#"{"p": 1}"#);
    let m2 = send(&t, "c", "b", r#"{"p":[2, "two"]}"#);
    let d1 = recv(&t, &["b", "--lease", "200ms"]);
    assert_eq!(ids(&d1), [m1.as_str(), m2.as_str()]);
    assert_eq!(deliveries(&d1), [1, 1]);
    let wait = ["b", "--wait", "--timeout", "30s", "--lease", "200ms"];
    let d2 = recv(&t, &wait);
    assert_eq!(ids(&d2), [m1.as_str(), m2.as_str()]);
    assert_eq!(deliveries(&d2), [2, 2]);
    let d3 = recv(&t, &wait);
    assert_eq!(ids(&d3), [m1.as_str(), m2.as_str()]);
    assert_eq!(deliveries(&d3), [3, 3]);
    for i in 0..2 {
        assert_eq!(without_delivery(&d1[i]), without_delivery(&d2[i]));
        assert_eq!(without_delivery(&d1[i]), without_delivery(&d3[i]));
    }
    assert_eq!(d1[0]["seq"], 2);
    assert_eq!(d1[1]["seq"], 1);
    assert_eq!(d1[0]["payload"], serde_json::json!({"p": 1}));
    assert_eq!(d3[1]["payload"], serde_json::json!({"p": [2, "two"]}));
    assert_eq!(count(&t, "b"), "2\n");
}

#[test]
fn r2_ack_by_id_acknowledges_exactly_those() {
    let t = TestRoot::new("l-ack-ids");
    t.ok(&["init", "b"]);
    let x1 = send(&t, "a", "b", "1");
    let x2 = send(&t, "c", "b", "2");
    let x3 = send(&t, "a", "b", "3");
    assert_eq!(recv(&t, &["b", "--lease", "200ms"]).len(), 3);

    let o = t.run(&["ack", "b", &x2]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "");
    assert_eq!(common::stderr(&o), "");
    assert_eq!(count(&t, "b"), "2\n");
    // Twice: the second time fails, naming it.
    let o = t.run(&["ack", "b", &x2]);
    assert_eq!(common::code(&o), 1);
    assert!(common::stderr(&o).contains(&x2), "{}", common::stderr(&o));

    // The others come back after the lease (which x2 shared); x2 does not.
    let again = recv(&t, &["b", "--wait", "--timeout", "30s", "--lease", "1h"]);
    assert_eq!(ids(&again), [x1.as_str(), x3.as_str()]);
    assert_eq!(deliveries(&again), [2, 2]);

    // A known and an unknown id: the known one is acknowledged, only the unknown one named.
    let o = t.run(&["ack", "b", &x1, "msg-1-1"]);
    assert_eq!(common::code(&o), 1);
    let err = common::stderr(&o);
    assert!(err.contains("msg-1-1") && !err.contains(&x1), "{err}");
    assert_eq!(count(&t, "b"), "1\n");
    t.ok(&["ack", "b", &x3]);
    assert_eq!(count(&t, "b"), "0\n");
    assert_eq!(t.ok(&["recv", "b"]), "");
}

#[test]
fn r2_ack_all_acknowledges_delivered_but_not_undelivered() {
    let t = TestRoot::new("l-ack-all");
    t.ok(&["init", "b"]);
    let y: Vec<String> = (1..=3)
        .map(|i| send(&t, "a", "b", &i.to_string()))
        .collect();
    let got = recv(&t, &["b", "--max", "2", "--lease", "200ms"]);
    assert_eq!(ids(&got), &y[..2]);
    let o = t.run(&["ack", "b", "--all"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(count(&t, "b"), "1\n");
    let rest = recv(&t, &["b", "--lease", "1h"]);
    assert_eq!(ids(&rest), &y[2..]);
    assert_eq!(deliveries(&rest), [1]);
    // Past the first two's lease, they do not come back.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(t.ok(&["recv", "b"]), "");
    assert_eq!(count(&t, "b"), "1\n");
}

#[test]
fn r2_recv_ack_acknowledges_what_it_printed() {
    let t = TestRoot::new("l-recv-ack");
    t.ok(&["init", "b"]);
    let a = send(&t, "a", "b", "1");
    let c = send(&t, "c", "b", "2");
    let got = recv(&t, &["b", "--ack", "--lease", "200ms"]);
    assert_eq!(ids(&got), [a.as_str(), c.as_str()]);
    assert_eq!(count(&t, "b"), "0\n");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        t.ok(&["recv", "b"]),
        "",
        "an acknowledged message came back"
    );
    let o = t.run(&["ack", "b", &a]);
    assert_eq!(common::code(&o), 1, "already acknowledged");
    assert!(common::stderr(&o).contains(&a));
}

#[test]
fn r2_recv_max_returns_at_most_n_oldest_first() {
    let t = TestRoot::new("l-max");
    t.ok(&["init", "b"]);
    let sent: Vec<String> = (0..5)
        .map(|i| send(&t, ["a", "c"][i % 2], "b", &i.to_string()))
        .collect();
    assert_eq!(ids(&recv(&t, &["b", "--max", "2", "--ack"])), &sent[0..2]);
    assert_eq!(ids(&recv(&t, &["b", "--max", "2", "--ack"])), &sent[2..4]);
    assert_eq!(ids(&recv(&t, &["b", "--max", "10", "--ack"])), &sent[4..]);
    assert_eq!(t.ok(&["recv", "b", "--max", "1"]), "");

    send(&t, "a", "b", "5");
    let o = t.run(&["recv", "b", "--max", "0"]);
    assert_eq!(common::code(&o), 1, "--max 0 accepted");
    assert_eq!(common::stdout(&o), "");
    assert!(!common::stderr(&o).is_empty());
    // Nothing was leased by the rejected call.
    assert_eq!(deliveries(&recv(&t, &["b", "--ack"])), [1]);
}

/// `recv b --wait --timeout 30s` (with `SHOAL_WAKE=wake` if given) has not returned 300 ms
/// later with nothing sent, and returns the message once one is sent.
fn blocked_then_woken(tag: &str, wake: Option<&str>) {
    let t = TestRoot::new(tag);
    t.ok(&["init", "b"]);
    let mut c = t.cmd(&["recv", "b", "--wait", "--timeout", "30s"]);
    if let Some(w) = wake {
        c.env("SHOAL_WAKE", w);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    if child.try_wait().unwrap().is_some() {
        let o = child.wait_with_output().unwrap();
        panic!(
            "SHOAL_WAKE={wake:?}: recv --wait returned with nothing sent ({:?}): {} {}",
            o.status,
            common::stdout(&o),
            common::stderr(&o)
        );
    }
    let id = send(&t, "a", "b", r#"{"wake": true}"#);
    let o = finish(child, 60, "recv --wait after a send");
    assert_eq!(
        common::code(&o),
        0,
        "SHOAL_WAKE={wake:?}: {}",
        common::stderr(&o)
    );
    let got = common::parse_lines(&common::stdout(&o));
    assert_eq!(ids(&got), [id.as_str()], "SHOAL_WAKE={wake:?}");
    assert_eq!(got[0]["payload"], serde_json::json!({"wake": true}));
    assert_eq!(got[0]["delivery"], 1);
}

#[test]
fn r2_recv_wait_blocks_until_a_message_arrives() {
    blocked_then_woken("l-wait", None);
}

#[test]
fn r2_recv_wait_with_inotify() {
    blocked_then_woken("l-wait-inotify", Some("inotify"));
}

#[test]
fn r2_recv_wait_with_futex() {
    blocked_then_woken("l-wait-futex", Some("futex"));
}

#[test]
fn r2_recv_wait_with_poll() {
    blocked_then_woken("l-wait-poll", Some("poll"));
}

#[test]
fn r2_unknown_wake_mechanism_is_rejected() {
    let t = TestRoot::new("l-wait-bogus");
    t.ok(&["init", "b"]);
    send(&t, "a", "b", "1");
    let o = t
        .cmd(&["recv", "b", "--wait", "--timeout", "5s"])
        .env("SHOAL_WAKE", "bogus")
        .output()
        .unwrap();
    assert_eq!(common::code(&o), 1);
    assert_eq!(common::stdout(&o), "");
    let err = common::stderr(&o);
    for word in ["bogus", "auto", "inotify", "futex", "poll"] {
        assert!(err.contains(word), "{word} not named in {err:?}");
    }
    assert_eq!(count(&t, "b"), "1\n");
    assert_eq!(
        deliveries(&recv(&t, &["b"])),
        [1],
        "the failed recv leased it"
    );
}

#[test]
fn r2_recv_wait_returns_when_a_lease_expires() {
    let t = TestRoot::new("l-wait-expiry");
    t.ok(&["init", "b"]);
    let id = send(&t, "a", "b", r#"{"x":1}"#);
    assert_eq!(deliveries(&recv(&t, &["b", "--lease", "300ms"])), [1]);
    // Nothing new is sent: only the lease running out can end this wait.
    let o = t.run(&["recv", "b", "--wait", "--timeout", "10s"]);
    assert_eq!(
        common::code(&o),
        0,
        "no redelivery before the timeout: {}",
        common::stderr(&o)
    );
    let got = common::parse_lines(&common::stdout(&o));
    assert_eq!(ids(&got), [id.as_str()]);
    assert_eq!(deliveries(&got), [2]);
}

/// (bytes allocated, logical bytes) of the files in `b`'s inbox directory.
fn inbox_usage(t: &TestRoot, id: &str) -> (u64, u64) {
    let dir = t.root().join("agents").join(id).join("inbox");
    let mut allocated = 0;
    let mut len = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let md = e.unwrap().metadata().unwrap();
        allocated += md.blocks() * 512;
        len += md.len();
    }
    (allocated, len)
}

#[test]
fn r2_acknowledged_space_is_reclaimed_and_the_bus_does_not_grow() {
    const N: u64 = 20_000;
    const MAX_ALLOCATED: u64 = 8 * 4096; // one page per shard
    let t = TestRoot::new("l-reclaim");
    t.ok(&["init", "b", "--quota-msgs", "100000"]);
    for cycle in 0..3u64 {
        let first = cycle * N;
        let mut input = String::with_capacity(N as usize * 16);
        for i in first..first + N {
            input.push_str(&format!("{{\"i\":{i}}}\n"));
        }
        let mut child = t
            .cmd(&["send", "a", "b", "t", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let o = finish(child, 300, "send --stdin");
        writer.join().unwrap().unwrap();
        assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
        assert_eq!(common::stdout(&o).lines().count(), N as usize);
        let (allocated, _) = inbox_usage(&t, "b");
        assert!(
            allocated > 2_000_000,
            "cycle {cycle}: only {allocated} bytes allocated for {N} messages"
        );

        let mut next = first;
        loop {
            let got = recv(&t, &["b", "--ack", "--max", "5000"]);
            if got.is_empty() {
                break;
            }
            assert!(got.len() <= 5000);
            for m in &got {
                assert_eq!(m["payload"]["i"], next, "cycle {cycle}: out of order");
                next += 1;
            }
        }
        assert_eq!(next, first + N, "cycle {cycle}: messages missing");

        let (allocated, len) = inbox_usage(&t, "b");
        assert!(
            len > 2_000_000 * (cycle + 1),
            "cycle {cycle}: logical size {len}"
        );
        assert!(
            allocated <= MAX_ALLOCATED,
            "cycle {cycle}: {allocated} bytes still allocated after everything was acknowledged"
        );
        let agents = common::parse_lines(&t.ok(&["agents", "--json"]));
        let b = agents
            .iter()
            .find(|a| a["id"] == "b")
            .unwrap_or_else(|| panic!("no b in {agents:?}"));
        assert_eq!(b["inbox_msgs"], 0, "{b}");
        assert_eq!(b["inbox_bytes"], 0, "{b}");
        assert_eq!(count(&t, "b"), "0\n");
    }
}

#[test]
fn r2_lease_state_is_shared_between_processes() {
    let t = TestRoot::new("l-procs");
    t.ok(&["init", "b"]);
    let z1 = send(&t, "a", "b", "1");
    let z2 = send(&t, "c", "b", "2");
    // One process leases, without acknowledging...
    let got = recv(&t, &["b", "--lease", "1h"]);
    assert_eq!(ids(&got), [z1.as_str(), z2.as_str()]);
    // ...another sees the leases (nothing to deliver)...
    assert_eq!(t.ok(&["recv", "b"]), "");
    // ...and others acknowledge by id.
    t.ok(&["ack", "b", &z2]);
    assert_eq!(count(&t, "b"), "1\n");
    t.ok(&["ack", "b", &z1]);
    assert_eq!(count(&t, "b"), "0\n");
    let o = t.run(&["ack", "b", &z1]);
    assert_eq!(common::code(&o), 1);
    assert!(common::stderr(&o).contains(&z1));
}
