//! Peers from etcd v3 in flannel's schema, so an existing flannel etcd can be read as is
//! and flannel can read what hgw writes:
//!
//! - `<prefix>/config`: `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}`,
//!   dual stack with `"EnableIPv6":true,"IPv6Network":"fd00:244::/32"` (and `IPv6SubnetLen`,
//!   `IPv6SubnetMin`, `IPv6SubnetMax`);
//! - `<prefix>/subnets/10.244.3.0-24`: `{"PublicIP":"172.31.0.3","BackendType":"host-gw"}`,
//!   dual stack `<prefix>/subnets/10.244.3.0-24&fd00:244:3::-64` with `"PublicIPv6"`, each
//!   attached to the owner's lease (a key without a lease is a reservation, respected).
//!
//! The config gets the checks of a static config: no default route, room for pods,
//! bounds inside the network, nothing over the uplink's networks; a bad config is refused
//! naming its key. An entry is parsed here (a malformed one is left out with a warning
//! naming its key); the desired state checks it as it checks every peer (inside the
//! network, off the uplink's networks, one entry per node address, the older of two
//! entries winning), and its warnings name the key too.
//!
//! This node claims its subnet (both families, one key) in a transaction that succeeds
//! only if the key is new (or still the entry it found for its own PublicIP). A task of
//! its own keeps the lease alive; the watch loop follows the subnets from the listed
//! revision, lists again on a broken watch or a compaction, and sends the agent the whole
//! peer set of each listing (the first is the one made while claiming the subnet), and
//! each entry's change in between.
//!
//! The files follow that order: `network` (the config and its subnet pools),
//! `entries` (the subnet keys and their values as peers), `connect` (connecting and
//! starting), `claim` (this node's subnet), `lease` (keeping its lease alive), `watch`
//! (following the subnets), `listing` (bounded reads of them).

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::agent::sources::PeerReceiver;
use crate::config::Network;

mod claim;
mod connect;
mod entries;
mod lease;
mod listing;
mod network;
#[cfg(test)]
mod test_support;
mod watch;

pub use connect::start;
pub use network::{Pool, SubnetSpace};

const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {operation} at {endpoints}: {source}")]
    Client {
        operation: &'static str,
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("reading {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("etcd key {key}: {reason}")]
    BadConfig { key: String, reason: String },
    #[error(
        "etcd key {key} has EnableIPv6, but the uplink has no global IPv6 address to publish as PublicIPv6"
    )]
    NoPublicIpv6 { key: String },
    #[error("no free subnet left in {network} (SubnetLen {subnet_len}, between {min} and {max})")]
    NoFreeSubnet {
        network: IpNet,
        subnet_len: u8,
        min: IpAddr,
        max: IpAddr,
    },
}

/// A connected source: this node's network, the public IPs it announces, and the peers
/// as they change.
pub struct EtcdSource {
    pub network: Network,
    pub public_ips: Vec<IpAddr>,
    pub peers: PeerReceiver,
}
