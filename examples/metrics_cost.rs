//! The bus's own metrics, on or off, counted in instructions rather than seconds (the
//! end-to-end timing in `cargo bench --bench metrics` moves by a few percent between runs):
//!
//! ```sh
//! cargo build --release --example metrics_cost
//! for m in off on; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/metrics_cost $m 20000 2>&1 | grep refs
//! done
//! ```
//!
//! Each run sends N 200-byte messages, receives and acknowledges them in batches of 1000.

use shoal::{AgentId, Bus, Payload, RecvOptions, Root};

fn main() {
    let mut args = std::env::args().skip(1);
    let on = match args.next().as_deref() {
        Some("on") => true,
        Some("off") => false,
        _ => {
            eprintln!("usage: metrics_cost on|off N");
            std::process::exit(1);
        }
    };
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let dir = std::path::PathBuf::from(format!(
        "/dev/shm/shoal-metrics-cost-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let bus =
        Bus::open_with_metrics(Root::create(&dir, shoal::LayoutKind::Jsonl).unwrap(), on).unwrap();
    let (from, to) = (AgentId::new("alice").unwrap(), AgentId::new("bob").unwrap());
    bus.init(&from).unwrap();
    bus.init(&to).unwrap();
    let payload = Payload::parse(&format!("{{\"data\":\"{}\"}}", "p".repeat(60)), 1 << 20).unwrap();
    let opts = RecvOptions {
        max: 1000,
        ..RecvOptions::default()
    };
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        for _ in 0..k {
            bus.send(&from, &to, "bench", &payload).unwrap();
        }
        let mut got = 0;
        while got < k {
            got += bus.recv(&to, &opts).unwrap().len();
            bus.ack_all(&to).unwrap();
        }
        left -= k;
    }
    drop(bus);
    std::fs::remove_dir_all(&dir).unwrap();
}
