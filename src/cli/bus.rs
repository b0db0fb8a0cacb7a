//! `init`, `send`, `recv`, `ack`, `echo`, `agents`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use shoal::envelope::{Payload, validate_type};
use shoal::store::AgentSettings;
use shoal::{AgentId, RecvOptions, SendOptions, Wait};

use super::{Ctx, Exit, is_unknown_agent, parse_duration, parse_size};

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Agent ids: [A-Za-z0-9_-]{1,64}, not starting with '-'.
    #[arg(required = true, value_name = "ID")]
    ids: Vec<String>,
    /// Inbox quota in unconsumed messages (default: the root's, 100000).
    #[arg(long, value_name = "N")]
    quota_msgs: Option<u64>,
    /// Inbox quota in unconsumed bytes, e.g. 64m (default: the root's, 64 MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    quota_bytes: Option<u64>,
    /// Join this team (created, with its hub, if new).
    #[arg(long, value_name = "TEAM")]
    team: Option<String>,
    /// The team's hub (default hub-<team>).
    #[arg(long, value_name = "HUB", requires = "team")]
    hub: Option<String>,
}

pub(crate) fn init(ctx: &Ctx, a: InitArgs) -> anyhow::Result<Exit> {
    // Validate every id before touching the filesystem: a bad id creates nothing anywhere.
    let ids = a
        .ids
        .iter()
        .map(|s| AgentId::new(s))
        .collect::<Result<Vec<_>, _>>()?;
    let team = a
        .team
        .as_deref()
        .map(AgentId::new)
        .transpose()
        .context("team")?;
    let hub = a
        .hub
        .as_deref()
        .map(AgentId::new)
        .transpose()
        .context("hub")?;
    let bus = ctx.bus(true)?;
    let d = bus.default_settings();
    let settings = AgentSettings {
        shards: d.shards,
        quota_msgs: a.quota_msgs.unwrap_or(d.quota_msgs),
        quota_bytes: a.quota_bytes.unwrap_or(d.quota_bytes),
    };
    for id in &ids {
        bus.init_with(id, &settings)
            .with_context(|| format!("cannot create agent {id}"))?;
        let layout = bus.root().layout();
        let dir = layout.agent_dir(id);
        ctx.log(&format!("Initialized message bus for {id}"));
        ctx.log(&format!("  Inbox: {}", layout.inbox_in(&dir).display()));
        if layout.kind() == shoal::LayoutKind::Compat {
            ctx.log(&format!("  Outbox: {}", layout.outbox_in(&dir).display()));
        }
        if let Some(t) = &team {
            super::coord::join(ctx, id, t, hub.as_ref())?;
        }
    }
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Sending agent id.
    from: String,
    /// Receiving agent id (must exist).
    to: String,
    /// Message type.
    #[arg(value_name = "TYPE")]
    kind: String,
    /// Payload: one JSON value (omit with --stdin).
    #[arg(required_unless_present = "stdin")]
    payload: Option<String>,
    /// Send one message per line of standard input (each line one JSON value); print one id
    /// per line. Stops at the first error, having sent the lines before it.
    #[arg(long, conflicts_with = "payload")]
    stdin: bool,
    /// Mark the message as the reply to this message id.
    #[arg(long, value_name = "MSG_ID")]
    reply_to: Option<String>,
    /// Payload cap in bytes (default: the root's, 1 MiB).
    #[arg(long, env = "SHOAL_MAX_PAYLOAD", value_name = "SIZE", value_parser = parse_size)]
    max_payload: Option<u64>,
}

pub(crate) fn send(ctx: &Ctx, a: SendArgs) -> anyhow::Result<Exit> {
    let from = AgentId::new(&a.from).context("sender")?;
    let to = AgentId::new(&a.to).context("recipient")?;
    validate_type(&a.kind)?;
    if a.payload.as_deref() == Some("") {
        bail!("{}", shoal::envelope::PayloadError::Empty);
    }
    let bus = match ctx.bus(false) {
        Ok(b) => b,
        Err(e) if is_unknown_agent(&e) => bail!(shoal::SendError::UnknownRecipient(to)),
        Err(e) => return Err(e),
    };
    let cap = a.max_payload.map_or(bus.max_payload(), |c| c as usize);
    let mesh = shoal::coord::Mesh::open(bus.clone())?;
    let opts = SendOptions {
        reply_to: a.reply_to.as_deref(),
        ..SendOptions::default()
    };
    let send_one = |text: &str| -> anyhow::Result<String> {
        let payload = Payload::parse(text, cap)?;
        let r = mesh.send(&from, &to, &a.kind, &payload, &opts)?;
        ctx.log(&format!(
            "Sent message: {from} -> {to} [{}] ({})",
            a.kind, r.id
        ));
        Ok(r.id)
    };
    match a.payload {
        Some(p) => super::out(&format!("{}\n", send_one(&p)?))?,
        None => {
            use std::io::BufRead;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin().lock());
            let mut line = String::new();
            for n in 1.. {
                // Ids are flushed whenever no more input is buffered: batched during a burst,
                // prompt when the writer pauses.
                if input.buffer().is_empty() {
                    out.flush()?;
                }
                line.clear();
                if input
                    .read_line(&mut line)
                    .context("reading standard input")?
                    == 0
                {
                    break;
                }
                let text = line.trim_end_matches(['\n', '\r']);
                if text.trim().is_empty() {
                    continue;
                }
                let id = send_one(text).with_context(|| format!("line {n}"))?;
                writeln!(out, "{id}")?;
            }
            out.flush()?;
        }
    }
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct RecvArgs {
    /// Receiving agent id (default: SHOAL_AGENT_ID, set for agents `shoal spawn` starts).
    #[arg(env = "SHOAL_AGENT_ID")]
    id: String,
    /// Block until a message arrives.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (exit status 124). Implies --wait.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// At most this many messages.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max: u64,
    /// Lease: unacknowledged messages are delivered again after this long.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Acknowledge the messages once they are printed.
    #[arg(long)]
    ack: bool,
}

pub(crate) fn recv(ctx: &Ctx, a: RecvArgs) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let bus = match ctx.bus(false) {
        Ok(b) => b,
        Err(e) if is_unknown_agent(&e) => bail!(shoal::RecvError::UnknownAgent(id)),
        Err(e) => return Err(e),
    };
    let waiting = a.wait || a.timeout.is_some();
    let opts = RecvOptions {
        max: a.max as usize,
        lease: a.lease,
        wait: match (waiting, a.timeout) {
            (false, _) => Wait::No,
            (true, None) => Wait::Forever,
            (true, Some(t)) => Wait::For(t),
        },
        filter: None,
    };
    let msgs = bus.recv(&id, &opts)?;
    if msgs.is_empty() {
        return Ok(if waiting { Exit::Timeout } else { Exit::Ok });
    }
    let mut text = String::with_capacity(msgs.len() * 256);
    for m in &msgs {
        text.push_str(&m.to_line());
        text.push('\n');
    }
    // Printed (and flushed) before acknowledging: a receiver killed in between gets them again.
    super::out(&text)?;
    if a.ack {
        let ids: Vec<String> = msgs.into_iter().map(|m| m.id).collect();
        bus.ack(&id, &ids)?;
    }
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct AckArgs {
    /// Agent id.
    id: String,
    /// Message ids to acknowledge.
    #[arg(value_name = "MSG_ID")]
    msg_ids: Vec<String>,
    /// Acknowledge every delivered, unacknowledged message.
    #[arg(long, conflicts_with = "msg_ids")]
    all: bool,
}

pub(crate) fn ack(ctx: &Ctx, a: AckArgs) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    if !a.all && a.msg_ids.is_empty() {
        bail!("nothing to acknowledge: give message ids or --all");
    }
    let bus = match ctx.bus(false) {
        Ok(b) => b,
        Err(e) if is_unknown_agent(&e) => bail!(shoal::RecvError::UnknownAgent(id)),
        Err(e) => return Err(e),
    };
    let report = if a.all {
        bus.ack_all(&id)?
    } else {
        bus.ack(&id, &a.msg_ids)?
    };
    if !report.unknown.is_empty() {
        bail!(
            "acknowledged {}; not outstanding for {id} (never delivered, already acknowledged, or unknown): {}",
            report.acked,
            report.unknown.join(" ")
        );
    }
    Ok(Exit::Ok)
}

#[derive(Debug, Args)]
pub(crate) struct EchoArgs {
    /// The agent to serve as, created if missing (default: SHOAL_AGENT_ID).
    #[arg(env = "SHOAL_AGENT_ID")]
    id: String,
    /// Exit after answering this many messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit after this long without a message.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    idle_exit: Option<Duration>,
    /// Work this long on each batch before answering (to simulate a busy agent).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    delay: Option<Duration>,
}

/// Answer every message with `<type>.reply`, same payload, `reply_to` set; a message of type
/// `shutdown` ends the loop. Replies are sent before the batch is acknowledged, so a crash
/// in between causes a duplicate reply, never a missing one.
pub(crate) fn echo(ctx: &Ctx, a: EchoArgs) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let bus = ctx.bus(true)?;
    bus.init(&id)?;
    // The echo agent is its inbox's one consumer for as long as it runs.
    bus.store().own_receiver(&id)?;
    let mesh = shoal::coord::Mesh::open(bus.clone())?;
    let opts = RecvOptions {
        max: 256,
        wait: a.idle_exit.map_or(Wait::Forever, Wait::For),
        ..RecvOptions::default()
    };
    let mut waiter = None;
    let mut answered = 0u64;
    let mut kind = String::new();
    // The sender of the last message: a served agent mostly hears from the same one.
    let mut last_from: Option<AgentId> = None;
    loop {
        // Answer inside the receive: the batch is acknowledged with the same state update.
        let mut stop = false;
        let mut failed: Option<anyhow::Error> = None;
        let mut handle = |msgs: &[shoal::Envelope]| -> bool {
            if let Some(d) = a.delay {
                std::thread::sleep(d);
            }
            for m in msgs {
                if m.kind == "shutdown" {
                    stop = true;
                    continue;
                }
                if last_from.as_ref().is_none_or(|f| f.as_str() != m.from) {
                    last_from = AgentId::new(&m.from).ok();
                }
                let Some(from) = &last_from else {
                    continue;
                };
                let reply = SendOptions {
                    reply_to: Some(&m.id),
                    ..SendOptions::default()
                };
                kind.clear();
                kind.push_str(&m.kind);
                kind.push_str(".reply");
                // The payload was checked when it was sent: echo it as it is.
                let p = Payload::from_received(&m.payload);
                let sent = mesh
                    .send(&id, from, &kind, &p, &reply)
                    .map_err(anyhow::Error::from);
                if let Err(e) = sent {
                    failed = Some(e);
                    return false; // not acknowledged: delivered again after the lease
                }
                answered += 1;
            }
            true
        };
        let msgs = bus.consume_with(&id, &opts, &mut waiter, &mut handle)?;
        if let Some(e) = failed {
            return Err(e);
        }
        if msgs.is_empty() {
            return Ok(Exit::Ok); // idle for --idle-exit
        }
        if stop || a.count.is_some_and(|c| answered >= c) {
            return Ok(Exit::Ok);
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct AgentsArgs {
    /// One JSON object per agent: id, inbox_msgs, inbox_bytes, sent.
    #[arg(long)]
    json: bool,
}

pub(crate) fn agents(ctx: &Ctx, a: AgentsArgs) -> anyhow::Result<Exit> {
    let bus = match ctx.bus(false) {
        Ok(b) => b,
        Err(e) if is_unknown_agent(&e) => return Ok(Exit::Ok),
        Err(e) => return Err(e),
    };
    let store = bus.store();
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "{:<24} {:>10} {:>12} {:>10}",
            "AGENT", "INBOX", "BYTES", "SENT"
        )?;
    }
    for id in store.agents()? {
        let (Ok(d), Ok(sent)) = (store.depth(&id), store.sent_count(&id)) else {
            continue; // removed while listing
        };
        if a.json {
            let v = serde_json::json!({"id": id, "inbox_msgs": d.msgs, "inbox_bytes": d.bytes, "sent": sent});
            writeln!(out, "{v}")?;
        } else {
            writeln!(
                out,
                "{:<24} {:>10} {:>12} {:>10}",
                id.as_str(),
                d.msgs,
                d.bytes,
                sent
            )?;
        }
    }
    out.flush()?;
    Ok(Exit::Ok)
}
