//! `shoal bench spawn`: how fast `shoal spawn` brings N agents to the point where they can
//! receive, against spawning as many trivial processes in the same run; and what idle waiting
//! agents cost in memory (PSS) and CPU.
//!
//! The floor forks and execs N copies of `true` and reaps them, with nothing else: the price
//! of N processes on this machine. Shoal's figure runs the spawner as `shoal spawn -n N --
//! shoal recv --wait` does, from creating the inboxes to every agent having checked its inbox
//! and gone to sleep on it. The two alternate, so both see the same machine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use shoal::Bus;
use shoal::agents::governor::Governor;
use shoal::agents::spawner::{Restart, SpawnOptions, Spawner};

use super::bench::{STOP, interrupted, percentile, round2, scratch};
use super::{Exit, parse_duration};

#[derive(Debug, Args)]
pub(crate) struct SpawnBenchArgs {
    /// Numbers of agents, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,1000")]
    agents: Vec<usize>,
    /// Measurements per size (shoal and floor alternate).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// How long idle agents are watched for their CPU use (at the last repeat of each size).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    idle: Duration,
    /// Most agents starting at once (the governor's max WIP).
    #[arg(long, value_name = "N")]
    max_wip: Option<usize>,
    /// One JSON object per size.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: SpawnBenchArgs) -> anyhow::Result<Exit> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&STOP))
            .context("cannot handle signals")?;
    }
    let exe = std::env::current_exe().context("cannot find the shoal executable")?;
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    for &n in &a.agents {
        if n == 0 {
            bail!("--agents sizes must be at least 1");
        }
        let (mut ready, mut init, mut total, mut floor) = (vec![], vec![], vec![], vec![]);
        let mut spawner_cpu = vec![];
        let mut idle = None;
        for r in 0..a.repeat {
            interrupted()?;
            floor.push(trivial_processes(n)?);
            interrupted()?;
            let last = r + 1 == a.repeat;
            let m = start_agents(&exe, n, &a, last)?;
            ready.push(m.ready_ms);
            spawner_cpu.push(m.spawner_cpu_ms);
            init.push(m.init_ms);
            total.push(m.init_ms + m.ready_ms);
            if last {
                idle = m.idle;
            }
        }
        for v in [
            &mut ready,
            &mut init,
            &mut total,
            &mut floor,
            &mut spawner_cpu,
        ] {
            v.sort_by(f64::total_cmp);
        }
        let (total50, floor50) = (percentile(&total, 0.5), percentile(&floor, 0.5));
        let idle = idle.unwrap_or_default();
        if a.json {
            let v = serde_json::json!({
                "agents": n,
                "repeats": a.repeat,
                "total_ms_p50": round2(total50),
                "init_ms_p50": round2(percentile(&init, 0.5)),
                "ready_ms_p50": round2(percentile(&ready, 0.5)),
                "spawner_cpu_ms_p50": round2(percentile(&spawner_cpu, 0.5)),
                "floor_ms_p50": round2(floor50),
                "ratio_to_floor": round2(total50 / floor50),
                "pss_kib_per_agent": round2(idle.pss_kib),
                "idle_cpu_pct": round2(idle.agents_cpu_pct * 1000.0) / 1000.0,
                "spawner_idle_cpu_pct": round2(idle.spawner_cpu_pct * 1000.0) / 1000.0,
                "idle_window_s": a.idle.as_secs_f64(),
            });
            super::out(&format!("{v}\n"))?;
        } else {
            super::out(&format!(
                "{n:>5} agents: ready in {total50:7.1} ms (inboxes {:.1} + processes {:.1}; spawner CPU {:.1})  | floor {floor50:7.1} ms ({:.2}x)  | idle: {:.0} KiB PSS/agent, agents {:.3}% of a core, spawner {:.3}%\n",
                percentile(&init, 0.5),
                percentile(&ready, 0.5),
                percentile(&spawner_cpu, 0.5),
                total50 / floor50,
                idle.pss_kib,
                idle.agents_cpu_pct,
                idle.spawner_cpu_pct,
            ))?;
        }
    }
    Ok(Exit::Ok)
}

/// Fork and exec `n` copies of `true` (by its full path: no PATH search), then reap them:
/// milliseconds.
fn trivial_processes(n: usize) -> anyhow::Result<f64> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let prog = std::env::split_paths(&path)
        .map(|d| d.join("true"))
        .find(|p| p.is_file())
        .context("no `true` on PATH")?;
    let t0 = Instant::now();
    let mut kids = Vec::with_capacity(n);
    for _ in 0..n {
        kids.push(
            Command::new(&prog)
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start `true`")?,
        );
    }
    for mut k in kids {
        k.wait()?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Idle {
    pss_kib: f64,
    agents_cpu_pct: f64,
    spawner_cpu_pct: f64,
}

struct Started {
    init_ms: f64,
    ready_ms: f64,
    /// CPU the spawner used until all were ready.
    spawner_cpu_ms: f64,
    idle: Option<Idle>,
}

/// What `shoal spawn -n N -- shoal recv --wait` does, timed: inboxes, then processes until all
/// are asleep on their inboxes. With `watch_idle`, then measure the idle agents.
fn start_agents(
    exe: &Path,
    n: usize,
    a: &SpawnBenchArgs,
    watch_idle: bool,
) -> anyhow::Result<Started> {
    let dir = scratch(&format!("spawn-{n}"))?;
    let t0 = Instant::now();
    let bus = Bus::create(&dir.0.join("root"))?;
    let specs = super::spawn::plan(&bus, n, None, "agent-")?;
    let init_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut governor = Governor::from_env().map_err(anyhow::Error::msg)?;
    if let Some(w) = a.max_wip {
        governor.max_wip = w;
    }
    let opts = SpawnOptions {
        command: vec![exe.into(), "recv".into(), "--wait".into()],
        restart: Restart::Never,
        governor,
        grace: Duration::from_secs(2),
        stall_after: Duration::from_secs(60),
        ready_timeout: Duration::from_secs(60),
        max_restarts: None,
        log_dir: None,
        shoal_exe: exe.to_owned(),
    };
    let cpu0 = shoal::sys::cpu_time();
    let mut sp = Spawner::new(bus, specs, opts)?;
    let ready = loop {
        if STOP.load(Ordering::Relaxed) {
            break None;
        }
        sp.step(Duration::from_millis(1))?;
        if let Some(d) = sp.all_ready_after() {
            break Some(d);
        }
        if sp.stopping() || sp.elapsed() > Duration::from_secs(120) {
            break None;
        }
    };
    let spawner_cpu_ms = (shoal::sys::cpu_time() - cpu0).as_secs_f64() * 1000.0;
    let idle = match ready {
        Some(_) if watch_idle => Some(measure_idle(&mut sp, a.idle)?),
        _ => None,
    };
    sp.stop();
    while !sp.step(Duration::from_millis(50))? {}
    let Some(ready) = ready else {
        interrupted()?;
        bail!("{n} agents were not all ready within 120 s");
    };
    Ok(Started {
        init_ms,
        ready_ms: ready.as_secs_f64() * 1000.0,
        spawner_cpu_ms,
        idle,
    })
}

/// Average PSS of the agents, and CPU used by them and by the spawner over `window`.
fn measure_idle(sp: &mut Spawner, window: Duration) -> anyhow::Result<Idle> {
    // Let the last starters finish their first wait.
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        sp.step(Duration::from_millis(50))?;
    }
    let pids: Vec<u32> = sp.processes().into_iter().map(|(_, p)| p).collect();
    let cpu_before: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    let me_before = shoal::sys::cpu_time();
    let t0 = Instant::now();
    while t0.elapsed() < window && !STOP.load(Ordering::Relaxed) {
        sp.step(Duration::from_millis(100))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_after: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    let me = (shoal::sys::cpu_time() - me_before).as_secs_f64();
    let pss: Vec<u64> = pids.iter().filter_map(|&p| pss_kib(p)).collect();
    Ok(Idle {
        pss_kib: pss.iter().sum::<u64>() as f64 / pss.len().max(1) as f64,
        agents_cpu_pct: 100.0 * cpu_after.saturating_sub(cpu_before) as f64 / 1e9 / secs,
        spawner_cpu_pct: 100.0 * me / secs,
    })
}

/// CPU time a process has used (ns), from /proc/<pid>/schedstat.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Proportional set size of a process (KiB), from /proc/<pid>/smaps_rollup.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
