//! Two processes, one bus: this program starts a copy of itself as the "pong" agent, sends it
//! pings and waits for each pong, and prints round-trip latencies.
//!
//! ```text
//! cargo run --release --example pingpong -- 10000
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use shoal::{AgentId, Bus, RecvOptions, SendOptions, Wait};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("--pong") {
        let root = args.next().ok_or("--pong needs the root")?;
        return pong(&root);
    }
    let rounds: usize = first.and_then(|a| a.parse().ok()).unwrap_or(1000);
    let root = std::path::PathBuf::from(format!("/dev/shm/shoal-pingpong-{}", std::process::id()));
    let bus = Bus::create(&root)?;
    let (ping, pong_id) = (AgentId::new("ping")?, AgentId::new("pong")?);
    bus.init(&ping)?;
    bus.init(&pong_id)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--pong")
        .arg(&root)
        .spawn()?;

    let wait = RecvOptions {
        max: 1,
        wait: Wait::For(Duration::from_secs(10)),
        ..RecvOptions::default()
    };
    let mut waiter = None;
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        let sent = bus.send_json(&ping, &pong_id, "ping", &i)?;
        let reply = bus.recv_with(&ping, &wait, &mut waiter)?;
        let reply = reply.first().ok_or("no pong within 10 s")?;
        if reply.reply_to.as_deref() != Some(sent.id.as_str()) {
            return Err(format!("pong answers {:?}, not {}", reply.reply_to, sent.id).into());
        }
        bus.ack(&ping, std::slice::from_ref(&reply.id))?;
        rtts.push(t.elapsed());
    }
    bus.send_str(&ping, &pong_id, "stop", "{}")?;
    child.wait()?;
    std::fs::remove_dir_all(&root)?;
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    println!(
        "{rounds} round trips between two processes: p50 {:.0} us, p99 {:.0} us (wake-up: {:?})",
        pct(0.5),
        pct(0.99),
        bus.wake_mode()
    );
    Ok(())
}

fn pong(root: &str) -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::open(shoal::Root::open(std::path::Path::new(root))?)?;
    let me = AgentId::new("pong")?;
    let wait = RecvOptions {
        wait: Wait::Forever,
        ..RecvOptions::default()
    };
    let mut waiter = None;
    loop {
        for m in bus.recv_with(&me, &wait, &mut waiter)? {
            if m.kind == "stop" {
                return Ok(());
            }
            let from = AgentId::new(&m.from)?;
            let payload = shoal::Payload::parse(m.payload.get(), usize::MAX)?;
            let opts = SendOptions {
                reply_to: Some(&m.id),
                ..SendOptions::default()
            };
            bus.send_with(&me, &from, "pong", &payload, &opts)?;
            bus.ack(&me, std::slice::from_ref(&m.id))?;
        }
    }
}
