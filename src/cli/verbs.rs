//! The bash `message-bus.sh` verbs, with its exact stdout and exit statuses.

use anyhow::bail;
use clap::Args;

use shoal::compat::bash_receive_output;
use shoal::root::{Root, RootError};
use shoal::{AgentId, RecvError};

use super::{Ctx, Exit, display, is_unknown_agent};

#[derive(Debug, Args)]
pub(crate) struct IdArg {
    /// Agent id.
    id: String,
}

#[derive(Debug, Args)]
pub(crate) struct CountArgs {
    /// Agent id.
    id: String,
    /// `inbox` (unacknowledged messages) or `outbox` (messages sent).
    #[arg(default_value = "inbox")]
    r#box: String,
}

fn inbox_not_found(id: &AgentId) -> anyhow::Error {
    anyhow::anyhow!("Inbox not found for agent: {id}")
}

pub(crate) fn receive(ctx: &Ctx, a: IdArg) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let msgs = match ctx.bus(false).and_then(|b| Ok(b.store().peek_all(&id)?)) {
        Ok(m) => m,
        Err(e) if is_unknown_agent(&e) => return Err(inbox_not_found(&id)),
        Err(e) => return Err(e),
    };
    super::out(&bash_receive_output(&msgs))?;
    if !msgs.is_empty() {
        ctx.log(&format!(
            "Retrieved {} messages for {id} (sorted by timestamp)",
            msgs.len()
        ));
    }
    Ok(Exit::Ok)
}

pub(crate) fn clear(ctx: &Ctx, a: IdArg) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let n = match ctx.bus(false).and_then(|b| Ok(b.store().clear(&id)?)) {
        Ok(n) => n,
        Err(e) if is_unknown_agent(&e) => return Err(inbox_not_found(&id)),
        Err(e) => return Err(e),
    };
    if n > 0 {
        ctx.log(&format!("Cleared {n} messages from {id} inbox"));
    }
    Ok(Exit::Ok)
}

pub(crate) fn count(ctx: &Ctx, a: CountArgs) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let n = match ctx.bus(false) {
        Err(e) if is_unknown_agent(&e) => 0,
        Err(e) => return Err(e),
        Ok(bus) => {
            let r = match a.r#box.as_str() {
                "inbox" => bus.store().depth(&id).map(|d| d.msgs),
                "outbox" => bus.store().sent_count(&id),
                _ => Ok(0), // as the bash bus: a box that does not exist holds 0 messages
            };
            match r {
                Ok(n) => n,
                Err(RecvError::UnknownAgent(_)) => 0,
                Err(e) => return Err(e.into()),
            }
        }
    };
    super::out(&format!("{n}\n"))?;
    Ok(Exit::Ok)
}

pub(crate) fn cleanup(ctx: &Ctx, a: IdArg) -> anyhow::Result<Exit> {
    let id = AgentId::new(&a.id)?;
    let removed = match ctx.bus(false) {
        Err(e) if is_unknown_agent(&e) => None,
        Err(e) => return Err(e),
        Ok(bus) => bus.remove(&id)?,
    };
    match removed {
        Some(r) => ctx.log(&format!(
            "Cleaned up message bus for {id} (inbox: {}, outbox: {})",
            r.inbox, r.sent
        )),
        None => ctx.log(&format!("No message bus to cleanup for {id}")),
    }
    Ok(Exit::Ok)
}

pub(crate) fn init_system(ctx: &Ctx) -> anyhow::Result<Exit> {
    let root = ctx.root(true)?;
    ctx.log(&format!(
        "Message bus system initialized at {}",
        display(root.path())
    ));
    Ok(Exit::Ok)
}

/// Remove the whole root, but only one that is a shoal root owned by this user: unlike the
/// bash bus, never `rm -rf` a directory that `MESSAGE_BASE_DIR` happens to name.
pub(crate) fn cleanup_system(ctx: &Ctx) -> anyhow::Result<Exit> {
    let path = ctx.root_path();
    let root = match Root::open(&path) {
        Ok(r) => r,
        Err(RootError::Missing(_)) if !path.exists() => return Ok(Exit::Ok),
        Err(RootError::Missing(_)) => bail!(
            "{}: not a shoal root (no .shoal-format marker); refusing to remove it",
            path.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let agents = shoal::Bus::open(root.clone())
        .ok()
        .and_then(|b| b.store().agents().ok())
        .map_or(0, |a| a.len());
    std::fs::remove_dir_all(root.path())
        .map_err(|e| anyhow::anyhow!("{}: {e}", root.path().display()))?;
    ctx.log(&format!("Message bus system cleaned up ({agents} agents)"));
    Ok(Exit::Ok)
}
