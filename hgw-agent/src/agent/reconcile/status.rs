//! What status shows of the reconciler's work: whether the node is ready, and each
//! peer's route and next hop.

use super::{FastPathMaps, Reconciler, RouteState, RouteTable};
use crate::{agent::observed::Observed, kernel::format_mac, serve::status::PeerStatus};

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
    /// Every route installed (or left to its foreign owner) and, with the fast path,
    /// every next hop's MAC known, once the source has spoken.
    pub fn ready(&self, observed: &Observed) -> bool {
        self.peers_known
            && self
                .desired
                .routes
                .iter()
                .all(|(cidr, hop)| match self.state.get(cidr) {
                    Some(RouteState::Installed) => {
                        self.maps.is_none()
                            || observed
                                .next_hops
                                .get(&hop.node_ip)
                                .is_some_and(|n| n.mac.is_some())
                    }
                    Some(RouteState::Foreign(_)) => true,
                    _ => false,
                })
    }

    pub fn peer_status(&mut self, observed: &Observed) -> Vec<PeerStatus> {
        if self.peer_status.is_none() {
            self.peer_status = Some(self.make_peer_status(observed));
        }
        self.peer_status.clone().unwrap_or_default()
    }

    fn make_peer_status(&self, observed: &Observed) -> Vec<PeerStatus> {
        self.desired
            .routes
            .iter()
            .map(|(cidr, hop)| PeerStatus {
                name: hop.peer.clone(),
                node_ip: hop.node_ip.to_string(),
                pod_cidr: cidr.to_string(),
                source: hop.source.clone(),
                lease: hop.lease.map(|l| format!("{l:x}")),
                mac: observed
                    .next_hops
                    .get(&hop.node_ip)
                    .and_then(|n| n.mac)
                    .map(format_mac),
                route: self.state.get(cidr) == Some(&RouteState::Installed),
                foreign_route: match self.state.get(cidr) {
                    Some(RouteState::Foreign(protocol)) => Some(protocol.clone()),
                    _ => None,
                },
            })
            .collect()
    }
}
