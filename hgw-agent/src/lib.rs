//! hgw's node agent as a library: the binary (`main.rs`) is its command line, and the
//! integration tests load the same eBPF object through [`datapath`].

pub mod agent;
pub mod caps;
pub mod cidr;
pub mod cni;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod etcd;
pub mod kernel;
pub mod lock;
pub mod masq;
pub mod metrics;
pub mod nft;
pub mod pin_owner;
pub mod probe;
pub mod setup;
pub mod source;
pub mod status;
pub mod tc;
pub mod uninstall;
