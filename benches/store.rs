//! Store benchmarks: a library send against the raw floor measured in the same run, and
//! receive + parse + acknowledge.
//!
//! The floor is what the hardware allows for one message: `flock` + one 200-byte `write` +
//! unlock on a file kept open (~430k/s per core on the reference machine, linux-facts.md).
//! Targets (issue 2): library send >= 70 % of the floor; receive + parse >= 1M msg/s.
//!
//! `cargo bench --bench store` runs criterion, then prints one JSON line per target with the
//! figures measured side by side in this run (interleaved blocks, medians).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal::store::{AckTarget, RecvRequest};
use shoal::{AgentId, Bus, Payload};

mod common;
use common::ShmDir;

const RECORD: usize = 200;

/// The floor: flock, one 200-byte write, unlock, on a file kept open.
struct Floor {
    file: File,
    record: Vec<u8>,
}

impl Floor {
    fn new(dir: &ShmDir) -> Floor {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dir.0.join("floor.jsonl"))
            .unwrap();
        let mut record = vec![b'x'; RECORD - 1];
        record.push(b'\n');
        Floor { file, record }
    }

    fn one(&mut self) {
        self.file.lock().unwrap();
        (&self.file).write_all(&self.record).unwrap();
        self.file.unlock().unwrap();
    }
}

/// A bus with a sender and a recipient, and a payload sized so the stored line is 200 bytes.
struct Sender {
    bus: Bus,
    from: AgentId,
    to: AgentId,
    payload: Payload,
}

impl Sender {
    fn new(dir: &ShmDir) -> Sender {
        let bus = Bus::create(&dir.0.join("root")).unwrap();
        let from = AgentId::new("alice").unwrap();
        let to = AgentId::new("bob").unwrap();
        let mut settings = bus.default_settings();
        settings.quota_msgs = u64::MAX;
        settings.quota_bytes = u64::MAX;
        bus.init_with(&to, &settings).unwrap();
        // Envelope overhead with these ids is ~127 bytes; fill the rest with payload.
        let line_without_payload = 127usize;
        let text = format!(
            "{{\"data\":\"{}\"}}",
            "p".repeat(RECORD - line_without_payload - 13)
        );
        let payload = Payload::parse(&text, 1 << 20).unwrap();
        Sender {
            bus,
            from,
            to,
            payload,
        }
    }

    fn one(&self) {
        self.bus
            .send(&self.from, &self.to, "bench", &self.payload)
            .unwrap();
    }

    /// Receive and acknowledge everything; returns the count.
    fn drain(&self, max: usize) -> usize {
        let store = self.bus.store();
        let req = RecvRequest {
            max,
            lease: Duration::from_secs(30),
            filter: None,
        };
        let mut n = 0;
        loop {
            let b = store.receive(&self.to, &req).unwrap();
            if b.messages.is_empty() {
                return n;
            }
            n += b.messages.len();
            store.ack(&self.to, AckTarget::AllDelivered).unwrap();
        }
    }
}

fn bench_append(c: &mut Criterion) {
    let dir = ShmDir::new("append");
    let mut floor = Floor::new(&dir);
    let sender = Sender::new(&dir);
    let mut g = c.benchmark_group("append_200B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("floor_flock_write_unlock", |b| b.iter(|| floor.one()));
    g.bench_function("library_send", |b| {
        b.iter_custom(|iters| {
            // Only the sends are timed; the inbox is drained between samples so tmpfs use stays
            // bounded however many iterations criterion asks for.
            let t = Instant::now();
            for _ in 0..iters {
                sender.one();
            }
            let e = t.elapsed();
            sender.drain(100_000);
            e
        })
    });
    g.finish();
}

fn bench_recv(c: &mut Criterion) {
    let dir = ShmDir::new("recv");
    let sender = Sender::new(&dir);
    let mut g = c.benchmark_group("recv_200B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("receive_parse_ack_batch1000", |b| {
        b.iter_custom(|iters| {
            for _ in 0..iters {
                sender.one();
            }
            let t = Instant::now();
            let n = sender.drain(1000);
            let e = t.elapsed();
            assert_eq!(n as u64, iters);
            e
        })
    });
    g.finish();
}

/// Interleaved blocks of floor and library sends, and of receives; medians of rates.
fn summary() {
    let dir = ShmDir::new("summary");
    let mut floor = Floor::new(&dir);
    let sender = Sender::new(&dir);
    let block = 50_000;
    let (mut floor_rates, mut send_rates, mut recv_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..block {
            floor.one();
        }
        floor_rates.push(block as f64 / t.elapsed().as_secs_f64());
        floor.file.set_len(0).unwrap();
        let t = Instant::now();
        for _ in 0..block {
            sender.one();
        }
        send_rates.push(block as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert_eq!(sender.drain(1000), block);
        recv_rates.push(block as f64 / t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, s, r) = (
        median(&mut floor_rates),
        median(&mut send_rates),
        median(&mut recv_rates),
    );
    println!(
        "{{\"bench\":\"append_200B\",\"floor_msgs_per_s\":{f:.0},\"send_msgs_per_s\":{s:.0},\"send_vs_floor_pct\":{:.1},\"target_pct\":70}}",
        100.0 * s / f
    );
    println!(
        "{{\"bench\":\"recv_parse_ack_200B\",\"msgs_per_s\":{r:.0},\"target_msgs_per_s\":1000000}}"
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_append(&mut c);
    bench_recv(&mut c);
    c.final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not: keep test mode quick.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
