//! The compat layout as scripts see it, through the `scripts/message-bus.sh` shim (executed
//! and sourced) and the binary: inbox files that `grep` reads exactly as the bash bus wrote
//! them; `mv` to `processed/` consuming a message (for `count`, `recv` and `receive`, leased or
//! not); private modes under `umask 022`; an outbox that stays empty while `count outbox`
//! counts; no temporary file ever visible as `*.json`; adoption of a directory the bash bus
//! left (also by many first commands at once), refusal of one it did not; the shim's commands
//! on a JSONL root.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestRoot;
use serde_json::Value;

/// The shim, by absolute path.
const SHIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/message-bus.sh");

/// The original's field extraction: `grep -o '"<key>"[[:space:]]*:[[:space:]]*"[^"]*"'`.
const EXTRACT: &str = r#"
field() { grep -o "\"$1\"[[:space:]]*:[[:space:]]*\"[^\"]*\"" "$2" | sed 's/.*"\([^"]*\)".*/\1/'; }
"#;

/// A command with the shim's environment: `SHOAL_BIN` and `MESSAGE_BASE_DIR` set, shoal's other
/// variables removed.
fn with_env(mut c: Command, base: &Path) -> Command {
    c.env("SHOAL_BIN", common::bin())
        .env("MESSAGE_BASE_DIR", base)
        .env_remove("SHOAL_ROOT")
        .env_remove("SHOAL_LAYOUT")
        .env_remove("SHOAL_BASH_LOGS")
        .env_remove("SHOAL_WAKE")
        .env_remove("SHOAL_MAX_PAYLOAD")
        .stdin(Stdio::null());
    c
}

/// The shim, executed: `scripts/message-bus.sh <args>`.
fn shim(base: &Path, args: &[&str]) -> Output {
    with_env(Command::new(SHIM), base)
        .args(args)
        .output()
        .unwrap()
}

/// The shim, executed under `umask 022`.
fn shim_umask_022(base: &Path, args: &[&str]) -> Output {
    let mut c = with_env(Command::new("sh"), base);
    c.args(["-c", "umask 022; exec \"$@\"", "sh", SHIM])
        .args(args);
    c.output().unwrap()
}

fn ok(o: Output, what: &str) -> String {
    assert_eq!(common::code(&o), 0, "{what} failed: {}", common::stderr(&o));
    common::stdout(&o)
}

/// The shim, executed, must succeed; returns stdout.
fn shim_ok(base: &Path, args: &[&str]) -> String {
    ok(shim(base, args), &format!("message-bus.sh {args:?}"))
}

/// `shim send`, returning the message id.
fn send(base: &Path, from: &str, to: &str, kind: &str, payload: &str) -> String {
    let out = shim_ok(base, &["send", from, to, kind, payload]);
    let id = out.strip_suffix('\n').expect("one line");
    assert!(id.starts_with("msg-") && !id.contains('\n'), "{out:?}");
    id.to_owned()
}

/// A bash script that sources the shim, then runs `body`.
fn sourced(base: &Path, body: &str) -> Output {
    let mut c = with_env(Command::new("bash"), base);
    c.arg("-c").arg(format!("source '{SHIM}'\n{body}"));
    c.output().unwrap()
}

/// `shoal --root <base> <args>`.
fn shoal(base: &Path, args: &[&str]) -> Command {
    let mut c = with_env(Command::new(common::bin()), base);
    c.arg("--root").arg(base).args(args);
    c
}

fn shoal_ok(base: &Path, args: &[&str]) -> String {
    ok(
        shoal(base, args).output().unwrap(),
        &format!("shoal {args:?}"),
    )
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Names matching `inbox/*.json` as a shell glob does (no dot files).
fn json_names(inbox: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// One message file exactly as the bash bus writes it, final newline included.
#[allow(clippy::too_many_arguments)]
fn bash_file(
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
         \"payload\": {payload},\n  \"requires_ack\": false\n}}\n"
    )
}

/// The bash `receive` output for these message files (each ending in a newline).
fn bash_array(files: &[String]) -> String {
    if files.is_empty() {
        return "[]\n".to_owned();
    }
    let body: Vec<&str> = files.iter().map(|f| f.trim_end_matches('\n')).collect();
    format!("[\n{}\n]\n", body.join("\n,\n"))
}

fn recv_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn r3_grep_reads_exactly_what_was_sent_from_files_in_the_bash_format() {
    let t = TestRoot::new("c-grep");
    let base = t.dir().join("bus");
    shim_ok(&base, &["init-system"]);
    shim_ok(&base, &["init", "bob"]);
    let before = epoch_secs();
    // (id, from, type, payload, expected sequence)
    let mut sent = vec![
        (
            send(&base, "alice", "bob", "hello", r#"{"n": 1}"#),
            "alice",
            "hello",
            r#"{"n": 1}"#,
            1,
        ),
        (
            send(&base, "carol", "bob", "task.done", "[1, 2]"),
            "carol",
            "task.done",
            "[1, 2]",
            1,
        ),
        (
            send(&base, "alice", "bob", "status-update", r#""a string""#),
            "alice",
            "status-update",
            r#""a string""#,
            2,
        ),
    ];
    // And one through the sourced function.
    let o = sourced(
        &base,
        r#"send_message alice bob work '{"k": [true, null]}'"#,
    );
    let id = ok(o, "send_message").trim().to_owned();
    sent.push((id, "alice", "work", r#"{"k": [true, null]}"#, 3));
    let after = epoch_secs();

    // A script greps the fields out of each file.
    let script = format!(
        "{EXTRACT}\nfor f in \"$MESSAGE_BASE_DIR/bob/inbox\"/*.json; do\n  \
         echo \"$(basename \"$f\")|$(field from \"$f\")|$(field type \"$f\")|$(field msg_id \"$f\")\"\ndone"
    );
    let out = ok(sourced(&base, &script), "grep script");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let mut want: Vec<String> = sent
        .iter()
        .map(|(id, from, kind, _, _)| format!("{id}.json|{from}|{kind}|{id}"))
        .collect();
    want.sort();
    assert_eq!(got, want);

    // Each file, byte for byte.
    let inbox = base.join("bob/inbox");
    assert_eq!(json_names(&inbox).len(), sent.len());
    for (id, from, kind, payload, seq) in &sent {
        let text = std::fs::read_to_string(inbox.join(format!("{id}.json"))).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let ts = v["timestamp"].as_u64().unwrap();
        assert!((before..=after).contains(&ts), "timestamp {ts}");
        assert_eq!(
            text,
            bash_file(id, from, "bob", ts, *seq, kind, payload),
            "file {id}.json"
        );
        assert!(text.ends_with("}\n"));
    }
    let first = std::fs::read_to_string(inbox.join(format!("{}.json", sent[0].0))).unwrap();
    assert!(first.contains("\n  \"payload\": {\"n\": 1},\n"), "{first}");
}

#[test]
fn r3_mv_to_processed_consumes_the_message() {
    let t = TestRoot::new("c-mv");
    let base = t.dir().join("bus");
    shim_ok(&base, &["init", "bob"]);
    let ids: Vec<String> = (1..=3)
        .map(|i| send(&base, "alice", "bob", "t", &format!("{{\"i\":{i}}}")))
        .collect();
    assert_eq!(shim_ok(&base, &["count", "bob"]), "3\n");

    // A script handles the second message and moves it away, as scripts do.
    let script = format!(
        "mkdir -p \"$MESSAGE_BASE_DIR/bob/processed\"\n\
         mv \"$MESSAGE_BASE_DIR/bob/inbox/{}.json\" \"$MESSAGE_BASE_DIR/bob/processed/\"\n\
         message_count bob",
        ids[1]
    );
    assert_eq!(ok(sourced(&base, &script), "mv script"), "2\n");
    assert_eq!(shim_ok(&base, &["count", "bob"]), "2\n");
    assert!(
        base.join(format!("bob/processed/{}.json", ids[1]))
            .is_file()
    );

    // `receive_messages` does not list it.
    let out = ok(sourced(&base, "receive_messages bob"), "receive_messages");
    let arr: Vec<Value> = serde_json::from_str(&out).unwrap();
    let listed: Vec<&str> = arr.iter().map(|m| m["msg_id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[0].as_str(), ids[2].as_str()]);

    // `shoal recv` never delivers it.
    let got = common::parse_lines(&shoal_ok(&base, &["recv", "bob", "--ack"]));
    assert_eq!(recv_ids(&got), [ids[0].clone(), ids[2].clone()]);
    assert_eq!(shoal_ok(&base, &["recv", "bob"]), "");
    assert_eq!(shim_ok(&base, &["count", "bob"]), "0\n");
    assert_eq!(shim_ok(&base, &["receive", "bob"]), "[]\n");
    // The moved file is left alone.
    assert!(
        base.join(format!("bob/processed/{}.json", ids[1]))
            .is_file()
    );
}

#[test]
fn r3_a_leased_message_moved_away_is_not_delivered_again() {
    let t = TestRoot::new("c-lease-mv");
    let base = t.dir().join("bus");
    shim_ok(&base, &["init", "bob"]);
    let m1 = send(&base, "alice", "bob", "t", r#"{"i":1}"#);
    let m2 = send(&base, "alice", "bob", "t", r#"{"i":2}"#);
    let got = common::parse_lines(&shoal_ok(&base, &["recv", "bob", "--lease", "200ms"]));
    assert_eq!(recv_ids(&got), [m1.clone(), m2.clone()]);
    assert!(got.iter().all(|m| m["delivery"] == 1));

    // A script moves the first away while it is leased.
    let script = format!(
        "mkdir -p \"$MESSAGE_BASE_DIR/bob/processed\"\n\
         mv \"$MESSAGE_BASE_DIR/bob/inbox/{m1}.json\" \"$MESSAGE_BASE_DIR/bob/processed/\""
    );
    ok(sourced(&base, &script), "mv script");
    assert_eq!(shim_ok(&base, &["count", "bob"]), "1\n");

    // After the lease, only the second comes back.
    let start = Instant::now();
    let again = loop {
        let got = common::parse_lines(&shoal_ok(&base, &["recv", "bob", "--lease", "200ms"]));
        if !got.is_empty() {
            break got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "watchdog: the unacknowledged message never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(recv_ids(&again), std::slice::from_ref(&m2));
    assert_eq!(again[0]["delivery"], 2);
    shoal_ok(&base, &["ack", "bob", &m2]);
    // Past another lease: nothing at all.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(shoal_ok(&base, &["recv", "bob"]), "");
    assert_eq!(shim_ok(&base, &["count", "bob"]), "0\n");
    assert!(base.join(format!("bob/processed/{m1}.json")).is_file());
}

#[test]
fn r3_files_0600_and_directories_0700_under_umask_022() {
    let t = TestRoot::new("c-modes");
    let base = t.dir().join("bus");
    for args in [
        &["init-system"][..],
        &["init", "alice"],
        &["init", "bob"],
        &["send", "alice", "bob", "t", r#"{"n": 1}"#],
        &["send", "bob", "alice", "t", "{}"],
        &["receive", "bob"],
    ] {
        ok(shim_umask_022(&base, args), &format!("{args:?}"));
    }
    // Sourced, under umask 022 too.
    let mut c = with_env(Command::new("sh"), &base);
    c.args(["-c", "umask 022; exec \"$@\"", "sh", "bash", "-c"])
        .arg(format!(
            "source '{SHIM}'\ninit_message_bus carol\nsend_message carol bob t '[1]'\nsend_message bob carol t '2'"
        ));
    ok(c.output().unwrap(), "sourced under umask 022");

    for id in ["alice", "bob", "carol"] {
        for d in [
            base.join(id),
            base.join(id).join("inbox"),
            base.join(id).join("outbox"),
        ] {
            assert!(d.is_dir(), "{} missing", d.display());
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        assert!(!json_names(&base.join(id).join("inbox")).is_empty());
    }
    assert_eq!(mode(&base), 0o700);
    let all = common::modes_under(&base);
    assert!(all.len() > 20, "{all:?}");
    for (p, m, is_dir) in all {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{} is mode {m:o}", p.display());
    }
}

#[test]
fn r3_outbox_stays_empty_while_count_outbox_counts_sends() {
    let t = TestRoot::new("c-outbox");
    let base = t.dir().join("bus");
    shim_ok(&base, &["init", "alice"]);
    shim_ok(&base, &["init", "bob"]);
    for i in 0..5 {
        send(&base, "alice", "bob", "t", &format!("{{\"i\":{i}}}"));
    }
    ok(
        sourced(
            &base,
            "for i in 1 2 3; do send_message bob alice t \"{\\\"i\\\":$i}\" >/dev/null; done",
        ),
        "sourced sends",
    );
    // More than the bash bus ever kept (it evicted past 100, v1.1 past 1000 messages).
    const BULK: usize = 1200;
    let mut c = shoal(&base, &["send", "alice", "bob", "t", "--stdin"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = String::new();
    for i in 0..BULK {
        input.push_str(&format!("{{\"bulk\":{i}}}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    assert_eq!(common::stdout(&o).lines().count(), BULK);

    let total = BULK + 5;
    assert_eq!(
        shim_ok(&base, &["count", "alice", "outbox"]),
        format!("{total}\n")
    );
    assert_eq!(shim_ok(&base, &["count", "bob", "outbox"]), "3\n");
    assert_eq!(shim_ok(&base, &["count", "bob"]), format!("{total}\n"));
    assert_eq!(
        shim_ok(&base, &["count", "bob", "inbox"]),
        format!("{total}\n")
    );
    assert_eq!(shim_ok(&base, &["count", "alice"]), "3\n");
    assert_eq!(json_names(&base.join("bob/inbox")).len(), total);
    for id in ["alice", "bob"] {
        let outbox = base.join(id).join("outbox");
        assert!(outbox.is_dir(), "{} missing", outbox.display());
        let left: Vec<_> = std::fs::read_dir(&outbox).unwrap().collect();
        assert!(left.is_empty(), "{}: {left:?}", outbox.display());
    }
}

#[test]
fn r3_no_temporary_file_is_ever_visible_as_json() {
    let t = TestRoot::new("c-tmp");
    let base = t.dir().join("bus");
    shim_ok(&base, &["init", "b"]);
    let inbox = base.join("b/inbox");
    const N: usize = 2000;
    let pad = "x".repeat(4000);

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            let mut verified: HashSet<String> = HashSet::new();
            let (mut reads, mut races, mut passes) = (0u64, 0u64, 0u64);
            let start = Instant::now();
            loop {
                // The last pass runs after the writer is done.
                let last = done.load(Ordering::Acquire);
                passes += 1;
                for name in json_names(&inbox) {
                    if verified.contains(&name) {
                        continue;
                    }
                    let bytes = match std::fs::read(inbox.join(&name)) {
                        Ok(b) => b,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            races += 1;
                            continue;
                        }
                        Err(e) => panic!("{name}: {e}"),
                    };
                    reads += 1;
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                        panic!(
                            "{name}: incomplete or invalid ({e}), {} bytes: {:?}",
                            bytes.len(),
                            String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(80)..])
                        )
                    });
                    assert!(bytes.ends_with(b"}\n"), "{name}: no final newline");
                    assert_eq!(format!("{}.json", v["msg_id"].as_str().unwrap()), name);
                    assert!(v["payload"]["i"].is_u64(), "{name}: {v}");
                    verified.insert(name);
                }
                if last {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(300),
                    "watchdog: writer not done"
                );
            }
            (verified.len(), reads, races, passes)
        })
    };

    let mut c = shoal(&base, &["send", "a", "b", "t", "--stdin"]);
    c.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut input = String::with_capacity(N * (pad.len() + 32));
    for i in 0..N {
        input.push_str(&format!("{{\"i\":{i},\"pad\":\"{pad}\"}}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    done.store(true, Ordering::Release);
    let (seen, reads, races, passes) = reader.join().unwrap();
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    eprintln!("reader: {passes} passes, {reads} files read, {races} vanished before reading");
    assert_eq!(seen, N, "the reader saw every message, complete");
    assert_eq!(json_names(&inbox).len(), N);
    assert_eq!(shim_ok(&base, &["count", "b"]), format!("{N}\n"));
    // No temporary file was left behind either.
    let others: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json") && n != ".lock")
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

/// What the bash bus leaves: base 0755, `bob/` and `old/` with `inbox/`, `outbox/`,
/// `.sequences/` (0755), `old/.sequences/bob` saying 2, and two messages from old to bob
/// (0644), named so that name order is the reverse of (timestamp, sequence) order.
/// Returns the two files' contents, in delivery order, with their ids.
fn make_bash_bus(base: &Path) -> Vec<(String, String)> {
    for id in ["bob", "old"] {
        for part in ["inbox", "outbox", ".sequences"] {
            std::fs::create_dir_all(base.join(id).join(part)).unwrap();
            set_mode(&base.join(id).join(part), 0o755);
        }
        set_mode(&base.join(id), 0o755);
    }
    set_mode(base, 0o755);
    std::fs::write(base.join("old/.sequences/bob"), "2\n").unwrap();
    set_mode(&base.join("old/.sequences/bob"), 0o644);
    let mut out = Vec::new();
    for (id, seq) in [("msg-1700000000-942", 1), ("msg-1700000000-042", 2)] {
        let text = bash_file(
            id,
            "old",
            "bob",
            1_700_000_000,
            seq,
            "hello",
            &format!("{{\"n\": {seq}}}"),
        );
        let p = base.join(format!("bob/inbox/{id}.json"));
        std::fs::write(&p, &text).unwrap();
        set_mode(&p, 0o644);
        out.push((id.to_owned(), text));
    }
    out
}

#[test]
fn r3_the_shim_adopts_a_directory_the_bash_bus_left() {
    let t = TestRoot::new("c-adopt");
    let base = t.dir().join("bus");
    std::fs::create_dir(&base).unwrap();
    let old = make_bash_bus(&base);

    let o = shim(&base, &["receive", "bob"]);
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    let texts: Vec<String> = old.iter().map(|(_, text)| text.clone()).collect();
    assert_eq!(common::stdout(&o), bash_array(&texts));
    assert!(
        common::stderr(&o).contains("adopted"),
        "{}",
        common::stderr(&o)
    );

    // Made private, and marked as a compat root.
    assert_eq!(mode(&base), 0o700);
    for d in ["bob", "bob/inbox", "bob/outbox"] {
        assert_eq!(mode(&base.join(d)), 0o700, "{d}");
    }
    for (id, text) in &old {
        let p = base.join(format!("bob/inbox/{id}.json"));
        assert_eq!(mode(&p), 0o600, "{id}");
        assert_eq!(
            &std::fs::read_to_string(&p).unwrap(),
            text,
            "{id} rewritten"
        );
    }
    let marker: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join(".shoal-format")).unwrap())
            .unwrap();
    assert_eq!(marker["format"], "shoal");
    assert_eq!(marker["layout"], "compat");

    // New sends work; recv delivers the old messages, then the new one.
    assert_eq!(shim_ok(&base, &["count", "bob"]), "2\n");
    let new = send(&base, "old", "bob", "hello", r#"{"n": 3}"#);
    assert_eq!(shim_ok(&base, &["count", "bob"]), "3\n");
    let got = common::parse_lines(&shoal_ok(&base, &["recv", "bob", "--ack"]));
    assert_eq!(
        recv_ids(&got),
        [old[0].0.clone(), old[1].0.clone(), new.clone()]
    );
    let n: Vec<u64> = got
        .iter()
        .map(|m| m["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(n, [1, 2, 3]);
    assert!(
        got.iter()
            .all(|m| m["from"] == "old" && m["type"] == "hello")
    );
    assert_eq!(got[0]["seq"], 1);
    assert_eq!(got[1]["seq"], 2);
    assert_eq!(shim_ok(&base, &["count", "bob"]), "0\n");
    assert_eq!(shim_ok(&base, &["receive", "bob"]), "[]\n");
    // A second command does not adopt again.
    let o = shim(&base, &["count", "bob"]);
    assert!(
        !common::stderr(&o).contains("adopted"),
        "{}",
        common::stderr(&o)
    );
}

/// The bash bus kept each pair's sequence counter in `<from>/.sequences/<to>`; a message sent
/// after adoption should continue it (3 here), not start the pair again at 1, which gives
/// bob two messages from old with sequence 1.
#[test]
fn r3_adoption_continues_the_bash_per_pair_sequence() {
    let t = TestRoot::new("c-adopt-seq");
    let base = t.dir().join("bus");
    std::fs::create_dir(&base).unwrap();
    make_bash_bus(&base);
    let new = send(&base, "old", "bob", "hello", r#"{"n": 3}"#);
    let text = std::fs::read_to_string(base.join(format!("bob/inbox/{new}.json"))).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["sequence"], 3,
        "old -> bob had sequences 1 and 2 before adoption: {text}"
    );
}

/// Agents switched to the shim all at once: their first commands race to adopt the directory.
/// Every one must succeed and every message must be there.
#[test]
fn r3_concurrent_first_commands_on_a_bash_made_directory_all_succeed() {
    const ROUNDS: usize = 60;
    const PROCS: usize = 16;
    for round in 0..ROUNDS {
        let t = TestRoot::new("c-adopt-race");
        let base = t.dir().join("bus");
        std::fs::create_dir(&base).unwrap();
        make_bash_bus(&base);
        for k in 0..PROCS {
            for part in ["inbox", "outbox", ".sequences"] {
                std::fs::create_dir_all(base.join(format!("w{k}/{part}"))).unwrap();
            }
        }
        let barrier = Arc::new(std::sync::Barrier::new(PROCS));
        let handles: Vec<_> = (0..PROCS)
            .map(|k| {
                let args: Vec<String> = if k % 4 == 0 {
                    vec!["receive".into(), "bob".into()]
                } else {
                    [
                        "send",
                        &format!("w{k}"),
                        "bob",
                        "t",
                        &format!("{{\"k\":{k}}}"),
                    ]
                    .map(String::from)
                    .to_vec()
                };
                let mut c = with_env(Command::new(SHIM), &base);
                c.args(&args);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    (args, c.output().unwrap())
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut sent = 0;
        for h in handles {
            let (args, o) = h.join().unwrap();
            if o.status.code() != Some(0) {
                failures.push(format!("{args:?}: {}", common::stderr(&o).trim()));
            } else if args[0] == "send" {
                sent += 1;
            }
        }
        assert!(
            failures.is_empty(),
            "round {round}: {} of {PROCS} failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(shim_ok(&base, &["count", "bob"]), format!("{}\n", 2 + sent));
    }
}

/// Every path under `p` with its mode and, for files, contents.
fn snapshot(p: &Path) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
    common::modes_under(p)
        .into_iter()
        .map(|(path, m, is_dir)| {
            let content = (!is_dir).then(|| std::fs::read(&path).unwrap());
            (path, (m, content))
        })
        .collect()
}

#[test]
fn r3_the_shim_refuses_a_directory_that_is_not_a_bash_bus() {
    // Something besides agent directories at the top, or inside an agent directory.
    for stray in ["notes.txt", "bob/notes.txt"] {
        let t = TestRoot::new("c-refuse");
        let base = t.dir().join("bus");
        std::fs::create_dir(&base).unwrap();
        make_bash_bus(&base);
        std::fs::write(base.join(stray), "my notes\n").unwrap();
        set_mode(&base.join(stray), 0o644);
        let before = snapshot(&base);
        for args in [
            &["receive", "bob"][..],
            &["init", "bob"],
            &["send", "old", "bob", "t", "{}"],
            &["clear", "bob"],
            &["init-system"],
            &["cleanup-system"],
        ] {
            let o = shim(&base, args);
            assert_eq!(
                common::code(&o),
                1,
                "{stray}: {args:?} was not refused: {}",
                common::stderr(&o)
            );
            assert_eq!(common::stdout(&o), "", "{stray}: {args:?}");
            assert!(
                !common::stderr(&o).is_empty(),
                "{stray}: {args:?} says nothing"
            );
            assert_eq!(snapshot(&base), before, "{stray}: {args:?} touched it");
        }
        assert!(!base.join(".shoal-format").exists());
    }
}

#[test]
fn r3_the_shim_works_on_a_jsonl_root() {
    let t = TestRoot::new("c-jsonl");
    let base = t.dir().join("bus");
    shoal_ok(&base, &["init", "bob"]);
    let marker = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(base.join(".shoal-format")).unwrap()).unwrap()
    };
    assert_eq!(marker()["layout"], "jsonl");
    // The shim asks for compat only for a root it creates.
    shim_ok(&base, &["init", "alice"]);
    shim_ok(&base, &["init-system"]);
    assert_eq!(marker()["layout"], "jsonl");
    assert!(base.join("agents/alice").is_dir());
    assert!(!base.join("alice").exists() && !base.join("bob").exists());

    let before = epoch_secs();
    let id1 = send(&base, "alice", "bob", "hello", r#"{"n": 1}"#);
    let id2 = send(&base, "carol", "bob", "task.done", "[1, 2]");
    let id3 = ok(
        sourced(&base, r#"send_message alice bob status '"done"'"#),
        "send_message",
    )
    .trim()
    .to_owned();
    let after = epoch_secs();
    assert_eq!(shim_ok(&base, &["count", "bob"]), "3\n");
    assert_eq!(shim_ok(&base, &["count", "bob", "inbox"]), "3\n");
    assert_eq!(shim_ok(&base, &["count", "alice", "outbox"]), "2\n");
    assert_eq!(shim_ok(&base, &["count", "alice"]), "0\n");
    assert_eq!(shim_ok(&base, &["count", "nobody"]), "0\n");

    let out = shim_ok(&base, &["receive", "bob"]);
    let arr: Vec<Value> = serde_json::from_str(&out).unwrap();
    let ts: Vec<u64> = arr
        .iter()
        .map(|m| m["timestamp"].as_u64().unwrap())
        .collect();
    assert!(ts.iter().all(|s| (before..=after).contains(s)), "{ts:?}");
    let expected = bash_array(&[
        bash_file(&id1, "alice", "bob", ts[0], 1, "hello", r#"{"n": 1}"#),
        bash_file(&id2, "carol", "bob", ts[1], 1, "task.done", "[1, 2]"),
        bash_file(&id3, "alice", "bob", ts[2], 2, "status", r#""done""#),
    ]);
    assert_eq!(out, expected);
    // receive does not consume; the sourced function prints the same.
    assert_eq!(
        ok(sourced(&base, "receive_messages bob"), "receive_messages"),
        expected
    );
    assert_eq!(shim_ok(&base, &["count", "bob"]), "3\n");

    assert_eq!(shim_ok(&base, &["clear", "bob"]), "");
    assert_eq!(shim_ok(&base, &["count", "bob"]), "0\n");
    assert_eq!(shim_ok(&base, &["receive", "bob"]), "[]\n");
    assert_eq!(shoal_ok(&base, &["recv", "bob"]), "");

    // Errors as the bash bus: status 1, nothing on stdout.
    for args in [
        &["send", "alice", "nobody", "t", "{}"][..],
        &["receive", "nobody"],
        &["clear", "nobody"],
        &["send", "alice", "bob", "t", ""],
        &["frobnicate"],
    ] {
        let o = shim(&base, args);
        assert_eq!(common::code(&o), 1, "{args:?}: {}", common::stderr(&o));
        if args[0] != "frobnicate" {
            assert_eq!(common::stdout(&o), "", "{args:?}");
        }
    }

    // cleanup through the shim, then the agent is gone.
    assert_eq!(shim_ok(&base, &["cleanup", "bob"]), "");
    assert!(!base.join("agents/bob").exists());
    assert_eq!(shim(&base, &["receive", "bob"]).status.code(), Some(1));
    assert_eq!(marker()["layout"], "jsonl");
}
