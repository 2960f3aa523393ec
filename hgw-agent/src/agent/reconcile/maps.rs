//! The fast path's route and endpoint maps: an entry for each route hgw holds (with
//! its next hop's MAC, when known) and each local pod, written only when it differs,
//! and the generation that makes cached flows see the writes.

use std::{collections::HashSet, net::IpAddr};

use hgw_common::{NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig};
use ipnet::IpNet;
use log::{debug, warn};

use super::{FastPathMaps, Reconciler, RouteState, RouteTable};
use crate::{agent::observed::Observed, kernel::format_mac};

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
    /// Whether the fast path carries `cidr`: desired, and not held by someone else.
    pub(super) fn takes(&self, cidr: IpNet) -> bool {
        self.desired.routes.contains_key(&cidr)
            && !matches!(self.state.get(&cidr), Some(RouteState::Foreign(_)))
    }

    fn next_hop(&self, cidr: IpNet, observed: &Observed) -> Option<NextHop> {
        let hop = self.desired.routes.get(&cidr)?;
        let mac = observed.next_hops.get(&hop.node_ip).and_then(|n| n.mac);
        Some(NextHop {
            ifindex: observed.uplink.index,
            mtu: observed.uplink.mtu,
            dst_mac: mac.unwrap_or_default(),
            src_mac: observed.uplink.mac,
            flags: if mac.is_some() { NEXT_HOP_MAC_KNOWN } else { 0 },
        })
    }

    pub(super) fn write_map_entry(&mut self, cidr: IpNet, observed: &Observed) {
        if !self.takes(cidr) {
            return;
        }
        let Some(next_hop) = self.next_hop(cidr, observed) else {
            return;
        };
        let Some(maps) = &mut self.maps else { return };
        if self.map.get(&cidr) == Some(&next_hop) {
            return;
        }
        match maps.set_route(cidr, next_hop) {
            Ok(()) => {
                self.map.insert(cidr, next_hop);
            }
            Err(e) => warn!("{e}"),
        }
    }

    pub(super) fn remove_map_entry(&mut self, cidr: IpNet) {
        let Some(maps) = &mut self.maps else { return };
        if !self.map.contains_key(&cidr) {
            return;
        }
        match maps.remove_route(cidr) {
            Ok(()) => {
                self.map.remove(&cidr);
            }
            Err(e) => warn!("{e}"),
        }
    }

    pub(super) fn write_all_map_entries(&mut self, observed: &Observed) {
        if !self.peers_known {
            return;
        }
        let cidrs: Vec<IpNet> = self.desired.routes.keys().copied().collect();
        for cidr in cidrs {
            self.write_map_entry(cidr, observed);
        }
    }

    /// The node's MACs, MTU or forwarding sysctls changed: the programs' config and
    /// every next hop carry them. Whether the programs have `node` now (true without a
    /// fast path: nothing to give).
    pub fn set_node(&mut self, node: NodeConfig, observed: &Observed) -> bool {
        let Some(maps) = &mut self.maps else {
            return true;
        };
        let written = match maps.set_config(node) {
            Ok(()) => true,
            Err(e) => {
                warn!("{e}");
                false
            }
        };
        self.write_all_map_entries(observed);
        written
    }

    pub(super) fn sync_endpoint(&mut self, ip: IpAddr, observed: &Observed) {
        let Some(maps) = &mut self.maps else { return };
        let previous = self.endpoints.get(&ip);
        let endpoint = observed.endpoint(ip, previous);
        if endpoint.as_ref() == previous {
            return;
        }
        let result = match endpoint {
            Some(endpoint) => maps.set_endpoint(ip, endpoint).map(|()| {
                debug!(
                    "pod {ip}: {} on port {}",
                    format_mac(endpoint.mac),
                    endpoint.ifindex
                );
                self.endpoints.insert(ip, endpoint);
            }),
            None => maps.remove_endpoint(ip).map(|()| {
                self.endpoints.remove(&ip);
            }),
        };
        if let Err(e) = result {
            warn!("{e}");
        }
    }

    pub(super) fn sync_all_endpoints(&mut self, observed: &Observed) {
        let ips: HashSet<IpAddr> = self
            .endpoints
            .keys()
            .chain(observed.pods.keys())
            .copied()
            .collect();
        for ip in ips {
            self.sync_endpoint(ip, observed);
        }
    }

    /// The maps' writes of this pass reach the cached flows: one generation change.
    pub fn publish_generation(&mut self) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.publish_generation() {
            warn!("{e}");
        }
    }

    /// The kernel's routing changed: every cached flow asks the FIB again.
    pub fn routing_changed(&mut self) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.bump_generation() {
            warn!("{e}");
        }
    }

    /// Pods the bridge knows whose port is not known yet, with their MACs: a
    /// forwarding dump would tell. None without the fast path (no endpoints to fill).
    pub fn pods_without_port<'a>(
        &'a self,
        observed: &'a Observed,
    ) -> impl Iterator<Item = (IpAddr, [u8; 6])> + 'a {
        observed
            .pods
            .iter()
            .filter(|(ip, _)| self.maps.is_some() && !self.endpoints.contains_key(ip))
            .map(|(ip, mac)| (*ip, *mac))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        FakeMaps, FakeRoutes, block_on, desired_state, observe_routes, peers,
    };
    use super::super::*;
    use crate::agent::fixtures::{UPLINK, observed};
    use crate::kernel::{KernelEvent, Neighbour};

    /// A new peer costs one write of its map entry and one generation in its pass:
    /// none at the route's install and another when the rest of the pass runs.
    #[test]
    fn a_new_peer_is_written_once() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        let set = peers(3);
        block_on(r.apply_peers(PeerBatch::All(set[..2].to_vec()), &observed));
        observe_routes(&mut observed, &routes);
        // Its next hop is known already (a neighbour of the node's).
        observed.apply(KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex: UPLINK,
                ip: IpAddr::V4(set[2].node_ip),
                mac: Some([2, 3, 3, 3, 3, 3]),
                stale: false,
            },
            deleted: false,
        });
        r.publish_generation();
        r.maps.as_mut().expect("present").writes = 0;
        let generation = r.maps.as_ref().expect("present").generation;
        block_on(r.apply_peers(
            PeerBatch::Changes(vec![(set[2].key().to_owned(), Some(set[2].clone()))]),
            &observed,
        ));
        // The route's own echo changes nothing more.
        observe_routes(&mut observed, &routes);
        let cidr = IpNet::V4(set[2].pod_cidr);
        block_on(r.on_change(Change::Prefix(cidr), &observed));
        r.publish_generation();
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.writes, 1);
        assert_eq!(maps.routes[&cidr].dst_mac, [2, 3, 3, 3, 3, 3]);
        assert_eq!(
            maps.generation,
            generation + 1,
            "one generation for the pass"
        );
    }

    #[test]
    fn a_next_hop_mac_updates_only_its_map_entries() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        let set = peers(10);
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        assert!(!r.ready(&observed), "no MAC known yet");
        r.maps.as_mut().expect("present").writes = 0;
        let ip = IpAddr::V4(set[3].node_ip);
        let change = observed.apply(KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex: UPLINK,
                ip,
                mac: Some([2, 1, 1, 1, 1, 1]),
                stale: false,
            },
            deleted: false,
        });
        block_on(r.on_change(change.expect("a change"), &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.writes, 1);
        let entry = maps.routes[&IpNet::V4(set[3].pod_cidr)];
        assert_eq!(entry.dst_mac, [2, 1, 1, 1, 1, 1]);
        assert_eq!(entry.flags & NEXT_HOP_MAC_KNOWN, NEXT_HOP_MAC_KNOWN);
    }
}
