//! Peer sources that live in their own folders (the static file's is still in
//! `agent::sources`).

/// Peers from flannel's etcd keys, and this node's lease.
pub mod etcd;
pub mod kube;
pub mod peer_blocks;
