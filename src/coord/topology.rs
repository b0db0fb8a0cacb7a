//! Teams, hubs and routes.
//!
//! # The topology file (format version 1)
//!
//! `topology.json` in the root (`.shoal-topology.json` in a compat root), rewritten atomically
//! under `.shoal-topology.lock`:
//!
//! ```text
//! {"v":1,"kind":"hybrid","cross_team":"via-hubs",
//!  "teams":[{"name":"team-000","hub":"hub-team-000","members":["agent-0000","agent-0001"]}]}
//! ```
//!
//! `kind` is `flat` (no teams: every message goes straight to its recipient) or `hybrid`.
//! In a hybrid topology each team has a hub and the hubs form a mesh:
//!
//! * inside a team, members reach each other directly;
//! * with `cross_team: "via-hubs"` (the default), a message between members of different
//!   teams travels member -> hub -> hub -> member, and a message between a member and an agent
//!   in no team (a coordinator) passes through the member's hub; with `"direct"`, only
//!   broadcasts and rounds use the hubs;
//! * hubs send directly, and messages to a hub go directly to it.
//!
//! The route a message took is recorded in its envelope (`route`).

use std::collections::HashMap;
use std::fs;
use std::io;

use serde::{Deserialize, Serialize};

use crate::envelope::AgentId;
use crate::layout::Layout;

/// Topology format version.
pub const TOPOLOGY_VERSION: u32 = 1;

/// Flat or hybrid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// No teams, no hubs.
    #[default]
    Flat,
    /// Teams with hubs; hubs form a mesh.
    Hybrid,
}

/// How messages between teams travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CrossTeam {
    /// Through the hubs.
    #[default]
    ViaHubs,
    /// Straight to the recipient (hubs only carry broadcasts and rounds).
    Direct,
}

/// One team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    /// Team name (an id).
    pub name: AgentId,
    /// Its hub.
    pub hub: AgentId,
    /// Its members (the hub not included).
    pub members: Vec<AgentId>,
}

/// The topology of a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Format version.
    pub v: u32,
    /// Flat or hybrid.
    pub kind: Kind,
    /// How cross-team messages travel.
    #[serde(default)]
    pub cross_team: CrossTeam,
    /// The teams.
    #[serde(default)]
    pub teams: Vec<Team>,
    #[serde(skip)]
    index: HashMap<AgentId, Place>,
}

/// Where an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Member(usize),
    Hub(usize),
}

/// The next step of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Straight into the recipient's inbox.
    Direct,
    /// Into this hub's inbox first.
    Via(AgentId),
}

/// Why a topology cannot be read, planned or changed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file is not a topology this build understands.
    #[error("{path}: bad topology: {detail}", path = .path.display())]
    Bad {
        /// The topology file.
        path: std::path::PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A plan or a join that does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// An I/O error.
    #[error("{path}", path = .path.display())]
    Io {
        /// The path concerned.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Topology {
    /// A flat topology.
    pub fn flat() -> Topology {
        Topology::new(Kind::Flat, Vec::new())
    }

    /// A topology of these teams.
    pub fn new(kind: Kind, teams: Vec<Team>) -> Topology {
        let mut t = Topology {
            v: TOPOLOGY_VERSION,
            kind,
            cross_team: CrossTeam::default(),
            teams,
            index: HashMap::new(),
        };
        t.reindex();
        t
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (i, team) in self.teams.iter().enumerate() {
            self.index.insert(team.hub.clone(), Place::Hub(i));
            for m in &team.members {
                self.index.insert(m.clone(), Place::Member(i));
            }
        }
    }

    /// Plan `n` agents named `<prefix><0000..>`: flat without a team size or count, else in
    /// teams of `team_size` (or `teams` teams), each with a hub `hub-<team>`. Returns the
    /// topology and the agent ids (hubs not included).
    ///
    /// # Errors
    /// [`TopologyError::Invalid`] for ids that would be invalid, or zero sizes.
    pub fn plan(
        n: usize,
        team_size: Option<usize>,
        teams: Option<usize>,
        prefix: &str,
    ) -> Result<(Topology, Vec<AgentId>), TopologyError> {
        let width = n.saturating_sub(1).to_string().len().max(4);
        let ids: Vec<AgentId> = (0..n)
            .map(|i| AgentId::new(&format!("{prefix}{i:0width$}")))
            .collect::<Result<_, _>>()
            .map_err(|e| TopologyError::Invalid(e.to_string()))?;
        // Team sizes: `team_size` each (the last one smaller), or `teams` teams as even as
        // can be (sizes differ by one at most).
        let sizes: Vec<usize> = match (team_size, teams) {
            (None, None) => return Ok((Topology::flat(), ids)),
            (Some(0), _) | (_, Some(0)) => {
                return Err(TopologyError::Invalid(
                    "team size and team count must be at least 1".into(),
                ));
            }
            (Some(k), _) => (0..n.div_ceil(k)).map(|t| k.min(n - t * k)).collect(),
            (None, Some(t)) if t > n => {
                return Err(TopologyError::Invalid(format!(
                    "cannot make {t} teams of {n} agents (every team needs a member)"
                )));
            }
            (None, Some(t)) => (0..t).map(|i| n / t + usize::from(i < n % t)).collect(),
        };
        let tw = sizes.len().saturating_sub(1).to_string().len().max(3);
        let mut teams_v = Vec::with_capacity(sizes.len());
        let mut rest = &ids[..];
        for (t, size) in sizes.into_iter().enumerate() {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let name = AgentId::new(&format!("team-{t:0tw$}"))
                .map_err(|e| TopologyError::Invalid(e.to_string()))?;
            let hub = AgentId::new(&format!("hub-{name}"))
                .map_err(|e| TopologyError::Invalid(e.to_string()))?;
            teams_v.push(Team {
                name,
                hub,
                members: chunk.to_vec(),
            });
        }
        Ok((Topology::new(Kind::Hybrid, teams_v), ids))
    }

    /// Load the topology of a root; `None` if none was planned.
    ///
    /// # Errors
    /// [`TopologyError`] for an unreadable or newer file.
    pub fn load(layout: &Layout) -> Result<Option<Topology>, TopologyError> {
        let path = layout.topology();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TopologyError::Io { path, source }),
        };
        let mut t: Topology = serde_json::from_slice(&text).map_err(|e| TopologyError::Bad {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if t.v > TOPOLOGY_VERSION {
            return Err(TopologyError::Bad {
                path,
                detail: format!(
                    "version {} is newer than this shoal reads ({TOPOLOGY_VERSION})",
                    t.v
                ),
            });
        }
        t.reindex();
        Ok(Some(t))
    }

    /// Write the topology (atomically: temporary file, then rename).
    ///
    /// # Errors
    /// [`TopologyError::Io`].
    pub fn save(&self, layout: &Layout) -> Result<(), TopologyError> {
        let tmp = layout.topology_tmp();
        let path = layout.topology();
        let io = |source| TopologyError::Io {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_vec(self).unwrap_or_default();
        text.push(b'\n');
        let _ = fs::remove_file(&tmp);
        let mut f = crate::store::create_private_file(&tmp).map_err(io)?;
        use std::io::Write;
        f.write_all(&text).map_err(io)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io)
    }

    /// Change the topology of a root under its lock: load (or start flat), apply `f`, save.
    ///
    /// # Errors
    /// [`TopologyError`], or what `f` returns.
    pub fn update<R>(
        layout: &Layout,
        f: impl FnOnce(&mut Topology) -> Result<R, TopologyError>,
    ) -> Result<R, TopologyError> {
        let lock_path = layout.topology_lock();
        // A lock file, never written: nothing to truncate. 0600 like every file in a root.
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&lock_path)
        }
        .map_err(|source| TopologyError::Io {
            path: lock_path.clone(),
            source,
        })?;
        lock.lock().map_err(|source| TopologyError::Io {
            path: lock_path.clone(),
            source,
        })?;
        let mut t = Topology::load(layout)?.unwrap_or_else(Topology::flat);
        let r = f(&mut t)?;
        t.reindex();
        t.save(layout)?;
        Ok(r)
    }

    /// Put `id` in team `team` (created, hybrid, with hub `hub` or `hub-<team>`, if new).
    ///
    /// # Errors
    /// [`TopologyError::Invalid`] if `id` is a hub, or the team exists with another hub.
    pub fn join(
        &mut self,
        id: &AgentId,
        team: &AgentId,
        hub: Option<&AgentId>,
    ) -> Result<AgentId, TopologyError> {
        if matches!(self.index.get(id), Some(Place::Hub(_))) {
            return Err(TopologyError::Invalid(format!(
                "{id} is a hub, not a member"
            )));
        }
        for t in &mut self.teams {
            t.members.retain(|m| m != id);
        }
        let at = match self.teams.iter().position(|t| t.name == *team) {
            Some(i) => {
                if let Some(h) = hub
                    && self.teams[i].hub != *h
                {
                    return Err(TopologyError::Invalid(format!(
                        "team {team} already has hub {}, not {h}",
                        self.teams[i].hub
                    )));
                }
                i
            }
            None => {
                let hub = match hub {
                    Some(h) => h.clone(),
                    None => AgentId::new(&format!("hub-{team}"))
                        .map_err(|e| TopologyError::Invalid(e.to_string()))?,
                };
                self.teams.push(Team {
                    name: team.clone(),
                    hub,
                    members: Vec::new(),
                });
                self.teams.len() - 1
            }
        };
        self.teams[at].members.push(id.clone());
        self.kind = Kind::Hybrid;
        self.reindex();
        Ok(self.teams[at].hub.clone())
    }

    /// Whether there are hubs.
    pub fn is_hybrid(&self) -> bool {
        self.kind == Kind::Hybrid && !self.teams.is_empty()
    }

    /// The team `id` is a member of.
    pub fn team_of(&self, id: &AgentId) -> Option<&Team> {
        match self.index.get(id) {
            Some(Place::Member(i)) => Some(&self.teams[*i]),
            _ => None,
        }
    }

    /// The team whose hub `id` is.
    pub fn team_of_hub(&self, id: &AgentId) -> Option<&Team> {
        match self.index.get(id) {
            Some(Place::Hub(i)) => Some(&self.teams[*i]),
            _ => None,
        }
    }

    /// A team by name.
    pub fn team(&self, name: &str) -> Option<&Team> {
        self.teams.iter().find(|t| t.name.as_str() == name)
    }

    /// Every hub.
    pub fn hubs(&self) -> impl Iterator<Item = &AgentId> {
        self.teams.iter().map(|t| &t.hub)
    }

    /// The next hop of a message from `from` to `to`.
    pub fn route(&self, from: &AgentId, to: &AgentId) -> Hop {
        if !self.is_hybrid() || self.cross_team == CrossTeam::Direct {
            return Hop::Direct;
        }
        let (f, t) = (self.index.get(from), self.index.get(to));
        match (f, t) {
            // Hubs send directly, and are reached directly.
            (Some(Place::Hub(_)), _) | (_, Some(Place::Hub(_))) => Hop::Direct,
            (Some(Place::Member(a)), Some(Place::Member(b))) if a == b => Hop::Direct,
            (Some(Place::Member(a)), _) => Hop::Via(self.teams[*a].hub.clone()),
            (None, Some(Place::Member(b))) => Hop::Via(self.teams[*b].hub.clone()),
            (None, None) => Hop::Direct,
        }
    }

    /// The next hop for a message hub `hub` is forwarding to `to`: the recipient itself when
    /// it is in the hub's team or in no team, else the recipient's hub.
    pub fn forward(&self, hub: &AgentId, to: &AgentId) -> Hop {
        match (self.index.get(hub), self.index.get(to)) {
            (Some(Place::Hub(h)), Some(Place::Member(t))) if h != t => {
                Hop::Via(self.teams[*t].hub.clone())
            }
            _ => Hop::Direct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn plan_makes_teams_with_hubs() {
        let (t, ids) = Topology::plan(250, Some(100), None, "agent-").unwrap();
        assert_eq!(ids.len(), 250);
        assert_eq!(ids[0].as_str(), "agent-0000");
        assert_eq!(t.teams.len(), 3);
        assert_eq!(t.teams[2].members.len(), 50);
        assert_eq!(t.teams[0].hub.as_str(), "hub-team-000");
        let (t, _) = Topology::plan(10, None, Some(3), "w").unwrap();
        assert_eq!(
            t.teams.iter().map(|t| t.members.len()).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert!(Topology::plan(3, None, Some(4), "w").is_err());
        let (t, ids) = Topology::plan(5, None, None, "w").unwrap();
        assert!(!t.is_hybrid());
        assert_eq!(ids.len(), 5);
        assert!(Topology::plan(5, Some(0), None, "w").is_err());
        assert!(Topology::plan(5, None, None, "../").is_err());
    }

    #[test]
    fn routes_follow_the_rules() {
        let (t, _) = Topology::plan(4, Some(2), None, "a").unwrap();
        let (a0, a1, a2, a3) = (id("a0000"), id("a0001"), id("a0002"), id("a0003"));
        let (h0, h1, coord) = (id("hub-team-000"), id("hub-team-001"), id("coord"));
        assert_eq!(t.route(&a0, &a1), Hop::Direct, "same team");
        assert_eq!(
            t.route(&a0, &a2),
            Hop::Via(h0.clone()),
            "other team: own hub first"
        );
        assert_eq!(
            t.forward(&h0, &a2),
            Hop::Via(h1.clone()),
            "then the other hub"
        );
        assert_eq!(t.forward(&h1, &a2), Hop::Direct, "then the member");
        assert_eq!(
            t.route(&a3, &coord),
            Hop::Via(h1.clone()),
            "member to outsider: own hub"
        );
        assert_eq!(t.forward(&h1, &coord), Hop::Direct);
        assert_eq!(
            t.route(&coord, &a0),
            Hop::Via(h0.clone()),
            "outsider to member: member's hub"
        );
        assert_eq!(t.route(&coord, &h1), Hop::Direct);
        assert_eq!(t.route(&h0, &a3), Hop::Direct, "hubs send directly");
        assert_eq!(t.route(&coord, &id("other")), Hop::Direct);
        let mut direct = t.clone();
        direct.cross_team = CrossTeam::Direct;
        assert_eq!(direct.route(&a0, &a2), Hop::Direct);
        assert_eq!(Topology::flat().route(&a0, &a2), Hop::Direct);
    }

    #[test]
    fn join_moves_an_agent_and_makes_the_team() {
        let mut t = Topology::flat();
        let hub = t.join(&id("x"), &id("red"), None).unwrap();
        assert_eq!(hub.as_str(), "hub-red");
        assert!(t.is_hybrid());
        t.join(&id("x"), &id("blue"), Some(&id("hb"))).unwrap();
        assert_eq!(t.team_of(&id("x")).unwrap().name.as_str(), "blue");
        assert!(t.team("red").unwrap().members.is_empty());
        assert!(t.join(&id("y"), &id("blue"), Some(&id("other"))).is_err());
        assert!(
            t.join(&id("hb"), &id("red"), None).is_err(),
            "a hub is not a member"
        );
    }
}
