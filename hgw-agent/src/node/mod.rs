//! The node around the fast path: what the agent checks and sets up on the host before
//! and beside the routes (capabilities, one agent per namespace, the bridge and
//! forwarding, conntrack, masquerade, the CNI files), all through nftables, sysctls
//! and files, and `uninstall`, which takes all of hgw off the node again.

pub mod caps;
pub mod cni;
pub mod conntrack;
pub mod forwarding;
pub mod lock;
pub mod masq;
pub mod nft;
pub mod setup;
pub mod sysctl;
pub mod uninstall;
