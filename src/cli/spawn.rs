//! `shoal spawn`, `shoal ps`, `shoal heartbeat` (and the spawner's hidden guardian).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use shoal::AgentId;
use shoal::agents::governor::Governor;
use shoal::agents::ps;
use shoal::agents::spawner::{AgentSpec, Counts, Restart, SpawnOptions, Spawner};
use shoal::coord::topology::Topology;

use super::{Ctx, Exit, parse_duration};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum RestartArg {
    /// An agent that ends stays ended.
    Never,
    /// Restart agents that fail (non-zero status, or a signal not sent by the spawner).
    OnFailure,
}

#[derive(Debug, Args)]
pub(crate) struct SpawnArgs {
    /// Number of agents.
    #[arg(short = 'n', long = "agents", value_name = "N")]
    agents: usize,
    /// Agents per team: plan a hybrid topology and run a hub per team.
    #[arg(long, value_name = "K")]
    team_size: Option<usize>,
    /// Agent ids are <prefix><number>.
    #[arg(long, value_name = "P", default_value = "agent-")]
    id_prefix: String,
    /// Restart policy.
    #[arg(long, value_enum, default_value = "never")]
    restart: RestartArg,
    /// Most restarts per agent (default: no limit; the backoff grows to its maximum).
    #[arg(long, value_name = "N")]
    max_restarts: Option<u32>,
    /// Most agents starting at once [default: AF_MAX_WIP, else 64].
    #[arg(long, value_name = "N")]
    max_wip: Option<usize>,
    /// Keep this % of CPU idle while starting agents; 0 = off
    /// [default: AF_CPU_HEADROOM_TARGET, else 0].
    #[arg(long, value_name = "PCT")]
    cpu_headroom: Option<f64>,
    /// Agents started between two governor checks [default: AF_BATCH_SIZE, else 32].
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Time from SIGTERM to SIGKILL when stopping.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    grace: Duration,
    /// An agent with messages waiting and no activity for this long is stalled.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    stall_after: Duration,
    /// An agent counts as started once it touches the bus or blocks (waits for anything), or
    /// after this long: until then it counts against --max-wip.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// Write each agent's stdout and stderr to DIR/<id>.log (default: inherited).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress bar or live line, even on a terminal.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// The agents' program and its arguments (each agent gets SHOAL_ROOT, SHOAL_AGENT_ID,
    /// SHOAL_TEAM, SHOAL_HUB and SHOAL_RESTARTS in its environment).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub(crate) struct PsArgs {
    /// One JSON array of objects.
    #[arg(long)]
    json: bool,
    /// Stall threshold (default: the spawner's, else 60s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    stall_after: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct HeartbeatArgs {
    /// The agent that is alive and working (default: SHOAL_AGENT_ID).
    #[arg(env = "SHOAL_AGENT_ID")]
    id: String,
}

#[derive(Debug, Args)]
pub(crate) struct GuardArgs {
    /// Time from SIGTERM to SIGKILL.
    #[arg(long, value_name = "MS")]
    grace_ms: u64,
    /// The spawner: its agents are found by their SHOAL_SPAWNER_PID too.
    #[arg(long, value_name = "PID")]
    spawner_pid: Option<u32>,
}

/// The signal that asked us to stop (0: none).
static STOP_SIGNAL: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn spawn(ctx: &Ctx, a: SpawnArgs) -> anyhow::Result<Exit> {
    if a.agents == 0 {
        bail!("-n must be at least 1");
    }
    let mut governor = Governor::from_env().map_err(anyhow::Error::msg)?;
    if let Some(v) = a.max_wip {
        governor.max_wip = v;
    }
    if let Some(v) = a.cpu_headroom {
        governor.cpu_headroom = v;
    }
    if let Some(v) = a.batch {
        governor.batch = v;
    }
    governor.check().map_err(anyhow::Error::msg)?;
    let bus = ctx.bus(true)?;
    let specs = plan(&bus, a.agents, a.team_size, &a.id_prefix)?;
    let hubs = specs.iter().filter(|s| s.runs_hub.is_some()).count();
    let opts = SpawnOptions {
        command: a.command,
        restart: match a.restart {
            RestartArg::Never => Restart::Never,
            RestartArg::OnFailure => Restart::OnFailure,
        },
        governor,
        grace: a.grace,
        stall_after: a.stall_after,
        ready_timeout: a.ready_timeout,
        max_restarts: a.max_restarts,
        log_dir: a.log_dir,
        shoal_exe: std::env::current_exe().context("cannot find the shoal executable")?,
    };
    let incidents = bus.root().layout().incidents();
    let mut sp = Spawner::new(bus, specs, opts)?;
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register_usize(sig, Arc::clone(&stop), sig as usize)
            .context("cannot install a signal handler")?;
    }
    let mut ui = Progress::new(a.agents, !a.quiet && std::io::stderr().is_terminal());
    let mut fatal = None;
    let mut seen_signal = 0;
    loop {
        match sp.step(Duration::from_millis(100)) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => fatal = fatal.or(Some(e)),
        }
        let sig = stop.swap(0, Ordering::Relaxed);
        if sig != 0 {
            if seen_signal == 0 {
                seen_signal = sig;
                STOP_SIGNAL.store(sig, Ordering::Relaxed);
                ui.note(&format!(
                    "stopping: SIGTERM sent to every agent, SIGKILL after {} (signal again to kill now)",
                    humantime(a.grace)
                ));
                sp.stop();
            } else {
                ui.note("killing now");
                sp.kill_now();
            }
        }
        ui.update(&sp);
    }
    ui.finish();
    let c = sp.counts();
    let codes = sp.exit_codes();
    let ready = sp.all_ready_after();
    let elapsed = sp.elapsed();
    drop(sp);
    if let Some(e) = fatal {
        return Err(e.into());
    }
    print_summary(
        a.json,
        &c,
        hubs,
        &codes,
        ready,
        elapsed,
        seen_signal,
        &incidents,
    )?;
    Ok(match seen_signal {
        s if s == signal_hook::consts::SIGINT as usize => Exit::Interrupted,
        s if s == signal_hook::consts::SIGTERM as usize => Exit::Terminated,
        s if s == signal_hook::consts::SIGHUP as usize => Exit::Hangup,
        _ if c.crashed + c.failed > 0 || codes.iter().any(|(code, _)| *code != Some(0)) => {
            Exit::Failure
        }
        _ => Exit::Ok,
    })
}

/// Agents (and hubs) to run: with `team_size`, a freshly planned hybrid topology; without, the
/// root's topology if it already places these agents in teams, else flat. Creates every inbox.
pub(crate) fn plan(
    bus: &shoal::Bus,
    n: usize,
    team_size: Option<usize>,
    prefix: &str,
) -> anyhow::Result<Vec<AgentSpec>> {
    let layout = bus.root().layout().clone();
    let (planned, ids) = Topology::plan(n, team_size, None, prefix)?;
    let topo = if team_size.is_some() {
        let t = planned.clone();
        Topology::update(&layout, move |cur| {
            *cur = t;
            Ok(())
        })?;
        planned
    } else {
        match Topology::load(&layout)? {
            Some(t) if t.is_hybrid() && ids.iter().all(|id| t.team_of(id).is_some()) => t,
            _ => Topology::flat(),
        }
    };
    let mut specs = Vec::with_capacity(ids.len() + topo.teams.len());
    for team in &topo.teams {
        specs.push(AgentSpec {
            id: team.hub.clone(),
            team: Some(team.name.to_string()),
            hub: None,
            runs_hub: Some(team.name.to_string()),
        });
    }
    for id in ids {
        let team = topo.team_of(&id);
        specs.push(AgentSpec {
            team: team.map(|t| t.name.to_string()),
            hub: team.map(|t| t.hub.clone()),
            id,
            runs_hub: None,
        });
    }
    // Creating an inbox is a few dozen file operations: spread them over the CPUs.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = specs.len().div_ceil(threads).max(1);
    let create = |part: &[AgentSpec]| -> anyhow::Result<()> {
        for s in part {
            bus.init(&s.id)
                .with_context(|| format!("cannot create agent {}", s.id))?;
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let mut jobs = Vec::new();
        for part in specs.chunks(chunk) {
            // Under a tight process limit (RLIMIT_NPROC counts threads) a thread may not
            // start: that part is done here instead.
            match std::thread::Builder::new().spawn_scoped(scope, move || create(part)) {
                Ok(j) => jobs.push(j),
                Err(_) => create(part)?,
            }
        }
        jobs.into_iter().try_for_each(|j| {
            j.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("inbox creation panicked")))
        })
    })?;
    Ok(specs)
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    json: bool,
    c: &Counts,
    hubs: usize,
    codes: &[(Option<i32>, usize)],
    ready: Option<Duration>,
    elapsed: Duration,
    signal: usize,
    incidents: &std::path::Path,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let stopped_by = match signal {
        0 => None,
        s => Some(
            nix::sys::signal::Signal::try_from(s as i32)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| s.to_string()),
        ),
    };
    if json {
        let codes_obj: serde_json::Map<String, serde_json::Value> = codes
            .iter()
            .map(|(code, n)| {
                (
                    code.map_or_else(|| "signal".to_owned(), |c| c.to_string()),
                    (*n).into(),
                )
            })
            .collect();
        let v = serde_json::json!({
            "agents": c.agents,
            "hubs": hubs,
            "ready_ms": ready.map(|d| d.as_secs_f64() * 1000.0),
            "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
            "exited": c.exited,
            "crashed": c.crashed,
            "failed": c.failed,
            "restarts": c.restarts,
            "crashes": c.crashes,
            "exit_codes": codes_obj,
            "stopped_by": stopped_by,
            "incidents": incidents.display().to_string(),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let hubs_s = if hubs > 0 {
        format!(" and {hubs} hubs")
    } else {
        String::new()
    };
    let ready_s = ready.map_or_else(
        || "not all ready".to_owned(),
        |d| format!("all ready in {}", humantime(d)),
    );
    writeln!(
        out,
        "{} agents{hubs_s}: {ready_s}; ran {}{}",
        c.agents,
        humantime(elapsed),
        stopped_by.map_or_else(String::new, |s| format!("; stopped by {s}"))
    )?;
    let codes_s: Vec<String> = codes
        .iter()
        .map(|(code, n)| match code {
            Some(c) => format!("status {c}: {n}"),
            None => format!("killed by a signal: {n}"),
        })
        .collect();
    writeln!(
        out,
        "ended: {} exited, {} crashed, {} failed ({}); {} restarts, {} crashes",
        c.exited,
        c.crashed,
        c.failed,
        if codes_s.is_empty() {
            "none ran".to_owned()
        } else {
            codes_s.join(", ")
        },
        c.restarts,
        c.crashes
    )?;
    writeln!(out, "incidents: {}", incidents.display())?;
    Ok(())
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The progress bar while agents start, then a live status line; nothing off a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: bool,
    last: Instant,
}

impl Progress {
    fn new(n: usize, on: bool) -> Progress {
        let bar = on.then(|| {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(n as u64),
                indicatif::ProgressDrawTarget::stderr_with_hz(10),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "starting {bar:30} {pos}/{len} ready {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            started: false,
            last: Instant::now(),
        }
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("shoal: {msg}"),
        }
    }

    fn update(&mut self, sp: &Spawner) {
        let Some(b) = &self.bar else {
            return;
        };
        if self.last.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last = Instant::now();
        let c = sp.counts();
        if !self.started && (c.ready == c.agents || sp.stopping()) {
            self.started = true;
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        }
        if self.started {
            b.set_message(format!(
                "{} running, {} stalled, {} restarting, {} exited, {} crashed, {} failed; {} restarts; {}",
                c.running,
                c.stalled,
                c.backoff,
                c.exited,
                c.crashed,
                c.failed,
                c.restarts,
                humantime(sp.elapsed())
            ));
        } else {
            b.set_position(c.ready as u64);
            b.set_message(format!("({} starting)", c.starting));
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub(crate) fn ps(ctx: &Ctx, a: PsArgs) -> anyhow::Result<Exit> {
    let bus = ctx.bus(false)?;
    let rows = ps::list(&bus, a.stall_after)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&rows)?)?;
        return Ok(Exit::Ok);
    }
    let w = rows.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
    writeln!(
        out,
        "{:w$}  {:10}  {:>7}  {:>8}  {:>6}  {:>8}  TEAM",
        "ID", "STATE", "PID", "RESTARTS", "INBOX", "IDLE"
    )?;
    for r in &rows {
        let pid = r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let idle = r
            .idle_ms
            .map_or_else(|| "-".to_owned(), |ms| humantime(Duration::from_millis(ms)));
        writeln!(
            out,
            "{:w$}  {:10}  {:>7}  {:>8}  {:>6}  {:>8}  {}{}",
            r.id,
            r.state,
            pid,
            r.restarts,
            r.inbox_depth,
            idle,
            r.team.as_deref().unwrap_or("-"),
            if r.hub { " (hub)" } else { "" }
        )?;
    }
    Ok(Exit::Ok)
}

pub(crate) fn heartbeat(ctx: &Ctx, a: HeartbeatArgs) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let bus = ctx.bus(false)?;
    bus.heartbeat(&id)?;
    Ok(Exit::Ok)
}

pub(crate) fn guard(a: GuardArgs) -> anyhow::Result<Exit> {
    shoal::agents::spawner::guard(
        std::io::stdin().lock(),
        Duration::from_millis(a.grace_ms),
        a.spawner_pid,
    )?;
    Ok(Exit::Ok)
}
