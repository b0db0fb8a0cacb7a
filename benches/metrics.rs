//! Metrics benchmarks (issue 6), printed as one JSON line each:
//!
//! * bus throughput with the bus's own metrics on and off, in the same run (interleaved blocks
//!   of 50,000 sends and their receive + acknowledge; medians): target cost under 1 %;
//! * the analyzer reading 16 shards of records: target 5M records per second (2 cores).
//!
//! `cargo bench --bench metrics` (`-- --quick` for a short run).

use std::time::{Duration, Instant};

use shoal::obs::metrics::{Emitter, MetricsOptions};
use shoal::obs::summary::{Query, Thresholds, summarize};
use shoal::{AgentId, Bus, Payload, RecvOptions, Root};

mod common;
use common::ShmDir;

struct Pair {
    bus: Bus,
    from: AgentId,
    to: AgentId,
    payload: Payload,
}

impl Pair {
    fn new(dir: &ShmDir, name: &str, metrics: bool) -> Pair {
        let root = Root::create(&dir.0.join(name), shoal::LayoutKind::Jsonl).unwrap();
        let bus = Bus::open_with_metrics(root, metrics).unwrap();
        let (from, to) = (AgentId::new("alice").unwrap(), AgentId::new("bob").unwrap());
        let mut s = bus.default_settings();
        s.quota_msgs = u64::MAX;
        s.quota_bytes = u64::MAX;
        bus.init_with(&to, &s).unwrap();
        bus.init(&from).unwrap();
        let payload =
            Payload::parse(&format!("{{\"data\":\"{}\"}}", "p".repeat(60)), 1 << 20).unwrap();
        Pair {
            bus,
            from,
            to,
            payload,
        }
    }

    /// Send `n`, then receive and acknowledge them all: messages per second.
    fn block(&self, n: usize) -> f64 {
        let t = Instant::now();
        for _ in 0..n {
            self.bus
                .send(&self.from, &self.to, "bench", &self.payload)
                .unwrap();
        }
        let opts = RecvOptions {
            max: 1000,
            ..RecvOptions::default()
        };
        let mut got = 0;
        while got < n {
            got += self.bus.recv(&self.to, &opts).unwrap().len();
            self.bus.ack_all(&self.to).unwrap();
        }
        n as f64 / t.elapsed().as_secs_f64()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = ShmDir::new("metrics");
    // Metrics on and off, interleaved.
    let on = Pair::new(&dir, "on", true);
    let off = Pair::new(&dir, "off", false);
    let (block, rounds) = if quick { (10_000, 6) } else { (50_000, 30) };
    on.block(block);
    off.block(block);
    // Pairs of blocks, in alternating order; the cost is the median of the pairs' ratios, which
    // cancels the machine's drift between pairs.
    let (mut r_on, mut r_off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (a, b) = if i % 2 == 0 {
            let a = off.block(block);
            (a, on.block(block))
        } else {
            let b = on.block(block);
            (off.block(block), b)
        };
        r_off.push(a);
        r_on.push(b);
        ratios.push(b / a);
    }
    let (m_on, m_off) = (median(&mut r_on), median(&mut r_off));
    println!(
        "{{\"bench\":\"bus_send_recv_ack_metrics_on_vs_off\",\"off_msgs_per_s\":{m_off:.0},\"on_msgs_per_s\":{m_on:.0},\"cost_pct\":{:.2},\"target_cost_pct\":1}}",
        100.0 * (1.0 - median(&mut ratios))
    );
    // What counting costs per message, measured directly (the end-to-end comparison above
    // is at the mercy of the machine's noise, a few percent between blocks).
    let counters = shoal::obs::counters::BusCounters::new(on.bus.root().layout());
    let reps = 10_000_000u32;
    let t = Instant::now();
    for _ in 0..reps {
        counters.count(
            std::hint::black_box(&on.from),
            shoal::obs::counters::Event::Sent,
            1,
        );
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(reps);
    println!(
        "{{\"bench\":\"bus_metrics_count\",\"ns_per_message\":{ns:.1},\"message_ns_off\":{:.0},\"cost_pct\":{:.2},\"target_cost_pct\":1}}",
        1e9 / m_off,
        100.0 * ns * m_off / 1e9
    );
    drop(counters);
    drop((on, off));

    // The analyzer over 16 shards.
    let n: u64 = if quick { 400_000 } else { 4_000_000 };
    let root = Root::create(&dir.0.join("analyzer"), shoal::LayoutKind::Jsonl).unwrap();
    let opts = MetricsOptions {
        rotate_bytes: u64::MAX,
        ..MetricsOptions::default()
    };
    let emitters: Vec<Emitter> = (0..16)
        .map(|i| Emitter::new(root.layout(), Some(&format!("agent-{i}")), opts))
        .collect();
    let names = [
        "coordination.time",
        "bus.sent",
        "bus.latency",
        "spawner.crash",
    ];
    for i in 0..n {
        let e = &emitters[(i % 16) as usize];
        let team = if i % 3 == 0 { "a" } else { "b" };
        e.emit(
            names[(i % 4) as usize],
            (i % 1000) as f64,
            "ms",
            &[("team", team)],
        )
        .unwrap();
    }
    drop(emitters);
    let mut rates = Vec::new();
    for _ in 0..if quick { 2 } else { 5 } {
        let t = Instant::now();
        let s = summarize(
            &root.layout().metrics_dir(),
            &Query::default(),
            &Thresholds::from_env(),
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(s.records, n);
        rates.push(n as f64 / secs);
    }
    println!(
        "{{\"bench\":\"analyzer_summary\",\"records\":{n},\"files\":16,\"records_per_s\":{:.0},\"target_records_per_s\":5000000}}",
        median(&mut rates)
    );
    std::thread::sleep(Duration::from_millis(1));
}
