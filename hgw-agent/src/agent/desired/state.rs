//! The desired state and its changes: which peer holds which route, the older of two
//! that conflict first.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{Delta, Hop, NodeFacts, Refusal, Skipped};
use crate::cidr::Taken;
use crate::config::{Network, Peer};

#[derive(Debug, Clone, Default)]
pub struct DesiredState {
    pub(super) network: Option<Network>,
    /// `None`: not known yet (the config's own checks); the node's checks wait.
    pub(super) node: Option<NodeFacts>,
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

    /// Every peer the source gave, moved out.
    pub fn into_peers(self) -> Vec<Peer> {
        self.peers.into_values().collect()
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

    /// What the whole state is, as one change from nothing: every route new, every
    /// peer left out said (a state built before anything was applied, such as the
    /// static peers checked at the start).
    pub fn everything(&self) -> Delta {
        Delta {
            changed: self.routes.keys().map(|cidr| (*cidr, None)).collect(),
            removed: Vec::new(),
            skipped: self.skipped().into_iter().cloned().collect(),
        }
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
}

fn rank(peer: &Peer) -> Rank {
    (peer.origin.order(), peer.key().to_owned())
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
    use crate::agent::desired::test_support::{etcd_peer, names, node, peer};
    use crate::agent::fixtures::network;
    use crate::config::{NetworkV6, PeerV6};

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
