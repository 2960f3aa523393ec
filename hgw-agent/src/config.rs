//! The agent's configuration: a TOML file, every field also a flag, validated as a
//! whole before the agent touches anything. Errors name the field and the value.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::agent::desired::{DesiredState, NodeFacts, Refusal, desired};
use crate::source::peer_blocks::PeerBlocks;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("missing {field}: set it in the config file or with --{flag}")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
    #[error("invalid {field} = {value:?}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    pub fn invalid(
        field: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Which packets the fast path may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FastPath {
    /// Only flows the kernel already accepted: conntrack holds them confirmed, replied
    /// (TCP: assured) and without NAT. The first packets of every flow, NAT'd flows,
    /// SYNs and ICMP go through the kernel, with all its netfilter rules.
    #[default]
    Established,
    /// Every packet between pod CIDRs that passes the header checks, without asking
    /// conntrack: skips NAT, FORWARD rules and conntrack for pod-to-pod traffic. Only
    /// for clusters with neither.
    All,
    /// No programs: kernel routes only (plain host-gw).
    Off,
}

impl FastPath {
    /// The name in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FastPath::Established => "established",
            FastPath::All => "all",
            FastPath::Off => "off",
        }
    }
}

/// Where the bridge-side program runs. Unset, the kernel decides: `ports` with tcx,
/// `bridge` with cls_bpf (see `HookKind::placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// The bridge's ingress (cni0): pod traffic has been through the bridge first.
    Bridge,
    /// Each bridge port's ingress (the pods' host-side veths), followed as pods come
    /// and go: the bridge is skipped for forwarded traffic. The bench measured it
    /// faster on every metric (1.42x kernel pps against 1.31x on cni0).
    Ports,
}

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
    /// TOML field and a flag of the same name, checked by [`Config::from_raw`].
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

/// Where the network and the peers come from.
#[derive(Debug, Clone)]
pub enum Source {
    Static { network: Network, peers: Vec<Peer> },
    Etcd(EtcdConfig),
    Kube(KubeConfig),
}

/// The Kubernetes API as the source: where it is, and flannel's network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub net_conf: PathBuf,
}

pub const DEFAULT_NET_CONF: &str = "/etc/kube-flannel/net-conf.json";

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl: i64,
    pub public_ip: Option<Ipv4Addr>,
    /// For a dual-stack network (none: the uplink's first global IPv6 address).
    pub public_ipv6: Option<Ipv6Addr>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_LEASE_TTL: i64 = 60;
pub const DEFAULT_STATUS_SOCKET: &str = "/run/hgw/hgw.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hgw";

/// `pin_dir`: an absolute directory, or "none" for no pinning.
fn pin_dir(path: &std::path::Path) -> Result<Option<PathBuf>, ConfigError> {
    if path == std::path::Path::new("none") {
        return Ok(None);
    }
    if !path.is_absolute() {
        return Err(ConfigError::invalid(
            "pin_dir",
            path.display(),
            "expected an absolute directory (on a bpffs), or \"none\"",
        ));
    }
    Ok(Some(path.to_owned()))
}
pub const DEFAULT_SUBNET_ENV: &str = "/run/flannel/subnet.env";
/// How long a carried flow's verdict is reused by default: a tenth of netfilter's
/// flowtable, which checks its flows' conntrack entries once a second.
pub const DEFAULT_CT_RECHECK_MS: u32 = 100;
/// As long as the flowtable's own interval.
pub const MAX_CT_RECHECK_MS: u32 = 1000;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub uplink: String,
    pub bridge: String,
    pub source: Source,
    /// Create the bridge with its gateway address, enable ip_forward, accept the
    /// cluster CIDR in FORWARD. Off by default: on a real host that is the admin's call.
    pub setup_node: bool,
    /// Which packets the eBPF fast path carries (off: kernel routes only, like
    /// flannel's host-gw).
    pub fast_path: FastPath,
    /// How long (ms) a carried flow's verdict is reused; 0: never.
    pub ct_recheck_ms: u32,
    /// Where the bridge-side program runs (`None`: as the kernel's hook kind suits).
    pub attach: Option<Attach>,
    pub status_socket: PathBuf,
    /// flannel's subnet file, written once the network is known.
    pub subnet_env: PathBuf,
    /// The CNI network config list to write, if any.
    pub cni_conf: Option<PathBuf>,
    /// Masquerade pod traffic leaving the cluster CIDR.
    pub ip_masq: bool,
    /// Where links and maps are pinned (`None`: not pinned).
    pub pin_dir: Option<PathBuf>,
    /// The fields as given, with the defaults filled in: what
    /// [`Config::restart_needed`] compares.
    given: RawConfig,
    /// Where metrics, /healthz and /readyz are served (none: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Config {
    /// Checks every field and every relation between the CIDRs; the first problem
    /// found is returned, naming the field and the value.
    pub fn from_raw(mut raw: RawConfig) -> Result<Self, ConfigError> {
        let kube = raw.kube.clone().filter(|k| k.enabled != Some(false));
        if kube.is_some() && raw.node_name.is_none() {
            // As flanneld: the DaemonSet passes the node's name in NODE_NAME.
            raw.node_name = std::env::var("NODE_NAME").ok();
            if raw.node_name.is_none() {
                return Err(ConfigError::invalid(
                    "node_name",
                    "",
                    "missing: set it in the config file, with --node-name or in NODE_NAME",
                ));
            }
        }
        let node_name = required(raw.node_name.clone(), "node_name", "node-name")?;
        let uplink = interface_name(required(raw.uplink.clone(), "uplink", "uplink")?, "uplink")?;
        let bridge = interface_name(
            raw.bridge.get_or_insert_with(|| "cni0".into()).clone(),
            "bridge",
        )?;
        if uplink == bridge {
            return Err(ConfigError::invalid(
                "bridge",
                &bridge,
                "the bridge cannot be the uplink",
            ));
        }
        let source = match (raw.etcd.clone(), kube) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "kube",
                    "(set)",
                    "[etcd] and [kube] are two sources of the same peers: keep one",
                ));
            }
            (None, Some(kube)) => {
                reject_given(&raw, "the Kubernetes API when [kube] is configured")?;
                Source::Kube(kube_config(kube)?)
            }
            (Some(etcd), None) => {
                reject_given(&raw, "etcd when [etcd] is configured")?;
                Source::Etcd(etcd_config(etcd)?)
            }
            (None, None) => static_source(
                &node_name,
                [raw.pod_cidr.clone(), raw.cluster_cidr.clone()],
                [raw.pod_cidr_v6.clone(), raw.cluster_cidr_v6.clone()],
                raw.peers.clone(),
            )?,
        };
        let metrics_addr = raw
            .metrics_addr
            .as_deref()
            .map(|addr| {
                addr.parse().map_err(|_| {
                    ConfigError::invalid(
                        "metrics_addr",
                        addr,
                        "expected IP:PORT, e.g. 127.0.0.1:9090 or [::]:9090",
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            node_name,
            uplink,
            bridge,
            source,
            setup_node: *raw.setup_node.get_or_insert(false),
            fast_path: *raw.fast_path.get_or_insert_default(),
            ct_recheck_ms: match *raw.ct_recheck_ms.get_or_insert(DEFAULT_CT_RECHECK_MS) {
                ms @ 0..=MAX_CT_RECHECK_MS => ms,
                ms => {
                    return Err(ConfigError::invalid(
                        "ct_recheck_ms",
                        ms,
                        format!(
                            "at most {MAX_CT_RECHECK_MS} (ms): longer would let a deleted conntrack entry's flow ride on"
                        ),
                    ));
                }
            },
            attach: raw.attach,
            status_socket: raw
                .status_socket
                .get_or_insert_with(|| DEFAULT_STATUS_SOCKET.into())
                .clone(),
            subnet_env: file_path(
                raw.subnet_env
                    .get_or_insert_with(|| DEFAULT_SUBNET_ENV.into())
                    .clone(),
                "subnet_env",
                None,
            )?,
            cni_conf: raw
                .cni_conf
                .clone()
                .map(|path| file_path(path, "cni_conf", Some(".conflist")))
                .transpose()?,
            ip_masq: *raw.ip_masq.get_or_insert(false),
            pin_dir: pin_dir(raw.pin_dir.get_or_insert_with(|| DEFAULT_PIN_DIR.into()))?,
            given: raw,
            metrics_addr,
        })
    }

    /// Reads the file (if any) and lays the flags over it, then checks the result.
    pub fn load(file: Option<&std::path::Path>, flags: RawConfig) -> Result<Self, ConfigError> {
        Self::load_with(file, flags, &mut PeerBlocks::default())
    }

    /// [`Config::load`], with the file's `[[peers]]` blocks kept in `blocks` from one
    /// read to the next.
    pub fn load_with(
        file: Option<&std::path::Path>,
        flags: RawConfig,
        blocks: &mut PeerBlocks,
    ) -> Result<Self, ConfigError> {
        let raw = match file {
            Some(path) => RawConfig::from_file_with(path, blocks)?,
            None => RawConfig::default(),
        };
        Self::from_raw(raw.with_flags(flags))
    }

    /// The fields whose values differ from the `running` config's, other than the
    /// static peers (applied while running): these wait for a restart. A field newly
    /// written with its default value is no change.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let mut names = self.given.differing(&running.given);
        names.retain(|name| *name != "peers");
        names
    }
}

/// With etcd or the Kubernetes API, this node's network and the peers come from there.
fn reject_given(raw: &RawConfig, from: &str) -> Result<(), ConfigError> {
    for (given, field) in [
        (raw.pod_cidr.is_some(), "pod_cidr"),
        (raw.cluster_cidr.is_some(), "cluster_cidr"),
        (raw.pod_cidr_v6.is_some(), "pod_cidr_v6"),
        (raw.cluster_cidr_v6.is_some(), "cluster_cidr_v6"),
        (!raw.peers.is_empty(), "peers"),
    ] {
        if given {
            return Err(ConfigError::invalid(
                field,
                "(set)",
                format!("comes from {from}; remove it"),
            ));
        }
    }
    Ok(())
}

fn kube_config(raw: RawKube) -> Result<KubeConfig, ConfigError> {
    let absolute = |path: PathBuf, field: &str| {
        if !path.is_absolute() {
            return Err(ConfigError::invalid(
                field,
                path.display(),
                "expected an absolute file path",
            ));
        }
        file_path(path, field, None)
    };
    Ok(KubeConfig {
        kubeconfig: raw
            .kubeconfig
            .map(|p| absolute(p, "kube.kubeconfig"))
            .transpose()?,
        net_conf: absolute(
            raw.net_conf.unwrap_or_else(|| DEFAULT_NET_CONF.into()),
            "kube.net_conf",
        )?,
    })
}

fn etcd_config(raw: RawEtcd) -> Result<EtcdConfig, ConfigError> {
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        return Err(ConfigError::Missing {
            field: "etcd.endpoints",
            flag: "etcd-endpoints",
        });
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ConfigError::invalid(
                format!("etcd.endpoints[{i}]"),
                endpoint,
                "expected http://HOST:PORT or https://HOST:PORT",
            ));
        }
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(ConfigError::invalid(
            "etcd.prefix",
            &prefix,
            "must start with / and not end with /",
        ));
    }
    let lease_ttl = raw.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
    if !(5..=86_400).contains(&lease_ttl) {
        return Err(ConfigError::invalid(
            "etcd.lease_ttl",
            lease_ttl,
            "must be 5 to 86400 seconds",
        ));
    }
    let public_ip = raw
        .public_ip
        .map(|ip| {
            ip.parse::<Ipv4Addr>()
                .map_err(|_| ConfigError::invalid("etcd.public_ip", &ip, "not an IPv4 address"))
        })
        .transpose()?;
    let public_ipv6 = raw
        .public_ipv6
        .map(|ip| {
            ip.parse::<Ipv6Addr>()
                .map_err(|_| ConfigError::invalid("etcd.public_ipv6", &ip, "not an IPv6 address"))
        })
        .transpose()?;
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        return Err(ConfigError::invalid(
            "etcd.key_file",
            "",
            "cert_file and key_file go together",
        ));
    }
    if raw.username.is_some() != raw.password.is_some() {
        return Err(ConfigError::invalid(
            "etcd.password",
            "",
            "username and password go together",
        ));
    }
    Ok(EtcdConfig {
        endpoints,
        prefix,
        lease_ttl,
        public_ip,
        public_ipv6,
        ca_file: raw.ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        username: raw.username,
        password: raw.password,
    })
}

/// The static network and peers: `v4` and `v6` are [pod CIDR, cluster CIDR].
fn static_source(
    node_name: &str,
    [pod_cidr, cluster_cidr]: [Option<String>; 2],
    [pod_cidr_v6, cluster_cidr_v6]: [Option<String>; 2],
    raw_peers: Vec<RawPeer>,
) -> Result<Source, ConfigError> {
    let (pod_cidr, cluster_cidr) = pod_and_cluster_cidr(
        Some(required(pod_cidr, "pod_cidr", "pod-cidr")?),
        Some(required(cluster_cidr, "cluster_cidr", "cluster-cidr")?),
        Family::V4,
    )?
    .expect("both given");
    let v6 = pod_and_cluster_cidr(pod_cidr_v6, cluster_cidr_v6, Family::V6)?;
    let network = Network {
        pod_cidr: v4_net(pod_cidr),
        cluster_cidr: v4_net(cluster_cidr),
        v6: v6.map(|(pod_cidr, cluster_cidr)| NetworkV6 {
            pod_cidr: v6_net(pod_cidr),
            cluster_cidr: v6_net(cluster_cidr),
        }),
    };

    let mut peers: Vec<Peer> = Vec::with_capacity(raw_peers.len());
    let mut names = HashSet::new();
    for (i, raw_peer) in raw_peers.into_iter().enumerate() {
        let field = |name: &str| format!("peers[{i}].{name}");
        if raw_peer.name.is_empty() {
            return Err(ConfigError::invalid(field("name"), "", "must not be empty"));
        }
        if raw_peer.name == node_name || !names.insert(raw_peer.name.clone()) {
            return Err(ConfigError::invalid(
                field("name"),
                &raw_peer.name,
                "names another node already",
            ));
        }
        let node_ip: Ipv4Addr = raw_peer.node_ip.parse().map_err(|_| {
            ConfigError::invalid(field("node_ip"), &raw_peer.node_ip, "not an IPv4 address")
        })?;
        let peer_cidr = cidr(&raw_peer.pod_cidr, &field("pod_cidr"), Family::V4)?;
        let v6 = match (raw_peer.node_ip_v6, raw_peer.pod_cidr_v6) {
            (None, None) => None,
            (Some(ip), Some(cidr_v6)) => {
                if network.v6.is_none() {
                    return Err(ConfigError::invalid(
                        field("pod_cidr_v6"),
                        cidr_v6,
                        "this node has no pod_cidr_v6 (IPv6 is off); set it, or drop the peer's IPv6 fields",
                    ));
                }
                let node_ip: Ipv6Addr = ip.parse().map_err(|_| {
                    ConfigError::invalid(field("node_ip_v6"), &ip, "not an IPv6 address")
                })?;
                let pod_cidr = v6_net(cidr(&cidr_v6, &field("pod_cidr_v6"), Family::V6)?);
                Some(PeerV6 { node_ip, pod_cidr })
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    field("pod_cidr_v6"),
                    "",
                    "missing: node_ip_v6 and pod_cidr_v6 go together",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    field("node_ip_v6"),
                    "",
                    "missing: node_ip_v6 and pod_cidr_v6 go together",
                ));
            }
        };
        let peer = Peer {
            name: raw_peer.name,
            node_ip,
            pod_cidr: v4_net(peer_cidr),
            v6,
            source: "static".into(),
            lease: None,
            origin: Origin::Static { index: i },
            backend: None,
        };
        peers.push(peer);
    }
    // What the peers must be beside each other and this node is the desired state's
    // to check (`check_peers`), at the agent's start and on each reload.
    Ok(Source::Static { network, peers })
}

/// Static peers are the admin's word: one the desired state would leave out is a config
/// error, naming its field. Without `node` (the config alone), the checks that need the
/// node's interfaces are left out. The state is kept by the file source, which checks
/// each reload's changes against it.
pub fn check_peers(
    network: &Network,
    peers: &[Peer],
    node: Option<&NodeFacts>,
) -> Result<DesiredState, ConfigError> {
    let state = desired(network, peers, node);
    match refused(&state) {
        Some(e) => Err(e),
        None => Ok(state),
    }
}

/// The config error of the first static peer `state` leaves out, if any.
pub fn refused(state: &DesiredState) -> Option<ConfigError> {
    let skipped = state.skipped().into_iter().next()?;
    // Named by their place in the file, which `peers` (maybe a part of it) carry.
    let index = |key: &str| match state.peer(key).map(|p| p.origin) {
        Some(Origin::Static { index }) => index,
        _ => 0,
    };
    let refusal = &skipped.refusal;
    let suffix = if refusal.is_ipv6() { "_v6" } else { "" };
    let i = index(&skipped.key);
    let peer = state.peer(&skipped.key).expect("a skipped peer is held");
    let (field, value) = if refusal.is_about_node_ip() {
        let ip = peer
            .hops()
            .map(|(_, ip)| ip)
            .find(|ip| ip.is_ipv6() == refusal.is_ipv6())
            .expect("a hop of the refused family");
        (format!("peers[{i}].node_ip{suffix}"), ip.to_string())
    } else {
        let cidr = peer
            .hops()
            .map(|(cidr, _)| cidr)
            .find(|cidr| cidr.addr().is_ipv6() == refusal.is_ipv6())
            .expect("a hop of the refused family");
        (format!("peers[{i}].pod_cidr{suffix}"), cidr.to_string())
    };
    let other = |key: &str| (index(key), state.peer(key).map_or("", |p| &p.name));
    let reason = match refusal {
        Refusal::Outside {
            network: Some(cluster),
            ..
        } => format!("not inside cluster_cidr{suffix} {cluster}"),
        Refusal::OverlapsOwn { own, .. } => format!("overlaps this node's pod_cidr{suffix} {own}"),
        Refusal::Overlaps {
            other_cidr,
            other: key,
            ..
        } => {
            let (j, name) = other(key);
            format!("overlaps peers[{j}].pod_cidr{suffix} {other_cidr} ({name})")
        }
        Refusal::RepeatedIp { other: key, .. } => {
            let (j, name) = other(key);
            format!("is also the node_ip{suffix} of peers[{j}] ({name})")
        }
        Refusal::OffLink { reason, .. } => reason.clone(),
        _ => skipped.reason.clone(),
    };
    Some(ConfigError::invalid(field, value, reason))
}

/// A node's pod CIDR and the cluster CIDR it must lie in: both or neither.
fn pod_and_cluster_cidr(
    pod_cidr: Option<String>,
    cluster_cidr: Option<String>,
    family: Family,
) -> Result<Option<(IpNet, IpNet)>, ConfigError> {
    let pod_field = &format!("pod_cidr{}", family.suffix());
    let cluster_field = &format!("cluster_cidr{}", family.suffix());
    let (pod_cidr, cluster_cidr) = match (pod_cidr, cluster_cidr) {
        (None, None) => return Ok(None),
        (Some(pod), Some(cluster)) => (
            cidr(&pod, pod_field, family)?,
            cidr(&cluster, cluster_field, family)?,
        ),
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                cluster_field,
                "",
                format!("missing: {pod_field} needs it"),
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                pod_field,
                "",
                format!("missing: {cluster_field} needs it"),
            ));
        }
    };
    if !cluster_cidr.contains(&pod_cidr) {
        return Err(ConfigError::invalid(
            pod_field,
            pod_cidr,
            format!("not inside {cluster_field} {cluster_cidr}"),
        ));
    }
    if pod_cidr.max_prefix_len() - pod_cidr.prefix_len() < 2 {
        return Err(ConfigError::invalid(
            pod_field,
            pod_cidr,
            "too small to hold a gateway and pods",
        ));
    }
    Ok(Some((pod_cidr, cluster_cidr)))
}

fn required(
    value: Option<String>,
    field: &'static str,
    flag: &'static str,
) -> Result<String, ConfigError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing { field, flag })
}

/// A file the agent writes: a path with a file name (and the extension its readers
/// look for, if any).
fn file_path(path: PathBuf, field: &str, extension: Option<&str>) -> Result<PathBuf, ConfigError> {
    let shown = path.display().to_string();
    if path.file_name().is_none() || shown.ends_with('/') {
        return Err(ConfigError::invalid(field, shown, "not a file path"));
    }
    if let Some(extension) = extension
        && !shown.ends_with(extension)
    {
        return Err(ConfigError::invalid(
            field,
            shown,
            format!("must end with {extension} (CNI runtimes read only such names as lists)"),
        ));
    }
    Ok(path)
}

fn interface_name(name: String, field: &str) -> Result<String, ConfigError> {
    if name.len() > IFNAME_MAX || name.contains(['/', ' ']) {
        return Err(ConfigError::invalid(
            field,
            &name,
            "not a valid interface name",
        ));
    }
    Ok(name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// How the family's config fields end: `pod_cidr`, `pod_cidr_v6`.
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "_v6",
        }
    }
}

fn cidr(value: &str, field: &str, family: Family) -> Result<IpNet, ConfigError> {
    let example = match family {
        Family::V4 => "not an IPv4 CIDR (like 10.244.1.0/24)",
        Family::V6 => "not an IPv6 CIDR (like fd00:244:1::/64)",
    };
    let net: IpNet = value
        .parse()
        .map_err(|_| ConfigError::invalid(field, value, example))?;
    if net.addr().is_ipv4() != (family == Family::V4) {
        return Err(ConfigError::invalid(field, value, example));
    }
    if net.trunc() != net {
        return Err(ConfigError::invalid(
            field,
            value,
            format!("host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

fn v4_net(net: IpNet) -> Ipv4Net {
    match net {
        IpNet::V4(net) => net,
        IpNet::V6(_) => unreachable!("checked by cidr()"),
    }
}

fn v6_net(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V6(net) => net,
        IpNet::V4(_) => unreachable!("checked by cidr()"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn raw(peers: &[(&str, &str, &str)]) -> RawConfig {
        RawConfig {
            node_name: Some("n1".into()),
            uplink: Some("eth0".into()),
            pod_cidr: Some("10.244.1.0/24".into()),
            cluster_cidr: Some("10.244.0.0/16".into()),
            peers: peers
                .iter()
                .map(|(name, ip, cidr)| RawPeer {
                    name: (*name).into(),
                    node_ip: (*ip).into(),
                    pod_cidr: (*cidr).into(),
                    node_ip_v6: None,
                    pod_cidr_v6: None,
                })
                .collect(),
            ..RawConfig::default()
        }
    }

    /// The config and its static peers' checks, as the agent's start runs them.
    fn checked(raw: RawConfig) -> Result<Config, ConfigError> {
        let config = Config::from_raw(raw)?;
        if let Source::Static { network, peers } = &config.source {
            check_peers(network, peers, None)?;
        }
        Ok(config)
    }

    fn error(peers: &[(&str, &str, &str)]) -> String {
        error_of(raw(peers))
    }

    #[test]
    fn accepts_a_valid_config() {
        let config =
            Config::from_raw(raw(&[("n2", "172.31.0.2", "10.244.2.0/24")])).expect("valid");
        let Source::Static { network, .. } = &config.source else {
            panic!("static config expected")
        };
        assert_eq!(network.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(config.bridge, "cni0");
        assert!(!config.setup_node);
        assert_eq!(config.fast_path, FastPath::Established);
    }

    #[test]
    fn rejects_bad_peers_naming_the_entry() {
        let e = error(&[("n2", "172.31.0.2", "10.244.1.0/24")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("overlaps this node's"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.244.0.0/20")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("overlaps this node's"),
            "{e}"
        );
        let e = error(&[
            ("n2", "172.31.0.2", "10.244.2.0/24"),
            ("n3", "172.31.0.3", "10.244.2.128/25"),
        ]);
        assert!(
            e.contains("peers[1].pod_cidr") && e.contains("overlaps peers[0]"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.245.2.0/24")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("not inside cluster_cidr"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.300", "10.244.2.0/24")]);
        assert!(
            e.contains("peers[0].node_ip") && e.contains("172.31.0.300"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.244.2.1/24")]);
        assert!(e.contains("host bits set"), "{e}");
        let e = error(&[("n1", "172.31.0.2", "10.244.2.0/24")]);
        assert!(e.contains("peers[0].name"), "{e}");
    }

    #[test]
    fn rejects_missing_and_bad_node_fields() {
        let mut r = raw(&[]);
        r.pod_cidr = None;
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("missing pod_cidr");
        assert!(e.to_string().contains("pod_cidr"), "{e}");
        let mut r = raw(&[]);
        r.pod_cidr = Some("10.245.1.0/24".into());
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("outside cluster");
        assert!(e.to_string().contains("not inside cluster_cidr"), "{e}");
        let mut r = raw(&[]);
        r.uplink = Some("an-interface-name-too-long".into());
        let e = Config::from_raw(r).map(|_| ()).expect_err("long name");
        assert!(e.to_string().contains("uplink"), "{e}");
    }

    #[test]
    fn etcd_excludes_static_network_fields() {
        let mut r = raw(&[]);
        r.etcd = Some(RawEtcd {
            endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
            ..RawEtcd::default()
        });
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("pod_cidr with etcd");
        assert!(
            e.to_string().contains("pod_cidr") && e.to_string().contains("comes from etcd"),
            "{e}"
        );
        let mut r = raw(&[]);
        r.pod_cidr = None;
        r.cluster_cidr = None;
        r.etcd = Some(RawEtcd {
            endpoints: Some(vec!["127.0.0.1:2379".into()]),
            ..RawEtcd::default()
        });
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("endpoint without scheme");
        assert!(e.to_string().contains("etcd.endpoints[0]"), "{e}");
    }

    /// A dual-stack node n1 (fd00:244:1::/64) with the given peers, each with both
    /// families: (name, IPv4, CIDR, IPv6, CIDR).
    fn raw_v6(peers: &[(&str, &str, &str, &str, &str)]) -> RawConfig {
        let mut r = raw(&[]);
        r.pod_cidr_v6 = Some("fd00:244:1::/64".into());
        r.cluster_cidr_v6 = Some("fd00:244::/32".into());
        r.peers = peers
            .iter()
            .map(|(name, ip, cidr, ip6, cidr6)| RawPeer {
                name: (*name).into(),
                node_ip: (*ip).into(),
                pod_cidr: (*cidr).into(),
                node_ip_v6: Some((*ip6).into()),
                pod_cidr_v6: Some((*cidr6).into()),
            })
            .collect();
        r
    }

    fn error_of(r: RawConfig) -> String {
        match checked(r) {
            Ok(config) => panic!("accepted {config:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn accepts_a_dual_stack_config() {
        let config = Config::from_raw(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:2::/64",
        )]))
        .expect("valid");
        let Source::Static { network, peers } = &config.source else {
            panic!("static config expected")
        };
        assert_eq!(
            network.gateway_v6(),
            Some("fd00:244:1::1".parse().expect("address"))
        );
        let hops: Vec<String> = peers[0]
            .hops()
            .map(|(cidr, ip)| format!("{cidr} via {ip}"))
            .collect();
        assert_eq!(
            hops,
            [
                "10.244.2.0/24 via 172.31.0.2",
                "fd00:244:2::/64 via fd00:172:31::2"
            ]
        );
    }

    #[test]
    fn rejects_bad_ipv6_fields_naming_them() {
        let peer = (
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:2::/64",
        );
        let mut r = raw_v6(&[peer]);
        r.pod_cidr_v6 = None;
        r.cluster_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("IPv6 is off"),
            "{e}"
        );
        let mut r = raw_v6(&[]);
        r.cluster_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("cluster_cidr_v6") && e.contains("missing"),
            "{e}"
        );
        let mut r = raw_v6(&[]);
        r.pod_cidr_v6 = Some("10.244.1.0/24".into());
        let e = error_of(r);
        assert!(
            e.contains("pod_cidr_v6") && e.contains("not an IPv6 CIDR"),
            "{e}"
        );
        let e = error_of(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:1::/64",
        )]));
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("overlaps this node's pod_cidr_v6"),
            "{e}"
        );
        let e = error_of(raw_v6(&[
            peer,
            (
                "n3",
                "172.31.0.3",
                "10.244.3.0/24",
                "fd00:172:31::2",
                "fd00:244:3::/64",
            ),
        ]));
        assert!(
            e.contains("peers[1].node_ip_v6") && e.contains("peers[0]"),
            "{e}"
        );
        let e = error_of(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "172.31.0.9",
            "fd00:244:2::/64",
        )]));
        assert!(e.contains("peers[0].node_ip_v6"), "{e}");
        let mut r = raw_v6(&[peer]);
        r.peers[0].pod_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("go together"),
            "{e}"
        );
    }

    /// `hgw-agent run`'s flags, without the file.
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        flags: RawConfig,
    }

    fn flags(args: &[&str]) -> RawConfig {
        Flags::try_parse_from(std::iter::once("hgw-agent").chain(args.iter().copied()))
            .expect("flags parse")
            .flags
    }

    fn file(text: &str) -> RawConfig {
        toml::from_str(text).expect("file parses")
    }

    const FILE: &str = r#"
node_name = "n1"
uplink = "eth0"
pod_cidr = "10.244.1.0/24"
cluster_cidr = "10.244.0.0/16"
setup_node = true
fast_path = "all"

[[peers]]
name = "n2"
node_ip = "172.31.0.2"
pod_cidr = "10.244.2.0/24"
"#;

    fn static_peers(config: &Config) -> Vec<&str> {
        let Source::Static { peers, .. } = &config.source else {
            panic!("static config expected: {config:?}")
        };
        peers.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn file_only() {
        let config = Config::from_raw(file(FILE).with_flags(flags(&[]))).expect("valid");
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.bridge, "cni0");
        assert!(config.setup_node);
        assert_eq!(config.fast_path, FastPath::All);
        assert_eq!(config.attach, None);
        assert_eq!(static_peers(&config), ["n2"]);
    }

    #[test]
    fn flags_only() {
        let raw = RawConfig::default().with_flags(flags(&[
            "--node-name=n1",
            "--uplink=eth0",
            "--pod-cidr=10.244.1.0/24",
            "--cluster-cidr=10.244.0.0/16",
            "--setup-node",
            "--attach=bridge",
            "--status-socket=/tmp/hgw.sock",
            "--peer=n2=172.31.0.2,10.244.2.0/24",
            "--peer=n3=172.31.0.3,10.244.3.0/24,fd00:172:31::3,fd00:244:3::/64",
        ]));
        assert_eq!(raw.peers[1].pod_cidr_v6.as_deref(), Some("fd00:244:3::/64"));
        // No IPv6 on this node: n3's IPv6 fields are refused, naming the flag's peer.
        let e = Config::from_raw(raw.clone())
            .map(|_| ())
            .expect_err("v6 peer");
        assert!(e.to_string().contains("peers[1].pod_cidr_v6"), "{e}");
        let mut raw = raw;
        raw.peers[1].node_ip_v6 = None;
        raw.peers[1].pod_cidr_v6 = None;
        let config = Config::from_raw(raw).expect("valid");
        assert!(config.setup_node);
        assert_eq!(config.attach, Some(Attach::Bridge));
        assert_eq!(config.fast_path, FastPath::Established);
        assert_eq!(config.status_socket, PathBuf::from("/tmp/hgw.sock"));
        assert_eq!(static_peers(&config), ["n2", "n3"]);
    }

    #[test]
    fn a_flag_overrides_the_file() {
        let raw = file(FILE).with_flags(flags(&["--fast-path", "off", "--bridge", "br0"]));
        let config = Config::from_raw(raw).expect("valid");
        assert_eq!(config.fast_path, FastPath::Off);
        assert_eq!(config.bridge, "br0");
        // Fields without a flag keep the file's value; an absent --setup-node is no
        // `setup_node = false`.
        assert_eq!(config.uplink, "eth0");
        assert!(config.setup_node);
    }

    #[test]
    fn an_etcd_flag_overrides_one_field_of_the_files_etcd() {
        let text = "node_name = \"n1\"\nuplink = \"eth0\"\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"/a\"\nusername = \"u\"\n";
        let raw = file(text).with_flags(flags(&[
            "--etcd-prefix=/b",
            "--public-ipv6=fd00:172:31::1",
            "--etcd-password=p",
        ]));
        let config = Config::from_raw(raw).expect("valid");
        let Source::Etcd(etcd) = &config.source else {
            panic!("etcd config expected")
        };
        assert_eq!(etcd.endpoints, ["http://10.0.0.5:2379"]);
        assert_eq!(etcd.prefix, "/b");
        assert_eq!(
            etcd.public_ipv6,
            Some("fd00:172:31::1".parse().expect("ip"))
        );
        assert_eq!(etcd.password.as_deref(), Some("p"));
    }

    #[test]
    fn an_etcd_password_alone_does_not_turn_etcd_on() {
        let raw = file(FILE).with_flags(flags(&["--etcd-password=p"]));
        assert!(raw.etcd.is_none());
        let raw = file(FILE).with_flags(flags(&["--etcd-prefix=/p"]));
        assert!(raw.etcd.is_some());
    }

    #[test]
    fn rejects_a_bad_public_ipv6() {
        let raw = file(
            "node_name = \"n1\"\nuplink = \"eth0\"\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\npublic_ipv6 = \"172.31.0.1\"\n",
        );
        let e = error_of(raw);
        assert!(
            e.contains("etcd.public_ipv6") && e.contains("not an IPv6 address"),
            "{e}"
        );
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

    #[test]
    fn restart_needed_names_the_changed_fields_but_not_peers() {
        let running = Config::from_raw(file(FILE)).expect("valid");
        let peers_only = format!(
            "{FILE}\n[[peers]]\nname = \"n3\"\nnode_ip = \"172.31.0.3\"\npod_cidr = \"10.244.3.0/24\"\n"
        );
        let reread = Config::from_raw(file(&peers_only)).expect("valid");
        assert_eq!(static_peers(&reread), ["n2", "n3"]);
        assert!(reread.restart_needed(&running).is_empty());
        // A default written out is no change.
        let explicit = format!("bridge = \"cni0\"\n{FILE}");
        let reread = Config::from_raw(file(&explicit)).expect("valid");
        assert!(reread.restart_needed(&running).is_empty());
        // Unset, `attach` is the kernel's choice: written out, it overrides that.
        let pinned = format!("attach = \"ports\"\n{FILE}");
        let reread = Config::from_raw(file(&pinned)).expect("valid");
        assert_eq!(reread.restart_needed(&running), ["attach"]);

        let changed = FILE
            .replace("fast_path = \"all\"", "fast_path = \"off\"")
            .replace("10.244.1.0/24", "10.244.4.0/24");
        let reread = Config::from_raw(file(&changed)).expect("valid");
        assert_eq!(reread.restart_needed(&running), ["pod_cidr", "fast_path"]);
    }

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
    fn subnet_env_cni_conf_and_ip_masq() {
        let config = Config::from_raw(file(FILE)).expect("valid");
        assert_eq!(config.subnet_env, PathBuf::from(DEFAULT_SUBNET_ENV));
        assert_eq!(config.cni_conf, None);
        assert!(!config.ip_masq);
        // Top-level fields go before the [[peers]] table.
        let text = format!(
            "subnet_env = \"/tmp/s.env\"\ncni_conf = \"/etc/cni/net.d/10-hgw.conflist\"\nip_masq = true\n{FILE}"
        );
        let config = Config::from_raw(file(&text)).expect("valid");
        assert_eq!(config.subnet_env, PathBuf::from("/tmp/s.env"));
        assert_eq!(
            config.cni_conf.as_deref(),
            Some(std::path::Path::new("/etc/cni/net.d/10-hgw.conflist"))
        );
        assert!(config.ip_masq);
        let raw = file(FILE).with_flags(flags(&[
            "--ip-masq",
            "--subnet-env=/run/x/subnet.env",
            "--cni-conf=/tmp/a.conflist",
        ]));
        let config = Config::from_raw(raw).expect("valid");
        assert!(config.ip_masq);
        assert_eq!(config.subnet_env, PathBuf::from("/run/x/subnet.env"));
        let e = Config::from_raw(
            file(FILE).with_flags(flags(&["--cni-conf=/etc/cni/net.d/10-hgw.conf"])),
        )
        .map(|_| ())
        .expect_err("not a list name");
        assert!(
            e.to_string().contains("cni_conf") && e.to_string().contains(".conflist"),
            "{e}"
        );
        let e = Config::from_raw(file(FILE).with_flags(flags(&["--subnet-env=/run/flannel/"])))
            .map(|_| ())
            .expect_err("a directory");
        assert!(e.to_string().contains("subnet_env"), "{e}");
    }

    #[test]
    fn metrics_addr_is_off_by_default_and_checked() {
        let base = raw(&[("n2", "172.31.0.2", "10.244.2.0/24")]);
        let config = Config::from_raw(base.clone()).expect("valid");
        assert_eq!(config.metrics_addr, None);
        let with = |addr: &str| {
            Config::from_raw(RawConfig {
                metrics_addr: Some(addr.into()),
                ..base.clone()
            })
        };
        let config = with("127.0.0.1:9090").expect("valid");
        assert_eq!(
            config.metrics_addr,
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        assert!(with("[::]:9090").is_ok());
        let e = with("localhost")
            .map(|_| ())
            .expect_err("no port")
            .to_string();
        assert!(e.contains("metrics_addr") && e.contains("localhost"), "{e}");
        let parsed =
            toml::from_str::<RawConfig>("metrics_addr = \"0.0.0.0:9090\"\n").expect("a file field");
        assert_eq!(parsed.metrics_addr.as_deref(), Some("0.0.0.0:9090"));
    }

    #[test]
    fn ct_recheck_ms_defaults_to_100_and_is_bounded_by_the_flowtables_second() {
        let base = raw(&[("n2", "172.31.0.2", "10.244.2.0/24")]);
        assert_eq!(
            Config::from_raw(base.clone()).expect("valid").ct_recheck_ms,
            100
        );
        let with = |ms: u32| {
            Config::from_raw(RawConfig {
                ct_recheck_ms: Some(ms),
                ..base.clone()
            })
        };
        assert_eq!(with(0).expect("off").ct_recheck_ms, 0);
        assert_eq!(with(1000).expect("the most").ct_recheck_ms, 1000);
        let e = with(1001).map(|_| ()).expect_err("too long").to_string();
        assert!(e.contains("ct_recheck_ms") && e.contains("1001"), "{e}");
        let parsed = toml::from_str::<RawConfig>("ct_recheck_ms = 250\n").expect("a file field");
        assert_eq!(parsed.ct_recheck_ms, Some(250));
    }

    #[test]
    fn kube_from_the_file_or_the_flags() {
        let kube = |raw: RawConfig| match Config::from_raw(raw).expect("valid").source {
            Source::Kube(kube) => kube,
            other => panic!("kube expected, got {other:?}"),
        };
        let base = "node_name = \"n1\"\nuplink = \"eth0\"\n";
        let got = kube(file(&format!("{base}[kube]\n")));
        assert_eq!(got.kubeconfig, None, "in-cluster by default");
        assert_eq!(got.net_conf, PathBuf::from(DEFAULT_NET_CONF));
        let got = kube(file(base).with_flags(flags(&[
            "--kube-subnet-mgr",
            "--kubeconfig=/etc/hgw/kubeconfig",
            "--kube-net-conf=/n.json",
        ])));
        assert_eq!(got.kubeconfig, Some(PathBuf::from("/etc/hgw/kubeconfig")));
        assert_eq!(got.net_conf, PathBuf::from("/n.json"));
    }

    #[test]
    fn kube_config_errors_name_the_field() {
        let error = |text: &str| {
            Config::from_raw(file(text))
                .expect_err("refused")
                .to_string()
        };
        let base = "node_name = \"n1\"\nuplink = \"eth0\"\n";
        let e = error(&format!("{base}[kube]\nkubeconfig = \"rel/k\"\n"));
        assert!(e.contains("kube.kubeconfig") && e.contains("rel/k"), "{e}");
        let e = error(&format!("{base}[kube]\nnet_conf = \"/etc/\"\n"));
        assert!(e.contains("kube.net_conf"), "{e}");
        let e = error(&format!("{base}pod_cidr = \"10.244.1.0/24\"\n[kube]\n"));
        assert!(
            e.contains("pod_cidr") && e.contains("Kubernetes API"),
            "{e}"
        );
        let e = error(&format!(
            "{base}[kube]\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\n"
        ));
        assert!(e.contains("kube") && e.contains("keep one"), "{e}");
    }
}
