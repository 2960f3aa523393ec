//! The agent's configuration: a TOML file, every field also a flag, validated as a
//! whole before the agent touches anything. Errors name the field and the value.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

pub use crate::datapath::{Attach, FastPath};

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

/// The config file as written: strings, checked by [`Config::from_raw`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_name: Option<String>,
    pub uplink: Option<String>,
    pub bridge: Option<String>,
    pub pod_cidr: Option<String>,
    pub cluster_cidr: Option<String>,
    /// IPv6 (dual stack): this node's IPv6 pod CIDR and the cluster's; both or neither.
    pub pod_cidr_v6: Option<String>,
    pub cluster_cidr_v6: Option<String>,
    pub setup_node: Option<bool>,
    pub fast_path: Option<FastPath>,
    pub attach: Option<Attach>,
    pub status_socket: Option<PathBuf>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    /// Learn the network, this node's subnet and the peers from etcd (flannel's schema).
    pub etcd: Option<RawEtcd>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: String,
    pub node_ip: String,
    pub pod_cidr: String,
    /// The peer's IPv6 node address and pod CIDR (dual stack): both or neither.
    pub node_ip_v6: Option<String>,
    pub pod_cidr_v6: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    /// Seconds; the lease is kept alive while the agent runs.
    pub lease_ttl: Option<i64>,
    /// This node's address in its lease (flannel's PublicIP) [default: the uplink's].
    pub public_ip: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RawConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
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
    /// Where it came from: "static", or its etcd key.
    pub source: String,
    /// The etcd lease that keeps it (none for static peers and etcd reservations).
    pub lease: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerV6 {
    pub node_ip: Ipv6Addr,
    pub pod_cidr: Ipv6Net,
}

impl Peer {
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
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl: i64,
    pub public_ip: Option<Ipv4Addr>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_LEASE_TTL: i64 = 60;
pub const DEFAULT_STATUS_SOCKET: &str = "/run/hgw/hgw.sock";

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
    /// Where the bridge-side program runs.
    pub attach: Attach,
    pub status_socket: PathBuf,
}

impl Config {
    /// Checks every field and every relation between the CIDRs; the first problem
    /// found is returned, naming the field and the value.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let node_name = required(raw.node_name, "node_name", "node-name")?;
        let uplink = interface_name(required(raw.uplink, "uplink", "uplink")?, "uplink")?;
        let bridge = interface_name(raw.bridge.unwrap_or_else(|| "cni0".into()), "bridge")?;
        if uplink == bridge {
            return Err(ConfigError::invalid(
                "bridge",
                &bridge,
                "the bridge cannot be the uplink",
            ));
        }
        let source = match raw.etcd {
            Some(etcd) => {
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
                            "comes from etcd when [etcd] is configured; remove it",
                        ));
                    }
                }
                Source::Etcd(etcd_config(etcd)?)
            }
            None => static_source(
                &node_name,
                [raw.pod_cidr, raw.cluster_cidr],
                [raw.pod_cidr_v6, raw.cluster_cidr_v6],
                raw.peers,
            )?,
        };
        Ok(Self {
            node_name,
            uplink,
            bridge,
            source,
            setup_node: raw.setup_node.unwrap_or(false),
            fast_path: raw.fast_path.unwrap_or_default(),
            attach: raw.attach.unwrap_or_default(),
            status_socket: raw
                .status_socket
                .unwrap_or_else(|| DEFAULT_STATUS_SOCKET.into()),
        })
    }
}

fn etcd_config(raw: RawEtcd) -> Result<EtcdConfig, ConfigError> {
    if raw.endpoints.is_empty() {
        return Err(ConfigError::Missing {
            field: "etcd.endpoints",
            flag: "etcd-endpoints",
        });
    }
    for (i, endpoint) in raw.endpoints.iter().enumerate() {
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
        endpoints: raw.endpoints,
        prefix,
        lease_ttl,
        public_ip,
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
        };
        for (hop_cidr, hop_ip) in peer.hops() {
            let suffix = Family::of(hop_ip).suffix();
            let cidr_field = field(&format!("pod_cidr{suffix}"));
            let ip_field = field(&format!("node_ip{suffix}"));
            let (own, cluster) = network
                .pod_cidrs()
                .zip(network.cluster_cidrs())
                .find(|(own, _)| own.addr().is_ipv4() == hop_cidr.addr().is_ipv4())
                .expect("a node network per peer family");
            if !cluster.contains(&hop_cidr) {
                return Err(ConfigError::invalid(
                    cidr_field,
                    hop_cidr,
                    format!("not inside cluster_cidr{suffix} {cluster}"),
                ));
            }
            if overlaps(hop_cidr, own) {
                return Err(ConfigError::invalid(
                    cidr_field,
                    hop_cidr,
                    format!("overlaps this node's pod_cidr{suffix} {own}"),
                ));
            }
            for (other, known) in peers.iter().enumerate() {
                for (known_cidr, known_ip) in known.hops() {
                    if overlaps(known_cidr, hop_cidr) {
                        return Err(ConfigError::invalid(
                            cidr_field,
                            hop_cidr,
                            format!(
                                "overlaps peers[{other}].pod_cidr{suffix} {known_cidr} ({})",
                                known.name
                            ),
                        ));
                    }
                    if known_ip == hop_ip {
                        return Err(ConfigError::invalid(
                            ip_field,
                            hop_ip,
                            format!(
                                "is also the node_ip{suffix} of peers[{other}] ({})",
                                known.name
                            ),
                        ));
                    }
                }
            }
        }
        peers.push(peer);
    }
    Ok(Source::Static { network, peers })
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
    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

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

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

#[cfg(test)]
mod tests {
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

    fn error(peers: &[(&str, &str, &str)]) -> String {
        match Config::from_raw(raw(peers)) {
            Ok(config) => panic!("accepted {config:?}"),
            Err(err) => err.to_string(),
        }
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
            endpoints: vec!["http://127.0.0.1:2379".into()],
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
            endpoints: vec!["127.0.0.1:2379".into()],
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
        match Config::from_raw(r) {
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

    #[test]
    fn unknown_fields_are_errors() {
        let e = toml::from_str::<RawConfig>("node_name = \"n1\"\npod_cidrs = \"x\"\n")
            .expect_err("unknown");
        assert!(e.to_string().contains("pod_cidrs"), "{e}");
    }
}
