//! A static peer for the tests of the peer sources and their channel.

use crate::config::{Origin, Peer};

pub(crate) fn peer(name: &str, ip: &str, index: usize) -> Peer {
    Peer {
        name: name.into(),
        node_ip: ip.parse().expect("ip"),
        pod_cidr: "10.244.2.0/24".parse().expect("cidr"),
        v6: None,
        source: "static".into(),
        lease: None,
        origin: Origin::Static { index },
        backend: None,
    }
}
