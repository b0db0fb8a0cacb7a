//! `shoal demo`: a real run on the root. Starts echo-agent processes, runs coordination rounds
//! through their inboxes, measures a send/receive burst, and shows the space coming back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use shoal::{AgentId, Bus, RecvOptions, Wait};

use super::{Children, Ctx, Exit};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Agent processes to start.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=5000))]
    agents: u32,
    /// Coordination rounds to time (after one warm-up round).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Messages in the send/receive burst.
    #[arg(long, default_value_t = 100_000)]
    burst: u64,
    /// Keep the demo's agents afterwards (default: remove them).
    #[arg(long)]
    keep: bool,
}

pub(crate) fn run(ctx: &Ctx, a: DemoArgs) -> anyhow::Result<Exit> {
    let bus = ctx.bus(true)?;
    let root = bus.root().path().to_owned();
    println!(
        "shoal demo on {} ({} agent processes)",
        root.display(),
        a.agents
    );
    let coord = AgentId::new("demo-coord")?;
    let sink = AgentId::new("demo-sink")?;
    let workers: Vec<AgentId> = (0..a.agents)
        .map(|i| AgentId::new(&format!("demo-w{i:04}")))
        .collect::<Result<_, _>>()?;
    for id in workers.iter().chain([&coord, &sink]) {
        bus.init(id)?;
    }
    let exe = std::env::current_exe().context("cannot find the shoal executable")?;
    let t = Instant::now();
    let mut children = Children(Vec::with_capacity(workers.len()));
    for w in &workers {
        let mut cmd = Command::new(&exe);
        Children::bind(&mut cmd);
        let child = cmd
            .arg("--root")
            .arg(&root)
            .args(["echo", w.as_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start agent {w}"))?;
        children.0.push(child);
    }
    println!(
        "  started {} agents in {:.1} ms",
        workers.len(),
        ms(t.elapsed())
    );

    // Round 0 includes the agents' start-up; it is reported but not counted.
    let warm = round(&bus, &coord, &workers, 0)?;
    println!("  warm-up round (agents starting): {:.1} ms", ms(warm));
    let mut times = Vec::new();
    for r in 1..=a.rounds {
        times.push(round(&bus, &coord, &workers, r)?);
    }
    times.sort();
    println!(
        "  {} rounds of broadcast -> {} replies -> gather: p50 {:.2} ms, max {:.2} ms, 100% delivered",
        a.rounds,
        workers.len(),
        ms(times[times.len() / 2]),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );

    let t = Instant::now();
    for i in 0..a.burst {
        bus.send_json(&coord, &sink, "burst", &serde_json::json!({ "i": i }))?;
    }
    let send_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut got = 0u64;
    let opts = RecvOptions {
        max: 4096,
        ..RecvOptions::default()
    };
    loop {
        let batch = bus.recv(&sink, &opts)?;
        if batch.is_empty() {
            break;
        }
        got += batch.len() as u64;
        bus.ack_all(&sink)?;
    }
    let recv_s = t.elapsed().as_secs_f64();
    if got != a.burst {
        bail!("burst: sent {} messages, received {got}", a.burst);
    }
    let depth = bus.depth(&sink)?;
    println!(
        "  burst of {} messages: send {:.0} msg/s, receive+ack {:.0} msg/s; inbox afterwards: {} messages, {} bytes on tmpfs",
        a.burst,
        a.burst as f64 / send_s,
        got as f64 / recv_s,
        depth.msgs,
        inbox_bytes(&bus, &sink)
    );

    for w in &workers {
        bus.send_str(&coord, w, "shutdown", "{}")?;
    }
    let mut failed = 0;
    for mut c in std::mem::take(&mut children.0) {
        if !c.wait()?.success() {
            failed += 1;
        }
    }
    println!(
        "  agents stopped: {} clean, {failed} failed",
        workers.len() - failed
    );
    if !a.keep {
        for id in workers.iter().chain([&coord, &sink]) {
            bus.remove(id)?;
        }
    }
    Ok(if failed == 0 { Exit::Ok } else { Exit::Failure })
}

/// Send a ping to every worker, gather one reply from each.
fn round(bus: &Bus, coord: &AgentId, workers: &[AgentId], r: u32) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut ids = std::collections::HashSet::with_capacity(workers.len());
    for w in workers {
        ids.insert(
            bus.send_json(coord, w, "ping", &serde_json::json!({ "round": r }))?
                .id,
        );
    }
    let opts = RecvOptions {
        max: 4096,
        wait: Wait::For(Duration::from_secs(60)),
        ..RecvOptions::default()
    };
    let mut waiter = None;
    while !ids.is_empty() {
        let msgs = bus.recv_with(coord, &opts, &mut waiter)?;
        if msgs.is_empty() {
            bail!("round {r}: {} agents did not reply within 60 s", ids.len());
        }
        for m in &msgs {
            if let Some(to) = &m.reply_to {
                ids.remove(to);
            }
        }
        bus.ack_all(coord)?;
    }
    Ok(t.elapsed())
}

/// Bytes the inbox's shard files occupy on tmpfs.
fn inbox_bytes(bus: &Bus, id: &AgentId) -> u64 {
    let dir = bus.root().layout().inbox_dir(id);
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::File::open(e.path()).ok())
        .filter_map(|f| shoal::sys::allocated_bytes(&f).ok())
        .sum()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
