//! Issue 4: topology, hubs and coordination primitives, with real processes.
//!
//! Every test plans a topology in a fresh root under /dev/shm, starts `shoal hub` and
//! `shoal echo` processes as a spawner would, and drives the coordination commands the way a
//! user does. Children are killed and reaped when a test ends, pass or fail.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TestRoot, code, parse_lines, stderr, stdout};
use serde_json::Value;

/// Child processes killed and reaped on drop.
struct Procs(Vec<Child>);

impl Procs {
    fn new() -> Procs {
        Procs(Vec::new())
    }

    fn spawn(&mut self, t: &TestRoot, args: &[&str]) -> usize {
        let c = t
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.0.push(c);
        self.0.len() - 1
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Agent ids `agent-0000` .. as `topology plan` names them.
fn agent(i: usize) -> String {
    format!("agent-{i:04}")
}

fn topology(t: &TestRoot) -> Value {
    serde_json::from_str(&t.ok(&["topology", "show", "--json"])).unwrap()
}

/// Start every team's hub, and one echo agent per agent (with extra echo arguments).
fn start_team(t: &TestRoot, procs: &mut Procs, n: usize, echo_args: &[&str]) {
    if let Some(teams) = topology(t)["teams"].as_array() {
        for team in teams {
            procs.spawn(t, &["hub", team["name"].as_str().unwrap()]);
        }
    }
    for i in 0..n {
        let id = agent(i);
        let mut args = vec!["echo", id.as_str()];
        args.extend_from_slice(echo_args);
        procs.spawn(t, &args);
    }
}

/// `shoal gather coord ... --json`: exit code and the report.
fn gather(t: &TestRoot, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["gather", "coord", "ping", r#"{"n":1}"#, "--json"];
    args.extend_from_slice(extra);
    let o = t.run(&args);
    let report = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("gather printed no report ({e}): {}", stderr(&o)));
    (code(&o), report)
}

/// Gather until a round is complete (agents are still starting), within `limit`.
fn warm_up(t: &TestRoot, limit: Duration) {
    let start = Instant::now();
    loop {
        let (c, r) = gather(t, &["--timeout", "2s"]);
        if c == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "agents never all answered: missing {}",
            r["missing"]
        );
    }
}

/// The senders of a report's replies, and that each is a reply to its request.
fn repliers(r: &Value) -> BTreeSet<String> {
    let request = r["request"].as_str().unwrap();
    r["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["reply_to"], request, "reply to another request: {m}");
            assert_eq!(m["type"], "ping.reply");
            m["from"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Receive and acknowledge `who`'s messages until `want` have come (or 20 s have passed).
fn recv_until(t: &TestRoot, who: &str, want: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < want && Instant::now() < deadline {
        let o = t.run(&["recv", who, "--timeout", "5s", "--ack"]);
        if code(&o) == 0 {
            seen.extend(parse_lines(&stdout(&o)));
        }
    }
    seen
}

fn all_agents(n: usize) -> BTreeSet<String> {
    (0..n).map(agent).collect()
}

#[test]
fn r4_topology_plan_show_and_join_at_init() {
    let t = TestRoot::new("r4-topo");
    t.ok(&["topology", "plan", "--agents", "7", "--team-size", "3"]);
    let topo = topology(&t);
    assert_eq!(topo["v"], 1);
    assert_eq!(topo["kind"], "hybrid");
    let teams = topo["teams"].as_array().unwrap();
    let sizes: Vec<usize> = teams
        .iter()
        .map(|t| t["members"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    let tree = t.ok(&["topology", "show"]);
    assert!(tree.starts_with("hybrid: 3 teams"), "{tree}");
    assert!(
        tree.contains("team-001 (hub hub-team-001, 3 members)"),
        "{tree}"
    );
    assert!(tree.contains("agent-0006"), "{tree}");
    // Every agent and hub has an inbox.
    let agents = t.ok(&["agents"]);
    for id in ["agent-0000", "agent-0006", "hub-team-000", "hub-team-002"] {
        assert!(agents.contains(id), "{id} missing from {agents}");
    }

    // Joining at init: a new team gets a hub named after it, or the one given.
    t.ok(&["init", "solo", "--team", "blue"]);
    t.ok(&["init", "duo", "--team", "red", "--hub", "red-hub"]);
    let topo = topology(&t);
    let team = |name: &str| {
        topo["teams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no team {name} in {topo}"))
    };
    assert_eq!(team("blue")["hub"], "hub-blue");
    assert_eq!(team("blue")["members"], serde_json::json!(["solo"]));
    assert_eq!(team("red")["hub"], "red-hub");
    assert!(t.ok(&["agents"]).contains("red-hub"));

    // Teams by count; a flat plan.
    let t2 = TestRoot::new("r4-topo2");
    t2.ok(&["topology", "plan", "--agents", "10", "--teams", "4"]);
    let sizes: Vec<usize> = topology(&t2)["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["members"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.len(), 4);
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
    let t3 = TestRoot::new("r4-topo3");
    t3.ok(&["topology", "plan", "--agents", "5"]);
    assert!(t3.ok(&["topology", "show"]).starts_with("flat"));
}

#[test]
fn r4_topology_errors_are_clear_and_keep_the_plan() {
    let t = TestRoot::new("r4-topo-err");
    t.ok(&["topology", "plan", "--agents", "4", "--team-size", "2"]);
    let before = topology(&t);
    for (args, words) in [
        (
            &["topology", "plan", "--agents", "0", "--team-size", "2"][..],
            "at least 1",
        ),
        (
            &[
                "topology",
                "plan",
                "--agents",
                "4",
                "--team-size",
                "2",
                "--teams",
                "2",
            ][..],
            "cannot be used with",
        ),
        (
            &["topology", "plan", "--agents", "4", "--team-size", "0"][..],
            "team",
        ),
        (&["gather", "coord", "ping", "{", "--json"][..], "JSON"),
        (
            &["broadcast", "coord", "ping", "{}", "--team", "nope"][..],
            "nope",
        ),
        (&["hub", "nope"][..], "nope"),
    ] {
        let o = t.run(args);
        assert_ne!(code(&o), 0, "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(words), "{args:?}: {err:?} lacks {words:?}");
    }
    assert_eq!(
        topology(&t),
        before,
        "a failed command changed the topology"
    );
}

#[test]
fn r4_a_message_between_teams_travels_through_both_hubs() {
    let t = TestRoot::new("r4-route");
    t.ok(&["topology", "plan", "--agents", "6", "--team-size", "3"]);
    let mut procs = Procs::new();
    // Sent before the hubs run: it waits in the first hub's inbox.
    let id = t.ok(&["send", "agent-0001", "agent-0004", "hello", r#"{"a":1}"#]);
    let id = id.trim();
    start_team(&t, &mut procs, 0, &[]);
    let got = parse_lines(&t.ok(&["recv", "agent-0004", "--timeout", "10s", "--ack"]));
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m["id"], id, "the id is kept along the way");
    assert_eq!(m["from"], "agent-0001");
    assert_eq!(m["payload"], serde_json::json!({"a": 1}));
    assert_eq!(
        m["route"],
        serde_json::json!(["agent-0001", "hub-team-000", "hub-team-001"]),
        "{m}"
    );
    // Inside a team: direct, no route.
    t.ok(&["send", "agent-0004", "agent-0005", "hi", "2"]);
    let got = parse_lines(&t.ok(&["recv", "agent-0005", "--ack"]));
    assert_eq!(got.len(), 1);
    assert!(got[0].get("route").is_none(), "{}", got[0]);

    // A topology planned with --direct delivers between teams directly.
    let d = TestRoot::new("r4-route-direct");
    d.ok(&[
        "topology",
        "plan",
        "--agents",
        "6",
        "--team-size",
        "3",
        "--direct",
    ]);
    d.ok(&["send", "agent-0001", "agent-0004", "hello", "1"]);
    let got = parse_lines(&d.ok(&["recv", "agent-0004", "--ack"]));
    assert_eq!(got.len(), 1, "no hub runs, yet the message is there");
}

/// A round at 100 agents: every reply accounted for, on each topology, several times.
fn rounds_at_100(plan: &[&str], hybrid: bool) {
    let t = TestRoot::new(if hybrid { "r4-round-h" } else { "r4-round-f" });
    let mut args = vec!["topology", "plan", "--agents", "100"];
    args.extend_from_slice(plan);
    t.ok(&args);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    start_team(&t, &mut procs, 100, &[]);
    warm_up(&t, Duration::from_secs(60));
    let teams = topology(&t)["teams"].as_array().map_or(0, Vec::len);
    for _ in 0..5 {
        let (c, r) = gather(&t, &["--timeout", "20s"]);
        assert_eq!(c, 0, "round incomplete: missing {}", r["missing"]);
        assert_eq!(r["expected"], 100);
        assert_eq!(r["replied"], 100);
        assert_eq!(r["missing"], serde_json::json!([]));
        assert_eq!(repliers(&r), all_agents(100));
        if hybrid {
            // The coordinator got one aggregate per team, not one message per agent.
            assert_eq!(r["messages"], teams, "{}", r["messages"]);
        } else {
            assert_eq!(r["messages"], 100);
        }
    }
    // Nothing left behind in the coordinator's inbox.
    assert_eq!(t.ok(&["count", "coord"]).trim(), "0");
}

#[test]
fn r4_rounds_at_100_agents_flat() {
    rounds_at_100(&[], false);
}

#[test]
fn r4_rounds_at_100_agents_hybrid() {
    rounds_at_100(&["--team-size", "25"], true);
}

#[test]
fn r4_a_hub_killed_during_a_round_is_restarted_and_no_reply_is_lost() {
    let t = TestRoot::new("r4-hub-kill");
    t.ok(&["topology", "plan", "--agents", "100", "--team-size", "25"]);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    let hubs = ["team-000", "team-001", "team-002", "team-003"];
    for team in hubs {
        procs.spawn(&t, &["hub", team]);
    }
    // Half the agents answer after 150 ms, the others after 900 ms: at 500 ms every hub
    // holds half its team's replies, waiting for the rest.
    for i in 0..100 {
        let delay = if i % 2 == 0 { "150ms" } else { "900ms" };
        procs.spawn(&t, &["echo", &agent(i), "--delay", delay]);
    }
    warm_up(&t, Duration::from_secs(60));
    // Killed before or while fanning out, and while holding half the replies.
    for (kill_at, restart_after) in [(20, 100), (500, 50), (500, 600)] {
        let mut round = t
            .cmd(&[
                "gather",
                "coord",
                "ping",
                r#"{"n":1}"#,
                "--json",
                "--timeout",
                "10s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(kill_at));
        assert!(
            round.try_wait().unwrap().is_none(),
            "the round cannot end before the agents' 900 ms"
        );
        // Hubs are children 0..4 (started first); kill two of them with SIGKILL.
        for h in [0, 2] {
            procs.0[h].kill().unwrap();
            procs.0[h].wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(restart_after));
        for h in [0, 2] {
            procs.0[h] = t
                .cmd(&["hub", hubs[h]])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
        }
        let o: Output = round.wait_with_output().unwrap();
        let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(
            code(&o),
            0,
            "kill at {kill_at} ms: missing {}",
            r["missing"]
        );
        assert_eq!(r["replied"], 100, "kill at {kill_at} ms");
        assert_eq!(repliers(&r), all_agents(100));
        // The restarted hubs took the round over: still one aggregate per team.
        assert_eq!(r["messages"], 4, "kill at {kill_at} ms");
    }
    // Anything a restarted hub sent twice was dropped at the receiver: a further round is
    // clean, and the coordinator's inbox holds nothing unhandled.
    let (c, r) = gather(&t, &["--timeout", "20s"]);
    assert_eq!(c, 0, "{r}");
    assert_eq!(t.ok(&["count", "coord"]).trim(), "0");
}

#[test]
fn r4_gather_names_the_missing_agents_and_exits_3() {
    let t = TestRoot::new("r4-missing");
    t.ok(&["topology", "plan", "--agents", "10", "--team-size", "5"]);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    // Hubs and agents 0..8 run; agent-0003 and agent-0008 never answer.
    for team in ["team-000", "team-001"] {
        procs.spawn(&t, &["hub", team]);
    }
    for i in (0..10).filter(|i| *i != 3 && *i != 8) {
        procs.spawn(&t, &["echo", &agent(i)]);
    }
    // Let them start: a round of the eight that run.
    let start = Instant::now();
    loop {
        let (_, r) = gather(&t, &["--timeout", "1s"]);
        if r["replied"] == 8 {
            assert_eq!(
                r["missing"],
                serde_json::json!(["agent-0003", "agent-0008"])
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{r}");
    }
    let o = t.run(&["gather", "coord", "ping", "1", "--timeout", "500ms"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("8 of 10 replied in "), "{text}");
    assert!(text.contains("missing: agent-0003 agent-0008"), "{text}");
    // One team only.
    let (c, r) = gather(&t, &["--team", "team-001", "--timeout", "500ms"]);
    assert_eq!(c, 3);
    assert_eq!(r["expected"], 5);
    assert_eq!(r["missing"], serde_json::json!(["agent-0008"]));
}

#[test]
fn r4_broadcast_reaches_every_agent_once_through_the_hubs() {
    broadcast_reaches_every_agent_once("jsonl");
}

/// On the bash bus's layout too: its message files keep `fanout` (they once dropped it, and a
/// hub took a broadcast for a message to itself).
#[test]
fn r4_broadcast_reaches_every_agent_once_through_the_hubs_on_the_compat_layout() {
    broadcast_reaches_every_agent_once("compat");
}

fn broadcast_reaches_every_agent_once(layout: &str) {
    let t = TestRoot::new(&format!("r4-bcast-{layout}"));
    t.ok(&[
        "--layout",
        layout,
        "topology",
        "plan",
        "--agents",
        "30",
        "--team-size",
        "8",
    ]);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    // Broadcast before the hubs run: nothing is lost, they fan out when they start.
    let id = t.ok(&["broadcast", "coord", "news", r#"{"v":1}"#]);
    let id = id.trim().to_owned();
    let team_only = t.ok(&["broadcast", "coord", "team", "2", "--team", "team-001"]);
    let team_only = team_only.trim().to_owned();
    start_team(&t, &mut procs, 0, &[]);
    for i in 0..30 {
        let a = agent(i);
        let want = if (8..16).contains(&i) { 2 } else { 1 };
        let seen = recv_until(&t, &a, want);
        let ids: Vec<&str> = seen.iter().map(|m| m["id"].as_str().unwrap()).collect();
        let mut expect = vec![id.as_str()];
        if want == 2 {
            expect.push(team_only.as_str());
        }
        assert_eq!(ids, expect, "{a}");
        assert_eq!(seen[0]["from"], "coord");
        assert_eq!(seen[0]["payload"], serde_json::json!({"v": 1}));
    }
    // Nothing more arrives (no duplicates).
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..30 {
        assert_eq!(t.ok(&["count", &agent(i)]).trim(), "0", "{}", agent(i));
    }
}

/// A hub removed and created again starts with an empty inbox and new numbers: its members'
/// duplicate checks must not take its broadcasts for copies of the old hub's.
#[test]
fn r4_a_hub_made_again_gets_its_broadcasts_through() {
    let t = TestRoot::new("r4-rehub");
    t.ok(&["topology", "plan", "--agents", "2", "--team-size", "2"]);
    t.ok(&["init", "coord"]);
    let recv_all = |want: usize| recv_until(&t, &agent(0), want);
    {
        let mut procs = Procs::new();
        procs.spawn(&t, &["hub", "team-000"]);
        for i in 0..3 {
            t.ok(&["broadcast", "coord", &format!("before{i}"), "{}"]);
        }
        let got = recv_all(3);
        assert_eq!(got.len(), 3);
    } // the hub is killed here
    t.ok(&["cleanup", "hub-team-000"]);
    t.ok(&["init", "hub-team-000"]);
    let mut procs = Procs::new();
    procs.spawn(&t, &["hub", "team-000"]);
    t.ok(&["broadcast", "coord", "after", "{}"]);
    let got = recv_all(1);
    assert_eq!(got.len(), 1, "the new hub's first broadcast was dropped");
    assert_eq!(got[0]["type"], "after");
}

/// Routed messages are numbered per (sender, recipient): a hub carrying one sender's messages
/// to several recipients must not take the second recipient's for copies of the first's.
/// Both hops: a coordinator outside the teams writes to a member's hub, and a member writes to
/// its own hub, which forwards to the other team's hub.
#[test]
fn r4_one_sender_to_two_members_of_a_team_through_hubs_loses_nothing() {
    let t = TestRoot::new("r4-pairs");
    t.ok(&["topology", "plan", "--agents", "6", "--team-size", "3"]);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    start_team(&t, &mut procs, 0, &[]);
    for from in ["coord", agent(1).as_str()] {
        for i in 0..3 {
            t.ok(&["send", from, &agent(4), "t", &format!("{{\"i\":{i}}}")]);
        }
        t.ok(&["send", from, &agent(5), "t", r#"{"i":9}"#]);
    }
    for (to, want) in [(agent(4), 6), (agent(5), 2)] {
        let seen = recv_until(&t, &to, want);
        assert_eq!(seen.len(), want, "{to} got {seen:?}");
    }
}

#[test]
fn r4_request_reply_with_a_correlation_id() {
    let t = TestRoot::new("r4-request");
    t.ok(&["topology", "plan", "--agents", "6", "--team-size", "3"]);
    t.ok(&["init", "asker"]);
    let mut procs = Procs::new();
    start_team(&t, &mut procs, 0, &[]);
    procs.spawn(&t, &["echo", "agent-0004"]);
    // Across teams, through the hubs, answered by an echo agent.
    let o = t.run(&[
        "request",
        "agent-0001",
        "agent-0004",
        "q",
        r#"{"x":7}"#,
        "--timeout",
        "20s",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let reply = parse_lines(&stdout(&o));
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0]["type"], "q.reply");
    assert_eq!(reply[0]["from"], "agent-0004");
    assert_eq!(reply[0]["payload"], serde_json::json!({"x": 7}));

    // Answered by hand with `send --reply-to`; an unrelated message waiting is left alone.
    t.ok(&["send", "agent-0005", "asker", "other", "0"]);
    let asker = t
        .cmd(&[
            "request",
            "asker",
            "agent-0005",
            "q",
            "1",
            "--timeout",
            "20s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = parse_lines(&t.ok(&["recv", "agent-0005", "--timeout", "10s", "--ack"]));
    assert_eq!(got.len(), 1);
    let req = got[0]["id"].as_str().unwrap().to_owned();
    // A reply to something else first: not taken as the answer.
    t.ok(&[
        "send",
        "agent-0005",
        "asker",
        "q.reply",
        "0",
        "--reply-to",
        "msg-0-0",
    ]);
    t.ok(&[
        "send",
        "agent-0005",
        "asker",
        "q.reply",
        r#""yes""#,
        "--reply-to",
        &req,
    ]);
    let o = asker.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let reply = parse_lines(&stdout(&o));
    assert_eq!(reply[0]["reply_to"], req.as_str());
    assert_eq!(reply[0]["payload"], "yes");
    let left: Vec<String> = parse_lines(&t.ok(&["recv", "asker"]))
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, ["other", "q.reply"], "other messages stay");

    // Nobody answers: exit status 124, like timeout(1).
    let o = t.run(&[
        "request",
        "asker",
        "agent-0002",
        "q",
        "1",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
}

#[test]
fn r4_a_barrier_releases_everyone_only_when_the_last_arrives() {
    let t = TestRoot::new("r4-barrier");
    t.ok(&["topology", "plan", "--agents", "5", "--team-size", "5"]);
    let mut procs = Procs::new();
    start_team(&t, &mut procs, 0, &[]);
    let members = "agent-0000,agent-0001,agent-0002,agent-0003,agent-0004";
    let mut waiting = Vec::new();
    // Four arrive (the leader, agent-0000, among them); the fifth comes later.
    for i in [3, 0, 1, 2] {
        waiting.push(
            t.cmd(&[
                "barrier",
                &agent(i),
                "phase-1",
                "--members",
                members,
                "--timeout",
                "30s",
            ])
            .spawn()
            .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    for c in &mut waiting {
        assert!(
            c.try_wait().unwrap().is_none(),
            "released before all arrived"
        );
    }
    let o = t.run(&["barrier", &agent(4), "phase-1", "--team", "team-000"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for mut c in waiting {
        assert!(c.wait().unwrap().success());
    }

    // Someone never comes: the leader names who is missing, exit status 124.
    let o = t.run(&[
        "barrier",
        "agent-0000",
        "phase-2",
        "--members",
        "agent-0000,agent-0001",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code(&o), 124);
    assert!(stderr(&o).contains("agent-0001"), "{}", stderr(&o));
    // Without members: a clear error.
    let o = t.run(&["barrier", "agent-0000", "x", "--team", "nope"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
}

#[test]
fn r4_a_round_of_1000_agents_under_one_user_past_the_inotify_limit() {
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(128);
    let n = 1000;
    assert!(
        n > limit,
        "fs.inotify.max_user_instances is {limit}: this test shows nothing above 1000"
    );
    let t = TestRoot::new("r4-1000");
    t.ok(&[
        "topology",
        "plan",
        "--agents",
        &n.to_string(),
        "--team-size",
        "100",
    ]);
    t.ok(&["init", "coord"]);
    let mut procs = Procs::new();
    start_team(&t, &mut procs, n, &[]);
    warm_up(&t, Duration::from_secs(120));
    // Every agent is a waiting receiver; they wake on the same request.
    let (c, r) = gather(&t, &["--timeout", "30s"]);
    assert_eq!(c, 0, "{}", r["missing"]);
    assert_eq!(repliers(&r), all_agents(n));
    assert_eq!(r["messages"], 10, "one aggregate per team");
    // And all processes are alive: none died of a refused inotify instance.
    for (i, c) in procs.0.iter_mut().enumerate() {
        assert!(c.try_wait().unwrap().is_none(), "process {i} exited");
    }
}

#[test]
fn r4_a_coordinator_inside_a_team_gets_its_teammates_directly_and_no_late_batch() {
    let t = TestRoot::new("r4-coord-in-team");
    t.ok(&["topology", "plan", "--agents", "10", "--team-size", "5"]);
    let mut procs = Procs::new();
    for team in ["team-000", "team-001"] {
        procs.spawn(&t, &["hub", team]);
    }
    for i in 1..10 {
        procs.spawn(&t, &["echo", &agent(i)]);
    }
    let start = Instant::now();
    let r = loop {
        let o = t.run(&[
            "gather",
            "agent-0000",
            "ping",
            "1",
            "--json",
            "--timeout",
            "1s",
        ]);
        let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
        if code(&o) == 0 {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            r["missing"]
        );
    };
    // Four teammates directly, one aggregate from the other team's hub.
    assert_eq!(r["replied"], 9);
    assert_eq!(r["messages"], 5, "{}", r["messages"]);
    // The coordinator's own hub collects nothing, so it sends nothing at the deadline.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(t.ok(&["count", "agent-0000"]).trim(), "0");
}

#[test]
fn r4_bench_round_reports_every_field_per_size_and_topology() {
    let o = std::process::Command::new(common::bin())
        .args([
            "bench",
            "round",
            "--agents",
            "12,30",
            "--rounds",
            "2",
            "--team-size",
            "8",
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = parse_lines(&stdout(&o));
    let seen: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["agents"].as_u64().unwrap(),
                l["topology"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(12, "flat"), (12, "hybrid"), (30, "flat"), (30, "hybrid")]
    );
    for l in &lines {
        for f in [
            "rounds",
            "p50_ms",
            "p95_ms",
            "delivered_pct",
            "coordinator_cpu_ms",
            "floor_p50_ms",
            "floor_coordinator_cpu_ms",
        ] {
            assert!(l[f].is_number(), "{f} missing in {l}");
        }
        assert_eq!(l["delivered_pct"], 100.0);
        assert_eq!(l["rounds"], 2);
        // Agents' CPU per round, from /proc (null only where /proc has no schedstat).
        if std::path::Path::new("/proc/self/schedstat").exists() {
            for f in ["agents_cpu_ms", "floor_agents_cpu_ms"] {
                assert!(l[f].as_f64().is_some_and(|ms| ms > 0.0), "{f} in {l}");
            }
            // The hubs' share: all of their forwarding is in it, none in a flat round.
            let hubs = l["hubs_cpu_ms"].as_f64().unwrap();
            match l["topology"].as_str().unwrap() {
                "flat" => assert_eq!(hubs, 0.0, "{l}"),
                _ => assert!(
                    hubs > 0.0 && hubs < l["agents_cpu_ms"].as_f64().unwrap(),
                    "{l}"
                ),
            }
        }
    }
    // Hybrid against flat, from rounds that took turns in the same run.
    for l in &lines {
        match l["topology"].as_str().unwrap() {
            "flat" => assert!(l["p50_vs_flat"].is_null(), "{l}"),
            _ => assert!(l["p50_vs_flat"].as_f64().is_some_and(|x| x > 0.0), "{l}"),
        }
    }
    // The coordinator gets one message per team in the hybrid topology (30 agents: 4 teams).
    assert_eq!(lines[3]["coordinator_messages"], 4);
    assert_eq!(lines[2]["coordinator_messages"], 30);
    let o = std::process::Command::new(common::bin())
        .args(["bench", "round", "--agents", "5", "--topology", "mesh"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("unknown topology"));
    let o = std::process::Command::new(common::bin())
        .args([
            "bench",
            "round",
            "--agents",
            "5",
            "--topology",
            "flat,hybrid,flat",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("listed twice"), "{}", stderr(&o));
}
