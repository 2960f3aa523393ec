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
//!
//! `state` keeps the state and applies the changes; `refusal` is what a peer must be
//! whatever the other peers, and the [`Refusal`] of one that is not.

use std::net::IpAddr;

use ipnet::IpNet;

mod refusal;
mod state;
#[cfg(test)]
mod test_support;

pub use refusal::{Refusal, off_link};
pub use state::{DesiredState, desired};

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
