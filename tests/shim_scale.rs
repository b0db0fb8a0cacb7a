//! The bash bus's own scale test, run through the drop-in shim `scripts/message-bus.sh`:
//! 1 master, 7 coordinators, 7 x 100 workers (708 agents), driven by a bash script that
//! sources the shim, with one-shot bash agents (as the original's `test-agent-simple.sh`) that
//! read their inbox files directly with grep/sed, reply with `send_message` and `clear_inbox`.
//! Every reply must arrive (the original delivered 97.4 %), every inbox be cleared, and
//! `shoal agents --json` list all 708 agents with their inbox depth and sent counts.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TestRoot;
use serde_json::Value;

/// The shim, by absolute path.
const SHIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/message-bus.sh");

const LETTERS: [char; 7] = ['A', 'B', 'C', 'D', 'E', 'F', 'G'];
const WORKERS_PER_TEAM: usize = 100;

/// One-shot agent, as the original's `test-agent-simple.sh`: answer every `task` or `work`
/// message in the inbox, read straight from the files, then clear the inbox.
fn agent_script() -> String {
    format!(
        r#"#!/bin/bash
source '{SHIM}'
id="${{1:?agent id}}"
for f in "$MESSAGE_BASE_DIR/$id/inbox"/*.json; do
    [[ -f "$f" ]] || continue
    from=$(grep -o '"from"[[:space:]]*:[[:space:]]*"[^"]*"' "$f" | sed 's/.*"\([^"]*\)".*/\1/')
    type=$(grep -o '"type"[[:space:]]*:[[:space:]]*"[^"]*"' "$f" | sed 's/.*"\([^"]*\)".*/\1/')
    msg_id=$(grep -o '"msg_id"[[:space:]]*:[[:space:]]*"[^"]*"' "$f" | sed 's/.*"\([^"]*\)".*/\1/')
    case "$type" in
        task | work)
            send_message "$id" "$from" response "{{\"status\":\"ok\",\"re\":\"$msg_id\"}}" >/dev/null
            ;;
    esac
done
clear_inbox "$id"
"#
    )
}

/// The driver: create the bus and 708 agents, send the 707 tasks, run the coordinators (all
/// at once), then the 700 workers (all at once). Writes `<work>/sent` (`<to> <msg-id>` lines),
/// `<work>/failed` (`<id> <status>` of every agent that failed) and `<work>/logs/<id>.err`;
/// prints `sends_ms=`, `coordinators_ms=`, `workers_ms=`, `round_ms=` on stdout.
fn driver_script() -> String {
    format!(
        r#"#!/bin/bash
source '{SHIM}'
agent="$1"
work="$2"
letters=({letters})
ms() {{ echo $(( $(date +%s%N) / 1000000 )); }}

init_message_bus_system
init_message_bus master
for L in "${{letters[@]}}"; do init_message_bus "coord-$L"; done
for L in "${{letters[@]}}"; do
    for i in $(seq 1 {workers}); do init_message_bus "worker-$L-$i"; done
done

start=$(ms)
: >"$work/sent"
: >"$work/failed"
for L in "${{letters[@]}}"; do
    id=$(send_message master "coord-$L" task "{{\"team\":\"$L\"}}")
    echo "coord-$L $id" >>"$work/sent"
done
for L in "${{letters[@]}}"; do
    for i in $(seq 1 {workers}); do
        id=$(send_message "coord-$L" "worker-$L-$i" work "{{\"team\":\"$L\",\"worker\":$i}}")
        echo "worker-$L-$i $id" >>"$work/sent"
    done
done
sent=$(ms)

run_agents() {{
    local -A pid_of=()
    local id
    for id in "$@"; do
        bash "$agent" "$id" >/dev/null 2>"$work/logs/$id.err" &
        pid_of[$id]=$!
    done
    for id in "$@"; do
        wait "${{pid_of[$id]}}" || echo "$id $?" >>"$work/failed"
    done
}}

coords=()
for L in "${{letters[@]}}"; do coords+=("coord-$L"); done
run_agents "${{coords[@]}}"
coordinated=$(ms)

workers=()
for L in "${{letters[@]}}"; do
    for i in $(seq 1 {workers}); do workers+=("worker-$L-$i"); done
done
run_agents "${{workers[@]}}"
end=$(ms)

echo "sends_ms=$((sent - start))"
echo "coordinators_ms=$((coordinated - sent))"
echo "workers_ms=$((end - coordinated))"
echo "round_ms=$((end - start))"
"#,
        letters = LETTERS.map(String::from).join(" "),
        workers = WORKERS_PER_TEAM,
    )
}

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

/// Run `cmd` in its own process group; kill the whole group (driver and agents) if it is not
/// done after `limit`.
fn run_with_watchdog(mut cmd: Command, limit: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Acquire) {
                if start.elapsed() > limit {
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Release);
    let fired = watchdog.join().unwrap();
    assert!(
        !fired,
        "watchdog: killed after {limit:?}; stderr tail: {}",
        tail(&common::stderr(&out))
    );
    out
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(3000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The message files (`*.json`, not dot files) of an inbox directory, parsed, with their names.
fn inbox_files(inbox: &Path) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(inbox)
        .unwrap_or_else(|e| panic!("{}: {e}", inbox.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
        .map(|n| {
            let bytes = std::fs::read(inbox.join(&n)).unwrap();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("{n}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
            });
            (n, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Check one response file in `owner`'s inbox and return `(from, re)`.
fn check_response(owner: &str, name: &str, m: &Value) -> (String, String) {
    assert_eq!(
        name,
        format!("{}.json", m["msg_id"].as_str().unwrap()),
        "file name is not <msg_id>.json"
    );
    assert_eq!(m["to"], owner, "{name}");
    assert_eq!(m["type"], "response", "{name}: {m}");
    assert_eq!(m["payload"]["status"], "ok", "{name}: {m}");
    assert_eq!(m["version"], "1.0");
    assert_eq!(m["requires_ack"], false);
    (
        m["from"].as_str().unwrap().to_owned(),
        m["payload"]["re"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn r3_708_agents_one_shot_round_through_the_sourced_shim() {
    let t = TestRoot::new("scale");
    let base = t.dir().join("bus");
    let work = t.dir().join("work");
    std::fs::create_dir_all(work.join("logs")).unwrap();
    let agent = t.dir().join("test-agent-simple.sh");
    let driver = t.dir().join("scale-driver.sh");
    std::fs::write(&agent, agent_script()).unwrap();
    std::fs::write(&driver, driver_script()).unwrap();

    let mut cmd = with_env(Command::new("bash"), &base);
    cmd.arg(&driver).arg(&agent).arg(&work);
    let start = Instant::now();
    let out = run_with_watchdog(cmd, Duration::from_secs(600));
    let wall = start.elapsed();
    assert_eq!(
        common::code(&out),
        0,
        "driver failed; stderr tail: {}",
        tail(&common::stderr(&out))
    );
    let timings: HashMap<String, u64> = common::stdout(&out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().parse().unwrap()))
        .collect();
    eprintln!(
        "708-agent round through the shim: {} ms (sends {} ms, 7 coordinators {} ms, 700 workers {} ms); \
         whole test incl. 708 inits {:.1} s",
        timings["round_ms"],
        timings["sends_ms"],
        timings["coordinators_ms"],
        timings["workers_ms"],
        wall.as_secs_f64()
    );

    // No agent failed.
    let failed = std::fs::read_to_string(work.join("failed")).unwrap();
    if !failed.is_empty() {
        let mut report = String::new();
        for line in failed.lines().take(10) {
            let id = line.split_whitespace().next().unwrap();
            let err = std::fs::read_to_string(work.join("logs").join(format!("{id}.err")))
                .unwrap_or_default();
            report.push_str(&format!("{line}: {err}\n"));
        }
        panic!(
            "{} agents failed; first ones:\n{report}",
            failed.lines().count()
        );
    }

    // What was sent: recipient -> message id.
    let sent_text = std::fs::read_to_string(work.join("sent")).unwrap();
    let sent: HashMap<String, String> = sent_text
        .lines()
        .map(|l| {
            let (to, id) = l.split_once(' ').unwrap();
            (to.to_owned(), id.to_owned())
        })
        .collect();
    assert_eq!(sent.len(), 707, "{sent_text}");
    let sent_ids: HashSet<&str> = sent.values().map(String::as_str).collect();
    assert_eq!(sent_ids.len(), 707, "message ids are not unique");

    let mut all_re: HashSet<String> = HashSet::new();
    let mut record = |re: String| {
        assert!(sent_ids.contains(re.as_str()), "re {re} was never sent");
        assert!(all_re.insert(re.clone()), "two responses to {re}");
    };

    // Master: one response from each coordinator, to the task it was sent.
    let master = inbox_files(&base.join("master/inbox"));
    assert_eq!(
        master.len(),
        7,
        "master's inbox: {:?}",
        master.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    let mut from_coords = HashSet::new();
    for (name, m) in &master {
        let (from, re) = check_response("master", name, m);
        assert_eq!(re, sent[&from], "{from} answered another message");
        assert!(from_coords.insert(from));
        record(re);
    }

    // Each coordinator: its task is gone, one response from each of its 100 workers.
    for l in LETTERS {
        let coord = format!("coord-{l}");
        let files = inbox_files(&base.join(&coord).join("inbox"));
        assert_eq!(files.len(), WORKERS_PER_TEAM, "{coord}'s inbox");
        assert!(
            !base
                .join(&coord)
                .join("inbox")
                .join(format!("{}.json", sent[&coord]))
                .exists(),
            "{coord}'s task was not cleared"
        );
        let mut workers = HashSet::new();
        for (name, m) in &files {
            let (from, re) = check_response(&coord, name, m);
            assert!(
                from.starts_with(&format!("worker-{l}-")),
                "{coord} got a response from {from}"
            );
            assert_eq!(re, sent[&from], "{from} answered another message");
            assert!(workers.insert(from));
            record(re);
        }
        // Every worker's inbox was cleared.
        for i in 1..=WORKERS_PER_TEAM {
            let w = format!("worker-{l}-{i}");
            let left = inbox_files(&base.join(&w).join("inbox"));
            assert!(left.is_empty(), "{w}'s inbox was not cleared: {left:?}");
        }
    }
    assert_eq!(all_re.len(), 707, "every task and work answered once");

    // `shoal agents --json` on the base: all 708, with their inbox depth and sent counts.
    let mut c = with_env(Command::new(common::bin()), &base);
    c.arg("--root").arg(&base).args(["agents", "--json"]);
    let o = c.output().unwrap();
    assert_eq!(common::code(&o), 0, "{}", common::stderr(&o));
    let agents = common::parse_lines(&common::stdout(&o));
    assert_eq!(agents.len(), 708);
    let mut expected: HashSet<String> = HashSet::from(["master".to_owned()]);
    for l in LETTERS {
        expected.insert(format!("coord-{l}"));
        for i in 1..=WORKERS_PER_TEAM {
            expected.insert(format!("worker-{l}-{i}"));
        }
    }
    let listed: HashSet<String> = agents
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected);
    for a in &agents {
        let id = a["id"].as_str().unwrap();
        let (inbox, sent) = match id {
            "master" => (7, 7),
            c if c.starts_with("coord-") => (WORKERS_PER_TEAM as u64, WORKERS_PER_TEAM as u64 + 1),
            _ => (0, 1),
        };
        assert_eq!(a["inbox_msgs"], inbox, "{a}");
        assert_eq!(a["sent"], sent, "{a}");
    }
}
