//! The spawner: starts one process per agent, supervises them, restarts the ones that crash,
//! and never leaves a process behind.
//!
//! # Processes
//!
//! Each agent runs in a process group of its own (so a shell script's children are signalled
//! with it). Its liveness lock is taken by the spawner and handed to the child, so the agent is
//! alive exactly as long as its processes are. Every child dies with the spawner
//! (`PR_SET_PDEATHSIG`), and a small guardian process (`shoal spawn` starts it, it watches a
//! pipe from the spawner) kills what is left of the agents' process groups if the spawner is
//! killed outright. When an agent's main process ends, whatever it left in its group is killed
//! and it is reaped.
//!
//! # Pacing
//!
//! See [`crate::agents::governor`]: at most `max_wip` agents *starting* at once (started, and
//! neither active on the bus yet nor past the ready timeout), `batch` starts between two CPU
//! headroom checks, backoff after failed spawns and crashes.
//!
//! The spawner is driven by its owner: [`Spawner::step`] does one round of supervision and
//! waits a little (until a child exits, a signal arrives, or there is something to do), so a
//! command can draw progress between steps and a benchmark can stop when all are ready.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::agents::governor::{CpuSampler, Governor};
use crate::agents::incidents::{Incident, IncidentLog, Kind};
use crate::agents::status::{AgentStatus, SpawnerLock, SpawnerStatus};
use crate::bus::Bus;
use crate::envelope::AgentId;
use crate::liveness::{AliveLock, LivenessError};
use crate::store::now_ms;

/// Restart policy for agents (hubs are always restarted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// An agent that ends stays ended.
    Never,
    /// An agent that exits with a failure status, or is killed by a signal it was not sent by
    /// the spawner, is restarted after a backoff delay.
    OnFailure,
}

/// One process the spawner runs.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The agent's id.
    pub id: AgentId,
    /// Its team (`SHOAL_TEAM`).
    pub team: Option<String>,
    /// Its team's hub (`SHOAL_HUB`).
    pub hub: Option<AgentId>,
    /// `Some(team)`: this is the hub of `team`, run as `shoal hub <team>`.
    pub runs_hub: Option<String>,
}

/// How to spawn.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The agents' program and its arguments.
    pub command: Vec<OsString>,
    /// Restart policy.
    pub restart: Restart,
    /// Pacing.
    pub governor: Governor,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
    /// An agent with messages waiting and no activity for this long is stalled.
    pub stall_after: Duration,
    /// An agent counts as started after this long even if it has not touched the bus yet.
    pub ready_timeout: Duration,
    /// Restarts allowed per agent (`None`: no limit).
    pub max_restarts: Option<u32>,
    /// Write each agent's stdout and stderr to `<dir>/<id>.log` instead of inheriting them.
    pub log_dir: Option<PathBuf>,
    /// The shoal executable (runs hubs and the guardian).
    pub shoal_exe: PathBuf,
}

/// Why the spawner could not start or carry on.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Another spawner runs on this root.
    #[error("another `shoal spawn` is running on this root (it holds {0})")]
    Busy(PathBuf),
    /// The agents' command cannot be run at all (not found, not executable).
    #[error("cannot run {program:?}")]
    Command {
        /// The program.
        program: OsString,
        /// Why.
        source: io::Error,
    },
    /// Something around the spawner's own files or processes failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SpawnError {
    let what = what.into();
    move |source| SpawnError::Io { what, source }
}

/// Where an agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not started yet.
    Pending,
    /// Started, not yet active on the bus.
    Starting,
    /// Running.
    Running,
    /// Waiting to be restarted.
    Backoff,
    /// Sent SIGTERM, not yet gone.
    Stopping,
    /// Ended (successfully, or stopped by the spawner).
    Exited,
    /// Ended with a failure, not restarted.
    Crashed,
    /// Could not be started, or crashed more often than allowed.
    Failed,
}

impl State {
    /// The name in the status file and in `shoal ps`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Exited => "exited",
            State::Crashed => "crashed",
            State::Failed => "failed",
        }
    }

    fn has_process(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }

    fn is_final(self) -> bool {
        matches!(self, State::Exited | State::Crashed | State::Failed)
    }
}

#[derive(Debug)]
struct Slot {
    spec: AgentSpec,
    state: State,
    pid: Option<u32>,
    restarts: u32,
    crashes: u32,
    /// Consecutive failures (crashes, failed spawns), for the backoff.
    failures: u32,
    started_ms: u64,
    started_at: Instant,
    ready_once: bool,
    retry_at: Option<Instant>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    stalled: bool,
    killed: bool,
}

/// Counts for progress displays and summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Agents (hubs not included).
    pub agents: usize,
    /// Agents that have been ready at least once.
    pub ready: usize,
    /// Agents starting now.
    pub starting: usize,
    /// Agents running now (starting not included).
    pub running: usize,
    /// Agents running and stalled now.
    pub stalled: usize,
    /// Agents waiting to be restarted.
    pub backoff: usize,
    /// Agents that ended with status 0 (or were stopped).
    pub exited: usize,
    /// Agents that ended with a failure and stay ended.
    pub crashed: usize,
    /// Agents that could not be started or gave up.
    pub failed: usize,
    /// Restarts so far (hubs included).
    pub restarts: u32,
    /// Crashes so far (hubs included).
    pub crashes: u32,
}

/// Crashes after this much healthy running start the backoff again from its minimum.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Status file rewrites at most this often.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// How often starting processes are looked up in /proc (have they gone to sleep?).
const PROC_CHECK: Duration = Duration::from_millis(10);
/// CPU headroom is sampled over at least this long.
const CPU_WINDOW: Duration = Duration::from_millis(25);

/// A running spawner. See the module documentation.
#[derive(Debug)]
pub struct Spawner {
    bus: Bus,
    opts: SpawnOptions,
    slots: Vec<Slot>,
    /// Each agent's meta table, mapped without keeping a descriptor: watching N agents must not
    /// cost N descriptors (running out of them is what the spawn backoff is for).
    probes: Vec<Option<crate::store::Probe>>,
    by_pid: HashMap<u32, usize>,
    queue: std::collections::VecDeque<usize>,
    incidents: IncidentLog,
    metrics: crate::obs::metrics::Emitter,
    _lock: SpawnerLock,
    guard: Guardian,
    wake_rx: UnixStream,
    cpu: CpuSampler,
    cpu_sampled_at: Instant,
    cpu_low: bool,
    since_check: usize,
    pause_until: Option<Instant>,
    started_at: Instant,
    started_ms: u64,
    all_ready: Option<Duration>,
    stop_deadline: Option<Instant>,
    next_stall_check: Instant,
    next_proc_check: Instant,
    status_dirty: bool,
    status_written: Option<Instant>,
    counts_cache: Counts,
}

impl Spawner {
    /// Take the root's spawner lock, start the guardian, and get ready to start `agents`
    /// (whose inboxes must exist). Nothing is started until [`Spawner::step`].
    ///
    /// # Errors
    /// [`SpawnError::Busy`] if another spawner runs on the root; [`SpawnError::Io`].
    pub fn new(
        bus: Bus,
        agents: Vec<AgentSpec>,
        opts: SpawnOptions,
    ) -> Result<Spawner, SpawnError> {
        let layout = bus.root().layout().clone();
        let lock = SpawnerLock::acquire(&layout).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                SpawnError::Busy(layout.spawner_lock())
            } else {
                io_err("cannot take the spawner lock")(e)
            }
        })?;
        let incidents = IncidentLog::open(&layout.incidents()).map_err(io_err(format!(
            "cannot open {}",
            layout.incidents().display()
        )))?;
        if let Some(dir) = &opts.log_dir {
            std::fs::create_dir_all(dir)
                .map_err(io_err(format!("cannot create {}", dir.display())))?;
        }
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_err("cannot make a pipe"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_err("cannot make a pipe"))?;
        for sig in [
            signal_hook::consts::SIGCHLD,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            let tx = wake_tx.try_clone().map_err(io_err("cannot make a pipe"))?;
            signal_hook::low_level::pipe::register(sig, tx)
                .map_err(io_err("cannot install a signal handler"))?;
        }
        let guard = Guardian::start(&opts.shoal_exe, opts.grace)?;
        let now = Instant::now();
        let slots: Vec<Slot> = agents
            .into_iter()
            .map(|spec| Slot {
                spec,
                state: State::Pending,
                pid: None,
                restarts: 0,
                crashes: 0,
                failures: 0,
                started_ms: 0,
                started_at: now,
                ready_once: false,
                retry_at: None,
                exit_code: None,
                signal: None,
                stalled: false,
                killed: false,
            })
            .collect();
        // Hubs first: agents' first messages may need them.
        let mut queue: std::collections::VecDeque<usize> = (0..slots.len())
            .filter(|&i| slots[i].spec.runs_hub.is_some())
            .collect();
        queue.extend((0..slots.len()).filter(|&i| slots[i].spec.runs_hub.is_none()));
        let mut sp = Spawner {
            bus,
            probes: slots.iter().map(|_| None).collect(),
            slots,
            by_pid: HashMap::new(),
            queue,
            incidents,
            metrics: crate::obs::metrics::Emitter::new(
                &layout,
                Some("spawner"),
                crate::obs::metrics::MetricsOptions::default(),
            ),
            _lock: lock,
            guard,
            wake_rx,
            cpu: {
                let mut c = CpuSampler::default();
                let _ = c.headroom(); // the baseline of the first window
                c
            },
            cpu_sampled_at: now,
            cpu_low: false,
            since_check: 0,
            pause_until: None,
            started_at: now,
            started_ms: now_ms(),
            all_ready: None,
            stop_deadline: None,
            next_stall_check: now + opts.stall_after.min(Duration::from_secs(1)),
            next_proc_check: now,
            status_dirty: true,
            status_written: None,
            counts_cache: Counts::default(),
            opts,
        };
        sp.refresh_counts();
        Ok(sp)
    }

    /// One round of supervision: reap, notice readiness and stalls, start what the governor
    /// allows, escalate a stop, write the status file; then wait up to `max_wait` for a child
    /// to exit, a signal, or a timer. Returns `true` once everything has ended.
    ///
    /// # Errors
    /// [`SpawnError::Command`] if the agents' command cannot be run (everything started is then
    /// being stopped: keep stepping until it returns `true`).
    pub fn step(&mut self, max_wait: Duration) -> Result<bool, SpawnError> {
        self.reap();
        self.check_ready();
        let mut fatal = None;
        if self.stop_deadline.is_none() {
            if let Err(e) = self.start_some() {
                self.stop();
                fatal = Some(e);
            } else if self.agents_done() {
                self.stop(); // every agent ended on its own: stop the hubs
            }
        }
        self.check_stalls();
        self.escalate();
        self.refresh_counts();
        let done = self.stop_deadline.is_some() && self.by_pid.is_empty();
        self.write_status(done);
        if let Some(e) = fatal {
            return Err(e);
        }
        if done {
            return Ok(true);
        }
        self.sleep(max_wait);
        Ok(false)
    }

    /// Stop: SIGTERM to every agent's process group now, SIGKILL to what is left after the
    /// grace period. Keep calling [`Spawner::step`] until it returns `true`.
    pub fn stop(&mut self) {
        if self.stop_deadline.is_some() {
            return;
        }
        self.stop_deadline = Some(Instant::now() + self.opts.grace);
        for s in &mut self.slots {
            if s.state == State::Backoff {
                s.state = State::Crashed; // it is not restarted now
                s.retry_at = None;
            }
            if s.state.has_process() {
                if let Some(pid) = s.pid {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                s.state = State::Stopping;
            }
        }
        self.queue.clear();
        self.status_dirty = true;
    }

    /// Stop without waiting out the grace period: SIGKILL at the next step.
    pub fn kill_now(&mut self) {
        self.stop();
        self.stop_deadline = Some(Instant::now());
    }

    /// Whether [`Spawner::stop`] was called (or the run ended on its own).
    pub fn stopping(&self) -> bool {
        self.stop_deadline.is_some()
    }

    /// Counts as of the last step.
    pub fn counts(&self) -> Counts {
        self.counts_cache
    }

    /// How long it took until every agent had been ready once (`None`: not yet).
    pub fn all_ready_after(&self) -> Option<Duration> {
        self.all_ready
    }

    /// Time since the spawner was created.
    pub fn elapsed(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Exit statuses of the agents' last processes: (status or `None` if killed by a signal,
    /// how many agents).
    pub fn exit_codes(&self) -> Vec<(Option<i32>, usize)> {
        let mut m: std::collections::BTreeMap<Option<i32>, usize> = Default::default();
        for s in self.slots.iter().filter(|s| s.spec.runs_hub.is_none()) {
            if s.state.is_final() && s.pid.is_some() {
                *m.entry(if s.signal.is_some() {
                    None
                } else {
                    s.exit_code
                })
                .or_default() += 1;
            }
        }
        m.into_iter().collect()
    }

    /// The processes of running agents: (id, pid), hubs included.
    pub fn processes(&self) -> Vec<(AgentId, u32)> {
        self.slots
            .iter()
            .filter(|s| s.state.has_process())
            .filter_map(|s| Some((s.spec.id.clone(), s.pid?)))
            .collect()
    }

    /// The status as the status file has it.
    pub fn status(&self) -> SpawnerStatus {
        SpawnerStatus {
            v: crate::agents::status::VERSION,
            pid: std::process::id(),
            started_ms: self.started_ms,
            updated_ms: now_ms(),
            running: true,
            command: self
                .opts
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            stall_after_ms: self.opts.stall_after.as_millis() as u64,
            agents: self
                .slots
                .iter()
                .map(|s| AgentStatus {
                    id: s.spec.id.to_string(),
                    team: s.spec.team.clone(),
                    hub: s.spec.runs_hub.is_some(),
                    state: if s.stalled && s.state == State::Running {
                        "stalled".to_owned()
                    } else {
                        s.state.as_str().to_owned()
                    },
                    pid: s.pid,
                    restarts: s.restarts,
                    crashes: s.crashes,
                    started_ms: s.pid.map(|_| s.started_ms),
                    exit_code: s.exit_code,
                    signal: s.signal,
                })
                .collect(),
        }
    }

    fn incident(&self, mut i: Incident, slot: Option<&Slot>) {
        if let Some(s) = slot {
            i.agent = Some(s.spec.id.to_string());
            i.pid = i.pid.or(s.pid);
        }
        // And a metric: `spawner.<kind>`, valued by what it measured (delay, headroom, idle
        // time), else 1.
        let (value, unit) = match (i.delay_ms, i.value) {
            (Some(d), _) => (d as f64, "ms"),
            (None, Some(v)) if i.kind == Kind::Throttle => (v, "percent"),
            (None, Some(v)) => (v, "ms"),
            (None, None) => (1.0, "count"),
        };
        let agent = i.agent.as_deref().unwrap_or("");
        let _ = self.metrics.emit(
            &format!("spawner.{}", i.kind.as_str()),
            value,
            unit,
            &[("agent", agent)],
        );
        if let Err(e) = self.incidents.record(&i) {
            tracing_warn(&format!(
                "cannot write to {}: {e}",
                self.incidents.path().display()
            ));
        }
    }

    fn agents_done(&self) -> bool {
        self.queue.is_empty()
            && self
                .slots
                .iter()
                .filter(|s| s.spec.runs_hub.is_none())
                .all(|s| s.state.is_final())
    }

    /// Collect every child that ended.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.ended(pid.as_raw() as u32, Some(code), None)
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.ended(pid.as_raw() as u32, None, Some(sig as i32));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {} // stopped or continued: not an end
            }
        }
    }

    fn ended(&mut self, pid: u32, code: Option<i32>, signal: Option<i32>) {
        if self.guard.is(pid) {
            self.guard.lost(code, signal);
            return;
        }
        let Some(i) = self.by_pid.remove(&pid) else {
            return;
        };
        // Whatever the agent left in its process group goes with it.
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        self.guard.forget(pid);
        self.status_dirty = true;
        let stopping = self.stop_deadline.is_some();
        let policy = self.opts.restart;
        let max_restarts = self.opts.max_restarts;
        let backoff = self.opts.governor.backoff;
        let s = &mut self.slots[i];
        s.exit_code = code;
        s.signal = signal;
        s.stalled = false;
        let ran = s.started_at.elapsed();
        if stopping || s.state == State::Stopping {
            s.state = State::Exited;
            return;
        }
        let is_hub = s.spec.runs_hub.is_some();
        if code == Some(0) && !is_hub {
            s.state = State::Exited;
            return;
        }
        let how = match (code, signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "ended".to_owned(),
        };
        s.crashes += u32::from(code != Some(0));
        let mut crash = Incident::new(Kind::Crash, now_ms(), format!("{} {how}", s.spec.id));
        crash.exit_code = code;
        crash.signal = signal;
        crash.restarts = Some(s.restarts);
        crash.pid = Some(pid);
        let restart = is_hub || policy == Restart::OnFailure;
        if !restart {
            s.state = State::Crashed;
            let snapshot = Some(&self.slots[i]);
            self.incident(crash, snapshot);
            return;
        }
        if max_restarts.is_some_and(|m| s.restarts >= m) {
            s.state = State::Failed;
            let mut gave = Incident::new(
                Kind::GaveUp,
                now_ms(),
                format!(
                    "{} crashed {} times: not restarted again",
                    s.spec.id, s.crashes
                ),
            );
            gave.restarts = Some(s.restarts);
            let snapshot = Some(&self.slots[i]);
            self.incident(crash, snapshot);
            self.incident(gave, snapshot);
            return;
        }
        s.failures = if ran >= HEALTHY_RUN {
            1
        } else {
            s.failures + 1
        };
        let delay = backoff.delay(s.failures);
        s.state = State::Backoff;
        s.retry_at = Some(Instant::now() + delay);
        let mut b = Incident::new(
            Kind::Backoff,
            now_ms(),
            format!("{} restarts in {} ms", s.spec.id, delay.as_millis()),
        );
        b.attempt = Some(s.failures);
        b.delay_ms = Some(delay.as_millis() as u64);
        b.restarts = Some(s.restarts);
        let snapshot = Some(&self.slots[i]);
        self.incident(crash, snapshot);
        self.incident(b, snapshot);
    }

    /// Starting agents are running once they touched the bus (a receiver that looked at its
    /// inbox is ready to receive), or went to sleep (blocked on something: done with starting
    /// up, whatever the program), or their ready timeout passed.
    fn check_ready(&mut self) {
        let now = Instant::now();
        let look_at_proc = now >= self.next_proc_check;
        if look_at_proc {
            self.next_proc_check = now + PROC_CHECK;
        }
        let mut changed = false;
        let layout = self.bus.root().layout();
        for (s, probe) in self.slots.iter_mut().zip(self.probes.iter_mut()) {
            if s.state != State::Starting {
                continue;
            }
            let active = probe_of(probe, layout, &s.spec.id)
                .and_then(|p| p.activity().last_ms)
                .is_some_and(|t| t >= s.started_ms);
            let asleep = || look_at_proc && s.pid.is_some_and(is_sleeping);
            if active || now.duration_since(s.started_at) >= self.opts.ready_timeout || asleep() {
                s.state = State::Running;
                s.ready_once = true;
                changed = true;
            }
        }
        if changed {
            self.status_dirty = true;
            if self.all_ready.is_none()
                && self
                    .slots
                    .iter()
                    .filter(|s| s.spec.runs_hub.is_none())
                    .all(|s| s.ready_once)
            {
                self.all_ready = Some(self.started_at.elapsed());
            }
        }
    }

    /// Start what the governor allows.
    fn start_some(&mut self) -> Result<(), SpawnError> {
        let now = Instant::now();
        // Agents whose backoff ran out go to the front.
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.state == State::Backoff && s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
                s.state = State::Pending;
                self.queue.push_front(i);
            }
        }
        if self.pause_until.is_some_and(|t| t > now) {
            return Ok(());
        }
        self.pause_until = None;
        let g = self.opts.governor;
        while !self.queue.is_empty() {
            let starting = self
                .slots
                .iter()
                .filter(|s| s.state == State::Starting)
                .count();
            if starting >= g.max_wip {
                return Ok(());
            }
            if self.since_check >= g.batch {
                self.since_check = 0;
                if self.cpu_throttled() {
                    return Ok(());
                }
            }
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            self.start(i)?;
            self.since_check += 1;
        }
        Ok(())
    }

    /// Between batches: is CPU headroom below the target? Headroom is measured over the time
    /// since the last check, at least `CPU_WINDOW` (`/proc/stat` counts in 10 ms ticks): a
    /// batch that comes sooner waits for the window to fill.
    fn cpu_throttled(&mut self) -> bool {
        let target = self.opts.governor.cpu_headroom;
        if target <= 0.0 {
            return false;
        }
        let now = Instant::now();
        let ready_at = self.cpu_sampled_at + CPU_WINDOW;
        if now < ready_at {
            self.pause_until = Some(ready_at);
            return true;
        }
        self.cpu_sampled_at = now;
        let Some(h) = self.cpu.headroom() else {
            return false;
        };
        let low = h < target;
        if low && !self.cpu_low {
            let mut i = Incident::new(
                Kind::Throttle,
                now_ms(),
                format!("CPU headroom {h:.1}% is below the {target}% target: starts paused"),
            );
            i.value = Some((h * 10.0).round() / 10.0);
            self.incident(i, None);
        }
        self.cpu_low = low;
        if low {
            self.pause_until = Some(now + CPU_WINDOW);
        }
        low
    }

    /// Start slot `i`'s process.
    fn start(&mut self, i: usize) -> Result<(), SpawnError> {
        let layout = self.bus.root().layout().clone();
        let s = &self.slots[i];
        // A hub takes its own lock; for any other program the spawner takes it and hands it on.
        let lock = if s.spec.runs_hub.is_none() {
            match AliveLock::acquire(&layout, &s.spec.id, Duration::from_millis(100)) {
                Ok(l) => Some(l),
                Err(LivenessError::Running(id)) => {
                    self.spawn_failed(
                        i,
                        format!(
                            "agent {id} is already running elsewhere (its liveness lock is held)"
                        ),
                    );
                    return Ok(());
                }
                Err(LivenessError::Io { source, .. }) if is_transient(&source) => {
                    self.spawn_failed(i, format!("cannot open its liveness lock: {source}"));
                    return Ok(());
                }
                Err(LivenessError::Io { path, source }) => {
                    return Err(io_err(format!("cannot open {}", path.display()))(source));
                }
            }
        } else {
            None
        };
        let mut cmd = match &s.spec.runs_hub {
            Some(team) => {
                let mut c = Command::new(&self.opts.shoal_exe);
                c.arg("--root")
                    .arg(self.bus.root().path())
                    .arg("hub")
                    .arg(team);
                c
            }
            None => {
                let mut c = Command::new(&self.opts.command[0]);
                c.args(&self.opts.command[1..]);
                c
            }
        };
        let root = self.bus.root().path();
        cmd.env("SHOAL_ROOT", root)
            .env("MESSAGE_BASE_DIR", root)
            .env("SHOAL_AGENT_ID", s.spec.id.as_str())
            .env("SHOAL_TEAM", s.spec.team.as_deref().unwrap_or(""))
            .env(
                "SHOAL_HUB",
                s.spec.hub.as_ref().map(AgentId::as_str).unwrap_or(""),
            )
            // Restarts including this start, when it is one.
            .env(
                "SHOAL_RESTARTS",
                (s.restarts + u32::from(s.pid.is_some())).to_string(),
            )
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(dir) = &self.opts.log_dir {
            let path = dir.join(format!("{}.log", s.spec.id));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(format!("cannot open {}", path.display())))?;
            let f2 = f
                .try_clone()
                .map_err(io_err(format!("cannot open {}", path.display())))?;
            cmd.stdout(f).stderr(f2);
        }
        cmd.env("SHOAL_SPAWNER_PID", std::process::id().to_string());
        // The child gets the locked descriptor through a copy without close-on-exec, made just
        // for this spawn and closed right after it. No code runs between fork and exec, so the
        // C library can spawn with vfork (posix_spawn): a fork of a spawner that has a thousand
        // inboxes mapped would copy all of their mappings, once per agent.
        let inherited = match &lock {
            Some(l) => Some(
                crate::sys::dup_inheritable(l.fd())
                    .map_err(io_err("cannot pass the liveness lock to the agent"))?,
            ),
            None => None,
        };
        let started_ms = now_ms();
        let res = cmd.spawn();
        drop(inherited);
        match res {
            Ok(child) => {
                let pid = child.id();
                drop(child); // reaped with waitpid(-1) in `reap`
                drop(lock); // the child holds it now
                self.guard.watch(pid);
                self.by_pid.insert(pid, i);
                let restarted = self.slots[i].pid.is_some();
                let s = &mut self.slots[i];
                if restarted {
                    s.restarts += 1;
                }
                s.pid = Some(pid);
                s.state = State::Starting;
                s.started_ms = started_ms;
                s.started_at = Instant::now();
                s.exit_code = None;
                s.signal = None;
                s.killed = false;
                self.status_dirty = true;
                if restarted {
                    let mut r =
                        Incident::new(Kind::Restart, now_ms(), format!("{} restarted", s.spec.id));
                    r.restarts = Some(s.restarts);
                    r.attempt = Some(s.failures);
                    let snapshot = Some(&self.slots[i]);
                    self.incident(r, snapshot);
                }
                Ok(())
            }
            Err(e) if is_transient(&e) => {
                self.spawn_failed(i, format!("cannot start a process: {e}"));
                Ok(())
            }
            Err(e) => {
                let s = &mut self.slots[i];
                s.state = State::Failed;
                let program = match &s.spec.runs_hub {
                    Some(_) => self.opts.shoal_exe.clone().into_os_string(),
                    None => self.opts.command[0].clone(),
                };
                Err(SpawnError::Command { program, source: e })
            }
        }
    }

    /// A start that failed for a reason that may pass (no processes or files left, lock held):
    /// back off, this agent and the starting of others.
    fn spawn_failed(&mut self, i: usize, why: String) {
        let backoff = self.opts.governor.backoff;
        let s = &mut self.slots[i];
        s.failures += 1;
        let delay = backoff.delay(s.failures);
        s.state = State::Backoff;
        s.retry_at = Some(Instant::now() + delay);
        self.pause_until = Some(Instant::now() + delay);
        let mut f = Incident::new(Kind::SpawnFailed, now_ms(), format!("{}: {why}", s.spec.id));
        f.attempt = Some(s.failures);
        let mut b = Incident::new(
            Kind::Backoff,
            now_ms(),
            format!("starts pause for {} ms", delay.as_millis()),
        );
        b.attempt = Some(s.failures);
        b.delay_ms = Some(delay.as_millis() as u64);
        self.status_dirty = true;
        let snapshot = Some(&self.slots[i]);
        self.incident(f, snapshot);
        self.incident(b, snapshot);
    }

    /// Every second or so: which running agents are stalled?
    fn check_stalls(&mut self) {
        let now = Instant::now();
        if now < self.next_stall_check {
            return;
        }
        let after = self.opts.stall_after;
        self.next_stall_check =
            now + (after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let store = self.bus.store();
        let layout = self.bus.root().layout();
        let exact_counts = layout.kind() == crate::LayoutKind::Jsonl;
        let t = now_ms();
        let mut events = Vec::new();
        for (i, (s, probe)) in self
            .slots
            .iter_mut()
            .zip(self.probes.iter_mut())
            .enumerate()
        {
            if s.state != State::Running || s.spec.runs_hub.is_some() {
                continue;
            }
            let Some(p) = probe_of(probe, layout, &s.spec.id) else {
                continue;
            };
            let act = p.activity();
            // The compat layout's counters overcount files scripts removed: count the files.
            let depth = if exact_counts {
                p.pending()
            } else {
                match store.depth(&s.spec.id) {
                    Ok(d) => d,
                    Err(_) => continue,
                }
            };
            let stalled = act.stalled(&depth, t, after);
            if stalled != s.stalled {
                s.stalled = stalled;
                self.status_dirty = true;
                let idle = act.idle_ms(t).unwrap_or(0);
                let mut inc = if stalled {
                    Incident::new(
                        Kind::Stalled,
                        t,
                        format!(
                            "{}: {} messages waiting, no activity for {} ms",
                            s.spec.id, depth.msgs, idle
                        ),
                    )
                } else {
                    Incident::new(Kind::Recovered, t, format!("{} is active again", s.spec.id))
                };
                inc.value = Some(idle as f64);
                events.push((i, inc));
            }
        }
        for (i, inc) in events {
            let snapshot = Some(&self.slots[i]);
            self.incident(inc, snapshot);
        }
    }

    /// Past the grace period: SIGKILL whatever did not stop.
    fn escalate(&mut self) {
        let Some(deadline) = self.stop_deadline else {
            return;
        };
        if Instant::now() < deadline {
            return;
        }
        let mut killed = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.state == State::Stopping
                && !s.killed
                && let Some(pid) = s.pid
            {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                s.killed = true;
                killed.push(i);
            }
        }
        for i in killed {
            let inc = Incident::new(
                Kind::Killed,
                now_ms(),
                format!(
                    "{} did not stop within {} ms of SIGTERM: killed",
                    self.slots[i].spec.id,
                    self.opts.grace.as_millis()
                ),
            );
            let snapshot = Some(&self.slots[i]);
            self.incident(inc, snapshot);
        }
    }

    fn refresh_counts(&mut self) {
        let mut c = Counts::default();
        for s in &self.slots {
            c.restarts += s.restarts;
            c.crashes += s.crashes;
            if s.spec.runs_hub.is_some() {
                continue;
            }
            c.agents += 1;
            c.ready += usize::from(s.ready_once);
            match s.state {
                State::Starting => c.starting += 1,
                State::Running | State::Stopping => {
                    c.running += 1;
                    c.stalled += usize::from(s.stalled);
                }
                State::Backoff => c.backoff += 1,
                State::Exited => c.exited += 1,
                State::Crashed => c.crashed += 1,
                State::Failed => c.failed += 1,
                State::Pending => {}
            }
        }
        self.counts_cache = c;
    }

    fn write_status(&mut self, last: bool) {
        if !last
            && (!self.status_dirty
                || self
                    .status_written
                    .is_some_and(|t| t.elapsed() < STATUS_EVERY))
        {
            return;
        }
        let mut st = self.status();
        st.running = !last;
        let layout = self.bus.root().layout().clone();
        if let Err(e) = st.save(&layout) {
            tracing_warn(&format!(
                "cannot write {}: {e}",
                layout.spawner_status().display()
            ));
        }
        self.status_dirty = false;
        self.status_written = Some(Instant::now());
    }

    /// Wait for a child to end, a signal, or the next thing to do.
    fn sleep(&mut self, max_wait: Duration) {
        let now = Instant::now();
        let mut wait = max_wait;
        if self.slots.iter().any(|s| s.state == State::Starting) {
            wait = wait.min(Duration::from_millis(1)); // readiness is polled
        }
        let mut until = |t: Instant| wait = wait.min(t.saturating_duration_since(now));
        if !self.queue.is_empty() {
            until(self.pause_until.unwrap_or(now));
        }
        for s in &self.slots {
            if let Some(t) = s.retry_at {
                until(t);
            }
        }
        until(self.next_stall_check);
        if let Some(d) = self.stop_deadline {
            until(d);
        }
        if self.status_dirty {
            until(self.status_written.map_or(now, |t| t + STATUS_EVERY));
        }
        let fd = self.wake_rx.as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = wait.as_millis().min(u16::MAX as u128) as u16;
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
        let mut buf = [0u8; 256];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for Spawner {
    /// A spawner dropped while agents run (its owner returned early): kill them all and reap.
    fn drop(&mut self) {
        for &pid in self.by_pid.keys() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let pids: Vec<u32> = self.by_pid.keys().copied().collect();
        for pid in pids {
            let _ = waitpid(Pid::from_raw(pid as i32), None);
            self.guard.forget(pid);
        }
        self.by_pid.clear();
        if self.stop_deadline.is_none() {
            self.write_status(true);
        }
    }
}

/// The probe of an agent, mapped on first use.
fn probe_of<'a>(
    slot: &'a mut Option<crate::store::Probe>,
    layout: &crate::layout::Layout,
    id: &AgentId,
) -> Option<&'a crate::store::Probe> {
    if slot.is_none() {
        *slot = crate::store::Probe::open(layout, id).ok().flatten();
    }
    slot.as_ref()
}

/// Whether process `pid` is asleep (blocked in a wait of some kind), from /proc/<pid>/stat.
fn is_sleeping(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('S')))
        .unwrap_or(false)
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

fn tracing_warn(msg: &str) {
    let _ = writeln!(io::stderr(), "shoal: warning: {msg}");
}

use std::os::fd::AsFd;

/// The guardian process: it learns of every agent's process group through a pipe, and when the
/// pipe closes with groups still listed (the spawner died without cleaning up), it sends them
/// SIGTERM, then SIGKILL after the grace period.
#[derive(Debug)]
struct Guardian {
    child: Option<Child>,
    pipe: Option<ChildStdin>,
    exe: PathBuf,
    grace: Duration,
    broken: bool,
}

impl Guardian {
    fn start(exe: &std::path::Path, grace: Duration) -> Result<Guardian, SpawnError> {
        let mut g = Guardian {
            child: None,
            pipe: None,
            exe: exe.to_owned(),
            grace,
            broken: false,
        };
        g.spawn()?;
        Ok(g)
    }

    fn spawn(&mut self) -> Result<(), SpawnError> {
        let mut child = Command::new(&self.exe)
            .arg("spawn-guard")
            .arg("--grace-ms")
            .arg(self.grace.as_millis().to_string())
            .arg("--spawner-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0) // not in the terminal's group: Ctrl-C is the spawner's to handle
            .spawn()
            .map_err(io_err(format!(
                "cannot start the guardian process ({} spawn-guard)",
                self.exe.display()
            )))?;
        self.pipe = child.stdin.take();
        self.child = Some(child);
        Ok(())
    }

    fn is(&self, pid: u32) -> bool {
        self.child.as_ref().is_some_and(|c| c.id() == pid)
    }

    fn send(&mut self, line: &str) {
        if let Some(p) = self.pipe.as_mut()
            && p.write_all(line.as_bytes()).is_err()
            && !self.broken
        {
            self.broken = true;
            tracing_warn(
                "the guardian process is gone: agents will not be cleaned up if the spawner is killed",
            );
        }
    }

    fn watch(&mut self, pgid: u32) {
        self.send(&format!("+{pgid}\n"));
    }

    fn forget(&mut self, pgid: u32) {
        self.send(&format!("-{pgid}\n"));
    }

    /// The guardian ended (it was reaped by `reap`).
    fn lost(&mut self, code: Option<i32>, signal: Option<i32>) {
        self.child = None;
        self.pipe = None;
        if !self.broken {
            self.broken = true;
            tracing_warn(&format!(
                "the guardian process ended ({}): agents will not be cleaned up if the spawner is killed",
                match (code, signal) {
                    (Some(c), _) => format!("status {c}"),
                    (_, Some(s)) => format!("signal {s}"),
                    _ => "?".into(),
                }
            ));
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        self.pipe = None; // EOF: the guardian sees an empty list and exits
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// The guardian's side (`shoal spawn-guard`): read `+pgid` / `-pgid` lines until the pipe
/// closes, then end what is still listed, and every process whose environment names
/// `spawner` as its `SHOAL_SPAWNER_PID` (an agent started a moment before the spawner died,
/// not yet announced on the pipe; an agent's child that left its group): SIGTERM, and SIGKILL
/// after `grace`. Returns how many groups and processes it had to end.
///
/// # Errors
/// Reading the pipe failed.
pub fn guard(input: impl Read, grace: Duration, spawner: Option<u32>) -> io::Result<usize> {
    use std::io::BufRead;
    // The spawner's death is what this process is for: ignore the terminal's signals.
    for sig in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let mut groups = std::collections::BTreeSet::new();
    for line in io::BufReader::new(input).lines() {
        let line = line?;
        let (op, n) = line.split_at(line.len().min(1));
        if let Ok(pg) = n.parse::<i32>()
            && pg > 1
        {
            match op {
                "+" => {
                    groups.insert(pg);
                }
                "-" => {
                    groups.remove(&pg);
                }
                _ => {}
            }
        }
    }
    // Negative: a process group; positive: one process.
    let mut targets: Vec<i32> = groups.iter().map(|g| -g).collect();
    if let Some(sp) = spawner {
        targets.extend(children_of_spawner(sp).into_iter().map(|p| p as i32));
    }
    let alive = |t: &i32| kill(Pid::from_raw(*t), None).is_ok();
    targets.retain(alive);
    let n = targets.len();
    for &t in &targets {
        let _ = kill(Pid::from_raw(t), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && targets.iter().any(alive) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for &t in &targets {
        let _ = kill(Pid::from_raw(t), Signal::SIGKILL);
    }
    Ok(n)
}

/// Processes whose environment has `SHOAL_SPAWNER_PID=<spawner>` (not zombies).
fn children_of_spawner(spawner: u32) -> Vec<u32> {
    let needle = format!("SHOAL_SPAWNER_PID={spawner}\0");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| memchr::memmem::find(&env, needle.as_bytes()).is_some())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_name_themselves() {
        assert_eq!(State::Backoff.as_str(), "backoff");
        assert!(State::Stopping.has_process());
        assert!(State::Crashed.is_final() && !State::Backoff.is_final());
    }
}
