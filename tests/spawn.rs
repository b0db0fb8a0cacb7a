//! Issue 5: the spawner and process governor, with real processes.
//!
//! Each test runs `shoal spawn` on a fresh root under /dev/shm, as a user does, watches it with
//! `shoal ps --json` and the incident log, and checks that no process it started outlives it:
//! every agent process carries `SHOAL_ROOT=<root>` in its environment, which is how the tests
//! find them in /proc.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestRoot, bin, code, stderr, stdout};
use serde_json::Value;

/// A `shoal spawn` in the background, killed and reaped on drop (pass or fail).
struct Spawn(Child, std::path::PathBuf);

impl Spawn {
    fn start(t: &TestRoot, args: &[&str], env: &[(&str, &str)]) -> Spawn {
        let mut full = vec!["spawn"];
        full.extend_from_slice(args);
        let mut c = t.cmd(&full);
        for (k, v) in env {
            c.env(k, v);
        }
        Spawn(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            t.root(),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Wait for it to end (at most `limit`), check that no process it started is left (an
    /// orphan would also hold its output pipes open), and return (exit code, stdout, stderr).
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let give_up = Instant::now() + limit;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < give_up,
                "shoal spawn did not end in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_no_processes(&self.1, Duration::from_secs(5));
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
        let o = child.wait_with_output().unwrap();
        (o.status.code(), stdout(&o), stderr(&o))
    }
}

impl Drop for Spawn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ps(t: &TestRoot) -> Vec<Value> {
    serde_json::from_str::<Value>(&t.ok(&["ps", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn states(rows: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in rows {
        *m.entry(r["state"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    m
}

/// Poll `shoal ps` until `pred` holds (at most `limit`); returns the last listing.
fn wait_ps(t: &TestRoot, limit: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let give_up = Instant::now() + limit;
    loop {
        // Until the spawner has created the root, there is nothing to list.
        let o = t.run(&["ps", "--json"]);
        let rows: Vec<Value> = if o.status.success() {
            serde_json::from_slice(&o.stdout).unwrap()
        } else {
            Vec::new()
        };
        if pred(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < give_up,
            "ps never got there in {limit:?}: {:?}",
            states(&rows)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `n` agents are listed, all running.
fn wait_all_running(t: &TestRoot, n: usize, limit: Duration) -> Vec<Value> {
    wait_ps(t, limit, |r| {
        r.len() == n && r.iter().all(|a| a["state"] == "running")
    })
}

/// The incident log through the library's reader, as JSON values; no line may be unreadable.
fn incidents(t: &TestRoot) -> Vec<Value> {
    incidents_at(&t.root())
}

fn incidents_at(root: &Path) -> Vec<Value> {
    let (records, bad) = shoal::agents::incidents::read(&root.join("incidents.jsonl")).unwrap();
    assert_eq!(bad, 0, "unreadable incident lines");
    records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

fn kinds(inc: &[Value], kind: &str) -> Vec<Value> {
    inc.iter().filter(|i| i["kind"] == kind).cloned().collect()
}

/// Processes (other than zombies) whose environment says they belong to `root`.
fn processes_of(root: &Path) -> Vec<i32> {
    let needle = format!("SHOAL_ROOT={}\0", root.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('Z')))
            .unwrap_or(true);
        if !zombie && env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn wait_no_processes(root: &Path, limit: Duration) {
    let give_up = Instant::now() + limit;
    loop {
        let left = processes_of(root);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{} processes of the root still alive after {limit:?}: {:?}",
            left.len(),
            &left[..left.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn r5_500_agents_start_and_are_all_alive() {
    let t = TestRoot::new("spawn500");
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "500",
            "--json",
            "--grace",
            "2s",
            "--",
            bin(),
            "recv",
            "--wait",
        ],
        &[],
    );
    let rows = wait_all_running(&t, 500, Duration::from_secs(60));
    // Alive by their locks, each with its own process.
    let pids: std::collections::BTreeSet<u64> =
        rows.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 500);
    for r in &rows {
        assert_eq!(r["alive"], true);
        assert_eq!(r["restarts"], 0);
        assert_eq!(r["inbox_depth"], 0);
        for key in ["id", "state", "pid", "restarts", "inbox_depth"] {
            assert!(r.get(key).is_some(), "ps --json lacks {key}: {r}");
        }
    }
    assert_eq!(processes_of(&t.root()).len(), 500);
    sp.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, out, err) = sp.finish(Duration::from_secs(30));
    assert_eq!(status, Some(143), "{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["agents"], 500);
    assert_eq!(summary["exited"], 500);
    assert_eq!(summary["stopped_by"], "SIGTERM");
    assert!(summary["ready_ms"].as_f64().unwrap() > 0.0);
    wait_no_processes(&t.root(), Duration::from_secs(5));
    let after = ps(&t);
    assert!(
        after
            .iter()
            .all(|r| r["state"] == "exited" && r["alive"] == false)
    );
}

#[test]
fn r5_spawner_killed_outright_leaves_no_agent_process() {
    let t = TestRoot::new("spawnkill");
    // Agents that start children of their own (grandchildren of the spawner), in teams with
    // hub processes.
    let script = format!("sleep 300 & exec {} recv --wait", bin());
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "40",
            "--team-size",
            "10",
            "--grace",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
    );
    wait_all_running(&t, 44, Duration::from_secs(30));
    // 40 agents, 40 sleeps, 4 hubs.
    assert_eq!(processes_of(&t.root()).len(), 84);
    sp.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _, _) = sp.finish(Duration::from_secs(5));
    assert_eq!(status, None, "killed by a signal");
    wait_no_processes(&t.root(), Duration::from_secs(10));
    // Nothing holds a liveness lock any more.
    let rows = ps(&t);
    assert!(rows.iter().all(|r| r["alive"] == false), "{rows:?}");
}

#[test]
fn r5_crashing_agent_is_restarted_with_growing_delays_then_given_up() {
    let t = TestRoot::new("spawncrash");
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "1",
            "--restart",
            "on-failure",
            "--max-restarts",
            "4",
            "--json",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
        &[("AF_BACKOFF_MIN_MS", "40"), ("AF_BACKOFF_MULTIPLIER", "2")],
    );
    let (status, out, err) = sp.finish(Duration::from_secs(20));
    assert_eq!(status, Some(1), "an agent that gave up is a failure: {err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["restarts"], 4);
    assert_eq!(summary["crashes"], 5);
    let inc = incidents(&t);
    let crashes = kinds(&inc, "crash");
    assert_eq!(crashes.len(), 5);
    assert!(
        crashes
            .iter()
            .all(|c| c["exit_code"] == 3 && c["agent"] == "agent-0000")
    );
    let delays: Vec<u64> = kinds(&inc, "backoff")
        .iter()
        .map(|b| b["delay_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(delays, [40, 80, 160, 320]);
    let restarts = kinds(&inc, "restart");
    assert_eq!(restarts.len(), 4);
    assert_eq!(kinds(&inc, "gave_up").len(), 1);
    // Each restart came no sooner than its delay after the crash before it.
    for (i, r) in restarts.iter().enumerate() {
        let gap = r["ts_ms"].as_u64().unwrap() - crashes[i]["ts_ms"].as_u64().unwrap();
        assert!(
            gap >= delays[i],
            "restart {i} after {gap} ms, delay {}",
            delays[i]
        );
    }
    let rows = ps(&t);
    assert_eq!(rows[0]["state"], "failed");
    assert_eq!(rows[0]["restarts"], 4);
    // Each incident is a metric too.
    let m: Value = serde_json::from_str(&t.ok(&["metrics", "summary", "--json"])).unwrap();
    let get = |name: &str| {
        m.as_array()
            .unwrap()
            .iter()
            .find(|x| x["metric"] == name)
            .cloned()
    };
    assert_eq!(get("spawner.crash").unwrap()["count"], 5);
    let b = get("spawner.backoff").unwrap();
    assert_eq!(
        (b["count"].as_u64(), b["max"].as_f64()),
        (Some(4), Some(320.0))
    );
    assert_eq!(get("spawner.restart").unwrap()["count"], 4);
}

#[test]
fn r5_messages_wait_in_a_crashed_agents_inbox_for_its_restart() {
    let t = TestRoot::new("spawnkeep");
    t.ok(&["init", "agent-0000", "tester"]);
    t.ok(&["send", "tester", "agent-0000", "job", r#"{"n":7}"#]);
    let logs = t.dir().join("logs");
    // The first run dies without touching its inbox; the restart receives the message.
    let script = format!(
        "if [ \"$SHOAL_RESTARTS\" = 0 ]; then exit 1; fi; exec {} recv --wait --timeout 10s",
        bin()
    );
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "1",
            "--restart",
            "on-failure",
            "--json",
            "--log-dir",
            logs.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[("AF_BACKOFF_MIN_MS", "20")],
    );
    let (status, out, err) = sp.finish(Duration::from_secs(20));
    assert_eq!(status, Some(0), "{out}{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["restarts"], 1);
    assert_eq!(summary["exit_codes"]["0"], 1);
    let log = std::fs::read_to_string(logs.join("agent-0000.log")).unwrap();
    assert!(log.contains(r#""payload":{"n":7}"#), "{log}");
}

#[test]
fn r5_stalled_agent_is_detected_and_a_heartbeat_clears_it() {
    let t = TestRoot::new("spawnstall");
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "1",
            "--stall-after",
            "400ms",
            "--ready-timeout",
            "100ms",
            "--grace",
            "500ms",
            "--",
            "sleep",
            "60",
        ],
        &[],
    );
    wait_all_running(&t, 1, Duration::from_secs(10));
    t.ok(&["init", "tester"]);
    // Idle with an empty inbox: not stalled, however long.
    std::thread::sleep(Duration::from_millis(600));
    let rows = wait_ps(&t, Duration::from_secs(1), |r| {
        r.iter().any(|a| a["id"] == "agent-0000")
    });
    let me = rows.iter().find(|a| a["id"] == "agent-0000").unwrap();
    assert_eq!(me["state"], "running");
    // A message arrives and nobody takes it.
    t.ok(&["send", "tester", "agent-0000", "job", "{}"]);
    let rows = ps(&t);
    let me = rows.iter().find(|a| a["id"] == "agent-0000").unwrap();
    assert_eq!(
        me["state"], "running",
        "not stalled the moment a message arrives"
    );
    wait_ps(&t, Duration::from_secs(10), |r| {
        r.iter()
            .any(|a| a["id"] == "agent-0000" && a["state"] == "stalled")
    });
    let give_up = Instant::now() + Duration::from_secs(10);
    while kinds(&incidents(&t), "stalled").is_empty() {
        assert!(Instant::now() < give_up, "no stalled incident");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = &kinds(&incidents(&t), "stalled")[0];
    assert_eq!(st["agent"], "agent-0000");
    // The agent says it is busy, not stuck.
    let hb = t
        .cmd(&["heartbeat"])
        .env("SHOAL_AGENT_ID", "agent-0000")
        .output()
        .unwrap();
    assert_eq!(code(&hb), 0, "{}", stderr(&hb));
    let rows = ps(&t);
    let me = rows.iter().find(|a| a["id"] == "agent-0000").unwrap();
    assert_eq!(me["state"], "running");
    assert!(me["idle_ms"].as_u64().unwrap() < 400);
    sp.signal(nix::sys::signal::Signal::SIGINT);
    let (status, _, _) = sp.finish(Duration::from_secs(10));
    assert_eq!(status, Some(130));
}

#[test]
fn r5_broadcast_wakes_300_waiting_agents() {
    let t = TestRoot::new("spawnbcast");
    let logs = t.dir().join("logs");
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "300",
            "--json",
            "--log-dir",
            logs.to_str().unwrap(),
            "--",
            bin(),
            "recv",
            "--wait",
            "--timeout",
            "60s",
        ],
        &[],
    );
    wait_all_running(&t, 300, Duration::from_secs(60));
    t.ok(&["init", "coordinator"]);
    t.ok(&["broadcast", "coordinator", "wake", r#"{"go":true}"#]);
    // Every agent wakes, prints the message and exits 0; then the spawner ends by itself.
    let (status, out, err) = sp.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["exited"], 300);
    assert_eq!(summary["exit_codes"]["0"], 300);
    for i in 0..300 {
        let log = std::fs::read_to_string(logs.join(format!("agent-{i:04}.log"))).unwrap();
        assert!(log.contains(r#""type":"wake""#), "agent {i}: {log}");
    }
}

#[test]
fn r5_stop_sends_term_then_kill_after_the_grace_period() {
    let t = TestRoot::new("spawnterm");
    // One agent ignores SIGTERM (and so does its sleep), one does not.
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "2",
            "--grace",
            "300ms",
            "--ready-timeout",
            "100ms",
            "--",
            "sh",
            "-c",
            "if [ \"$SHOAL_AGENT_ID\" = agent-0000 ]; then trap '' TERM; fi; sleep 60",
        ],
        &[],
    );
    wait_all_running(&t, 2, Duration::from_secs(10));
    let t0 = Instant::now();
    sp.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _, _) = sp.finish(Duration::from_secs(10));
    assert_eq!(status, Some(143));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let killed = kinds(&incidents(&t), "killed");
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert_eq!(killed[0]["agent"], "agent-0000");
    wait_no_processes(&t.root(), Duration::from_secs(5));
}

#[test]
fn r5_agents_inherit_only_their_own_liveness_lock() {
    let t = TestRoot::new("spawnfds");
    let out = t.dir().join("fds");
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        "for f in /proc/$$/fd/*; do readlink \"$f\" || true; done > {}/$SHOAL_AGENT_ID",
        out.display()
    );
    // The spawner holds the root's spawner lock, the incident log and every inbox's meta
    // table open while it starts them: none of it may leak into an agent.
    let sp = Spawn::start(&t, &["-n", "3", "--", "sh", "-c", &script], &[]);
    let (status, _, err) = sp.finish(Duration::from_secs(20));
    assert_eq!(status, Some(0), "{err}");
    for i in 0..3 {
        let id = format!("agent-{i:04}");
        let fds = std::fs::read_to_string(out.join(&id)).unwrap();
        let root = t.root().display().to_string();
        let mine: Vec<&str> = fds.lines().filter(|l| l.starts_with(&root)).collect();
        assert_eq!(
            mine,
            [format!("{root}/agents/{id}/alive.lock")],
            "agent {id} has these files of the root open: {fds}"
        );
    }
}

#[test]
fn r5_a_second_spawner_on_the_same_root_is_refused() {
    let t = TestRoot::new("spawntwo");
    let sp = Spawn::start(
        &t,
        &["-n", "1", "--ready-timeout", "100ms", "--", "sleep", "60"],
        &[],
    );
    wait_all_running(&t, 1, Duration::from_secs(10));
    let o = t.run(&["spawn", "-n", "1", "--", "true"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("another `shoal spawn` is running"),
        "{}",
        stderr(&o)
    );
    sp.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _, _) = sp.finish(Duration::from_secs(10));
    assert_eq!(status, Some(143));
}

#[test]
fn r5_bash_agents_use_the_message_bus_shim() {
    let t = TestRoot::new("spawnbash");
    t.ok(&["init", "collector"]);
    let shim = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/message-bus.sh");
    let script = format!(
        ". {shim}; send_message \"$SHOAL_AGENT_ID\" collector hello \"{{\\\"from\\\":\\\"$SHOAL_AGENT_ID\\\"}}\""
    );
    let sp = Spawn::start(
        &t,
        &["-n", "5", "--json", "--", "bash", "-c", &script],
        &[("SHOAL_BIN", bin())],
    );
    let (status, out, err) = sp.finish(Duration::from_secs(30));
    assert_eq!(status, Some(0), "{out}{err}");
    let got = common::parse_lines(&t.ok(&["recv", "collector", "--max", "10"]));
    let mut from: Vec<String> = got
        .iter()
        .map(|m| m["payload"]["from"].as_str().unwrap().to_owned())
        .collect();
    from.sort();
    assert_eq!(
        from,
        (0..5).map(|i| format!("agent-{i:04}")).collect::<Vec<_>>()
    );
}

#[test]
fn r5_bad_input_is_a_clear_error_and_starts_nothing() {
    let t = TestRoot::new("spawnbad");
    let o = t.run(&["spawn", "-n", "0", "--", "true"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("-n must be at least 1"),
        "{}",
        stderr(&o)
    );
    let o = t.run(&["spawn", "-n", "2"]);
    assert_eq!(code(&o), 1, "no command");
    let o = t
        .cmd(&["spawn", "-n", "2", "--", "true"])
        .env("AF_MAX_WIP", "lots")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("AF_MAX_WIP"), "{}", stderr(&o));
    let o = t.run(&["spawn", "-n", "2", "--", "/no/such/program"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("cannot run \"/no/such/program\""),
        "{}",
        stderr(&o)
    );
    assert!(processes_of(&t.root()).is_empty());
    let o = t.run(&["heartbeat", "nobody"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("nobody"), "{}", stderr(&o));
}

#[test]
fn r5_ps_lists_agents_without_a_spawner() {
    let t = TestRoot::new("spawnps");
    t.ok(&["init", "a1", "a2"]);
    t.ok(&["send", "a1", "a2", "x", "{}"]);
    let rows = ps(&t);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["id"], "a2");
    assert_eq!(rows[1]["state"], "down");
    assert_eq!(rows[1]["inbox_depth"], 1);
    assert!(rows[0]["idle_ms"].is_u64(), "a1 sent: it was active");
    let text = t.ok(&["ps"]);
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.lines().nth(2).unwrap().contains("down"), "{text}");
}

#[test]
fn r5_bench_spawn_reports_start_up_memory_and_cpu() {
    let o = Command::new(bin())
        .args([
            "bench", "spawn", "--agents", "10,25", "--repeat", "2", "--idle", "300ms", "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = common::parse_lines(&stdout(&o));
    let sizes: Vec<u64> = lines
        .iter()
        .map(|l| l["agents"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [10, 25]);
    for l in &lines {
        for f in [
            "total_ms_p50",
            "init_ms_p50",
            "ready_ms_p50",
            "floor_ms_p50",
            "ratio_to_floor",
            "spawner_cpu_ms_p50",
            "idle_cpu_pct",
            "spawner_idle_cpu_pct",
        ] {
            assert!(l[f].is_number(), "{f} missing in {l}");
        }
        // Real processes were measured: each has some resident memory, under 10 MiB.
        let pss = l["pss_kib_per_agent"].as_f64().unwrap();
        assert!(pss > 50.0 && pss < 10240.0, "{l}");
        assert!(l["floor_ms_p50"].as_f64().unwrap() > 0.0);
    }
    let o = Command::new(bin())
        .args(["bench", "spawn", "--agents", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("at least 1"), "{}", stderr(&o));
}

#[test]
fn r5_low_cpu_headroom_throttles_starts_without_losing_any() {
    let t = TestRoot::new("spawnthrottle");
    // Agents that keep both CPUs busy for a while: with half of the CPU to be kept idle,
    // starts pause (a `throttle` incident), and every agent still starts.
    let busy = "end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done";
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "12",
            "--batch",
            "2",
            "--ready-timeout",
            "50ms",
            "--json",
            "--",
            "sh",
            "-c",
            busy,
        ],
        &[("AF_CPU_HEADROOM_TARGET", "50")],
    );
    let (status, out, err) = sp.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["exited"], 12);
    let throttles = kinds(&incidents(&t), "throttle");
    assert!(!throttles.is_empty(), "no throttle incident");
    assert!(throttles[0]["value"].as_f64().unwrap() < 50.0);
}

#[test]
fn r5_ended_agents_are_reaped_while_others_run() {
    let t = TestRoot::new("spawnreap");
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "6",
            "--ready-timeout",
            "100ms",
            "--",
            "sh",
            "-c",
            "case $SHOAL_AGENT_ID in agent-000[0-2]) exit 0;; esac; sleep 60",
        ],
        &[],
    );
    wait_ps(&t, Duration::from_secs(10), |r| {
        states(r) == [("exited".to_owned(), 3), ("running".to_owned(), 3)].into()
    });
    std::thread::sleep(Duration::from_millis(200));
    let zombies: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = stat.rsplit_once(") ")?.1;
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            let ppid: i32 = f.next()?.parse().ok()?;
            (state == "Z" && ppid == sp.pid()).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect();
    assert!(zombies.is_empty(), "unreaped children: {zombies:?}");
    sp.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _, _) = sp.finish(Duration::from_secs(10));
    assert_eq!(status, Some(143));
}

#[test]
fn r5_max_wip_limits_agents_starting_at_once() {
    let t = TestRoot::new("spawnwip");
    // Agents that stop themselves: neither asleep nor on the bus, so each counts as starting
    // until the ready timeout; with two at a time, they start in pairs 200 ms apart.
    let sp = Spawn::start(
        &t,
        &[
            "-n",
            "6",
            "--max-wip",
            "2",
            "--ready-timeout",
            "200ms",
            "--grace",
            "100ms",
            "--",
            "sh",
            "-c",
            "kill -STOP $$",
        ],
        &[],
    );
    let rows = wait_all_running(&t, 6, Duration::from_secs(20));
    assert_eq!(rows.len(), 6);
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(t.root().join("spawner.json")).unwrap())
            .unwrap();
    let mut started: Vec<u64> = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["started_ms"].as_u64().unwrap())
        .collect();
    started.sort_unstable();
    for pair in [(0, 2), (2, 4)] {
        let gap = started[pair.1] - started[pair.0];
        assert!(
            gap >= 190,
            "agents {pair:?} started {gap} ms apart: {started:?}"
        );
    }
    sp.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _, _) = sp.finish(Duration::from_secs(10));
    assert_eq!(status, Some(143));
    assert_eq!(
        kinds(&incidents(&t), "killed").len(),
        6,
        "stopped processes need SIGKILL"
    );
}

#[test]
fn r5_failed_starts_back_off_and_every_agent_still_starts() {
    if !common::is_root() {
        eprintln!("skipped: needs root to run the spawner as another user with a process limit");
        return;
    }
    // As `nobody`, with at most 12 processes: starts fail with EAGAIN until earlier agents
    // exit; each failure is an incident and a backoff, and in the end all 30 have run.
    let t = TestRoot::new("spawnagain");
    let dir = t.dir().join("nobody");
    std::fs::create_dir_all(&dir).unwrap();
    let (uid, gid) = (65534, 65534);
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    let root = dir.join("root");
    let script = format!(
        "ulimit -u 12 && exec {} --root {} spawn -n 30 --json -- sleep 0.3",
        bin(),
        root.display()
    );
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .env("AF_BACKOFF_MIN_MS", "20")
        .env("AF_BACKOFF_MAX_MS", "200")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let summary: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(summary["exited"], 30);
    assert_eq!(summary["exit_codes"]["0"], 30);
    let inc = incidents_at(&root);
    let failed = kinds(&inc, "spawn_failed");
    assert!(
        !failed.is_empty(),
        "no start failed under a 12-process limit"
    );
    assert!(
        failed[0]["detail"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable"),
        "{failed:?}"
    );
    assert!(
        kinds(&inc, "backoff")
            .iter()
            .all(|b| b["delay_ms"].as_u64().unwrap() <= 200)
    );
}

#[test]
fn r5_spawner_killed_while_starting_agents_leaves_nothing() {
    // Killed mid-start, some agents exist that the guardian has not been told about yet, and
    // some have not yet asked to die with the spawner: neither may survive it.
    for delay_ms in [30, 80, 150, 250] {
        let t = TestRoot::new("spawnkillstart");
        let sp = Spawn::start(&t, &["-n", "300", "--", bin(), "recv", "--wait"], &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        sp.signal(nix::sys::signal::Signal::SIGKILL);
        let (status, _, _) = sp.finish(Duration::from_secs(15));
        assert_eq!(status, None, "killed by a signal");
    }
}
