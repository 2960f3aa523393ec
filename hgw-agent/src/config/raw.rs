//! The configuration as given: the file's fields and the flags of the same names, each
//! field given twice merged (the flag over the file).

use std::path::PathBuf;

use serde::Deserialize;

use super::{Attach, ConfigError, FastPath};
use crate::source::peer_blocks::PeerBlocks;

/// How a field given twice combines: `over` (the flags) on `self` (the file).
trait Merge {
    fn merge(self, over: Self) -> Self;
}

/// A nested section merges field by field; a plain value given as a flag replaces the
/// file's.
impl<T: Merge> Merge for Option<T> {
    fn merge(self, over: Self) -> Self {
        match (self, over) {
            (Some(file), Some(flag)) => Some(file.merge(flag)),
            (file, flag) => flag.or(file),
        }
    }
}

macro_rules! flag_replaces_file {
    ($($ty:ty),*) => { $(impl Merge for $ty { fn merge(self, over: Self) -> Self { over } })* };
}
flag_replaces_file!(
    String,
    PathBuf,
    bool,
    i64,
    u32,
    FastPath,
    Attach,
    Vec<String>
);

/// `--peer` flags add to the file's `[[peers]]`.
impl Merge for Vec<RawPeer> {
    fn merge(mut self, over: Self) -> Self {
        self.extend(over);
        self
    }
}

/// Declares a config section once: the struct (its fields are both flags and file
/// fields), [`Merge`] field by field, and the names of the fields that differ.
macro_rules! section {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $($(#[$field_attr:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $($(#[$field_attr])* pub $field: $ty,)*
        }

        impl Merge for $name {
            fn merge(self, over: Self) -> Self {
                Self { $($field: self.$field.merge(over.$field),)* }
            }
        }

        impl $name {
            /// The names of the fields whose values differ from `other`'s.
            pub fn differing(&self, other: &Self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $(if self.$field != other.$field {
                    names.push(stringify!($field));
                })*
                names
            }
        }
    };
}

section! {
    /// The configuration as given (the file, then the flags over it): every field is a
    /// TOML field and a flag of the same name, checked by
    /// [`Config::from_raw`](super::Config::from_raw).
    #[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct RawConfig {
        /// This node's name.
        #[arg(long)]
        pub node_name: Option<String>,
        /// Interface facing the other nodes (they must share its L2 segment).
        #[arg(long)]
        pub uplink: Option<String>,
        /// Bridge the local pods are attached to [default: cni0].
        #[arg(long)]
        pub bridge: Option<String>,
        /// This node's pod CIDR, e.g. 10.244.1.0/24.
        #[arg(long)]
        pub pod_cidr: Option<String>,
        /// The whole cluster's pod CIDR, e.g. 10.244.0.0/16.
        #[arg(long)]
        pub cluster_cidr: Option<String>,
        /// Dual stack: this node's IPv6 pod CIDR, e.g. fd00:244:1::/64.
        #[arg(long)]
        pub pod_cidr_v6: Option<String>,
        /// Dual stack: the whole cluster's IPv6 pod CIDR, e.g. fd00:244::/32.
        #[arg(long)]
        pub cluster_cidr_v6: Option<String>,
        /// Set the node up: bridge with the gateway address, ip_forward, FORWARD accept
        /// for the cluster CIDR. Off by default.
        #[arg(long, num_args = 0, default_missing_value = "true")]
        pub setup_node: Option<bool>,
        /// Which packets the fast path carries: established (flows conntrack accepted,
        /// without NAT), all (every pod-to-pod packet: no NAT or FORWARD policy on pod
        /// traffic), off (kernel routes only) [default: established].
        #[arg(long, value_enum)]
        pub fast_path: Option<FastPath>,
        /// How long (ms, at most 1000) a carried flow's verdict (conntrack's in
        /// `established` mode, the kernel route's in both) and next hop are reused
        /// before one of its packets looks them up again; a deleted conntrack entry
        /// stops the flow's fast path within this time (netfilter's own flowtable
        /// checks once a second). 0: every packet looks up [default: 100].
        #[arg(long)]
        pub ct_recheck_ms: Option<u32>,
        /// Where the bridge-side program runs: on the bridge, or on each of its ports
        /// (the pods' veths, skipping the bridge) [default: ports with tcx, bridge on
        /// kernels without it, where a port's qdisc is the CNI plugins'].
        #[arg(long, value_enum)]
        pub attach: Option<Attach>,
        /// Where `hgw-agent status` reaches this agent [default: /run/hgw/hgw.sock].
        #[arg(long)]
        pub status_socket: Option<PathBuf>,
        /// A peer node as NAME=NODE_IP,POD_CIDR, or dual stack
        /// NAME=NODE_IP,POD_CIDR,NODE_IPV6,POD_CIDR_V6 (repeatable; added to the file's
        /// [[peers]]).
        #[arg(
            long = "peer",
            value_name = "NAME=NODE_IP,POD_CIDR[,NODE_IPV6,POD_CIDR_V6]",
            value_parser = RawPeer::from_flag,
        )]
        #[serde(default)]
        pub peers: Vec<RawPeer>,
        /// Learn the network, this node's subnet and the peers from etcd (flannel's
        /// schema): the file's [etcd] section.
        #[command(flatten)]
        pub etcd: Option<RawEtcd>,
        /// Learn the network, this node's pod CIDRs and the peers from the Kubernetes
        /// API, as flanneld --kube-subnet-mgr does: the file's [kube] section.
        #[command(flatten)]
        pub kube: Option<RawKube>,
        /// Where flannel's subnet file goes, for CNI configs written for flannel
        /// (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ)
        /// [default: /run/flannel/subnet.env].
        #[arg(long)]
        pub subnet_env: Option<PathBuf>,
        /// Also write a CNI network config list here (bridge, host-local, portmap), e.g.
        /// /etc/cni/net.d/10-hgw.conflist [default: none].
        #[arg(long)]
        pub cni_conf: Option<PathBuf>,
        /// Masquerade pod traffic that leaves the cluster CIDR (flannel's --ip-masq
        /// rules, in nftables table inet hgw-masq). Off by default.
        #[arg(long, num_args = 0, default_missing_value = "true")]
        pub ip_masq: Option<bool>,
        /// Pin the programs' links and maps in this directory (on a bpffs, mounted
        /// when missing), so the fast path keeps forwarding while the agent restarts
        /// and the next agent takes over in place; "none": no pinning, the programs
        /// go with the agent [default: /sys/fs/bpf/hgw].
        #[arg(long)]
        pub pin_dir: Option<PathBuf>,
        /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this address,
        /// e.g. 127.0.0.1:9090 [default: off].
        #[arg(long)]
        pub metrics_addr: Option<String>,
    }
}

section! {
    /// `[etcd]` in the file; the flags are `--etcd-<field>` (but `--public-ip`,
    /// `--public-ipv6`).
    #[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct RawEtcd {
        /// Learn the network, this node's subnet and the peers from etcd (flannel's
        /// schema), e.g. http://10.0.0.5:2379 (comma-separated for several).
        #[arg(long = "etcd-endpoints", value_delimiter = ',')]
        pub endpoints: Option<Vec<String>>,
        /// etcd key prefix [default: /coreos.com/network].
        #[arg(long = "etcd-prefix")]
        pub prefix: Option<String>,
        /// TTL of this node's subnet lease, in seconds [default: 60].
        #[arg(long = "etcd-lease-ttl")]
        pub lease_ttl: Option<i64>,
        /// This node's PublicIP in etcd [default: the uplink's first IPv4 address].
        #[arg(long)]
        pub public_ip: Option<String>,
        /// This node's PublicIPv6 in etcd, for a dual-stack network [default: the
        /// uplink's first global IPv6 address].
        #[arg(long)]
        pub public_ipv6: Option<String>,
        /// CA certificate (PEM) for etcd over TLS.
        #[arg(long = "etcd-ca-file")]
        pub ca_file: Option<PathBuf>,
        /// Client certificate (PEM) for etcd.
        #[arg(long = "etcd-cert-file")]
        pub cert_file: Option<PathBuf>,
        /// Client key (PEM) for etcd.
        #[arg(long = "etcd-key-file")]
        pub key_file: Option<PathBuf>,
        /// etcd user name.
        #[arg(long = "etcd-username")]
        pub username: Option<String>,
        /// etcd password (better: the HGW_ETCD_PASSWORD environment variable).
        #[arg(long = "etcd-password", env = "HGW_ETCD_PASSWORD", hide_env_values = true)]
        pub password: Option<String>,
    }
}

section! {
    /// `[kube]` in the file (an empty `[kube]` turns it on); the flags are
    /// `--kube-subnet-mgr`, `--kubeconfig` and `--kube-net-conf`.
    #[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct RawKube {
        /// Learn the network, this node's pod CIDRs and the peers from the Kubernetes
        /// API (flanneld's --kube-subnet-mgr): Nodes' spec.podCIDRs and flannel's
        /// annotations. The node's name defaults to the NODE_NAME environment variable.
        #[arg(long = "kube-subnet-mgr", num_args = 0, default_missing_value = "true")]
        pub enabled: Option<bool>,
        /// kubeconfig to reach the API server with [default: the in-cluster service
        /// account].
        #[arg(long = "kubeconfig")]
        pub kubeconfig: Option<PathBuf>,
        /// flannel's network config (the kube-flannel ConfigMap's net-conf.json)
        /// [default: /etc/kube-flannel/net-conf.json].
        #[arg(long = "kube-net-conf")]
        pub net_conf: Option<PathBuf>,
    }
}

impl RawEtcd {
    /// Nothing but a password: what HGW_ETCD_PASSWORD alone gives, which does not
    /// turn etcd on.
    fn only_password(&self) -> bool {
        let without = RawEtcd {
            password: None,
            ..self.clone()
        };
        without == RawEtcd::default()
    }
}

/// A `[[peers]]` entry, or a `--peer` flag.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: String,
    pub node_ip: String,
    pub pod_cidr: String,
    /// The peer's IPv6 node address and pod CIDR (dual stack): both or neither.
    pub node_ip_v6: Option<String>,
    pub pod_cidr_v6: Option<String>,
}

impl RawPeer {
    /// `NAME=NODE_IP,POD_CIDR[,NODE_IPV6,POD_CIDR_V6]`; the values are checked with
    /// the file's.
    fn from_flag(spec: &str) -> Result<Self, String> {
        let expected = || {
            "expected NAME=NODE_IP,POD_CIDR or NAME=NODE_IP,POD_CIDR,NODE_IPV6,POD_CIDR_V6"
                .to_string()
        };
        let (name, rest) = spec.split_once('=').ok_or_else(expected)?;
        let fields: Vec<&str> = rest.split(',').collect();
        let (v4, v6) = match fields.as_slice() {
            [ip, cidr] => ((ip, cidr), None),
            [ip, cidr, ip6, cidr6] => ((ip, cidr), Some((ip6, cidr6))),
            _ => return Err(expected()),
        };
        Ok(RawPeer {
            name: name.into(),
            node_ip: v4.0.to_string(),
            pod_cidr: v4.1.to_string(),
            node_ip_v6: v6.map(|v6| v6.0.to_string()),
            pod_cidr_v6: v6.map(|v6| v6.1.to_string()),
        })
    }
}

impl RawConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        Self::from_file_with(path, &mut PeerBlocks::default())
    }

    /// [`RawConfig::from_file`], parsing only the `[[peers]]` blocks `blocks` has not
    /// seen (a file read again after one peer changed).
    pub fn from_file_with(
        path: &std::path::Path,
        blocks: &mut PeerBlocks,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        blocks.parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// The flags over the file: a flag replaces the file's field, `--peer` adds a peer,
    /// and an etcd password alone (HGW_ETCD_PASSWORD) only joins a configured `[etcd]`.
    pub fn with_flags(self, mut flags: RawConfig) -> RawConfig {
        if self.etcd.is_none() && flags.etcd.as_ref().is_some_and(RawEtcd::only_password) {
            flags.etcd = None;
        }
        self.merge(flags)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::config::Config;
    use crate::config::test_support::{FILE, Flags, file, flags, static_peers};

    #[test]
    fn unknown_fields_are_errors() {
        let e = toml::from_str::<RawConfig>("node_name = \"n1\"\npod_cidrs = \"x\"\n")
            .expect_err("unknown");
        assert!(e.to_string().contains("pod_cidrs"), "{e}");
        let e = toml::from_str::<RawConfig>("[etcd]\nendpoint = [\"http://a:1\"]\n")
            .expect_err("unknown in [etcd]");
        assert!(e.to_string().contains("endpoint"), "{e}");
        let e = toml::from_str::<RawConfig>(
            "[[peers]]\nname = \"n2\"\nnode_ip = \"172.31.0.2\"\npod_cidr = \"10.244.2.0/24\"\nnode_ipv6 = \"x\"\n",
        )
        .expect_err("unknown in [[peers]]");
        assert!(e.to_string().contains("node_ipv6"), "{e}");
    }

    #[test]
    fn an_etcd_password_alone_does_not_turn_etcd_on() {
        let raw = file(FILE).with_flags(flags(&["--etcd-password=p"]));
        assert!(raw.etcd.is_none());
        let raw = file(FILE).with_flags(flags(&["--etcd-prefix=/p"]));
        assert!(raw.etcd.is_some());
    }

    #[test]
    fn peer_flags_add_to_the_files_peers() {
        let raw = file(FILE).with_flags(flags(&["--peer", "n3=172.31.0.3,10.244.3.0/24"]));
        let config = Config::from_raw(raw).expect("valid");
        assert_eq!(static_peers(&config), ["n2", "n3"]);
        assert!(
            Flags::try_parse_from(["hgw-agent", "--peer", "n3=172.31.0.3"]).is_err(),
            "a --peer without a pod CIDR parsed"
        );
    }
}
