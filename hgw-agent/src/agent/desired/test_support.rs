//! Peers and a node for the tests of the desired state's modules.

use super::{DesiredState, NodeFacts};
use crate::agent::fixtures;
use crate::config::{Origin, Peer};

pub(super) fn node() -> NodeFacts {
    fixtures::node("172.31.0.1/24", &["192.168.9.1/24"])
}

pub(super) fn peer(name: &str, node_ip: &str, pod_cidr: &str) -> Peer {
    etcd_peer(name, node_ip, pod_cidr, 0)
}

pub(super) fn etcd_peer(name: &str, node_ip: &str, pod_cidr: &str, revision: i64) -> Peer {
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

pub(super) fn names(state: &DesiredState) -> Vec<&str> {
    state.routes.values().map(|h| h.peer.as_str()).collect()
}
