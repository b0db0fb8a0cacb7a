//! `shoal bench round`: coordination rounds with real agent processes, flat and hybrid, each
//! against the floor measured in the same run.
//!
//! The floor is a bare round of the same size with no shoal code: the coordinator appends one
//! line to each receiver's file under flock and rings its futex bell (one shared table), each
//! receiver process wakes, reads its file, appends a reply line to one of 16 reply files and
//! rings the coordinator's bell; the coordinator waits until every reply is there. The floor's
//! processes and those of every topology measured are all running at once, and their rounds
//! take turns (floor, then the topologies in a rotating order), so all of them see the same
//! machine.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use shoal::coord::Mesh;
use shoal::coord::topology::Topology;
use shoal::envelope::Payload;
use shoal::sys::futex;
use shoal::sys::shared::SharedWords;
use shoal::{AgentId, Bus};

use super::{Children, Ctx, Exit, parse_duration};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCmd {
    /// Coordination rounds with real agent processes, flat and hybrid, against the floor.
    Round(RoundArgs),
    /// Starting 500 and 1000 agents with `shoal spawn` against spawning as many trivial
    /// processes; memory and CPU of idle waiting agents.
    Spawn(super::bench_spawn::SpawnBenchArgs),
    /// One receiver of the floor measurement (started by `bench round`).
    #[command(hide = true)]
    FloorAgent(FloorAgentArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RoundArgs {
    /// Numbers of agents, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,708,1000")]
    agents: Vec<usize>,
    /// Topologies, comma-separated: flat, hybrid.
    #[arg(long, value_delimiter = ',', default_value = "flat,hybrid")]
    topology: Vec<String>,
    /// Timed rounds per size and topology (after one warm-up round).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Agents per team in the hybrid topology.
    #[arg(long, default_value_t = 100)]
    team_size: usize,
    /// Give up on a round after this long.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// One JSON object per size and topology.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct FloorAgentArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    index: usize,
    #[arg(long)]
    agents: usize,
}

pub(crate) fn run(ctx: &Ctx, cmd: BenchCmd) -> anyhow::Result<Exit> {
    match cmd {
        BenchCmd::Round(a) => round(ctx, a),
        BenchCmd::Spawn(a) => super::bench_spawn::run(a),
        BenchCmd::FloorAgent(a) => floor_agent(&a),
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Set by SIGINT or SIGTERM: the benchmark stops after the current round and cleans up.
pub(crate) static STOP: std::sync::LazyLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

pub(crate) fn interrupted() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn round(_ctx: &Ctx, a: RoundArgs) -> anyhow::Result<Exit> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&STOP))
            .context("cannot handle signals")?;
    }
    let exe = std::env::current_exe().context("cannot find the shoal executable")?;
    for (i, t) in a.topology.iter().enumerate() {
        if t != "flat" && t != "hybrid" {
            bail!("unknown topology {t:?} (flat or hybrid)");
        }
        // Each topology's agents run in a scratch root named after it, all at once.
        if a.topology[..i].contains(t) {
            bail!("topology {t:?} is listed twice");
        }
    }
    for &n in &a.agents {
        if n == 0 {
            bail!("--agents sizes must be at least 1");
        }
    }
    for &n in &a.agents {
        let mut floor = Floor::start(&exe, n)?;
        // Every topology's agents run at once and their rounds take turns with the floor's
        // (in a rotating order), so that topologies are compared under the same conditions
        // as each is with the floor: this machine's speed drifts by tens of percent within
        // minutes, more than the differences measured.
        let mut pops = Vec::with_capacity(a.topology.len());
        for topo in &a.topology {
            pops.push(Population::start(&exe, n, topo == "hybrid", &a)?);
        }
        let mut floor_times = Vec::with_capacity(a.rounds);
        let mut floor_cpu = Duration::ZERO;
        let floor0 = children_cpu(&floor.children.0);
        for p in &mut pops {
            p.begin();
        }
        for r in 0..a.rounds {
            interrupted()?;
            let c0 = shoal::sys::cpu_time();
            floor_times.push(floor.round()?);
            floor_cpu += shoal::sys::cpu_time() - c0;
            let k = pops.len();
            for i in 0..k {
                pops[(r + i) % k].round(a.timeout)?;
            }
        }
        let floor_agents_cpu_ms = per_round(floor0, children_cpu(&floor.children.0), a.rounds);
        let floor_cpu_ms = ms_per_round(floor_cpu, a.rounds);
        floor_times.sort_by(f64::total_cmp);
        let floor_p50 = percentile(&floor_times, 0.5);
        let results: Vec<Rounds> = pops
            .into_iter()
            .map(|p| p.finish(a.rounds))
            .collect::<anyhow::Result<_>>()?;
        let flat_p50 = results
            .iter()
            .find(|r| !r.hybrid)
            .map(|r| percentile(&r.times, 0.5));
        for r in &results {
            let topo = if r.hybrid { "hybrid" } else { "flat" };
            let (p50, p95) = (percentile(&r.times, 0.5), percentile(&r.times, 0.95));
            // Hybrid against flat, when both ran.
            let vs_flat = flat_p50.filter(|_| r.hybrid).map(|f| p50 / f);
            if a.json {
                let v = serde_json::json!({
                    "agents": n,
                    "topology": topo,
                    "rounds": r.times.len(),
                    "p50_ms": round2(p50),
                    "p95_ms": round2(p95),
                    "delivered_pct": round2(r.delivered_pct),
                    "coordinator_cpu_ms": round2(r.cpu_ms),
                    "coordinator_messages": r.messages,
                    "floor_p50_ms": round2(floor_p50),
                    "floor_coordinator_cpu_ms": round2(floor_cpu_ms),
                    "ratio_to_floor": round2(p50 / floor_p50),
                    "p50_vs_flat": vs_flat.map(round2),
                    "agents_cpu_ms": r.agents_cpu_ms.map(round2),
                    "floor_agents_cpu_ms": floor_agents_cpu_ms.map(round2),
                    "hubs_cpu_ms": r.hubs_cpu_ms.map(round2),
                });
                super::out(&format!("{v}\n"))?;
            } else {
                super::out(&format!(
                    "{n:>5} agents {topo:<6}: p50 {p50:7.2} ms  p95 {p95:7.2} ms  delivered {:6.2}%  coordinator {:6.2} ms CPU, {} messages/round  | floor p50 {floor_p50:6.2} ms  ({:.2}x){}, coordinator {floor_cpu_ms:.2} ms CPU{}{}\n",
                    r.delivered_pct,
                    r.cpu_ms,
                    r.messages,
                    p50 / floor_p50,
                    vs_flat.map_or(String::new(), |x| format!(" ({x:.2}x flat)")),
                    match (r.agents_cpu_ms, floor_agents_cpu_ms) {
                        (Some(s), Some(f)) => format!(
                            "  | agents {s:.2} ms CPU/round, floor's {f:.2} ({:.2}x)",
                            s / f
                        ),
                        _ => String::new(),
                    },
                    match r.hubs_cpu_ms {
                        Some(h) if r.hybrid => format!(", of it hubs {h:.2}"),
                        _ => String::new(),
                    }
                ))?;
            }
        }
        floor.stop();
    }
    Ok(Exit::Ok)
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

struct Rounds {
    hybrid: bool,
    /// Round times in milliseconds, sorted.
    times: Vec<f64>,
    delivered_pct: f64,
    cpu_ms: f64,
    messages: usize,
    /// CPU of shoal's agent processes (echo agents and hubs) per round.
    agents_cpu_ms: Option<f64>,
    /// Of `agents_cpu_ms`, the hubs' (zero in a flat topology).
    hubs_cpu_ms: Option<f64>,
}

/// `d` spread over `rounds`, in milliseconds.
fn ms_per_round(d: Duration, rounds: usize) -> f64 {
    d.as_secs_f64() * 1000.0 / rounds.max(1) as f64
}

/// CPU per round between two readings, in milliseconds.
fn per_round(c0: Option<Duration>, c1: Option<Duration>, rounds: usize) -> Option<f64> {
    Some(ms_per_round(c1? - c0?, rounds))
}

/// One topology's agents for one size: `n` echo agents (and hubs) in a root of their own and
/// a coordinator gathering from them, kept running while the other topology and the floor
/// take their turns.
struct Population {
    hybrid: bool,
    mesh: Mesh,
    coord: AgentId,
    payload: Payload,
    waiter: Option<shoal::wake::Waiter>,
    /// Hubs first. Declared before the directory, so they are gone when it is removed.
    children: Children,
    hubs: usize,
    _dir: Scratch,
    times: Vec<f64>,
    replied: usize,
    expected: usize,
    cpu: Duration,
    messages: usize,
    /// The agents' and hubs' CPU when the timed rounds began.
    cpu0: (Option<Duration>, Option<Duration>),
}

impl Population {
    /// Start the agents and wait until a round is complete.
    fn start(exe: &Path, n: usize, hybrid: bool, a: &RoundArgs) -> anyhow::Result<Population> {
        let dir = scratch(&format!(
            "round-{n}-{}",
            if hybrid { "hybrid" } else { "flat" }
        ))?;
        let root = dir.0.join("root");
        let bus = Bus::create(&root)?;
        let coord = AgentId::new("coord")?;
        bus.init(&coord)?;
        let (topo, ids) = Topology::plan(n, hybrid.then_some(a.team_size), None, "agent-")?;
        for id in ids.iter().chain(topo.hubs()) {
            bus.init(id)?;
        }
        topo.save(bus.root().layout())?;
        let mesh = Mesh::open(bus.clone())?;
        let mut children = Children(Vec::new());
        let spawn = |args: &[&str]| -> anyhow::Result<Child> {
            let mut cmd = Command::new(exe);
            Children::bind(&mut cmd);
            cmd.arg("--root")
                .arg(&root)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start an agent process")
        };
        for t in &topo.teams {
            children.0.push(spawn(&["hub", t.name.as_str()])?);
        }
        for id in &ids {
            children.0.push(spawn(&["echo", id.as_str()])?);
        }
        let mut p = Population {
            hybrid,
            mesh,
            coord,
            payload: Payload::parse(r#"{"task":"ping"}"#, 1 << 20)?,
            waiter: None,
            children,
            hubs: topo.teams.len(),
            _dir: dir,
            times: Vec::with_capacity(a.rounds),
            replied: 0,
            expected: 0,
            cpu: Duration::ZERO,
            messages: 0,
            cpu0: (None, None),
        };
        // Warm-up: the agents are starting; wait until a round is complete.
        let start = Instant::now();
        loop {
            let r = p.gather(Duration::from_secs(10))?;
            if r.complete() {
                break;
            }
            interrupted()?;
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{n} agents: {} still missing after 120 s of warm-up",
                    r.missing.len()
                );
            }
        }
        Ok(p)
    }

    /// The timed rounds begin: agents only work in their own rounds, so what they run from
    /// here on is per round.
    fn begin(&mut self) {
        self.cpu0 = (
            children_cpu(&self.children.0),
            children_cpu(&self.children.0[..self.hubs]),
        );
    }

    /// One round, untimed.
    fn gather(&mut self, timeout: Duration) -> anyhow::Result<shoal::coord::RoundReport> {
        let r = self.mesh.gather_with(
            &self.coord,
            "ping",
            &self.payload,
            None,
            timeout,
            &mut self.waiter,
        )?;
        Ok(r)
    }

    /// One timed round.
    fn round(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let c0 = shoal::sys::cpu_time();
        let r = self.gather(timeout)?;
        self.cpu += shoal::sys::cpu_time() - c0;
        self.times.push(r.elapsed.as_secs_f64() * 1000.0);
        self.replied += r.replies.len();
        self.expected += r.expected.len();
        self.messages = self.messages.max(r.messages);
        Ok(())
    }

    /// Stop the agents; the figures of the timed rounds.
    fn finish(mut self, rounds: usize) -> anyhow::Result<Rounds> {
        let agents_cpu_ms = per_round(self.cpu0.0, children_cpu(&self.children.0), rounds);
        let hubs_cpu_ms = per_round(
            self.cpu0.1,
            children_cpu(&self.children.0[..self.hubs]),
            rounds,
        );
        self.mesh.broadcast(
            &self.coord,
            "shutdown",
            &Payload::parse("{}", 64)?,
            None,
            None,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        for c in self.children.0.iter_mut().skip(self.hubs) {
            while c.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.times.sort_by(f64::total_cmp);
        Ok(Rounds {
            hybrid: self.hybrid,
            times: std::mem::take(&mut self.times),
            delivered_pct: if self.expected == 0 {
                100.0
            } else {
                100.0 * self.replied as f64 / self.expected as f64
            },
            cpu_ms: ms_per_round(self.cpu, rounds),
            messages: self.messages,
            agents_cpu_ms,
            hubs_cpu_ms,
        })
    }
}

/// CPU time all of `children` have run so far (`None` where `/proc` does not say).
fn children_cpu(children: &[Child]) -> Option<Duration> {
    children
        .iter()
        .map(|c| shoal::sys::process_cpu_time(c.id()))
        .sum()
}

/// A scratch directory on tmpfs, removed on drop.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn scratch(tag: &str) -> anyhow::Result<Scratch> {
    let p = PathBuf::from(format!("/dev/shm/shoal-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(Scratch(p))
}

const BELL_STRIDE: usize = 64;
const REPLY_SHARDS: usize = 16;

fn open_append(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(p)
}

/// The floor's receivers and files for one size, kept running while shoal is measured so that
/// floor and shoal rounds alternate under the same conditions.
struct Floor {
    _dir: Scratch,
    n: usize,
    bells: SharedWords,
    reqs: Vec<File>,
    reps: Vec<File>,
    offsets: [u64; REPLY_SHARDS],
    buf: Vec<u8>,
    children: Children,
}

impl Floor {
    fn start(exe: &Path, n: usize) -> anyhow::Result<Floor> {
        let dir = scratch(&format!("floor-{n}"))?;
        let bells_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.0.join("bells"))?;
        let len = (n + 1) * BELL_STRIDE;
        shoal::sys::grow(&bells_file, len as u64)?;
        let bells = SharedWords::map(&bells_file, len)?;
        let mut reqs = Vec::with_capacity(n);
        for i in 0..n {
            reqs.push(open_append(&dir.0.join(format!("req-{i}")))?);
        }
        let mut reps = Vec::with_capacity(REPLY_SHARDS);
        for s in 0..REPLY_SHARDS {
            reps.push(open_append(&dir.0.join(format!("rep-{s:02}")))?);
        }
        let mut children = Children(Vec::with_capacity(n));
        for i in 0..n {
            let mut cmd = Command::new(exe);
            Children::bind(&mut cmd);
            children.0.push(
                cmd.args(["bench", "floor-agent", "--dir"])
                    .arg(&dir.0)
                    .args(["--index", &i.to_string(), "--agents", &n.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("cannot start a floor agent")?,
            );
        }
        let ready = bells.u32_at(n * BELL_STRIDE + 4);
        let start = Instant::now();
        while (ready.load(Ordering::SeqCst) as usize) < n {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "floor: only {} of {n} receivers started",
                    ready.load(Ordering::SeqCst)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut f = Floor {
            _dir: dir,
            n,
            bells,
            reqs,
            reps,
            offsets: [0; REPLY_SHARDS],
            buf: Vec::new(),
            children,
        };
        f.round()?; // warm caches
        Ok(f)
    }

    /// One bare round; returns its time in milliseconds.
    fn round(&mut self) -> anyhow::Result<f64> {
        let n = self.n;
        let coord = self.bells.u32_at(n * BELL_STRIDE);
        let t0 = Instant::now();
        for (i, f) in self.reqs.iter().enumerate() {
            f.lock()?;
            (&*f).write_all(b"r\n")?;
            f.unlock()?;
            let bell = self.bells.u32_at(i * BELL_STRIDE);
            bell.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(bell);
        }
        let mut got = 0;
        while got < n {
            let seen = coord.load(Ordering::SeqCst);
            for (s, f) in self.reps.iter_mut().enumerate() {
                f.seek(SeekFrom::Start(self.offsets[s]))?;
                self.buf.clear();
                f.read_to_end(&mut self.buf)?;
                let complete = self
                    .buf
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                got += self.buf[..complete].iter().filter(|&&b| b == b'\n').count();
                self.offsets[s] += complete as u64;
            }
            if got < n {
                futex::wait(coord, seen, Some(Duration::from_secs(30)))?;
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("floor: only {got} of {n} replies after 60 s");
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64() * 1000.0)
    }

    fn stop(mut self) {
        for (i, f) in self.reqs.iter().enumerate() {
            let _ = (&*f).write_all(b"s\n");
            let bell = self.bells.u32_at(i * BELL_STRIDE);
            bell.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(bell);
        }
        for c in &mut self.children.0 {
            let _ = c.wait();
        }
        self.children.0.clear();
    }
}

/// One floor receiver: wait on its bell, answer each request line with a reply line.
fn floor_agent(a: &FloorAgentArgs) -> anyhow::Result<Exit> {
    let bells_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.dir.join("bells"))?;
    let bells = SharedWords::map(&bells_file, (a.agents + 1) * BELL_STRIDE)?;
    let bell = bells.u32_at(a.index * BELL_STRIDE);
    let coord = bells.u32_at(a.agents * BELL_STRIDE);
    let mut req = File::open(a.dir.join(format!("req-{}", a.index)))?;
    let rep = open_append(&a.dir.join(format!("rep-{:02}", a.index % REPLY_SHARDS)))?;
    let line = format!("{}\n", a.index);
    bells
        .u32_at(a.agents * BELL_STRIDE + 4)
        .fetch_add(1, Ordering::SeqCst);
    let mut buf = [0u8; 4096];
    loop {
        let seen = bell.load(Ordering::SeqCst);
        let k = req.read(&mut buf)?;
        if k == 0 {
            futex::wait(bell, seen, None)?;
            continue;
        }
        for &b in &buf[..k] {
            match b {
                b's' => return Ok(Exit::Ok),
                b'r' => {
                    rep.lock()?;
                    (&rep).write_all(line.as_bytes())?;
                    rep.unlock()?;
                    coord.fetch_add(1, Ordering::SeqCst);
                    futex::wake_all(coord);
                }
                _ => {}
            }
        }
    }
}
