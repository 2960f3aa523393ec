//! The desired state: which routes and fast-path entries this node should have, given
//! the network, the peers and what the node is. The one place where peers are checked
//! (every source's, and the static config's): a peer is accepted whole, or left out
//! with a [`Refusal`] that the caller words for its input (a config field, an etcd key,
//! a Node). No I/O, no kernel: unit-tested as it is.
//!
//! It is kept up to date change by change ([`DesiredState::apply`]): a changed peer
//! costs lookups, not a pass over every peer. Of two peers that conflict (overlapping
//! pod CIDRs, the same node IP) the older keeps its routes, whatever order the changes
//! come in; when it goes, the younger one is considered again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::cidr::{Taken, overlaps};
use crate::config::{Network, Origin, Peer};

/// What the desired state is computed against: facts of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub uplink_name: String,
    /// The uplink's networks (address + prefix): every peer must be on one of them.
    pub uplink_networks: Vec<IpNet>,
    /// Every address of the node's other interfaces, but the bridge's (the gateway).
    pub addresses: Vec<IpNet>,
    /// The public IPs this node announces to its source (etcd, the Kubernetes API).
    pub public_ips: Vec<IpAddr>,
}

/// One peer route: a pod CIDR via a node IP on the uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub node_ip: IpAddr,
    pub peer: String,
    /// "static", the etcd key or the Node (`node/NAME`) it came from.
    pub source: String,
    pub lease: Option<i64>,
    /// The key of the peer that holds it.
    pub key: String,
}

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
    fn is_conflict(&self) -> bool {
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

/// A peer left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub peer: String,
    pub source: String,
    pub pod_cidrs: Vec<IpNet>,
    pub refusal: Refusal,
    /// The refusal in the source's words.
    pub reason: String,
}

/// What one [`DesiredState::apply`] changed in the routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Pod CIDRs new, or with another next hop (with the one they had).
    pub changed: Vec<(IpNet, Option<IpAddr>)>,
    /// Pod CIDRs no longer wanted, with the hop they had.
    pub removed: Vec<(IpNet, Hop)>,
    /// Peers left out, new or for a new reason (each said once).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Default)]
pub struct DesiredState {
    network: Option<Network>,
    /// `None`: not known yet (the config's own checks); the node's checks wait.
    node: Option<NodeFacts>,
    /// Every peer the source gave, by key.
    peers: HashMap<String, Peer>,
    /// Pod CIDR -> next hop, every one reachable the host-gw way.
    pub routes: BTreeMap<IpNet, Hop>,
    /// The accepted peers' pod CIDRs and node IPs, with their keys.
    taken: Taken<String>,
    ips: HashMap<IpAddr, String>,
    /// Peers left out, by key.
    skipped: HashMap<String, Skipped>,
}

/// The order in which conflicts are settled: older first, then by key.
type Rank = (i64, String);

impl DesiredState {
    pub fn new(network: Network, node: Option<NodeFacts>) -> Self {
        Self {
            network: Some(network),
            node,
            ..Self::default()
        }
    }

    /// The peer the source gave for `key`.
    pub fn peer(&self, key: &str) -> Option<&Peer> {
        self.peers.get(key)
    }

    /// Every peer the source gave.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// The peers left out now, oldest first.
    pub fn skipped(&self) -> Vec<&Skipped> {
        let mut skipped: Vec<(Rank, &Skipped)> = self
            .skipped
            .iter()
            .map(|(key, s)| (rank(&self.peers[key]), s))
            .collect();
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        skipped.into_iter().map(|(_, s)| s).collect()
    }

    /// Makes `peers` the whole peer set: only the peers that differ from the ones held
    /// are considered again.
    pub fn replace_all(&mut self, peers: Vec<Peer>) -> Delta {
        let mut next: HashMap<String, Peer> =
            peers.into_iter().map(|p| (p.key().to_owned(), p)).collect();
        let mut changes: Vec<(String, Option<Peer>)> = Vec::new();
        for (key, old) in &self.peers {
            match next.remove(key) {
                None => changes.push((key.clone(), None)),
                Some(new) if new != *old => changes.push((key.clone(), Some(new))),
                Some(_) => {}
            }
        }
        changes.extend(next.into_iter().map(|(key, p)| (key, Some(p))));
        self.apply(changes)
    }

    /// Takes the changes of some peers (`None`: gone), by key.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = (String, Option<Peer>)>) -> Delta {
        let mut before: HashMap<IpNet, Option<Hop>> = HashMap::new();
        let mut candidates: BTreeSet<Rank> = BTreeSet::new();
        let mut released = false;
        for (key, peer) in changes {
            if self.peers.get(&key) == peer.as_ref() {
                continue;
            }
            released |= self.release(&key, &mut before);
            match peer {
                Some(peer) => {
                    candidates.insert(rank(&peer));
                    self.peers.insert(key, peer);
                }
                None => {
                    self.peers.remove(&key);
                    self.skipped.remove(&key);
                }
            }
        }
        // What a peer gone or changed held may now go to one it kept out.
        if released {
            candidates.extend(
                self.skipped
                    .iter()
                    .filter(|(_, s)| s.refusal.is_conflict())
                    .map(|(key, _)| rank(&self.peers[key])),
            );
        }
        let mut delta = Delta::default();
        while let Some(next) = candidates.pop_first() {
            self.consider(next, &mut candidates, &mut before, &mut delta);
        }
        for (cidr, old) in before {
            match (old, self.routes.get(&cidr)) {
                (None, Some(_)) => delta.changed.push((cidr, None)),
                (Some(old), Some(new)) if old.node_ip != new.node_ip => {
                    delta.changed.push((cidr, Some(old.node_ip)));
                }
                (Some(old), None) => delta.removed.push((cidr, old)),
                _ => {}
            }
        }
        // In prefix order, for the logs (the pairs are small to move; the hops are not).
        delta.changed.sort_unstable_by_key(|(cidr, _)| *cidr);
        delta.removed.sort_by_key(|(cidr, _)| *cidr);
        delta
    }

    /// Takes `key`'s routes away, if it had them; whether it had.
    fn release(&mut self, key: &str, before: &mut HashMap<IpNet, Option<Hop>>) -> bool {
        let Some(peer) = self.peers.get(key) else {
            return false;
        };
        let hops: Vec<(IpNet, IpAddr)> = peer.hops().collect();
        let held = self
            .routes
            .get(&hops[0].0)
            .is_some_and(|hop| hop.key == key);
        if !held {
            return false;
        }
        for (cidr, ip) in hops {
            let old = self.routes.remove(&cidr);
            before.entry(cidr).or_insert(old);
            self.taken.remove(cidr);
            if self.ips.get(&ip).is_some_and(|k| k == key) {
                self.ips.remove(&ip);
            }
        }
        true
    }

    /// Accepts the peer ranked `(_, key)`, or leaves it out saying why; a younger peer
    /// in its way is moved out (and considered again).
    fn consider(
        &mut self,
        (order, key): Rank,
        candidates: &mut BTreeSet<Rank>,
        before: &mut HashMap<IpNet, Option<Hop>>,
        delta: &mut Delta,
    ) {
        // Taken out while it is considered (moved, not copied), and put back after.
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        self.settle((order, key), peer, candidates, before, delta);
    }

    fn settle(
        &mut self,
        (order, key): Rank,
        peer: Peer,
        candidates: &mut BTreeSet<Rank>,
        before: &mut HashMap<IpNet, Option<Hop>>,
        delta: &mut Delta,
    ) {
        // Already holding its routes (a conflict that was settled meanwhile).
        if self
            .routes
            .get(&IpNet::V4(peer.pod_cidr))
            .is_some_and(|hop| hop.key == key)
        {
            self.peers.insert(key, peer);
            return;
        }
        let mut refusal = self.refuse(&peer);
        let mut younger: Vec<String> = Vec::new();
        if refusal.is_none() {
            for (cidr, ip) in peer.hops() {
                let found = self
                    .taken
                    .find(cidr)
                    .map(|(other_cidr, other)| (other.clone(), Some(other_cidr)))
                    .into_iter()
                    .chain(self.ips.get(&ip).map(|other| (other.clone(), None)));
                for (other, other_cidr) in found {
                    if (self.peers[&other].origin.order(), other.as_str()) > (order, key.as_str()) {
                        younger.push(other);
                        continue;
                    }
                    refusal = Some(match other_cidr {
                        Some(other_cidr) => Refusal::Overlaps {
                            cidr,
                            other_cidr,
                            other,
                        },
                        None => Refusal::RepeatedIp { ip, other },
                    });
                    break;
                }
                if refusal.is_some() {
                    break;
                }
            }
        }
        if let Some(refusal) = refusal {
            let other = match &refusal {
                Refusal::Overlaps { other, .. } | Refusal::RepeatedIp { other, .. } => {
                    self.peers.get(other)
                }
                _ => None,
            };
            let skipped = Skipped {
                key: key.clone(),
                peer: peer.name.clone(),
                source: peer.source.clone(),
                pod_cidrs: peer.hops().map(|(cidr, _)| cidr).collect(),
                reason: refusal.describe(&peer, other),
                refusal,
            };
            if self.skipped.get(&key).map(|s| &s.reason) != Some(&skipped.reason) {
                delta.skipped.push(skipped.clone());
            }
            self.skipped.insert(key.clone(), skipped);
            self.peers.insert(key, peer);
            return;
        }
        for other in younger {
            if self.release(&other, before) {
                candidates.insert(rank(&self.peers[&other]));
            }
        }
        self.skipped.remove(&key);
        for (cidr, ip) in peer.hops() {
            let old = self.routes.insert(
                cidr,
                Hop {
                    node_ip: ip,
                    peer: peer.name.clone(),
                    source: peer.source.clone(),
                    lease: peer.lease,
                    key: key.clone(),
                },
            );
            before.entry(cidr).or_insert(old);
            self.taken.insert(cidr, key.clone());
            self.ips.insert(ip, key.clone());
        }
        self.peers.insert(key, peer);
    }

    /// Why `peer` must not have its routes, whatever the other peers: a route that would
    /// hand the node's own traffic to a peer, one outside the network, a next hop that
    /// cannot be reached in one hop, a backend other than host-gw.
    fn refuse(&self, peer: &Peer) -> Option<Refusal> {
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

fn rank(peer: &Peer) -> Rank {
    (peer.origin.order(), peer.key().to_owned())
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

/// A whole peer set at once (a test's, or a config's check).
pub fn desired(network: &Network, peers: &[Peer], node: Option<&NodeFacts>) -> DesiredState {
    let mut state = DesiredState::new(*network, node.cloned());
    state.replace_all(peers.to_vec());
    state
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
        etcd_peer(name, node_ip, pod_cidr, 0)
    }

    fn etcd_peer(name: &str, node_ip: &str, pod_cidr: &str, revision: i64) -> Peer {
        Peer {
            name: name.into(),
            node_ip: node_ip.parse().expect("a valid literal"),
            pod_cidr: pod_cidr.parse().expect("a valid literal"),
            v6: None,
            source: format!("/p/subnets/{name}"),
            lease: None,
            origin: Origin::Etcd { revision },
            backend: None,
        }
    }

    fn names(state: &DesiredState) -> Vec<&str> {
        state.routes.values().map(|h| h.peer.as_str()).collect()
    }

    #[test]
    fn every_reachable_peer_gets_a_route() {
        let state = desired(
            &network(),
            &[
                peer("n2", "172.31.0.2", "10.244.2.0/24"),
                peer("n3", "172.31.0.3", "10.244.3.0/24"),
            ],
            Some(&node()),
        );
        assert_eq!(state.routes.len(), 2);
        assert!(state.skipped().is_empty());
        let hop = &state.routes[&"10.244.3.0/24".parse().expect("a valid literal")];
        assert_eq!(
            hop.node_ip,
            "172.31.0.3".parse::<IpAddr>().expect("present")
        );
        assert_eq!(hop.peer, "n3");
    }

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

    #[test]
    fn the_older_peer_keeps_an_overlapping_prefix_in_any_order() {
        let older = etcd_peer("n2", "172.31.0.2", "10.244.2.0/24", 5);
        let younger = etcd_peer("n9", "172.31.0.9", "10.244.2.128/25", 9);
        for set in [
            vec![older.clone(), younger.clone()],
            vec![younger.clone(), older.clone()],
        ] {
            let state = desired(&network(), &set, Some(&node()));
            assert_eq!(names(&state), ["n2"]);
            assert_eq!(
                state.skipped()[0].reason,
                "10.244.2.128/25 overlaps the older entry /p/subnets/n2"
            );
        }
        // One change at a time: the younger first, then the older takes its place.
        let mut state = DesiredState::new(network(), Some(node()));
        let delta = state.apply([(younger.key().to_owned(), Some(younger.clone()))]);
        assert_eq!(delta.changed.len(), 1);
        let delta = state.apply([(older.key().to_owned(), Some(older.clone()))]);
        assert_eq!(names(&state), ["n2"]);
        assert_eq!(
            delta.changed,
            [("10.244.2.0/24".parse::<IpNet>().expect("cidr"), None)]
        );
        assert_eq!(delta.removed.len(), 1);
        assert_eq!(delta.skipped.len(), 1);
        // The older goes: the younger gets its route back.
        let delta = state.apply([(older.key().to_owned(), None)]);
        assert_eq!(names(&state), ["n9"]);
        assert_eq!(delta.changed.len(), 1);
        assert_eq!(delta.removed.len(), 1);
        assert!(state.skipped().is_empty());
    }

    #[test]
    fn a_repeated_node_ip_stays_with_the_older_peer() {
        let older = etcd_peer("n2", "172.31.0.2", "10.244.2.0/24", 1);
        let younger = etcd_peer("n3", "172.31.0.2", "10.244.3.0/24", 2);
        let state = desired(&network(), &[younger, older], Some(&node()));
        assert_eq!(names(&state), ["n2"]);
        assert_eq!(
            state.skipped()[0].reason,
            "PublicIP 172.31.0.2 is already the address of the older entry /p/subnets/n2"
        );
    }

    #[test]
    fn one_changed_peer_is_one_change() {
        let set: Vec<Peer> = (2..200)
            .map(|i| {
                etcd_peer(
                    &format!("n{i}"),
                    &format!("172.31.0.{i}"),
                    &format!("10.244.{i}.0/24"),
                    i,
                )
            })
            .collect();
        let mut state = desired(&network(), &set, Some(&node()));
        assert_eq!(state.routes.len(), 198);
        let mut moved = set[10].clone();
        moved.node_ip = "172.31.0.250".parse().expect("ip");
        let delta = state.apply([(moved.key().to_owned(), Some(moved.clone()))]);
        assert_eq!(
            delta.changed,
            [(IpNet::V4(moved.pod_cidr), Some(IpAddr::V4(set[10].node_ip)))]
        );
        assert!(delta.removed.is_empty() && delta.skipped.is_empty());
        // The same set again: nothing to do.
        let mut again = set.clone();
        again[10] = moved;
        assert_eq!(state.replace_all(again), Delta::default());
        // A skipped peer is said once, not on every change.
        let bad = etcd_peer("bad", "192.168.200.2", "10.244.250.0/24", 300);
        let delta = state.apply([(bad.key().to_owned(), Some(bad.clone()))]);
        assert_eq!(delta.skipped.len(), 1);
        let mut bad_again = bad.clone();
        bad_again.lease = Some(7);
        let delta = state.apply([(bad.key().to_owned(), Some(bad_again))]);
        assert!(delta.skipped.is_empty(), "{delta:?}");
    }

    #[test]
    fn dual_stack_peers_get_one_route_per_family() {
        let mut network = network();
        network.v6 = Some(NetworkV6 {
            pod_cidr: "fd00:244:1::/64".parse().expect("a valid literal"),
            cluster_cidr: "fd00:244::/32".parse().expect("a valid literal"),
        });
        let mut node = node();
        node.uplink_networks
            .push("fd00:31::1/64".parse().expect("a valid literal"));
        let mut n2 = peer("n2", "172.31.0.2", "10.244.2.0/24");
        n2.v6 = Some(PeerV6 {
            node_ip: "fd00:31::2".parse().expect("a valid literal"),
            pod_cidr: "fd00:244:2::/64".parse().expect("a valid literal"),
        });
        let state = desired(&network, &[n2.clone()], Some(&node));
        assert_eq!(state.routes.len(), 2, "{:?}", state.skipped());
        // Its IPv6 side outside the network: the peer is left out whole.
        n2.v6 = Some(PeerV6 {
            node_ip: "fd00:31::2".parse().expect("a valid literal"),
            pod_cidr: "fd00:99::/64".parse().expect("a valid literal"),
        });
        let state = desired(&network, &[n2], Some(&node));
        assert!(state.routes.is_empty());
        assert!(
            state.skipped()[0]
                .reason
                .contains("fd00:99::/64 is outside the IPv6Network fd00:244::/32")
        );
    }
}
