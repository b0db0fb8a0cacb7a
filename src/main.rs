//! The `shoal` command: parse arguments, call the library, map errors to exit codes.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Local agents coordinating through JSONL inboxes on tmpfs.
///
/// Root directory: --root, else SHOAL_ROOT, else MESSAGE_BASE_DIR, else /dev/shm/shoal-<uid>.
/// Exit status: 0 ok, 1 error, 3 round incomplete, 75 inbox full (retry later), 124 timed out,
/// 128+N stopped by signal N (spawn).
#[derive(Debug, Parser)]
#[command(name = "shoal", version, max_term_width = 100)]
struct Cli {
    /// Root directory (default: SHOAL_ROOT, MESSAGE_BASE_DIR, /dev/shm/shoal-<uid>).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,

    /// Log on stderr as the bash message-bus.sh does (`[HH:MM:SS] [MESSAGE-BUS] ...`).
    #[arg(long, global = true, env = "SHOAL_BASH_LOGS", value_parser = clap::builder::FalseyValueParser::new())]
    bash_logs: bool,

    /// Layout of a root created now: jsonl (sharded inboxes) or compat (one file per message,
    /// as message-bus.sh). An existing root keeps the layout it was created with.
    #[arg(long, global = true, env = "SHOAL_LAYOUT", value_name = "LAYOUT")]
    layout: Option<shoal::LayoutKind>,

    #[command(subcommand)]
    command: Command,
}

// Subcommands' arguments are built only for the subcommand that runs: an agent process
// starting `shoal recv` does not pay for building thirty commands it will not use.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
enum Command {
    /// Create agents and their inboxes (idempotent).
    Init(cli::bus::InitArgs),
    /// Send one message; prints its id.
    Send(cli::bus::SendArgs),
    /// Receive messages as JSON lines, oldest first; they stay leased until acknowledged.
    Recv(cli::bus::RecvArgs),
    /// Acknowledge received messages.
    Ack(cli::bus::AckArgs),
    /// Serve as an agent that answers every message it receives (for demos and benchmarks).
    Echo(cli::bus::EchoArgs),
    /// List agents with inbox depth and messages sent.
    Agents(cli::bus::AgentsArgs),
    /// message-bus.sh `receive`: all unacknowledged messages as a JSON array (does not consume).
    Receive(cli::verbs::IdArg),
    /// message-bus.sh `clear`: remove what the last `receive` returned (or everything).
    Clear(cli::verbs::IdArg),
    /// message-bus.sh `count`: messages in the inbox, or sent (`outbox`).
    Count(cli::verbs::CountArgs),
    /// message-bus.sh `cleanup`: remove an agent and its inbox.
    Cleanup(cli::verbs::IdArg),
    /// message-bus.sh `init-system`: create the root.
    InitSystem,
    /// message-bus.sh `cleanup-system`: remove the whole root.
    CleanupSystem,
    /// Plan or show the topology (teams and hubs).
    #[command(subcommand)]
    Topology(cli::coord::TopologyCmd),
    /// Run the hub of a team (forwarding, fan-out, aggregating replies) until killed.
    Hub(cli::coord::HubArgs),
    /// Send one message to every agent (or a team), fanned out through the hubs; prints its id.
    Broadcast(cli::coord::BroadcastArgs),
    /// A coordination round: request to every agent (or a team), one reply from each.
    /// Exit status 0 if all replied, 3 if some did not.
    Gather(cli::coord::GatherArgs),
    /// Send a request and print its reply (exit status 124 on timeout).
    Request(cli::coord::RequestArgs),
    /// Wait until every member of a set reaches a named barrier.
    Barrier(cli::coord::BarrierArgs),
    /// Start N agent processes running CMD and supervise them until they end or are stopped.
    /// Exit status 0 if all ended well, 1 if some crashed, 128+signal if stopped by a signal.
    Spawn(cli::spawn::SpawnArgs),
    /// List agents: state (from liveness locks), pid, restarts, inbox depth, idle time.
    Ps(cli::spawn::PsArgs),
    /// Tell the spawner an agent busy with other work is alive (any send/recv/ack counts too).
    Heartbeat(cli::spawn::HeartbeatArgs),
    /// The spawner's guardian process (started by `shoal spawn`, not by hand).
    #[command(hide = true)]
    SpawnGuard(cli::spawn::GuardArgs),
    /// Metrics: record a value, summarize, export for Prometheus.
    #[command(subcommand)]
    Metrics(cli::metrics::MetricsCmd),
    /// Run a real demo: agent processes on the root, coordination rounds, throughput.
    Demo(cli::demo::DemoArgs),
    /// Benchmarks that need real processes (criterion benchmarks: `cargo bench`).
    #[command(subcommand)]
    Bench(cli::bench::BenchCmd),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                // Missing or malformed arguments: status 1, as message-bus.sh.
                _ => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    shoal::sys::die_with_spawner();
    shoal::sys::raise_fd_limit();
    let ctx = cli::Ctx::new(cli.root, cli.bash_logs, cli.layout);
    let result = match cli.command {
        Command::Init(a) => cli::bus::init(&ctx, a),
        Command::Send(a) => cli::bus::send(&ctx, a),
        Command::Recv(a) => cli::bus::recv(&ctx, a),
        Command::Ack(a) => cli::bus::ack(&ctx, a),
        Command::Echo(a) => cli::bus::echo(&ctx, a),
        Command::Agents(a) => cli::bus::agents(&ctx, a),
        Command::Receive(a) => cli::verbs::receive(&ctx, a),
        Command::Clear(a) => cli::verbs::clear(&ctx, a),
        Command::Count(a) => cli::verbs::count(&ctx, a),
        Command::Cleanup(a) => cli::verbs::cleanup(&ctx, a),
        Command::InitSystem => cli::verbs::init_system(&ctx),
        Command::CleanupSystem => cli::verbs::cleanup_system(&ctx),
        Command::Topology(c) => cli::coord::topology(&ctx, c),
        Command::Hub(a) => cli::coord::hub(&ctx, a),
        Command::Broadcast(a) => cli::coord::broadcast(&ctx, a),
        Command::Gather(a) => cli::coord::gather(&ctx, a),
        Command::Request(a) => cli::coord::request(&ctx, a),
        Command::Barrier(a) => cli::coord::barrier(&ctx, a),
        Command::Spawn(a) => cli::spawn::spawn(&ctx, a),
        Command::Ps(a) => cli::spawn::ps(&ctx, a),
        Command::Heartbeat(a) => cli::spawn::heartbeat(&ctx, a),
        Command::SpawnGuard(a) => cli::spawn::guard(a),
        Command::Metrics(c) => cli::metrics::run(&ctx, c),
        Command::Demo(a) => cli::demo::run(&ctx, a),
        Command::Bench(c) => cli::bench::run(&ctx, c),
    };
    ExitCode::from(ctx.finish(result) as u8)
}
