//! What the agent's unit tests build on: a node with pod CIDR 10.244.1.0/24 in
//! 10.0.0.0/8, uplink eth0 (ifindex 2), bridge cni0 (ifindex 3).

use ipnet::IpNet;

use super::{desired::NodeFacts, observed::Observed};
use crate::{config::Network, kernel::Link};

pub const UPLINK: u32 = 2;
pub const BRIDGE: u32 = 3;

pub fn network() -> Network {
    Network {
        pod_cidr: "10.244.1.0/24".parse().expect("a valid literal"),
        cluster_cidr: "10.0.0.0/8".parse().expect("a valid literal"),
        v6: None,
    }
}

/// The node with `uplink` (address/prefix) on eth0 and `addresses` elsewhere.
pub fn node(uplink: &str, addresses: &[&str]) -> NodeFacts {
    let net = |s: &str| s.parse::<IpNet>().expect("a valid literal");
    NodeFacts {
        uplink_name: "eth0".into(),
        uplink_networks: vec![net(uplink)],
        addresses: addresses.iter().map(|a| net(a)).collect(),
        public_ips: Vec::new(),
    }
}

pub fn observed() -> Observed {
    let link = |index: u32| Link {
        index,
        mac: [2, 0, 0, 0, 0, index as u8],
        mtu: 1500,
        up: true,
        xdp: false,
    };
    Observed::new(
        ("eth0", link(UPLINK)),
        ("cni0", link(BRIDGE)),
        vec!["10.244.1.0/24".parse().expect("a valid literal")],
    )
}
