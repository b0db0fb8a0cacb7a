//! The message-bus.sh shim: a transcript of every command and edge case, executed and sourced,
//! with the stdout and exit status the original bash bus gives (from
//! ../shared/reference/message-bus-sh.md), and one regression test per defect of the original
//! that must not come back.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::TestRoot;

const SHIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/message-bus.sh");

/// A command for the shim's environment: the base directory, the binary under test.
fn env_cmd(program: &str, base: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("MESSAGE_BASE_DIR", base)
        .env("SHOAL_BIN", common::bin())
        .env_remove("SHOAL_ROOT")
        .env_remove("SHOAL_LAYOUT")
        .env_remove("SHOAL_BASH_LOGS")
        .stdin(Stdio::null());
    c
}

/// Run the shim as a command (under /bin/sh via its shebang, or under bash).
fn exec_shim(base: &Path, shell: Option<&str>, args: &[&str]) -> Output {
    let mut c = match shell {
        Some(sh) => {
            let mut c = env_cmd(sh, base);
            c.arg(SHIM);
            c
        }
        None => env_cmd(SHIM, base),
    };
    c.args(args).output().unwrap()
}

/// What a step's stdout must be.
#[derive(Debug, Clone)]
enum Out {
    /// Exactly this text.
    Exact(&'static str),
    /// The usage text (executed mode only), naming the script as invoked.
    Usage,
    /// One message id, `msg-<seconds>-<digits>`, and a newline.
    MsgId,
    /// The bash `receive` array of these (from, to, type, payload, sequence), oldest first.
    Messages(Vec<(&'static str, &'static str, &'static str, &'static str, u64)>),
}

/// One step of the transcript: command, arguments, expected stdout and exit status.
struct Step {
    cmd: &'static str,
    args: Vec<&'static str>,
    out: Out,
    status: i32,
}

fn step(cmd: &'static str, args: &[&'static str], out: Out, status: i32) -> Step {
    Step {
        cmd,
        args: args.to_vec(),
        out,
        status,
    }
}

/// The transcript, in order. Expected values are the original's (reference doc), except where
/// the original was defective (those differ on purpose, see docs/migrating.md).
fn transcript() -> Vec<Step> {
    use Out::*;
    vec![
        step("bogus", &[], Usage, 1),
        step("", &[], Usage, 1),
        step("init-system", &[], Exact(""), 0),
        step("init-system", &[], Exact(""), 0),   // idempotent
        step("init", &[], Exact(""), 1),          // missing id
        step("init", &[""], Exact(""), 1),        // empty id
        step("init", &["../evil"], Exact(""), 1), // defect 4: path traversal refused
        step("init", &["alice"], Exact(""), 0),
        step("init", &["alice"], Exact(""), 0), // repeated init
        step("init", &["bob"], Exact(""), 0),
        step("receive", &["bob"], Exact("[]\n"), 0), // empty inbox
        step("send", &["alice", "carol", "t", "{}"], Exact(""), 1), // unknown recipient
        step("send", &["alice", "bob"], Exact(""), 1), // missing arguments
        step("send", &["alice", "bob", "t"], Exact(""), 1), // missing payload
        step("send", &["alice", "bob", "", "{}"], Exact(""), 1), // empty type
        step("send", &["alice", "bob", "t", "not-json"], Exact(""), 1), // defect 6
        step("send", &["alice", "bob", "hello", r#"{"n": 1}"#], MsgId, 0),
        step("send", &["alice", "bob", "list", "[1, 2]"], MsgId, 0),
        step(
            "receive",
            &["bob"],
            Messages(vec![
                ("alice", "bob", "hello", r#"{"n": 1}"#, 1),
                ("alice", "bob", "list", "[1, 2]", 2),
            ]),
            0,
        ),
        step("receive", &["carol"], Exact(""), 1), // no such inbox
        step("receive", &[], Exact(""), 1),
        step("count", &["bob"], Exact("2\n"), 0),
        step("count", &["bob", "inbox"], Exact("2\n"), 0),
        step("count", &["alice", "outbox"], Exact("2\n"), 0),
        step("count", &["bob", "outbox"], Exact("0\n"), 0),
        step("count", &["bob", "bogus"], Exact("0\n"), 0), // unknown box
        step("count", &["nobody"], Exact("0\n"), 0),       // unknown agent
        step("count", &[], Exact(""), 1),
        step("clear", &["bob"], Exact(""), 0),
        step("count", &["bob"], Exact("0\n"), 0),
        step("clear", &["bob"], Exact(""), 0), // empty inbox
        step("clear", &["carol"], Exact(""), 1),
        step("clear", &[], Exact(""), 1),
        step("cleanup", &["bob"], Exact(""), 0),
        step("cleanup", &["bob"], Exact(""), 0), // absent agent
        step("cleanup", &[], Exact(""), 1),
        step("send", &["alice", "bob", "t", "{}"], Exact(""), 1), // bob is gone
        step("cleanup-system", &[], Exact(""), 0),
        step("cleanup-system", &[], Exact(""), 0), // absent base
        step("count", &["alice"], Exact("0\n"), 0),
    ]
}

const USAGE_TAIL: &str = "{init|send|receive|clear|count|cleanup|init-system|cleanup-system} [args]\n\nCommands:\n  init <agent-id>                     - Initialize message bus for agent\n  send <from> <to> <type> <payload>   - Send message between agents\n  receive <agent-id>                  - Receive messages (JSON array)\n  clear <agent-id>                    - Clear inbox after processing\n  count <agent-id> [inbox|outbox]     - Get message count\n  cleanup <agent-id>                  - Cleanup agent's message bus\n  init-system                         - Initialize message bus system\n  cleanup-system                      - Cleanup entire message bus\n";

/// The bash bus's message text, with the timestamp taken from the output.
fn bash_message(id: &str, m: &(&str, &str, &str, &str, u64), timestamp: u64) -> String {
    format!(
        "{{\n  \"version\": \"1.0\",\n  \"msg_id\": \"{id}\",\n  \"from\": \"{}\",\n  \"to\": \"{}\",\n  \"timestamp\": {timestamp},\n  \"sequence\": {},\n  \"type\": \"{}\",\n  \"payload\": {},\n  \"requires_ack\": false\n}}",
        m.0, m.1, m.4, m.2, m.3
    )
}

/// Check one step's output; `ids` collects the ids `send` printed, in order.
fn check(s: &Step, what: &str, stdout: &str, status: i32, usage_name: &str, ids: &mut Vec<String>) {
    assert_eq!(status, s.status, "{what}: exit status; stdout {stdout:?}");
    match &s.out {
        Out::Exact(e) => assert_eq!(stdout, *e, "{what}: stdout"),
        Out::Usage => assert_eq!(
            stdout,
            format!("Usage: {usage_name} {USAGE_TAIL}"),
            "{what}: usage"
        ),
        Out::MsgId => {
            let id = stdout
                .strip_suffix('\n')
                .unwrap_or_else(|| panic!("{what}: no newline: {stdout:?}"));
            let parts: Vec<&str> = id.splitn(3, '-').collect();
            assert!(
                parts.len() == 3
                    && parts[0] == "msg"
                    && parts[1].bytes().all(|b| b.is_ascii_digit())
                    && parts[2].bytes().all(|b| b.is_ascii_digit()),
                "{what}: not a message id: {stdout:?}"
            );
            ids.push(id.to_owned());
        }
        Out::Messages(ms) => {
            let parsed: Vec<serde_json::Value> =
                serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(parsed.len(), ms.len(), "{what}: {stdout}");
            let mut expect = String::from("[\n");
            for (i, m) in ms.iter().enumerate() {
                if i > 0 {
                    expect.push_str(",\n");
                }
                let ts = parsed[i]["timestamp"].as_u64().unwrap();
                expect.push_str(&bash_message(&ids[ids.len() - ms.len() + i], m, ts));
                expect.push('\n');
            }
            expect.push_str("]\n");
            assert_eq!(stdout, expect, "{what}: receive output");
        }
    }
}

fn check_logs(stderr: &str, what: &str) {
    for line in stderr.lines() {
        let ok = line.len() > 26
            && line.as_bytes()[0] == b'['
            && line[1..9].bytes().enumerate().all(|(i, b)| {
                if i % 3 == 2 {
                    b == b':'
                } else {
                    b.is_ascii_digit()
                }
            })
            && line[9..].starts_with("] [MESSAGE-BUS] ");
        assert!(
            ok,
            "{what}: stderr line not in the bash bus's log form: {line:?}"
        );
    }
}

fn run_executed(shell: Option<&str>) {
    let t = TestRoot::new(&format!("transcript-{}", shell.unwrap_or("sh")));
    let base = t.dir().join("bus");
    let mut ids = Vec::new();
    for s in transcript() {
        let mut args = vec![s.cmd];
        args.extend(&s.args);
        if s.cmd.is_empty() {
            args.clear(); // no command at all
        }
        let o = exec_shim(&base, shell, &args);
        let what = format!("executed ({}) {args:?}", shell.unwrap_or("sh"));
        check(
            &s,
            &what,
            &common::stdout(&o),
            common::code(&o),
            SHIM,
            &mut ids,
        );
        check_logs(&common::stderr(&o), &what);
    }
    assert!(
        !t.dir().join("evil").exists(),
        "init ../evil escaped the base directory"
    );
}

#[test]
fn r3_transcript_executed() {
    run_executed(None);
}

#[test]
fn r3_transcript_executed_with_bash() {
    run_executed(Some("bash"));
}

#[test]
fn r3_transcript_sourced() {
    let t = TestRoot::new("transcript-sourced");
    let base = t.dir().join("bus");
    let func = |cmd: &str| match cmd {
        "init" => "init_message_bus",
        "send" => "send_message",
        "receive" => "receive_messages",
        "clear" => "clear_inbox",
        "count" => "message_count",
        "cleanup" => "cleanup_message_bus",
        "init-system" => "init_message_bus_system",
        "cleanup-system" => "cleanup_message_bus_system",
        _ => "",
    };
    let steps: Vec<Step> = transcript()
        .into_iter()
        .filter(|s| !func(s.cmd).is_empty())
        .collect();
    // One bash script sources the shim once and runs every step, each step's stdout, stderr and
    // status to its own files. `&& rc=0 || rc=$?` keeps `set -e` (which sourcing turns on, as
    // the original did) from ending the script at the first failing step.
    let out_dir = t.dir().join("steps");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut script = format!("source '{SHIM}'\n");
    for (i, s) in steps.iter().enumerate() {
        let args: Vec<String> = s
            .args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        script.push_str(&format!(
            "{} {} >'{d}/{i}.out' 2>'{d}/{i}.err' && rc=0 || rc=$?; echo $rc >'{d}/{i}.rc'\n",
            func(s.cmd),
            args.join(" "),
            d = out_dir.display()
        ));
    }
    script.push_str("echo done\n");
    let path = t.dir().join("transcript.sh");
    std::fs::write(&path, script).unwrap();
    let o = env_cmd("bash", &base).arg(&path).output().unwrap();
    assert!(o.status.success(), "driver failed: {}", common::stderr(&o));
    assert_eq!(common::stdout(&o), "done\n");
    let mut ids = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let read = |ext: &str| std::fs::read_to_string(out_dir.join(format!("{i}.{ext}"))).unwrap();
        let status: i32 = read("rc").trim().parse().unwrap();
        let what = format!("sourced {}({:?})", func(s.cmd), s.args);
        check(s, &what, &read("out"), status, SHIM, &mut ids);
        check_logs(&read("err"), &what);
    }
}

/// A base directory with `init`ed agents, through the shim.
fn bus_with(t: &TestRoot, agents: &[&str]) -> PathBuf {
    let base = t.dir().join("bus");
    for a in agents {
        let o = exec_shim(&base, None, &["init", a]);
        assert!(o.status.success(), "{}", common::stderr(&o));
    }
    base
}

fn inbox_files(base: &Path, id: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(base.join(id).join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Defect 1: ids were `msg-<seconds>-<0..999>` and a collision overwrote a message while both
/// sends reported success (4 of 200 lost with concurrent senders).
#[test]
fn r3_concurrent_sends_never_collide_or_overwrite() {
    let t = TestRoot::new("collide");
    let base = bus_with(&t, &["bob"]);
    const PROCS: usize = 8;
    const EACH: usize = 150;
    let script = format!(
        "source '{SHIM}'\nfor i in $(seq {EACH}); do send_message \"s$1\" bob t \"{{\\\"i\\\":$i}}\" 2>/dev/null; done\n"
    );
    let path = t.dir().join("sender.sh");
    std::fs::write(&path, script).unwrap();
    let children: Vec<_> = (0..PROCS)
        .map(|p| {
            env_cmd("bash", &base)
                .arg(&path)
                .arg(p.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = HashSet::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        for id in common::stdout(&o).lines() {
            assert!(ids.insert(id.to_owned()), "duplicate id {id}");
        }
    }
    assert_eq!(ids.len(), PROCS * EACH);
    let files = inbox_files(&base, "bob");
    assert_eq!(
        files.len(),
        PROCS * EACH,
        "every send is a file: nothing overwritten"
    );
    for id in &ids {
        assert!(files.contains(&format!("{id}.json")), "{id} has no file");
    }
    let o = exec_shim(&base, None, &["count", "bob"]);
    assert_eq!(common::stdout(&o), format!("{}\n", PROCS * EACH));
}

/// Defect 2: an inbox over 100 (v1.1: 1000) messages silently deleted its oldest message.
#[test]
fn r3_no_eviction_past_100_or_1000_messages() {
    let t = TestRoot::new("evict");
    let base = bus_with(&t, &["bob"]);
    let mut input = String::new();
    for i in 0..1500 {
        input.push_str(&format!("{{\"i\":{i}}}\n"));
    }
    let mut c = env_cmd(common::bin(), &base)
        .args(["--root"])
        .arg(&base)
        .args(["send", "alice", "bob", "t", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
    let o = exec_shim(&base, None, &["count", "bob"]);
    assert_eq!(common::stdout(&o), "1500\n");
    let o = exec_shim(&base, None, &["receive", "bob"]);
    let arr: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(arr.len(), 1500);
    let is: Vec<u64> = arr
        .iter()
        .map(|m| m["payload"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(
        is,
        (0..1500).collect::<Vec<u64>>(),
        "all there, oldest first"
    );
}

/// Defect 3: `clear` deleted every message, including ones that arrived after `receive`.
#[test]
fn r3_clear_keeps_messages_that_arrived_after_receive() {
    let t = TestRoot::new("clear");
    let base = bus_with(&t, &["bob"]);
    for i in 0..3 {
        assert!(
            exec_shim(
                &base,
                None,
                &["send", "a", "bob", "t", &format!("{{\"early\":{i}}}")]
            )
            .status
            .success()
        );
    }
    let seen = exec_shim(&base, None, &["receive", "bob"]);
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&seen.stdout)
            .unwrap()
            .len(),
        3
    );
    let late = exec_shim(&base, None, &["send", "a", "bob", "t", r#"{"late":true}"#]);
    let late_id = common::stdout(&late).trim().to_owned();
    assert!(exec_shim(&base, None, &["clear", "bob"]).status.success());
    assert_eq!(inbox_files(&base, "bob"), vec![format!("{late_id}.json")]);
    assert_eq!(
        common::stdout(&exec_shim(&base, None, &["count", "bob"])),
        "1\n"
    );
}

/// Defect 4: `init ../evil` created directories outside the base directory.
#[test]
fn r3_ids_cannot_reach_outside_the_base_directory() {
    let t = TestRoot::new("traversal");
    let base = bus_with(&t, &["bob"]);
    let before: Vec<_> = std::fs::read_dir(t.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for bad in [
        "../evil",
        "../../evil",
        "a/../../evil",
        "/tmp/evil",
        "..",
        ".",
        "-rf",
        "a b",
    ] {
        for cmd in ["init", "cleanup", "receive", "clear"] {
            let o = exec_shim(&base, None, &[cmd, bad]);
            assert_eq!(common::code(&o), 1, "{cmd} {bad:?} must fail");
        }
        let o = exec_shim(&base, None, &["send", "bob", bad, "t", "{}"]);
        assert_eq!(common::code(&o), 1, "send to {bad:?} must fail");
    }
    let after: Vec<_> = std::fs::read_dir(t.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "nothing created next to the base directory");
    assert!(!Path::new("/tmp/evil").exists());
    assert!(
        base.join("bob").exists(),
        "cleanup of a bad id removed nothing"
    );
}

/// Defect 5: directories were mode 755 in a world-writable /dev/shm.
#[test]
fn r3_everything_is_private() {
    let t = TestRoot::new("private");
    let base = bus_with(&t, &["alice", "bob"]);
    assert!(
        exec_shim(&base, None, &["send", "alice", "bob", "t", "{}"])
            .status
            .success()
    );
    for (path, mode, is_dir) in common::modes_under(&base) {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
}

/// Defect 6: `send a b t not-json` exited 0 and wrote an invalid file.
#[test]
fn r3_invalid_payloads_are_refused_and_leave_no_file() {
    let t = TestRoot::new("payload");
    let base = bus_with(&t, &["bob"]);
    for bad in ["not-json", "{", "{\"a\":}", "", "{} {}", "'x'"] {
        let o = exec_shim(&base, None, &["send", "a", "bob", "t", bad]);
        assert_eq!(common::code(&o), 1, "payload {bad:?} must be refused");
        assert_eq!(common::stdout(&o), "");
    }
    assert!(inbox_files(&base, "bob").is_empty());
    let all: Vec<_> = std::fs::read_dir(base.join("bob").join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        all,
        vec![".lock".to_owned()],
        "no temporary file left behind"
    );
}

/// Defect 7 (unbounded outbox copies): shoal counts sent messages instead of copying them.
#[test]
fn r3_outbox_does_not_grow() {
    let t = TestRoot::new("outbox");
    let base = bus_with(&t, &["alice", "bob"]);
    for i in 0..50 {
        assert!(
            exec_shim(&base, None, &["send", "alice", "bob", "t", &format!("{i}")])
                .status
                .success()
        );
    }
    assert_eq!(
        std::fs::read_dir(base.join("alice").join("outbox"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        common::stdout(&exec_shim(&base, None, &["count", "alice", "outbox"])),
        "50\n"
    );
}
