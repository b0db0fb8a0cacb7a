//! Coordination over the bus: a topology of teams and hubs, and the primitives built on it
//! (broadcast, gather rounds, request/reply, barriers).
//!
//! [`Mesh`] sends along the topology's routes; [`hub::run`] is what a hub process runs;
//! [`round`] has the primitives. A flat topology (or none) gives the same primitives with
//! every message sent directly, so the two can be compared.

pub mod hub;
pub mod round;
pub mod topology;

use crate::bus::{Bus, SendOptions};
use crate::envelope::{AgentId, Payload};
use crate::store::{Receipt, SendError};
use topology::{Hop, Topology, TopologyError};

pub use round::{Broadcast, CoordError, RoundReport};

/// A bus and its topology: sends go along the topology's routes.
#[derive(Debug, Clone)]
pub struct Mesh {
    bus: Bus,
    topo: Topology,
}

impl Mesh {
    /// The bus with the topology of its root (flat if none was planned).
    ///
    /// # Errors
    /// [`TopologyError`] for an unreadable topology file.
    pub fn open(bus: Bus) -> Result<Mesh, TopologyError> {
        let topo = Topology::load(bus.root().layout())?.unwrap_or_else(Topology::flat);
        Ok(Mesh { bus, topo })
    }

    /// A mesh with an explicit topology (tests, benchmarks).
    pub fn with_topology(bus: Bus, topo: Topology) -> Mesh {
        Mesh { bus, topo }
    }

    /// Read the topology again (it changed on disk).
    ///
    /// # Errors
    /// [`TopologyError`].
    pub fn reload(&mut self) -> Result<(), TopologyError> {
        self.topo = Topology::load(self.bus.root().layout())?.unwrap_or_else(Topology::flat);
        Ok(())
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Send a message along its route: directly, or through the hubs the topology puts in
    /// between (the route is recorded in the envelope).
    ///
    /// # Errors
    /// [`SendError`] (a hub on the way counts as the recipient: an unknown hub is an error).
    pub fn send(
        &self,
        from: &AgentId,
        to: &AgentId,
        kind: &str,
        payload: &Payload,
        opts: &SendOptions<'_>,
    ) -> Result<Receipt, SendError> {
        match self.topo.route(from, to) {
            Hop::Direct => self.bus.send_with(from, to, kind, payload, opts),
            Hop::Via(hub) => {
                let route = [from.to_string()];
                let o = SendOptions {
                    via: Some(&hub),
                    route: Some(opts.route.unwrap_or(&route)),
                    ..*opts
                };
                self.bus.send_with(from, to, kind, payload, &o)
            }
        }
    }
}
