//! Where the peers come from: the config file, etcd, the Kubernetes API. Each hands
//! its peers to the agent's loop through `agent::sources`' channel.

/// Peers from flannel's etcd keys, and this node's lease.
pub mod etcd;
/// The static peers of the config file, followed as the file changes.
pub mod file;
pub mod kube;
pub mod peer_blocks;
