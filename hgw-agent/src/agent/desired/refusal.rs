//! What a peer must be whatever the other peers (its routes must not take the node's
//! own traffic, lie outside the network, or need more than one hop), and why one is
//! left out, said in its source's words.

use std::net::IpAddr;

use ipnet::IpNet;

use super::DesiredState;
use crate::cidr::overlaps;
use crate::config::{Origin, Peer};

/// Why a peer cannot have its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A node IP is one this node announces as its own.
    OwnPublicIp(IpAddr),
    /// A node IP that cannot be reached the host-gw way (see [`off_link`]).
    OffLink {
        ip: IpAddr,
        reason: String,
    },
    DefaultRoute(IpNet),
    /// A pod CIDR outside the cluster network of its family (`None`: the node has no
    /// network of that family).
    Outside {
        cidr: IpNet,
        network: Option<IpNet>,
    },
    OverlapsOwn {
        cidr: IpNet,
        own: IpNet,
    },
    OverUplink {
        cidr: IpNet,
        net: IpNet,
    },
    ContainsAddress {
        cidr: IpNet,
        addr: IpAddr,
    },
    /// A backend other than host-gw, where the source says which.
    Backend(String),
    /// A pod CIDR overlaps an older peer's (`other`, its key).
    Overlaps {
        cidr: IpNet,
        other_cidr: IpNet,
        other: String,
    },
    /// A node IP is already an older peer's.
    RepeatedIp {
        ip: IpAddr,
        other: String,
    },
}

impl Refusal {
    /// A refusal that another peer's going away may lift.
    pub(super) fn is_conflict(&self) -> bool {
        matches!(self, Self::Overlaps { .. } | Self::RepeatedIp { .. })
    }

    /// The pod CIDR (or else the node IP) it is about, whose family names the field.
    pub fn is_ipv6(&self) -> bool {
        match self {
            Self::OwnPublicIp(ip)
            | Self::OffLink { ip, .. }
            | Self::RepeatedIp { ip, .. }
            | Self::ContainsAddress { addr: ip, .. } => {
                // ContainsAddress is about the CIDR, whose family is the address's.
                ip.is_ipv6()
            }
            Self::DefaultRoute(cidr)
            | Self::Outside { cidr, .. }
            | Self::OverlapsOwn { cidr, .. }
            | Self::OverUplink { cidr, .. }
            | Self::Overlaps { cidr, .. } => cidr.addr().is_ipv6(),
            Self::Backend(_) => false,
        }
    }

    /// Whether it is about a node IP (else a pod CIDR or the backend).
    pub fn is_about_node_ip(&self) -> bool {
        matches!(
            self,
            Self::OwnPublicIp(_) | Self::OffLink { .. } | Self::RepeatedIp { .. }
        )
    }

    /// Said in the words of the peer's source; `other` is the older peer it conflicts
    /// with, if any.
    pub fn describe(&self, peer: &Peer, other: Option<&Peer>) -> String {
        let ip_field = |ip: &IpAddr| match (&peer.origin, ip.is_ipv6()) {
            (Origin::Etcd { .. }, false) => "PublicIP",
            (Origin::Etcd { .. }, true) => "PublicIPv6",
            (Origin::Kube { .. }, _) => "public IP",
            (Origin::Static { .. }, _) => "node IP",
        };
        let older = |key: &str| match (&peer.origin, other) {
            (Origin::Etcd { .. }, _) => format!("the older entry {key}"),
            (Origin::Kube { .. }, Some(o)) => format!("the older Node {}", o.name),
            (_, Some(o)) => format!("peer {} ({})", o.name, o.source),
            (_, None) => key.to_owned(),
        };
        match self {
            Self::OwnPublicIp(ip) => format!("{} {ip} is this node's address", ip_field(ip)),
            Self::OffLink { ip, reason } => format!("node IP {ip} {reason}"),
            Self::DefaultRoute(cidr) => format!("{cidr} is a default route"),
            Self::Outside {
                cidr,
                network: Some(net),
            } => {
                let name = if net.addr().is_ipv6() {
                    "IPv6Network"
                } else {
                    "Network"
                };
                format!("{cidr} is outside the {name} {net}")
            }
            Self::Outside {
                cidr,
                network: None,
            } => format!("{cidr}: this node has no network of its family"),
            Self::OverlapsOwn { cidr, own } => {
                format!("{cidr} overlaps this node's pod CIDR {own}")
            }
            Self::OverUplink { cidr, net } => {
                format!("{cidr} overlaps the uplink's network {net}")
            }
            Self::ContainsAddress { cidr, addr } => {
                format!("{cidr} contains the node's own address {addr}")
            }
            Self::Backend(found) => format!(
                "backend type {found:?}, not \"host-gw\": its pods are not reachable the host-gw way"
            ),
            Self::Overlaps {
                cidr,
                other_cidr,
                other,
            } => match peer.origin {
                Origin::Etcd { .. } => format!("{cidr} overlaps {}", older(other)),
                _ => format!("{cidr} overlaps {other_cidr} of {}", older(other)),
            },
            Self::RepeatedIp { ip, other } => match peer.origin {
                Origin::Kube { .. } => format!("{ip} is already the public IP of {}", older(other)),
                _ => format!(
                    "{} {ip} is already the address of {}",
                    ip_field(ip),
                    older(other)
                ),
            },
        }
    }
}

impl DesiredState {
    /// Why `peer` must not have its routes, whatever the other peers: a route that would
    /// hand the node's own traffic to a peer, one outside the network, a next hop that
    /// cannot be reached in one hop, a backend other than host-gw.
    pub(super) fn refuse(&self, peer: &Peer) -> Option<Refusal> {
        if let Some(backend) = peer.backend.as_ref().filter(|b| *b != "host-gw") {
            return Some(Refusal::Backend(backend.clone()));
        }
        for (cidr, ip) in peer.hops() {
            if let Some(refusal) = self.refuse_hop(cidr, ip) {
                return Some(refusal);
            }
        }
        None
    }

    fn refuse_hop(&self, cidr: IpNet, ip: IpAddr) -> Option<Refusal> {
        if cidr.prefix_len() == 0 {
            return Some(Refusal::DefaultRoute(cidr));
        }
        if let Some(node) = &self.node {
            if node.public_ips.contains(&ip) {
                return Some(Refusal::OwnPublicIp(ip));
            }
            if let Some(reason) = off_link(ip, &node.uplink_name, &node.uplink_networks) {
                return Some(Refusal::OffLink { ip, reason });
            }
            if let Some(net) = node
                .uplink_networks
                .iter()
                .find(|net| overlaps(net.trunc(), cidr))
            {
                return Some(Refusal::OverUplink {
                    cidr,
                    net: net.trunc(),
                });
            }
            if let Some(addr) = node.addresses.iter().find(|a| cidr.contains(&a.addr())) {
                return Some(Refusal::ContainsAddress {
                    cidr,
                    addr: addr.addr(),
                });
            }
        }
        let network = self.network.as_ref()?;
        let family = |net: &IpNet| net.addr().is_ipv4() == cidr.addr().is_ipv4();
        let cluster = network.cluster_cidrs().find(family);
        if !cluster.is_some_and(|net| net.contains(&cidr)) {
            return Some(Refusal::Outside {
                cidr,
                network: cluster,
            });
        }
        if let Some(own) = network.pod_cidrs().find(|own| overlaps(*own, cidr)) {
            return Some(Refusal::OverlapsOwn { cidr, own });
        }
        None
    }
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
    use crate::agent::desired::desired;
    use crate::agent::desired::test_support::{node, peer};
    use crate::agent::fixtures::network;

    #[test]
    fn routes_that_would_take_the_nodes_own_traffic_are_skipped() {
        let mut own = node();
        own.public_ips = vec!["172.31.0.7".parse().expect("ip")];
        let mut vxlan = peer("vxlan", "172.31.0.2", "10.244.2.0/24");
        vxlan.backend = Some("vxlan".into());
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
                peer("public", "172.31.0.7", "10.244.2.0/24"),
                "PublicIP 172.31.0.7 is this node's address",
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
            (
                peer("outside", "172.31.0.2", "11.0.0.0/24"),
                "outside the Network",
            ),
            (peer("default", "172.31.0.2", "0.0.0.0/0"), "default route"),
            (vxlan, "not \"host-gw\""),
        ];
        for (peer, reason) in cases {
            let state = desired(&network(), std::slice::from_ref(&peer), Some(&own));
            assert!(state.routes.is_empty(), "{}: {state:?}", peer.name);
            let skipped = state.skipped();
            assert_eq!(skipped.len(), 1, "{}", peer.name);
            assert!(
                skipped[0].reason.contains(reason),
                "{}: {:?} should say {reason:?}",
                peer.name,
                skipped[0].reason
            );
        }
    }
}
