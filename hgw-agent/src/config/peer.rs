//! What every source makes: the peers, and this node's place in the cluster.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A peer node: its pod CIDR is reached via its node IP on the uplink's L2 segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    /// Dual stack: its IPv6 node address and pod CIDR.
    pub v6: Option<PeerV6>,
    /// Where it came from: "static", its etcd key, or its Node (`node/NAME`).
    pub source: String,
    /// The etcd lease that keeps it (none for static peers and etcd reservations).
    pub lease: Option<i64>,
    /// Which of two conflicting peers is older.
    pub origin: Origin,
    /// The backend it announces, where its source says (flannel's backend type).
    pub backend: Option<String>,
}

/// Which source a peer came from, and how old it is there: of two peers that conflict,
/// the older keeps its routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `peers[index]` of the config.
    Static { index: usize },
    /// Its etcd entry's create revision.
    Etcd { revision: i64 },
    /// Its Node's creation time, in seconds.
    Kube { created: i64 },
}

impl Origin {
    pub fn order(self) -> i64 {
        match self {
            Self::Static { index } => index as i64,
            Self::Etcd { revision } => revision,
            Self::Kube { created } => created,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerV6 {
    pub node_ip: Ipv6Addr,
    pub pod_cidr: Ipv6Net,
}

impl Peer {
    /// What names it in its source: a static peer's name, an etcd key, `node/NAME`.
    pub fn key(&self) -> &str {
        match self.origin {
            Origin::Static { .. } => &self.name,
            _ => &self.source,
        }
    }

    /// Its routes, one per family (IPv4 first): pod CIDR via node IP.
    pub fn hops(&self) -> impl Iterator<Item = (IpNet, IpAddr)> {
        let v4 = (IpNet::V4(self.pod_cidr), IpAddr::V4(self.node_ip));
        let v6 = self
            .v6
            .map(|v6| (IpNet::V6(v6.pod_cidr), IpAddr::V6(v6.node_ip)));
        std::iter::once(v4).chain(v6)
    }
}

/// This node's place in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
    /// Dual stack: the IPv6 pod CIDR and cluster CIDR.
    pub v6: Option<NetworkV6>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkV6 {
    pub pod_cidr: Ipv6Net,
    pub cluster_cidr: Ipv6Net,
}

impl Network {
    /// The bridge's address: the first host of the pod CIDR, as flannel's CNI uses.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr.network()) + 1)
    }

    /// The bridge's IPv6 address (the first host of the IPv6 pod CIDR), with IPv6 on.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.v6
            .map(|v6| Ipv6Addr::from(u128::from(v6.pod_cidr.network()) + 1))
    }

    /// This node's pod CIDRs, IPv4 first.
    pub fn pod_cidrs(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.pod_cidr)).chain(self.v6.map(|v6| IpNet::V6(v6.pod_cidr)))
    }

    /// The cluster CIDRs, IPv4 first.
    pub fn cluster_cidrs(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.cluster_cidr))
            .chain(self.v6.map(|v6| IpNet::V6(v6.cluster_cidr)))
    }
}
