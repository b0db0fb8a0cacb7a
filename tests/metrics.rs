//! Issue 6: the metrics emitter, analyzer and Prometheus export, with real processes.
//!
//! Concurrent writers are copies of this test binary, re-run with `SHOAL_TEST_EMIT` set: the
//! `emitter_child` test then emits its share of records through the library and exits.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestRoot, code, stderr};
use serde_json::Value;
use shoal::obs::metrics::{Emitter, MetricsOptions};

/// The child side: emit `SHOAL_TEST_EMIT=<root>,<index>,<count>,<rotate_bytes>` records.
#[test]
fn emitter_child() {
    let Ok(spec) = std::env::var("SHOAL_TEST_EMIT") else {
        return; // an ordinary test run: nothing to do
    };
    let f: Vec<&str> = spec.split(',').collect();
    let root = shoal::Root::open(Path::new(f[0])).unwrap();
    let (index, count, rotate): (u64, u64, u64) = (
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
    );
    let opts = MetricsOptions {
        rotate_bytes: rotate,
        flush_bytes: 4096,
        ..MetricsOptions::default()
    };
    let m = Emitter::new(root.layout(), None, opts);
    let p = index.to_string();
    for i in 0..count {
        m.emit(
            "test.n",
            (index * 1_000_000 + i) as f64,
            "count",
            &[("p", &p)],
        )
        .unwrap();
    }
}

/// Run `n` writer processes at once, each emitting `count` records; returns every value found
/// in the metrics files, and the files.
fn concurrent_writers(t: &TestRoot, n: u64, count: u64, rotate: u64) -> (Vec<u64>, usize) {
    t.ok(&["init", "x"]);
    let me = std::env::current_exe().unwrap();
    let kids: Vec<_> = (0..n)
        .map(|i| {
            Command::new(&me)
                .args(["--exact", "emitter_child", "--test-threads=1"])
                .env(
                    "SHOAL_TEST_EMIT",
                    format!("{},{i},{count},{rotate}", t.root().display()),
                )
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    let dir = t.root().join("metrics");
    let mut values = Vec::new();
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        files += 1;
        for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            values.push(v["value"].as_u64().unwrap());
        }
    }
    values.sort_unstable();
    (values, files)
}

/// Compare without printing millions of numbers: counts, then the first difference.
fn assert_same(got: &[u64], want: &[u64]) {
    assert_eq!(got.len(), want.len(), "records found vs written");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "first difference at {i}: found {}, expected {}",
            got[i], want[i]
        );
    }
}

fn expected(n: u64, count: u64) -> Vec<u64> {
    (0..n)
        .flat_map(|i| (0..count).map(move |j| i * 1_000_000 + j))
        .collect()
}

#[test]
fn r6_64_processes_every_record_exactly_once_across_16_shards() {
    let t = TestRoot::new("metrics64");
    let (values, files) = concurrent_writers(&t, 64, 500, 1 << 30);
    assert_same(&values, &expected(64, 500));
    assert!((8..=16).contains(&files), "{files} shard files");
}

#[test]
fn r6_rotation_under_concurrent_writers_loses_nothing() {
    let t = TestRoot::new("metricsrot");
    // Eight writers on (mostly) shared shards, rotating every 20 KB.
    let (values, files) = concurrent_writers(&t, 8, 3000, 20_000);
    assert_same(&values, &expected(8, 3000));
    assert!(files > 16, "rotated: {files} files");
    // The analyzer reads rotated files too.
    let s: Value = serde_json::from_str(&t.ok(&["metrics", "summary", "--json"])).unwrap();
    assert_eq!(s[0]["count"], 24_000);
}

#[test]
fn r6_summary_of_a_known_data_set_is_exact() {
    let t = TestRoot::new("metricsknown");
    t.ok(&["init", "x"]);
    // 1..=200 in two teams: odd values in team a, even in b; and one torn line.
    let root = shoal::Root::open(&t.root()).unwrap();
    let m = Emitter::new(root.layout(), Some("x"), MetricsOptions::default());
    for v in 1..=200u32 {
        let team = if v % 2 == 1 { "a" } else { "b" };
        m.emit(
            "coordination.time",
            f64::from(v) * 100.0,
            "ms",
            &[("team", team)],
        )
        .unwrap();
    }
    let shard = m.shard_path();
    drop(m);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&shard)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, b"{\"timestamp\":\"x\",garbage\n{\"torn")
        })
        .unwrap();
    let o = t.run(&["metrics", "summary", "--json", "--by", "team"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 unreadable lines skipped"),
        "{}",
        stderr(&o)
    );
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = &s[0];
    assert_eq!(c["metric"], "coordination.time");
    assert_eq!(c["count"], 200);
    assert_eq!(c["avg"], 10_050.0);
    assert_eq!(
        (c["min"].as_f64(), c["max"].as_f64()),
        (Some(100.0), Some(20_000.0))
    );
    // Nearest rank: p50 = 100th value, p95 = 190th, p99 = 198th.
    assert_eq!(
        (c["p50"].as_f64(), c["p95"].as_f64(), c["p99"].as_f64()),
        (Some(10_000.0), Some(19_000.0), Some(19_800.0))
    );
    // Above the 10 s threshold: 10_100 .. 20_000.
    assert_eq!(c["violations"], 100);
    assert_eq!(c["threshold"]["op"], ">");
    assert_eq!(c["by"]["a"]["count"], 100);
    assert_eq!(c["by"]["a"]["max"], 19_900.0);
    assert_eq!(c["by"]["b"]["min"], 200.0);
    // Filters.
    let only: Value =
        serde_json::from_str(&t.ok(&["metrics", "summary", "--json", "--metric", "nope"])).unwrap();
    assert_eq!(only, serde_json::json!([]));
    let recent: Value =
        serde_json::from_str(&t.ok(&["metrics", "summary", "--json", "--since", "1h"])).unwrap();
    assert_eq!(recent[0]["count"], 200);
}

#[test]
fn r6_prometheus_output_parses_and_is_written_atomically() {
    let t = TestRoot::new("metricsprom");
    t.ok(&["init", "x"]);
    for (m, v, tags) in [
        ("coordination.time", "12.5", r#"{"team":"a"}"#),
        ("coordination.time", "14", r#"{"team":"a"}"#),
        ("coordination.time", "9", r#"{"team":"b \"quoted\""}"#),
        ("bus.sent", "3", "{}"),
        ("weird-name/x", "1", r#"{"9bad":"v"}"#),
    ] {
        t.ok(&["metrics", "emit", m, v, "ms", tags]);
    }
    let out = t.dir().join("shoal.prom");
    t.ok(&["metrics", "prom", "--out", out.to_str().unwrap()]);
    let text = std::fs::read_to_string(&out).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let mut got: BTreeMap<String, f64> = BTreeMap::new();
    for s in &scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("unexpected sample {s:?}"),
        };
        let team = s.labels.get("team").unwrap_or("");
        got.insert(format!("{}|{team}", s.metric), v);
    }
    assert_eq!(
        got["shoal_coordination_time|a"], 14.0,
        "latest value of the series: {got:?}"
    );
    // The parser crate keeps escapes as they are (and drops the last quote), so the escaped
    // label is checked on the text itself.
    assert!(
        got.iter()
            .any(|(k, v)| k.starts_with("shoal_coordination_time|b ") && *v == 9.0)
    );
    assert!(
        text.contains("shoal_coordination_time{team=\"b \\\"quoted\\\"\"} 9\n"),
        "{text}"
    );
    assert_eq!(got["shoal_bus_sent|"], 3.0);
    assert!(got.contains_key("shoal_weird_name_x|"));
    // Every sample line is well-formed for the text format: name{labels} value.
    let re_ok = |l: &str| {
        let (name, rest) = l.split_at(l.find(['{', ' ']).unwrap());
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && rest.rsplit_once(' ').unwrap().1.parse::<f64>().is_ok()
    };
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(re_ok(l), "bad sample line {l:?}");
    }
    // No temporary file left beside it.
    let left: Vec<_> = std::fs::read_dir(t.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty());
}

#[test]
fn r6_emit_rejects_bad_input_and_keeps_what_is_stored() {
    let t = TestRoot::new("metricsbad");
    t.ok(&["metrics", "emit", "ok.metric", "1"]);
    for (args, msg) in [
        (vec!["metrics", "emit", "m", "abc"], "is not a number"),
        (vec!["metrics", "emit", "m", "NaN"], "is not a number"),
        (
            vec!["metrics", "emit", "m", "1", "ms", "[1,2]"],
            "not a JSON object",
        ),
        (
            vec!["metrics", "emit", "m", "1", "ms", "{bad"],
            "not a JSON object",
        ),
        (vec!["metrics", "emit", "", "1"], "invalid metric name"),
    ] {
        let o = t.run(&args);
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    let s: Value = serde_json::from_str(&t.ok(&["metrics", "summary", "--json"])).unwrap();
    assert_eq!(s.as_array().unwrap().len(), 1);
    assert_eq!(s[0]["metric"], "ok.metric");
    std::thread::sleep(Duration::from_millis(1));
}

fn summary_of(t: &TestRoot) -> BTreeMap<String, Value> {
    let s: Value = serde_json::from_str(&t.ok(&["metrics", "summary", "--json"])).unwrap();
    s.as_array()
        .unwrap()
        .iter()
        .map(|m| (m["metric"].as_str().unwrap().to_owned(), m.clone()))
        .collect()
}

#[test]
fn r6_the_bus_records_its_own_traffic_with_no_user_code() {
    let t = TestRoot::new("metricsauto");
    t.ok(&["init", "a", "b"]);
    for i in 0..5 {
        t.ok(&["send", "a", "b", "job", &format!("{{\"i\":{i}}}")]);
    }
    assert_eq!(code(&t.run(&["send", "a", "nobody", "job", "{}"])), 1);
    t.ok(&["recv", "b", "--max", "10"]);
    t.ok(&["ack", "b", "--all"]);
    let m = summary_of(&t);
    let sum = |k: &str| m.get(k).map_or(0.0, |v| v["sum"].as_f64().unwrap());
    assert_eq!(sum("bus.sent"), 5.0);
    assert_eq!(sum("bus.rejected"), 1.0);
    assert_eq!(sum("bus.received"), 5.0);
    assert_eq!(sum("bus.acked"), 5.0);
    assert_eq!(
        m["bus.latency"]["count"], 5,
        "one latency sample per message"
    );
    assert_eq!(m["bus.latency"]["unit"], "ms");
    assert_eq!(
        m["coordination.queue_depth"]["max"], 5.0,
        "depth seen by the receiver"
    );
    // Tagged per agent, and the rejection with its reason.
    let by: Value = serde_json::from_str(&t.ok(&[
        "metrics",
        "summary",
        "--json",
        "--metric",
        "bus.rejected",
        "--by",
        "reason",
    ]))
    .unwrap();
    assert_eq!(by[0]["by"]["unknown_recipient"]["count"], 1);

    // Off: nothing recorded.
    let t2 = TestRoot::new("metricsoff");
    let off = |args: &[&str]| {
        let o = t2.cmd(args).env("SHOAL_METRICS", "0").output().unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    };
    off(&["init", "a", "b"]);
    off(&["send", "a", "b", "job", "{}"]);
    off(&["recv", "b"]);
    assert!(!t2.root().join("metrics").exists());
}

#[test]
fn r6_a_coordination_round_is_recorded() {
    let t = TestRoot::new("metricsround");
    t.ok(&["init", "coord", "w1", "w2"]);
    // Nobody answers: the round times out with both workers missing.
    let o = t.run(&["gather", "coord", "ping", "{}", "--timeout", "200ms"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let m = summary_of(&t);
    assert_eq!(m["coordination.time"]["count"], 1);
    assert!(m["coordination.time"]["max"].as_f64().unwrap() >= 200.0);
    assert_eq!(m["coordination.delivery_rate"]["max"], 0.0);
    assert_eq!(
        m["coordination.delivery_rate"]["violations"], 1,
        "below 90 %"
    );
    assert_eq!(m["coordination.error_rate"]["max"], 100.0);
    assert_eq!(m["coordination.agents"]["max"], 2.0);
}
