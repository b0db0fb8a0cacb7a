//! The bash `message-bus.sh` verbs on the JSONL store, through the real binary: `receive`,
//! `clear`, `count`, `cleanup`, `init-system`, `cleanup-system`, with the bash script's exact
//! stdout and exit statuses; `receive`/`clear` never losing a message that arrived in between
//! (the bash defect); `--bash-logs` / `SHOAL_BASH_LOGS` log lines; cross-shard ordering.

mod common;

use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use common::TestRoot;
use serde_json::Value;

/// The keys of a bash message, in the order the script writes them.
const BASH_KEYS: [&str; 9] = [
    "version",
    "msg_id",
    "from",
    "to",
    "timestamp",
    "sequence",
    "type",
    "payload",
    "requires_ack",
];

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `shoal send`, returning the printed message id (checked to look like `msg-<secs>-<digits>`).
fn send(t: &TestRoot, from: &str, to: &str, kind: &str, payload: &str) -> String {
    let out = t.ok(&["send", from, to, kind, payload]);
    let id = out
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("send output {out:?} does not end in a newline"));
    assert!(
        !id.contains('\n'),
        "send printed more than one line: {out:?}"
    );
    let mut parts = id.splitn(3, '-');
    assert_eq!(parts.next(), Some("msg"), "bad id {id:?}");
    for p in parts {
        assert!(
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
            "bad id {id:?}"
        );
    }
    id.to_owned()
}

/// One message exactly as the bash script writes its file (no trailing newline).
fn bash_message(
    id: &str,
    from: &str,
    to: &str,
    timestamp: u64,
    sequence: u64,
    kind: &str,
    payload: &str,
) -> String {
    format!(
        "{{\n  \"version\": \"1.0\",\n  \"msg_id\": \"{id}\",\n  \"from\": \"{from}\",\n  \"to\": \"{to}\",\n  \
         \"timestamp\": {timestamp},\n  \"sequence\": {sequence},\n  \"type\": \"{kind}\",\n  \
         \"payload\": {payload},\n  \"requires_ack\": false\n}}"
    )
}

/// Check `out` has the exact shape of the bash `receive` output (`[`, messages separated by
/// `,` lines, `]`; each message 2-space indented, keys in order, one line each) and return
/// the messages, parsed.
fn check_bash_array(out: &str) -> Vec<Value> {
    let parsed: Value =
        serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    let arr = parsed.as_array().expect("not a JSON array").clone();
    assert!(out.ends_with('\n'), "no final newline: {out:?}");
    if arr.is_empty() {
        assert_eq!(out, "[]\n");
        return arr;
    }
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"["), "first line: {out}");
    assert_eq!(lines.last(), Some(&"]"), "last line: {out}");
    let body = &lines[1..lines.len() - 1];
    let chunks: Vec<&[&str]> = body.split(|l| *l == ",").collect();
    assert_eq!(
        chunks.len(),
        arr.len(),
        "one `,` line between messages: {out}"
    );
    for (chunk, msg) in chunks.iter().zip(&arr) {
        assert_eq!(chunk.len(), BASH_KEYS.len() + 2, "message lines: {chunk:?}");
        assert_eq!(chunk[0], "{");
        assert_eq!(chunk[chunk.len() - 1], "}");
        for (i, key) in BASH_KEYS.iter().enumerate() {
            let line = chunk[i + 1];
            let prefix = format!("  \"{key}\": ");
            assert!(
                line.starts_with(&prefix),
                "line {line:?}: expected key {key}"
            );
            let last = i + 1 == BASH_KEYS.len();
            assert_eq!(!line.ends_with(','), last, "comma on line {line:?}");
        }
        assert_eq!(chunk[1], "  \"version\": \"1.0\",");
        assert_eq!(chunk[9], "  \"requires_ack\": false");
        let keys: Vec<&str> = msg
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), BASH_KEYS.len(), "keys: {keys:?}");
    }
    arr
}

fn receive(t: &TestRoot, id: &str) -> Vec<Value> {
    check_bash_array(&t.ok(&["receive", id]))
}

fn msg_ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["msg_id"].as_str().unwrap().to_owned())
        .collect()
}

fn count(t: &TestRoot, args: &[&str]) -> String {
    let mut a = vec!["count"];
    a.extend_from_slice(args);
    t.ok(&a)
}

/// Whether `line` starts like a bash bus log line: `[HH:MM:SS] [MESSAGE-BUS] `.
fn is_bash_log(line: &str) -> bool {
    let b = line.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() > 25
        && b[0] == b'['
        && digits(1..3)
        && b[3] == b':'
        && digits(4..6)
        && b[6] == b':'
        && digits(7..9)
        && line[9..].starts_with("] [MESSAGE-BUS] ")
}

/// The text of each bash log line on stderr (after the prefix); panics on any other line.
fn bash_log_texts(o: &Output) -> Vec<String> {
    let err = common::stderr(o);
    err.lines()
        .map(|l| {
            assert!(
                is_bash_log(l),
                "not a bash log line: {l:?} (stderr: {err:?})"
            );
            l["[00:00:00] [MESSAGE-BUS] ".len()..].to_owned()
        })
        .collect()
}

#[test]
fn r2_receive_on_an_empty_inbox_prints_an_empty_array() {
    let t = TestRoot::new("v-empty");
    t.ok(&["init", "b"]);
    let o = t.run(&["receive", "b"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "[]\n");
    assert_eq!(common::stderr(&o), "");
}

#[test]
fn r2_receive_and_clear_of_a_missing_inbox_fail() {
    let t = TestRoot::new("v-missing");
    // No root at all, then a root without that agent.
    for _ in 0..2 {
        for verb in ["receive", "clear"] {
            let o = t.run(&[verb, "nobody"]);
            assert_eq!(common::code(&o), 1, "{verb}: {}", common::stderr(&o));
            assert_eq!(common::stdout(&o), "", "{verb}");
            assert!(
                common::stderr(&o).contains("nobody"),
                "{verb}: {}",
                common::stderr(&o)
            );
        }
        t.ok(&["init", "b"]);
    }
}

#[test]
fn r2_receive_prints_the_exact_bash_array() {
    let t = TestRoot::new("v-exact");
    t.ok(&["init", "b"]);
    let before = epoch_secs();
    let id1 = send(&t, "alice", "b", "hello", r#"{"n": 1}"#);
    let id2 = send(
        &t,
        "alice",
        "b",
        "multi",
        "{\n  \"x\": [1,\n    2],\n  \"s\": \"a b\"\n}\n",
    );
    let id3 = send(&t, "carol", "b", "task.done", "[1, 2]");
    let after = epoch_secs();

    let out = t.ok(&["receive", "b"]);
    let msgs = check_bash_array(&out);
    assert_eq!(msgs.len(), 3, "{out}");
    assert_eq!(
        msg_ids(&msgs),
        [id1.as_str(), id2.as_str(), id3.as_str()],
        "oldest first"
    );
    let ts: Vec<u64> = msgs
        .iter()
        .map(|m| m["timestamp"].as_u64().unwrap())
        .collect();
    for &s in &ts {
        assert!(
            (before..=after).contains(&s),
            "timestamp {s} not within the sends ({before}..={after})"
        );
    }
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    // Sequences count per (from, to) pair from 1.
    let seqs: Vec<u64> = msgs
        .iter()
        .map(|m| m["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 1]);

    let expected = format!(
        "[\n{}\n,\n{}\n,\n{}\n]\n",
        bash_message(&id1, "alice", "b", ts[0], 1, "hello", r#"{"n": 1}"#),
        bash_message(
            &id2,
            "alice",
            "b",
            ts[1],
            2,
            "multi",
            r#"{"x":[1,2],"s":"a b"}"#
        ),
        bash_message(&id3, "carol", "b", ts[2], 1, "task.done", "[1, 2]"),
    );
    assert_eq!(out, expected);

    // Payloads: byte for byte (the space in `{"n": 1}` kept); a multi-line one on one line.
    assert!(out.contains("\n  \"payload\": {\"n\": 1},\n"), "{out}");
    assert!(
        out.contains("\n  \"payload\": {\"x\":[1,2],\"s\":\"a b\"},\n"),
        "{out}"
    );
    assert_eq!(msgs[0]["payload"], serde_json::json!({"n": 1}));
    assert_eq!(
        msgs[1]["payload"],
        serde_json::json!({"x": [1, 2], "s": "a b"})
    );
    assert_eq!(msgs[0]["version"], "1.0");
    assert_eq!(msgs[0]["requires_ack"], false);
}

#[test]
fn r2_receive_does_not_consume() {
    let t = TestRoot::new("v-peek");
    t.ok(&["init", "b"]);
    let ids: Vec<String> = (1..=3)
        .map(|i| send(&t, "a", "b", "t", &format!("{{\"i\":{i}}}")))
        .collect();
    let first = t.ok(&["receive", "b"]);
    assert_eq!(msg_ids(&check_bash_array(&first)), ids);
    assert_eq!(count(&t, &["b"]), "3\n");
    let second = t.ok(&["receive", "b"]);
    assert_eq!(first, second, "a second receive returns the same");
    assert_eq!(count(&t, &["b"]), "3\n");
    // Nothing was leased either: recv gets them all, first delivery.
    let got = common::parse_lines(&t.ok(&["recv", "b"]));
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids);
    assert!(got.iter().all(|m| m["delivery"] == 1));
}

/// Regression for the bash defect 3: `clear` deleted messages that arrived after `receive`.
#[test]
fn r2_clear_removes_only_what_receive_returned() {
    let t = TestRoot::new("v-clear-race");
    t.ok(&["init", "b"]);
    for i in 1..=3 {
        send(&t, "a", "b", "t", &format!("{{\"i\":{i}}}"));
    }
    assert_eq!(receive(&t, "b").len(), 3);
    // Two arrive after the receive: one in the same shard as the first three, one from
    // another sender.
    let later = [
        send(&t, "a", "b", "t", r#"{"i":4}"#),
        send(&t, "zed", "b", "t", r#"{"i":5}"#),
    ];
    let o = t.run(&["clear", "b"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "");
    assert_eq!(count(&t, &["b"]), "2\n");
    let left = receive(&t, "b");
    assert_eq!(msg_ids(&left), later);
    assert_eq!(left[0]["payload"]["i"], 4);
    assert_eq!(left[1]["payload"]["i"], 5);
}

#[test]
fn r2_clear_without_a_prior_receive_removes_everything() {
    let t = TestRoot::new("v-clear-all");
    t.ok(&["init", "b"]);
    for (i, from) in ["a", "c", "d", "e"].iter().enumerate() {
        send(&t, from, "b", "t", &format!("{{\"i\":{i}}}"));
    }
    assert_eq!(count(&t, &["b"]), "4\n");
    assert_eq!(t.ok(&["clear", "b"]), "");
    assert_eq!(count(&t, &["b"]), "0\n");
    assert_eq!(t.ok(&["receive", "b"]), "[]\n");
    assert_eq!(
        t.ok(&["recv", "b"]),
        "",
        "cleared messages are not delivered"
    );
}

#[test]
fn r2_clear_on_an_empty_inbox_exits_0() {
    let t = TestRoot::new("v-clear-empty");
    t.ok(&["init", "b"]);
    let o = t.run(&["clear", "b"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "");
    // Also right after a receive of nothing.
    assert_eq!(t.ok(&["receive", "b"]), "[]\n");
    assert_eq!(t.ok(&["clear", "b"]), "");
    assert_eq!(count(&t, &["b"]), "0\n");
}

#[test]
fn r2_a_second_clear_removes_everything_present_then() {
    let t = TestRoot::new("v-clear-twice");
    t.ok(&["init", "b"]);
    send(&t, "a", "b", "t", "1");
    assert_eq!(receive(&t, "b").len(), 1);
    let kept = send(&t, "c", "b", "t", "2");
    t.ok(&["clear", "b"]); // removes the one received, consumes the snapshot
    assert_eq!(count(&t, &["b"]), "1\n");
    assert_eq!(msg_ids(&receive(&t, "b")), [kept.as_str()]);
    // That receive took a snapshot again: clear, then clear right away.
    send(&t, "a", "b", "t", "3");
    t.ok(&["clear", "b"]);
    assert_eq!(count(&t, &["b"]), "1\n");
    t.ok(&["clear", "b"]); // no snapshot left: everything present now
    assert_eq!(count(&t, &["b"]), "0\n");
    assert_eq!(t.ok(&["receive", "b"]), "[]\n");
    // A receive of nothing, a clear consuming its snapshot, then two sends between that clear
    // and the next: the next clear removes them.
    assert_eq!(receive(&t, "b").len(), 0);
    t.ok(&["clear", "b"]);
    send(&t, "a", "b", "t", "4");
    send(&t, "d", "b", "t", "5");
    t.ok(&["clear", "b"]);
    assert_eq!(count(&t, &["b"]), "0\n");
    assert_eq!(t.ok(&["recv", "b"]), "");
}

#[test]
fn r2_clear_removes_messages_leased_to_a_recv_consumer() {
    let t = TestRoot::new("v-clear-leased");
    t.ok(&["init", "b"]);
    let a = send(&t, "a", "b", "t", "1");
    let c = send(&t, "c", "b", "t", "2");
    // Leased, not acknowledged, with a short lease.
    let got = common::parse_lines(&t.ok(&["recv", "b", "--lease", "200ms"]));
    assert_eq!(got.len(), 2);
    // `receive` shows leased messages too.
    assert_eq!(msg_ids(&receive(&t, "b")), [a.as_str(), c.as_str()]);
    t.ok(&["clear", "b"]);
    assert_eq!(count(&t, &["b"]), "0\n");
    // Past the lease they do not come back.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(t.ok(&["recv", "b"]), "");
    // Nothing is outstanding: `ack --all` of nothing succeeds quietly; acking one by id fails
    // naming it.
    let o = t.run(&["ack", "b", "--all"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "");
    assert_eq!(common::stderr(&o), "");
    let o = t.run(&["ack", "b", &a]);
    assert_eq!(common::code(&o), 1);
    assert!(common::stderr(&o).contains(&a), "{}", common::stderr(&o));
}

#[test]
fn r2_clear_keeps_a_lease_taken_on_a_message_sent_after_receive() {
    let t = TestRoot::new("v-clear-lease-later");
    t.ok(&["init", "b"]);
    let m1 = send(&t, "a", "b", "t", "1");
    let m2 = send(&t, "a", "b", "t", "2");
    assert_eq!(msg_ids(&receive(&t, "b")), [m1.as_str(), m2.as_str()]);
    let m3 = send(&t, "a", "b", "t", "3");
    // A consumer leases all three, then the bash-style consumer clears what it received.
    let got = common::parse_lines(&t.ok(&["recv", "b"]));
    assert_eq!(got.len(), 3);
    t.ok(&["clear", "b"]);
    assert_eq!(count(&t, &["b"]), "1\n");
    assert_eq!(msg_ids(&receive(&t, "b")), [m3.as_str()]);
    // m3 is still leased to the consumer, which can acknowledge it; m1 is gone.
    let o = t.run(&["ack", "b", &m1]);
    assert_eq!(common::code(&o), 1);
    assert!(common::stderr(&o).contains(&m1), "{}", common::stderr(&o));
    t.ok(&["ack", "b", &m3]);
    assert_eq!(count(&t, &["b"]), "0\n");
}

#[test]
fn r2_count_inbox_and_outbox() {
    let t = TestRoot::new("v-count");
    // No root yet: 0.
    assert_eq!(count(&t, &["b"]), "0\n");
    t.ok(&["init", "a", "b"]);
    assert_eq!(count(&t, &["b"]), "0\n");
    assert_eq!(count(&t, &["b", "inbox"]), "0\n");
    assert_eq!(count(&t, &["b", "outbox"]), "0\n");
    let ids: Vec<String> = (0..3)
        .map(|i| send(&t, "a", "b", "t", &i.to_string()))
        .collect();
    // From a sender that is not an agent: delivered, but counted in nobody's outbox.
    send(&t, "ghost", "b", "t", "9");
    assert_eq!(count(&t, &["b"]), "4\n");
    assert_eq!(count(&t, &["b", "inbox"]), "4\n");
    assert_eq!(count(&t, &["a", "outbox"]), "3\n");
    assert_eq!(count(&t, &["a", "inbox"]), "0\n");
    assert_eq!(count(&t, &["b", "outbox"]), "0\n");
    assert_eq!(count(&t, &["ghost", "outbox"]), "0\n");
    assert_eq!(count(&t, &["ghost"]), "0\n");
    // Once the sender is an agent, its later sends count.
    t.ok(&["init", "ghost"]);
    send(&t, "ghost", "b", "t", "10");
    assert_eq!(count(&t, &["ghost", "outbox"]), "1\n");
    assert_eq!(count(&t, &["b"]), "5\n");
    // Leased but unacknowledged messages still count; acknowledged ones do not.
    t.ok(&["recv", "b", "--max", "2"]);
    assert_eq!(count(&t, &["b"]), "5\n");
    t.ok(&["ack", "b", &ids[0], &ids[1]]);
    assert_eq!(count(&t, &["b"]), "3\n");
    // The sent count is not reduced by the recipient consuming.
    assert_eq!(count(&t, &["a", "outbox"]), "3\n");
    // An unknown box holds 0 messages, as in the bash bus.
    assert_eq!(count(&t, &["b", "processed"]), "0\n");
}

#[test]
fn r2_cleanup_removes_the_agent() {
    let t = TestRoot::new("v-cleanup");
    t.ok(&["init", "b"]);
    send(&t, "a", "b", "t", "1");
    send(&t, "a", "b", "t", "2");
    let o = t.run(&["cleanup", "b"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "");
    assert!(!t.root().join("agents").join("b").exists());
    let o = t.run(&["send", "a", "b", "t", "3"]);
    assert_eq!(common::code(&o), 1);
    assert_eq!(common::stdout(&o), "");
    assert_eq!(count(&t, &["b"]), "0\n");
    assert_eq!(common::code(&t.run(&["receive", "b"])), 1);
    // Absent: still 0, also with no root at all.
    assert_eq!(t.ok(&["cleanup", "b"]), "");
    assert_eq!(t.ok(&["cleanup", "never"]), "");
    let bare = TestRoot::new("v-cleanup-bare");
    assert_eq!(bare.ok(&["cleanup", "b"]), "");
    // Re-created, it starts empty.
    t.ok(&["init", "b"]);
    assert_eq!(t.ok(&["receive", "b"]), "[]\n");
    assert_eq!(count(&t, &["b"]), "0\n");
}

#[test]
fn r2_init_system_and_cleanup_system() {
    let t = TestRoot::new("v-system");
    assert!(!t.root().exists());
    for _ in 0..2 {
        let o = t.run(&["init-system"]);
        assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
        assert_eq!(common::stdout(&o), "");
        assert!(t.root().is_dir());
        assert!(t.root().join(".shoal-format").is_file());
    }
    t.ok(&["init", "b"]);
    send(&t, "a", "b", "t", "1");
    // init-system again keeps what is there.
    t.ok(&["init-system"]);
    assert_eq!(count(&t, &["b"]), "1\n");
    for _ in 0..2 {
        let o = t.run(&["cleanup-system"]);
        assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
        assert_eq!(common::stdout(&o), "");
        assert!(!t.root().exists());
    }
    assert_eq!(count(&t, &["b"]), "0\n");
    t.ok(&["init-system"]);
    assert!(t.root().is_dir());
}

/// The log lines of each verb in bash-log mode, enabled by `enable` on a command.
fn check_bash_logs(tag: &str, enable: fn(&mut std::process::Command)) {
    let t = TestRoot::new(tag);
    let run = |args: &[&str]| -> Output {
        let mut c = t.cmd(args);
        enable(&mut c);
        c.output().unwrap()
    };
    let ok = |args: &[&str]| -> (String, Vec<String>) {
        let o = run(args);
        assert_eq!(common::code(&o), 0, "{args:?}: {}", common::stderr(&o));
        (common::stdout(&o), bash_log_texts(&o))
    };

    let (_, logs) = ok(&["init-system"]);
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].starts_with("Message bus system initialized"),
        "{logs:?}"
    );

    let (_, logs) = ok(&["init", "b"]);
    assert!(!logs.is_empty());
    assert!(logs[0].contains("b"), "{logs:?}");

    let (out, logs) = ok(&["send", "a", "b", "t", r#"{"n":1}"#]);
    let id = out.trim_end();
    assert_eq!(logs, [format!("Sent message: a -> b [t] ({id})")]);
    let (_, logs) = ok(&["send", "c", "b", "t", r#"{"n":2}"#]);
    assert_eq!(logs.len(), 1);

    let (out, logs) = ok(&["receive", "b"]);
    assert_eq!(check_bash_array(&out).len(), 2);
    assert_eq!(logs, ["Retrieved 2 messages for b (sorted by timestamp)"]);

    let (out, logs) = ok(&["clear", "b"]);
    assert_eq!(out, "");
    assert_eq!(logs, ["Cleared 2 messages from b inbox"]);

    let (out, logs) = ok(&["cleanup", "b"]);
    assert_eq!(out, "");
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(logs[0].contains("b"), "{logs:?}");

    // Errors: `... ERROR: ...`, exit 1.
    for args in [
        &["send", "a", "b", "t", "1"][..],
        &["receive", "b"][..],
        &["send", "a", "../evil", "t", "1"][..],
    ] {
        let o = run(args);
        assert_eq!(common::code(&o), 1, "{args:?}");
        let logs = bash_log_texts(&o);
        assert!(
            logs.iter().any(|l| l.starts_with("ERROR: ")),
            "{args:?}: {logs:?}"
        );
    }
    let o = run(&["receive", "b"]);
    assert_eq!(bash_log_texts(&o), ["ERROR: Inbox not found for agent: b"]);

    let (_, logs) = ok(&["cleanup-system"]);
    assert_eq!(logs.len(), 1, "{logs:?}");
}

#[test]
fn r2_bash_logs_flag() {
    check_bash_logs("v-logs-flag", |c| {
        // The global flag, placed after the subcommand.
        c.arg("--bash-logs");
    });
}

#[test]
fn r2_bash_logs_env() {
    check_bash_logs("v-logs-env", |c| {
        c.env("SHOAL_BASH_LOGS", "1");
    });
}

#[test]
fn r2_without_bash_logs_success_is_silent_and_errors_are_plain() {
    let t = TestRoot::new("v-quiet");
    let quiet = |args: &[&str], env_off: bool| -> String {
        let mut c = t.cmd(args);
        if env_off {
            c.env("SHOAL_BASH_LOGS", "0");
        }
        let o = c.output().unwrap();
        assert_eq!(common::code(&o), 0, "{args:?}: {}", common::stderr(&o));
        assert_eq!(common::stderr(&o), "", "{args:?} wrote on stderr");
        common::stdout(&o)
    };
    for env_off in [false, true] {
        quiet(&["init-system"], env_off);
        quiet(&["init", "b"], env_off);
        let id = quiet(&["send", "a", "b", "t", "1"], env_off);
        quiet(&["receive", "b"], env_off);
        quiet(&["count", "b"], env_off);
        quiet(&["count", "b", "outbox"], env_off);
        quiet(&["recv", "b"], env_off);
        quiet(&["ack", "b", id.trim_end()], env_off);
        quiet(&["clear", "b"], env_off);
        quiet(&["cleanup", "b"], env_off);
        quiet(&["cleanup", "b"], env_off);
        quiet(&["cleanup-system"], env_off);
        quiet(&["cleanup-system"], env_off);
    }
    t.ok(&["init", "b"]);
    for args in [&["send", "a", "zz", "t", "1"][..], &["receive", "zz"][..]] {
        let o = t.run(args);
        assert_eq!(common::code(&o), 1, "{args:?}");
        let err = common::stderr(&o);
        assert!(err.starts_with("shoal: error: "), "{args:?}: {err:?}");
        assert!(err.contains("zz"), "{args:?}: {err:?}");
        assert!(!err.contains("[MESSAGE-BUS]"), "{args:?}: {err:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
    }
}

#[test]
fn r2_twenty_senders_across_shards_come_out_in_send_order() {
    let t = TestRoot::new("v-shards");
    t.ok(&["init", "b"]);
    let ids: Vec<String> = (0..20)
        .map(|i| {
            send(
                &t,
                &format!("sender{i:02}"),
                "b",
                "t",
                &format!("{{\"k\":{i}}}"),
            )
        })
        .collect();
    // They did land in several shard files.
    let inbox = t.root().join("agents").join("b").join("inbox");
    let used = std::fs::read_dir(&inbox)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().metadata().unwrap().len() > 0)
        .count();
    assert!(used >= 2, "20 senders used only {used} shard(s)");

    let msgs = receive(&t, "b");
    assert_eq!(msg_ids(&msgs), ids, "receive: not in send order");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["from"], format!("sender{i:02}"));
        assert_eq!(m["sequence"], 1);
    }
    let got = common::parse_lines(&t.ok(&["recv", "b", "--ack"]));
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids, "recv: not in send order");
    assert_eq!(count(&t, &["b"]), "0\n");
}
