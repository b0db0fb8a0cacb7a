//! What `shoal ps` shows: every agent of a root, alive or not, with its state.
//!
//! Liveness comes from the agents' liveness locks (never from PIDs), activity and inbox depth
//! from their meta tables, and process ids, restarts and exit statuses from the spawner's
//! status file when a spawner runs (or ran) on the root.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::agents::status::{self, AgentStatus, SpawnerStatus};
use crate::bus::Bus;
use crate::coord::topology::Topology;
use crate::envelope::AgentId;
use crate::store::now_ms;

/// The stall threshold when neither the caller nor a spawner gives one.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// One agent, as `shoal ps --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRow {
    /// Agent id.
    pub id: String,
    /// `running`, `stalled`, `starting`, `stopping`, `restarting` (waiting out a backoff),
    /// `pending` (not started yet), `exited`, `crashed`, `failed`, or `down` (no process, and
    /// no spawner record of how it ended).
    pub state: String,
    /// Whether a process holds its liveness lock.
    pub alive: bool,
    /// Its current (or last) process, from the spawner.
    pub pid: Option<u32>,
    /// Restarts, from the spawner.
    pub restarts: u32,
    /// Crashes, from the spawner.
    pub crashes: u32,
    /// Messages stored and not yet acknowledged.
    pub inbox_depth: u64,
    /// Their bytes.
    pub inbox_bytes: u64,
    /// Its last send, receive, ack or heartbeat, ms since the epoch.
    pub last_activity_ms: Option<u64>,
    /// Milliseconds since then.
    pub idle_ms: Option<u64>,
    /// Its team.
    pub team: Option<String>,
    /// Whether it is a hub.
    pub hub: bool,
    /// Exit status of its last process.
    pub exit_code: Option<i32>,
    /// Signal that ended its last process.
    pub signal: Option<i32>,
}

/// Every agent of the bus's root, sorted by id. `stall_after` overrides the threshold of the
/// spawner that runs (or ran) there.
///
/// # Errors
/// The root cannot be listed, or its spawner status file cannot be read.
pub fn list(bus: &Bus, stall_after: Option<Duration>) -> Result<Vec<AgentRow>, std::io::Error> {
    let layout = bus.root().layout();
    let st: Option<SpawnerStatus> = SpawnerStatus::load(layout)?;
    let live = status::spawner_running(layout)?;
    let after = stall_after
        .or_else(|| st.as_ref().map(|s| Duration::from_millis(s.stall_after_ms)))
        .unwrap_or(DEFAULT_STALL_AFTER);
    let topo = Topology::load(layout).ok().flatten();
    let mut records: BTreeMap<String, AgentStatus> = st
        .map(|s| s.agents.into_iter().map(|a| (a.id.clone(), a)).collect())
        .unwrap_or_default();
    let store = bus.store();
    let mut ids: Vec<String> = store
        .agents()
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .into_iter()
        .map(|a| a.to_string())
        .collect();
    ids.extend(records.keys().cloned());
    ids.sort();
    ids.dedup();
    let now = now_ms();
    let mut rows = Vec::with_capacity(ids.len());
    for id_s in ids {
        let Ok(id) = AgentId::new(&id_s) else {
            continue;
        };
        let rec = records.remove(&id_s);
        let alive = crate::liveness::is_alive(layout, &id).unwrap_or(false);
        let depth = store.depth(&id).unwrap_or_default();
        let act = store.activity(&id).unwrap_or_default();
        let rec_state = rec.as_ref().map(|r| r.state.as_str());
        let state = if alive {
            if act.stalled(&depth, now, after) {
                "stalled"
            } else {
                match rec_state {
                    Some(s @ ("starting" | "stopping")) if live => s,
                    _ => "running",
                }
            }
        } else {
            match rec_state {
                Some(s @ ("exited" | "crashed" | "failed")) => s,
                Some("backoff") if live => "restarting",
                Some("pending") if live => "pending",
                _ => "down",
            }
        };
        let (team, hub) = match &topo {
            Some(t) => match (t.team_of(&id), t.team_of_hub(&id)) {
                (_, Some(team)) => (Some(team.name.to_string()), true),
                (Some(team), None) => (Some(team.name.to_string()), false),
                (None, None) => (None, false),
            },
            None => (None, false),
        };
        rows.push(AgentRow {
            id: id_s,
            state: state.to_owned(),
            alive,
            pid: rec.as_ref().and_then(|r| r.pid),
            restarts: rec.as_ref().map_or(0, |r| r.restarts),
            crashes: rec.as_ref().map_or(0, |r| r.crashes),
            inbox_depth: depth.msgs,
            inbox_bytes: depth.bytes,
            last_activity_ms: act.last_ms,
            idle_ms: act.idle_ms(now),
            team: team.or_else(|| rec.as_ref().and_then(|r| r.team.clone())),
            hub: hub || rec.as_ref().is_some_and(|r| r.hub),
            exit_code: rec.as_ref().and_then(|r| r.exit_code),
            signal: rec.as_ref().and_then(|r| r.signal),
        });
    }
    Ok(rows)
}
