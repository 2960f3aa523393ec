//! Peer sources that live in their own folders (the others are still `etcd` and
//! `agent::sources`).

pub mod kube;
pub mod peer_blocks;
