//! The desired state: which routes and fast-path entries this node should have, as a
//! pure function of the network, the peers and what the node is. No I/O, no kernel:
//! unit-tested as it is.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::cidr::{Taken, overlaps};
use crate::config::{Network, Peer};

/// What the desired state is computed against: facts of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub uplink_name: String,
    /// The uplink's networks (address + prefix): every peer must be on one of them.
    pub uplink_networks: Vec<IpNet>,
    /// Every address of the node's other interfaces, but the bridge's (the gateway).
    pub addresses: Vec<IpNet>,
}

/// One peer route: a pod CIDR via a node IP on the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub node_ip: IpAddr,
    pub peer: String,
    /// "static", or the etcd key it came from.
    pub source: String,
    pub lease: Option<i64>,
}

/// A peer route left out, and why (said once, in a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub pod_cidr: IpNet,
    pub node_ip: IpAddr,
    pub peer: String,
    pub source: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Pod CIDR -> next hop, every one reachable the host-gw way.
    pub routes: BTreeMap<IpNet, Hop>,
    pub skipped: Vec<Skipped>,
}

impl DesiredState {
    /// The pod CIDRs each next hop carries (a node IP may carry several).
    pub fn by_next_hop(&self) -> HashMap<IpAddr, Vec<IpNet>> {
        let mut by_hop: HashMap<IpAddr, Vec<IpNet>> = HashMap::new();
        for (cidr, hop) in &self.routes {
            by_hop.entry(hop.node_ip).or_default().push(*cidr);
        }
        by_hop
    }
}

/// The routes `peers` ask for, minus those that would hand the node's own traffic to a
/// peer or cannot be reached in one hop; the first peer to claim a prefix keeps it.
pub fn desired(network: &Network, peers: &[Peer], node: &NodeFacts) -> DesiredState {
    let mut state = DesiredState::default();
    let mut taken = Taken::default();
    for peer in peers {
        for (pod_cidr, node_ip) in peer.hops() {
            let skip = |reason: String| Skipped {
                pod_cidr,
                node_ip,
                peer: peer.name.clone(),
                source: peer.source.clone(),
                reason,
            };
            let reason = refuse(network, pod_cidr, node_ip, node).or_else(|| {
                let (other, _) = taken.find(pod_cidr)?;
                let hop = &state.routes[&other];
                Some(format!(
                    "{pod_cidr} overlaps {other} of peer {} ({})",
                    hop.peer, hop.source
                ))
            });
            if let Some(reason) = reason {
                state.skipped.push(skip(reason));
                continue;
            }
            taken.insert(pod_cidr, ());
            state.routes.insert(
                pod_cidr,
                Hop {
                    node_ip,
                    peer: peer.name.clone(),
                    source: peer.source.clone(),
                    lease: peer.lease,
                },
            );
        }
    }
    state
}

/// Why a peer route must not be installed, if it must not.
fn refuse(network: &Network, pod_cidr: IpNet, node_ip: IpAddr, node: &NodeFacts) -> Option<String> {
    if let Some(reason) = off_link(node_ip, &node.uplink_name, &node.uplink_networks) {
        return Some(format!("node IP {node_ip} {reason}"));
    }
    if pod_cidr.prefix_len() == 0 {
        return Some(format!("{pod_cidr} is a default route"));
    }
    if let Some(own) = network.pod_cidrs().find(|own| overlaps(*own, pod_cidr)) {
        return Some(format!("{pod_cidr} overlaps this node's pod CIDR {own}"));
    }
    if let Some(net) = node
        .uplink_networks
        .iter()
        .find(|net| overlaps(net.trunc(), pod_cidr))
    {
        return Some(format!(
            "{pod_cidr} overlaps the uplink's network {}",
            net.trunc()
        ));
    }
    if let Some(addr) = node.addresses.iter().find(|a| pod_cidr.contains(&a.addr())) {
        return Some(format!(
            "{pod_cidr} contains the node's own address {}",
            addr.addr()
        ));
    }
    None
}

/// Why a peer's node IP cannot be reached the host-gw way from this uplink, if it
/// cannot.
pub fn off_link(node_ip: IpAddr, uplink: &str, networks: &[IpNet]) -> Option<String> {
    if networks.iter().any(|n| n.addr() == node_ip) {
        return Some("is this node's own uplink address".into());
    }
    if networks.iter().any(|n| n.contains(&node_ip)) {
        return None;
    }
    let have: Vec<String> = networks
        .iter()
        .filter(|n| n.addr().is_ipv4() == node_ip.is_ipv4())
        .map(|n| n.to_string())
        .collect();
    let family = if node_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    Some(format!(
        "not on the subnet of uplink {uplink} ({}): host-gw needs every peer on the same L2 segment",
        if have.is_empty() {
            format!("no {family} address")
        } else {
            have.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fixtures::{self, network};
    use crate::config::{NetworkV6, PeerV6};

    fn node() -> NodeFacts {
        fixtures::node("172.31.0.1/24", &["192.168.9.1/24"])
    }

    fn peer(name: &str, node_ip: &str, pod_cidr: &str) -> Peer {
        Peer {
            name: name.into(),
            node_ip: node_ip.parse().expect("a valid literal"),
            pod_cidr: pod_cidr.parse().expect("a valid literal"),
            v6: None,
            source: "static".into(),
            lease: None,
        }
    }

    #[test]
    fn every_reachable_peer_gets_a_route() {
        let state = desired(
            &network(),
            &[
                peer("n2", "172.31.0.2", "10.244.2.0/24"),
                peer("n3", "172.31.0.3", "10.244.3.0/24"),
            ],
            &node(),
        );
        assert_eq!(state.routes.len(), 2);
        assert!(state.skipped.is_empty());
        let hop = &state.routes[&"10.244.3.0/24".parse().expect("a valid literal")];
        assert_eq!(
            hop.node_ip,
            "172.31.0.3".parse::<IpAddr>().expect("present")
        );
        assert_eq!(hop.peer, "n3");
    }

    #[test]
    fn routes_that_would_take_the_nodes_own_traffic_are_skipped() {
        let cases = [
            (
                peer("off", "192.168.200.2", "10.244.2.0/24"),
                "not on the subnet",
            ),
            (
                peer("self", "172.31.0.1", "10.244.2.0/24"),
                "own uplink address",
            ),
            (
                peer("own", "172.31.0.2", "10.244.1.0/25"),
                "this node's pod CIDR",
            ),
            (
                peer("uplink", "172.31.0.2", "172.31.0.0/24"),
                "uplink's network",
            ),
            (
                peer("addr", "172.31.0.2", "192.168.9.0/24"),
                "node's own address",
            ),
            (peer("default", "172.31.0.2", "0.0.0.0/0"), "default route"),
        ];
        for (peer, reason) in cases {
            let state = desired(&network(), std::slice::from_ref(&peer), &node());
            assert!(state.routes.is_empty(), "{}: {state:?}", peer.name);
            assert_eq!(state.skipped.len(), 1, "{}", peer.name);
            assert!(
                state.skipped[0].reason.contains(reason),
                "{}: {:?} should say {reason:?}",
                peer.name,
                state.skipped[0].reason
            );
        }
    }

    #[test]
    fn the_first_peer_keeps_an_overlapping_prefix() {
        let state = desired(
            &network(),
            &[
                peer("n2", "172.31.0.2", "10.244.2.0/24"),
                peer("n9", "172.31.0.9", "10.244.2.128/25"),
            ],
            &node(),
        );
        assert_eq!(state.routes.len(), 1);
        assert_eq!(state.routes.values().next().expect("present").peer, "n2");
        assert!(state.skipped[0].reason.contains("of peer n2"));
    }

    #[test]
    fn dual_stack_peers_get_one_route_per_family() {
        let mut network = network();
        network.v6 = Some(NetworkV6 {
            pod_cidr: "fd00:244:1::/64".parse().expect("a valid literal"),
            cluster_cidr: "fd00:244::/48".parse().expect("a valid literal"),
        });
        let mut node = node();
        node.uplink_networks
            .push("fd00:31::1/64".parse().expect("a valid literal"));
        let mut n2 = peer("n2", "172.31.0.2", "10.244.2.0/24");
        n2.v6 = Some(PeerV6 {
            node_ip: "fd00:31::2".parse().expect("a valid literal"),
            pod_cidr: "fd00:244:2::/64".parse().expect("a valid literal"),
        });
        let state = desired(&network, &[n2], &node);
        assert_eq!(state.routes.len(), 2);
        let by_hop = state.by_next_hop();
        assert_eq!(by_hop.len(), 2);
    }
}
