//! hgw's node agent as a library: the binary (`main.rs`) is its command line, and the
//! integration tests load the same eBPF object through [`datapath`].

/// The event loop: peers and kernel events in, routes and map entries out.
pub mod agent;
/// Overlap checks over CIDRs.
pub mod cidr;
/// The config file and flags, checked.
pub mod config;
/// The eBPF fast path: load, attach, pin, and the maps.
pub mod datapath;
/// Routes, neighbours and links over netlink.
pub mod kernel;
/// The host around the fast path: capabilities, lock, set-up, nftables, CNI files, uninstall.
pub mod node;
/// What the agent answers: `status` on a Unix socket; metrics and health over HTTP.
pub mod serve;
/// Peer sources: the config file, etcd, the Kubernetes API.
pub mod source;
/// tc hooks: tcx support, and what else sits on an interface's ingress and egress.
pub mod tc;
