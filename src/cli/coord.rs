//! `topology`, `hub`, `broadcast`, `gather`, `request`, `barrier`.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use shoal::AgentId;
use shoal::coord::topology::{CrossTeam, Topology};
use shoal::coord::{Mesh, hub};
use shoal::envelope::Payload;

use super::{Ctx, Exit, parse_duration};

#[derive(Debug, Subcommand)]
pub(crate) enum TopologyCmd {
    /// Plan N agents in teams with hubs (or flat), create their inboxes, write the topology.
    Plan(PlanArgs),
    /// Print the topology: a tree, or JSON.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Number of agents.
    #[arg(long, value_name = "N")]
    agents: usize,
    /// Agents per team.
    #[arg(long, value_name = "K", conflicts_with = "teams")]
    team_size: Option<usize>,
    /// Number of teams.
    #[arg(long, value_name = "T")]
    teams: Option<usize>,
    /// Agent ids are <prefix><number>.
    #[arg(long, value_name = "P", default_value = "agent-")]
    id_prefix: String,
    /// Deliver messages between teams directly (hubs then only carry broadcasts and rounds).
    #[arg(long)]
    direct: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The topology file as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn topology(ctx: &Ctx, cmd: TopologyCmd) -> anyhow::Result<Exit> {
    match cmd {
        TopologyCmd::Plan(a) => plan(ctx, a),
        TopologyCmd::Show(a) => show(ctx, a),
    }
}

fn plan(ctx: &Ctx, a: PlanArgs) -> anyhow::Result<Exit> {
    if a.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let (mut topo, ids) = Topology::plan(a.agents, a.team_size, a.teams, &a.id_prefix)?;
    if a.direct {
        topo.cross_team = CrossTeam::Direct;
    }
    let bus = ctx.bus(true)?;
    for id in ids.iter().chain(topo.hubs()) {
        bus.init(id)
            .with_context(|| format!("cannot create agent {id}"))?;
    }
    let layout = bus.root().layout().clone();
    let planned = topo.clone();
    Topology::update(&layout, move |t| {
        *t = planned;
        Ok(())
    })?;
    eprintln!(
        "planned {} agents{} in {}",
        ids.len(),
        if topo.is_hybrid() {
            format!(" in {} teams with hubs", topo.teams.len())
        } else {
            " (flat)".to_owned()
        },
        layout.topology().display()
    );
    Ok(Exit::Ok)
}

fn show(ctx: &Ctx, a: ShowArgs) -> anyhow::Result<Exit> {
    let bus = ctx.bus(false)?;
    let topo = Topology::load(bus.root().layout())?.unwrap_or_else(Topology::flat);
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&topo)?)?;
        return Ok(Exit::Ok);
    }
    if !topo.is_hybrid() {
        writeln!(out, "flat: every message goes straight to its recipient")?;
        return Ok(Exit::Ok);
    }
    let cross = match topo.cross_team {
        CrossTeam::ViaHubs => "between teams via the hubs",
        CrossTeam::Direct => "between teams directly",
    };
    writeln!(out, "hybrid: {} teams, {cross}", topo.teams.len())?;
    for (i, t) in topo.teams.iter().enumerate() {
        let last = i + 1 == topo.teams.len();
        writeln!(
            out,
            "{} {} (hub {}, {} members)",
            if last { "└─" } else { "├─" },
            t.name,
            t.hub,
            t.members.len()
        )?;
        for (j, m) in t.members.iter().enumerate() {
            let branch = if j + 1 == t.members.len() {
                "└─"
            } else {
                "├─"
            };
            writeln!(out, "{}  {branch} {m}", if last { " " } else { "│" })?;
        }
    }
    Ok(Exit::Ok)
}

/// Put a freshly created agent in a team (`init --team`).
pub(crate) fn join(
    ctx: &Ctx,
    id: &AgentId,
    team: &AgentId,
    hub: Option<&AgentId>,
) -> anyhow::Result<()> {
    let bus = ctx.bus(true)?;
    let layout = bus.root().layout().clone();
    let hub_id = Topology::update(&layout, |t| t.join(id, team, hub))?;
    bus.init(&hub_id)?;
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct HubArgs {
    /// The team whose hub to run.
    team: String,
}

/// Run a team's hub until killed.
pub(crate) fn hub(ctx: &Ctx, a: HubArgs) -> anyhow::Result<Exit> {
    let mesh = Mesh::open(ctx.bus(false)?)?;
    let stop = AtomicBool::new(false);
    hub::run(&mesh, &a.team, &stop, None)?;
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct BroadcastArgs {
    /// Sending agent id.
    from: String,
    /// Message type.
    #[arg(value_name = "TYPE")]
    kind: String,
    /// Payload: one JSON value.
    payload: String,
    /// Only this team.
    #[arg(long, value_name = "TEAM")]
    team: Option<String>,
}

pub(crate) fn broadcast(ctx: &Ctx, a: BroadcastArgs) -> anyhow::Result<Exit> {
    let from = AgentId::new(&a.from)?;
    let mesh = Mesh::open(ctx.bus(false)?)?;
    let payload = Payload::parse(&a.payload, mesh.bus().max_payload())?;
    let b = mesh.broadcast(&from, &a.kind, &payload, a.team.as_deref(), None)?;
    eprintln!(
        "{} recipients, {} messages written by {from}",
        b.recipients.len(),
        b.sent
    );
    super::out(&format!("{}\n", b.id))?;
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct GatherArgs {
    /// Coordinating agent id (replies come to its inbox).
    from: String,
    /// Request type.
    #[arg(value_name = "TYPE")]
    kind: String,
    /// Request payload: one JSON value.
    payload: String,
    /// Only this team.
    #[arg(long, value_name = "TEAM")]
    team: Option<String>,
    /// How long to wait for replies.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// One JSON object: request, expected, replied, missing, ms, messages, replies.
    #[arg(long)]
    json: bool,
}

/// A coordination round. Exit status 0 if every agent replied, 3 if some did not.
pub(crate) fn gather(ctx: &Ctx, a: GatherArgs) -> anyhow::Result<Exit> {
    let from = AgentId::new(&a.from)?;
    let mesh = Mesh::open(ctx.bus(false)?)?;
    let payload = Payload::parse(&a.payload, mesh.bus().max_payload())?;
    let r = mesh.gather(&from, &a.kind, &payload, a.team.as_deref(), a.timeout)?;
    let ms = r.elapsed.as_secs_f64() * 1000.0;
    if a.json {
        let v = serde_json::json!({
            "request": r.request,
            "expected": r.expected.len(),
            "replied": r.replies.len(),
            "missing": r.missing,
            "ms": (ms * 100.0).round() / 100.0,
            "messages": r.messages,
            "replies": r.replies.values().collect::<Vec<_>>(),
        });
        super::out(&format!("{v}\n"))?;
    } else {
        let mut text = format!(
            "{} of {} replied in {ms:.1} ms ({} messages received)\n",
            r.replies.len(),
            r.expected.len(),
            r.messages
        );
        if !r.missing.is_empty() {
            let names: Vec<&str> = r.missing.iter().map(AgentId::as_str).collect();
            text.push_str(&format!("missing: {}\n", names.join(" ")));
        }
        super::out(&text)?;
    }
    Ok(if r.complete() {
        Exit::Ok
    } else {
        Exit::Incomplete
    })
}

#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// Requesting agent id (the reply comes to its inbox).
    from: String,
    /// Agent asked.
    to: String,
    /// Request type.
    #[arg(value_name = "TYPE")]
    kind: String,
    /// Request payload: one JSON value.
    payload: String,
    /// How long to wait for the reply (exit status 124 after it).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Send a request, print its reply (the message whose reply_to is the request's id).
pub(crate) fn request(ctx: &Ctx, a: RequestArgs) -> anyhow::Result<Exit> {
    let from = AgentId::new(&a.from)?;
    let to = AgentId::new(&a.to)?;
    let mesh = Mesh::open(ctx.bus(false)?)?;
    let payload = Payload::parse(&a.payload, mesh.bus().max_payload())?;
    match mesh.request(&from, &to, &a.kind, &payload, a.timeout)? {
        Some(reply) => {
            super::out(&format!("{}\n", reply.to_line()))?;
            Ok(Exit::Ok)
        }
        None => Ok(Exit::Timeout),
    }
}

#[derive(Debug, Args)]
pub(crate) struct BarrierArgs {
    /// This agent.
    id: String,
    /// The barrier's name (agents meet at the same name).
    name: String,
    /// Members, comma-separated (this agent included).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["team", "all"])]
    members: Vec<String>,
    /// Every member of this team.
    #[arg(long, conflicts_with = "all")]
    team: Option<String>,
    /// Every agent (hubs excluded).
    #[arg(long)]
    all: bool,
    /// Give up after this long (exit status 124).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Wait until every member reached the barrier.
pub(crate) fn barrier(ctx: &Ctx, a: BarrierArgs) -> anyhow::Result<Exit> {
    let me = AgentId::new(&a.id)?;
    let mesh = Mesh::open(ctx.bus(false)?)?;
    let mut members: Vec<AgentId> = if a.all {
        let hubs: std::collections::BTreeSet<&AgentId> = mesh.topology().hubs().collect();
        mesh.bus()
            .store()
            .agents()?
            .into_iter()
            .filter(|x| !hubs.contains(x))
            .collect()
    } else if let Some(t) = &a.team {
        mesh.topology()
            .team(t)
            .ok_or_else(|| anyhow::anyhow!("no team {t} in the topology"))?
            .members
            .clone()
    } else {
        a.members
            .iter()
            .map(|m| AgentId::new(m))
            .collect::<Result<_, _>>()?
    };
    if members.is_empty() {
        bail!("a barrier needs members: --members a,b,c, --team T or --all");
    }
    if !members.contains(&me) {
        members.push(me.clone());
    }
    match mesh.barrier(&me, &a.name, &members, a.timeout) {
        Ok(()) => Ok(Exit::Ok),
        Err(shoal::coord::CoordError::BarrierTimeout { name, missing }) => {
            let names: Vec<&str> = missing.iter().map(AgentId::as_str).collect();
            ctx.error(&format!(
                "barrier {name}: timed out waiting for {}",
                names.join(" ")
            ));
            Ok(Exit::Timeout)
        }
        Err(e) => Err(e.into()),
    }
}
