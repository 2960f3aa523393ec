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

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, LeaseClient, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::agent::sources::{PeerChange, PeerReceiver, PeerSender, peer_channel};
use crate::cidr::{Taken, overlaps};
use crate::config::{EtcdConfig, Network, NetworkV6, Origin, Peer, PeerV6};

mod listing;
use listing::{Warned, list};

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

/// Flannel's network config (`<prefix>/config`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelConfig {
    #[serde(rename = "EnableIPv4", default)]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6", default)]
    enable_ipv6: bool,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    subnet_len: u8,
    #[serde(default)]
    subnet_min: Option<String>,
    #[serde(default)]
    subnet_max: Option<String>,
    #[serde(rename = "IPv6Network", default)]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen", default)]
    ipv6_subnet_len: u8,
    #[serde(rename = "IPv6SubnetMin", default)]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax", default)]
    ipv6_subnet_max: Option<String>,
    #[serde(default)]
    backend: Option<Backend>,
}

#[derive(Debug, Deserialize)]
struct Backend {
    #[serde(rename = "Type")]
    kind: String,
}

/// A subnet lease's value, as flannel writes it (`PublicIPv6` is null without IPv6).
#[derive(Debug, Serialize, Deserialize)]
struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    public_ip: String,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    public_ipv6: Option<String>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    backend_type: String,
}

/// The config's field names of one family, for messages.
struct Fields {
    family: &'static str,
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
}

const FIELDS_V4: Fields = Fields {
    family: "IPv4",
    network: "Network",
    len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
};

const FIELDS_V6: Fields = Fields {
    family: "IPv6",
    network: "IPv6Network",
    len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
};

/// One family's subnets: the network cut into `subnet_len` subnets, handed out from
/// `min` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNet,
    pub subnet_len: u8,
    pub min: IpAddr,
    pub max: IpAddr,
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

fn from_u128(value: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(value.into())
    } else {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    }
}

/// The first of `uplink`'s networks that `net` overlaps: a subnet there would take the
/// node's own traffic (its uplink addresses, SSH included) for pods.
fn uplink_overlap(net: &IpNet, uplink: &[IpNet]) -> Option<IpNet> {
    uplink.iter().map(IpNet::trunc).find(|u| overlaps(*net, *u))
}

impl Pool {
    /// Flannel's rules (pkg/subnet/config.go `CheckNetworkConfig`): at least four
    /// subnets in the network, none shorter than /30 (/126), bounds inside the network
    /// and on a subnet boundary; by default /24 (/64) subnets, or a quarter of a small
    /// network, and the first subnet skipped. hgw also refuses a default route.
    fn parse(
        f: &Fields,
        network: Option<&str>,
        subnet_len: u8,
        min: Option<&str>,
        max: Option<&str>,
    ) -> Result<Self, String> {
        let v6 = f.family == "IPv6";
        let Some(text) = network else {
            return Err(format!("{} is missing", f.network));
        };
        let network = text
            .parse::<IpNet>()
            .ok()
            .filter(|n| n.addr().is_ipv6() == v6)
            .ok_or_else(|| format!("{} {text:?} is not an {} CIDR", f.network, f.family))?
            .trunc();
        let prefix = network.prefix_len();
        let bits = bits(network.addr());
        if prefix == 0 {
            return Err(format!(
                "{} {network} is a default route: it would take all of the node's traffic for pods",
                f.network
            ));
        }
        let (default_len, longest) = if v6 { (64, 126) } else { (24, 30) };
        let subnet_len = match subnet_len {
            0 if prefix + 4 > bits => {
                return Err(format!(
                    "{} {network} is too small for four subnets of four addresses (at most /{})",
                    f.network,
                    bits - 4
                ));
            }
            0 if prefix + 2 <= default_len => default_len,
            0 => prefix + 2,
            len if len > longest => {
                return Err(format!(
                    "{} {len} leaves no room for pods (at most {longest})",
                    f.len
                ));
            }
            len if len < prefix + 2 => {
                return Err(format!(
                    "{} {len} is too short for {} {network}: it must hold at least four subnets (at least {})",
                    f.len,
                    f.network,
                    prefix + 2
                ));
            }
            len => len,
        };
        let size = 1u128 << (bits - subnet_len);
        let (first, last) = (to_u128(network.network()), to_u128(network.broadcast()));
        let bound = |value: Option<&str>, name: &str, default: u128| -> Result<u128, String> {
            let Some(text) = value else {
                return Ok(default);
            };
            let addr = text
                .parse::<IpAddr>()
                .ok()
                .filter(|a| a.is_ipv6() == v6)
                .ok_or_else(|| format!("{name} {text:?} is not an {} address", f.family))?;
            if !network.contains(&addr) {
                return Err(format!("{name} {addr} is outside {} {network}", f.network));
            }
            let value = to_u128(addr);
            if !value.is_multiple_of(size) {
                return Err(format!("{name} {addr} is not on a /{subnet_len} boundary"));
            }
            Ok(value)
        };
        let min = bound(min, f.min, first + size)?;
        let max = bound(max, f.max, last - (size - 1))?;
        if min > max {
            return Err(format!(
                "{} {} is above {} {}",
                f.min,
                from_u128(min, v6),
                f.max,
                from_u128(max, v6)
            ));
        }
        Ok(Self {
            network,
            subnet_len,
            min: from_u128(min, v6),
            max: from_u128(max, v6),
        })
    }

    /// Whether `net` is one this pool hands out (flannel's `isSubnetConfigCompat`).
    fn fits(&self, net: &IpNet) -> bool {
        let addr = net.network();
        net.prefix_len() == self.subnet_len
            && addr.is_ipv6() == self.network.addr().is_ipv6()
            && to_u128(self.min) <= to_u128(addr)
            && to_u128(addr) <= to_u128(self.max)
    }

    /// Every subnet from min to max, in order.
    fn subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v6 = self.network.addr().is_ipv6();
        let size = 1u128 << (bits(self.min) - self.subnet_len);
        let max = to_u128(self.max);
        std::iter::successors(Some(to_u128(self.min)), move |a| {
            a.checked_add(size).filter(|next| *next <= max)
        })
        .filter_map(move |a| IpNet::new(from_u128(a, v6), self.subnet_len).ok())
    }

    fn no_free_subnet(&self) -> EtcdError {
        EtcdError::NoFreeSubnet {
            network: self.network,
            subnet_len: self.subnet_len,
            min: self.min,
            max: self.max,
        }
    }
}

/// The subnet space of a flannel network: IPv4, and IPv6 with `EnableIPv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetSpace {
    pub v4: Pool,
    pub v6: Option<Pool>,
}

impl SubnetSpace {
    pub fn parse(key: &str, text: &str) -> Result<Self, EtcdError> {
        let bad = |reason: String| EtcdError::BadConfig {
            key: key.to_owned(),
            reason,
        };
        let config: FlannelConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if let Some(backend) = &config.backend
            && backend.kind != "host-gw"
        {
            warn!(
                "{key}: Backend.Type is {:?}; hgw does host-gw routing whatever it says",
                backend.kind
            );
        }
        if config.enable_ipv4 == Some(false) {
            return Err(bad(
                "EnableIPv4 is false: hgw needs an IPv4 network (IPv6 only is not supported)"
                    .into(),
            ));
        }
        let v4 = Pool::parse(
            &FIELDS_V4,
            config.network.as_deref(),
            config.subnet_len,
            config.subnet_min.as_deref(),
            config.subnet_max.as_deref(),
        )
        .map_err(bad)?;
        let v6 = if config.enable_ipv6 {
            Some(
                Pool::parse(
                    &FIELDS_V6,
                    config.ipv6_network.as_deref(),
                    config.ipv6_subnet_len,
                    config.ipv6_subnet_min.as_deref(),
                    config.ipv6_subnet_max.as_deref(),
                )
                .map_err(bad)?,
            )
        } else {
            None
        };
        Ok(Self { v4, v6 })
    }

    fn pools(&self) -> impl Iterator<Item = (&'static Fields, &Pool)> {
        std::iter::once((&FIELDS_V4, &self.v4)).chain(self.v6.as_ref().map(|p| (&FIELDS_V6, p)))
    }

    /// A network over the uplink's networks would hand the node's own traffic to pods.
    pub(crate) fn check_uplink(&self, key: &str, uplink: &[IpNet]) -> Result<(), EtcdError> {
        for (fields, pool) in self.pools() {
            if let Some(net) = uplink_overlap(&pool.network, uplink) {
                return Err(EtcdError::BadConfig {
                    key: key.to_owned(),
                    reason: format!(
                        "{} {} overlaps the uplink's network {net}",
                        fields.network, pool.network
                    ),
                });
            }
        }
        Ok(())
    }

    /// The network of a node holding `own`.
    fn network(&self, own: SubnetKey) -> Network {
        Network {
            pod_cidr: own.v4,
            cluster_cidr: self.v4_network(),
            v6: own
                .v6
                .zip(self.v6_network())
                .map(|(pod_cidr, cluster_cidr)| NetworkV6 {
                    pod_cidr,
                    cluster_cidr,
                }),
        }
    }

    fn v4_network(&self) -> Ipv4Net {
        match self.v4.network {
            IpNet::V4(net) => net,
            IpNet::V6(_) => unreachable!("parsed as IPv4"),
        }
    }

    fn v6_network(&self) -> Option<Ipv6Net> {
        match self.v6?.network {
            IpNet::V6(net) => Some(net),
            IpNet::V4(_) => unreachable!("parsed as IPv6"),
        }
    }
}

/// A subnet key's subnets: `10.244.3.0-24`, dual stack `10.244.3.0-24&fd00:244:3::-64`
/// (flannel's `MakeSubnetKey` / `ParseSubnetKey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SubnetKey {
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
}

impl SubnetKey {
    fn key(&self, prefix: &str) -> String {
        let mut key = format!(
            "{prefix}/subnets/{}-{}",
            self.v4.network(),
            self.v4.prefix_len()
        );
        if let Some(v6) = self.v6 {
            key.push_str(&format!("&{}-{}", v6.network(), v6.prefix_len()));
        }
        key
    }

    fn parse(prefix: &str, key: &str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?.strip_prefix("/subnets/")?;
        let (v4, v6) = match rest.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (rest, None),
        };
        let (addr, len) = v4.split_once('-')?;
        let v4 = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        let v6 = match v6 {
            Some(text) => {
                let (addr, len) = text.rsplit_once('-')?;
                let net = Ipv6Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
                (net.trunc() == net).then_some(net)?;
                Some(net)
            }
            None => None,
        };
        (v4.trunc() == v4).then_some(Self { v4, v6 })
    }

    fn nets(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.v4)).chain(self.v6.map(IpNet::V6))
    }
}

/// One entry under `<prefix>/subnets/`, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: String,
    /// The size of a value too large to be a lease ([`listing::MAX_VALUE`]), not kept.
    oversize: Option<usize>,
    lease: i64,
    create_revision: i64,
    mod_revision: i64,
}

/// One entry as a peer: a subnet key, flannel's value, addresses of the right family
/// (IPv6 only with `EnableIPv6`). What it must be beside the network and the other
/// peers is the desired state's to check.
fn peer_of(prefix: &str, key: &str, entry: &Entry, space: &SubnetSpace) -> Result<Peer, String> {
    let Some(mut subnet_key) = SubnetKey::parse(prefix, key) else {
        return Err(
            "not a subnet key (want <prefix>/subnets/A.B.C.D-LEN, or A.B.C.D-LEN&IPV6-LEN)".into(),
        );
    };
    // A dual-stack entry in an IPv4 network is used for IPv4 only.
    if space.v6.is_none() {
        subnet_key.v6 = None;
    }
    if let Some(size) = entry.oversize {
        return Err(format!(
            "value of {size} bytes, more than a flannel lease's {} bytes",
            listing::MAX_VALUE
        ));
    }
    let attrs: LeaseAttrs = serde_json::from_str(&entry.value)
        .map_err(|e| format!("value is not a flannel lease: {e}"))?;
    let public_ip = attrs
        .public_ip
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("PublicIP {:?} is not an IPv4 address", attrs.public_ip))?;
    let v6 = match (subnet_key.v6, &attrs.public_ipv6) {
        (None, _) => None,
        (Some(_), None) => {
            return Err("an IPv6 subnet without PublicIPv6".into());
        }
        (Some(pod_cidr), Some(text)) => Some(PeerV6 {
            node_ip: text
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("PublicIPv6 {text:?} is not an IPv6 address"))?,
            pod_cidr,
        }),
    };
    Ok(Peer {
        name: format!("{}-{}", subnet_key.v4.network(), subnet_key.v4.prefix_len()),
        node_ip: public_ip,
        pod_cidr: subnet_key.v4,
        v6,
        source: key.to_owned(),
        lease: (entry.lease != 0).then_some(entry.lease),
        origin: Origin::Etcd {
            revision: entry.create_revision,
        },
        // Older flannel entries say none: taken as host-gw.
        backend: (!attrs.backend_type.is_empty()).then_some(attrs.backend_type),
    })
}

/// The peers of a listing, but this node's own entry; a malformed entry is named in a
/// warning (once while it stands).
fn peers_of(
    prefix: &str,
    own_key: &str,
    entries: &BTreeMap<String, Entry>,
    space: &SubnetSpace,
    warned: &mut Warned,
) -> Vec<Peer> {
    warned.retain(|key| entries.contains_key(key));
    entries
        .iter()
        .filter(|(key, _)| *key != own_key)
        .filter_map(|(key, entry)| checked(prefix, key, entry, space, warned))
        .collect()
}

/// `entry` as a peer, or `None` with a warning.
fn checked(
    prefix: &str,
    key: &str,
    entry: &Entry,
    space: &SubnetSpace,
    warned: &mut Warned,
) -> Option<Peer> {
    match peer_of(prefix, key, entry, space) {
        Ok(peer) => {
            warned.forget(key);
            Some(peer)
        }
        Err(reason) => {
            if warned.first(key, entry) {
                warn!("etcd key {key}: ignored: {reason}");
            }
            None
        }
    }
}

/// The subnets of a key must lie inside the network and off the uplink's networks.
fn check_subnets(
    subnet_key: &SubnetKey,
    space: &SubnetSpace,
    uplink: &[IpNet],
) -> Result<(), String> {
    for net in subnet_key.nets() {
        if let Some(up) = uplink_overlap(&net, uplink) {
            return Err(format!("{net} overlaps the uplink's network {up}"));
        }
    }
    for (net, (fields, pool)) in subnet_key.nets().zip(space.pools()) {
        if !pool.network.contains(&net) {
            return Err(format!(
                "{net} is outside the {} {}",
                fields.network, pool.network
            ));
        }
    }
    Ok(())
}

/// A connected source: this node's network, the public IPs it announces, and the peers
/// as they change.
pub struct EtcdSource {
    pub network: Network,
    pub public_ips: Vec<IpAddr>,
    pub peers: PeerReceiver,
}

struct Shared {
    config: EtcdConfig,
    public_ip: Ipv4Addr,
    public_ipv6: Option<Ipv6Addr>,
    uplink: Vec<IpNet>,
    endpoints: String,
}

impl Shared {
    fn error(&self, operation: &'static str) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        move |source| {
            crate::serve::metrics::count_etcd_error();
            EtcdError::Client {
                operation,
                endpoints: self.endpoints.clone(),
                source,
            }
        }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.config.prefix)
    }
}

/// The uplink's first global IPv6 address (not link-local), as flanneld picks it.
fn first_global_ipv6(uplink: &[IpNet]) -> Option<Ipv6Addr> {
    uplink.iter().find_map(|net| match net.addr() {
        IpAddr::V6(a) if !a.is_loopback() && !a.is_multicast() && !a.is_unicast_link_local() => {
            Some(a)
        }
        _ => None,
    })
}

/// Connects, reads and checks the network config, acquires this node's subnet (both
/// families with `EnableIPv6`), and starts the lease keeper, the watch and the
/// forwarder to the agent. Fails (before the agent changes anything on the node) if
/// etcd cannot be reached or holds no usable config. `uplink_networks` are the uplink's
/// addresses with their prefixes: no subnet may cover them.
pub async fn start(
    config: EtcdConfig,
    public_ip: Ipv4Addr,
    uplink_networks: &[IpNet],
) -> Result<EtcdSource, EtcdError> {
    let mut shared = Shared {
        endpoints: config.endpoints.join(","),
        config,
        public_ip,
        public_ipv6: None,
        uplink: uplink_networks.to_vec(),
    };
    let mut client = connect(&shared).await?;
    let config_key = format!("{}/config", shared.config.prefix);
    let response = client
        .get(config_key.as_str(), None)
        .await
        .map_err(shared.error("reading the network config"))?;
    let text = match response.kvs().first() {
        Some(kv) => kv
            .value_str()
            .map_err(shared.error("reading the network config"))?
            .to_owned(),
        None => {
            return Err(EtcdError::BadConfig {
                key: config_key,
                reason: "missing: write flannel's network config there".into(),
            });
        }
    };
    let space = SubnetSpace::parse(&config_key, &text)?;
    space.check_uplink(&config_key, uplink_networks)?;
    if space.v6.is_some() {
        // The configured address first, else the uplink's first global one.
        shared.public_ipv6 = Some(
            shared
                .config
                .public_ipv6
                .or_else(|| first_global_ipv6(uplink_networks))
                .ok_or(EtcdError::NoPublicIpv6 {
                    key: config_key.clone(),
                })?,
        );
    }

    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let (own, listed) = acquire(&mut client, &shared, &space, lease, None).await?;
    info!(
        "etcd: this node holds {} (lease {lease:x}, TTL {} s)",
        own.key(&shared.config.prefix),
        shared.config.lease_ttl
    );

    let network = space.network(own);
    let (lease_tx, lease_rx) = watch::channel(lease);
    let (lost_tx, lost_rx) = mpsc::channel(1);
    tokio::spawn(keep_alive(
        client.lease_client(),
        shared.endpoints.clone(),
        shared.config.lease_ttl,
        lease_rx,
        lost_tx,
    ));
    let (tx, rx) = peer_channel();
    let lease = Lease {
        id: lease,
        renewed: lease_tx,
        lost: lost_rx,
    };
    let public_ips = std::iter::once(IpAddr::V4(shared.public_ip))
        .chain(shared.public_ipv6.map(IpAddr::V6))
        .collect();
    tokio::spawn(run(client, shared, space, (own, listed), lease, tx));
    Ok(EtcdSource {
        network,
        public_ips,
        peers: rx,
    })
}

async fn connect(shared: &Shared) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let (Some(user), Some(password)) = (&shared.config.username, &shared.config.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if shared.config.ca_file.is_some() || shared.config.cert_file.is_some() {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| EtcdError::ReadFile {
                path: path.display().to_string(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &shared.config.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&shared.config.cert_file, &shared.config.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Client::connect(&shared.config.endpoints, Some(options))
        .await
        .map_err(shared.error("connecting"))
}

/// Why this node's entry cannot be kept as it is, if it cannot: flannel's
/// compatibility (each family from its pool, IPv6 exactly when enabled) and the checks
/// of an entry's subnets (its value is ours to rewrite). Reservations may lie outside
/// SubnetMin and SubnetMax, and keep an IPv6 subnet the network does not use.
fn own_entry_unfit(
    subnet_key: SubnetKey,
    reservation: bool,
    space: &SubnetSpace,
    uplink: &[IpNet],
) -> Option<String> {
    match (space.v6.is_some(), subnet_key.v6.is_some()) {
        (true, false) => return Some("no IPv6 subnet, but the network has EnableIPv6".into()),
        (false, true) if !reservation => {
            return Some("an IPv6 subnet, but the network has no EnableIPv6".into());
        }
        _ => {}
    }
    let subnet_key = SubnetKey {
        v6: subnet_key.v6.filter(|_| space.v6.is_some()),
        ..subnet_key
    };
    if let Err(reason) = check_subnets(&subnet_key, space, uplink) {
        return Some(reason);
    }
    if reservation {
        return None;
    }
    space
        .pools()
        .zip(subnet_key.nets())
        .find(|((_, pool), net)| !pool.fits(net))
        .map(|((fields, pool), net)| {
            format!(
                "{net} is not a /{} between {} {} and {} {}",
                pool.subnet_len, fields.min, pool.min, fields.max, pool.max
            )
        })
}

/// Takes a subnet for this node: its own entry (same PublicIP) if there is one that
/// still fits, else `preferred`, else the first free one, in each family. Each claim is
/// one transaction (both families are one key) that only succeeds if nobody changed the
/// keys since we looked, so two nodes never share a subnet; an own entry that no longer
/// fits is deleted in the same transaction. The listing it claimed on comes back too:
/// the watch goes on from it, so the subnets are listed once at start.
async fn acquire(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    lease: i64,
    preferred: Option<SubnetKey>,
) -> Result<(SubnetKey, Listing), EtcdError> {
    let prefix = &shared.config.prefix;
    let value = serde_json::to_string(&LeaseAttrs {
        public_ip: shared.public_ip.to_string(),
        public_ipv6: shared.public_ipv6.map(|ip| ip.to_string()),
        backend_type: "host-gw".into(),
    })
    .expect("plain strings serialize");
    loop {
        let (entries, revision) = list(client, shared).await?;
        let ip = shared.public_ip.to_string();
        let mut mine: Vec<(&String, &Entry)> = entries
            .iter()
            .filter(|(key, entry)| {
                SubnetKey::parse(prefix, key).is_some()
                    && serde_json::from_str::<LeaseAttrs>(&entry.value)
                        .is_ok_and(|a| a.public_ip == ip)
            })
            .collect();
        mine.sort_by_key(|(key, entry)| (entry.create_revision, *key));
        let mut old = None;
        if let Some((key, entry)) = mine.first() {
            let subnet_key = SubnetKey::parse(prefix, key).expect("filtered on parsing");
            let unfit = own_entry_unfit(subnet_key, entry.lease == 0, space, &shared.uplink);
            match unfit {
                // A reservation for this node is used as it is, never rewritten.
                None if entry.lease == 0 => {
                    let own = SubnetKey {
                        v6: subnet_key.v6.filter(|_| space.v6.is_some()),
                        ..subnet_key
                    };
                    return Ok((own, (entries, revision)));
                }
                Some(reason) if entry.lease == 0 => {
                    return Err(EtcdError::BadConfig {
                        key: (*key).clone(),
                        reason: format!("this node's reservation cannot be used: {reason}"),
                    });
                }
                None => {
                    let compare =
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, entry.mod_revision);
                    if claim(client, shared, key, &value, lease, vec![compare], vec![]).await? {
                        return Ok((subnet_key, (entries, revision)));
                    }
                    continue;
                }
                Some(reason) => {
                    warn!(
                        "etcd key {key}: this node's old subnet does not fit the network config ({reason}); claiming another"
                    );
                    old = Some(((*key).clone(), entry.mod_revision));
                }
            }
        }
        let mut taken = Taken::default();
        for key in entries
            .keys()
            .filter(|k| Some(*k) != old.as_ref().map(|o| &o.0))
        {
            if let Some(subnet_key) = SubnetKey::parse(prefix, key) {
                for net in subnet_key.nets() {
                    taken.insert(net, key.as_str());
                }
            }
        }
        let free = |net: &IpNet| {
            taken.find(*net).is_none() && uplink_overlap(net, &shared.uplink).is_none()
        };
        let pick = |pool: &Pool, preferred: Option<IpNet>| -> Result<IpNet, EtcdError> {
            preferred
                .filter(|p| pool.fits(p) && free(p))
                .or_else(|| pool.subnets().find(|s| free(s)))
                .ok_or_else(|| pool.no_free_subnet())
        };
        let v4 = match pick(&space.v4, preferred.map(|p| IpNet::V4(p.v4)))? {
            IpNet::V4(net) => net,
            IpNet::V6(_) => unreachable!("an IPv4 pool"),
        };
        let v6 = match &space.v6 {
            Some(pool) => match pick(pool, preferred.and_then(|p| p.v6).map(IpNet::V6))? {
                IpNet::V6(net) => Some(net),
                IpNet::V4(_) => unreachable!("an IPv6 pool"),
            },
            None => None,
        };
        let subnet_key = SubnetKey { v4, v6 };
        let key = subnet_key.key(prefix);
        let mut compares = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        let mut deletes = Vec::new();
        if let Some((old_key, revision)) = &old {
            compares.push(Compare::mod_revision(
                old_key.as_str(),
                CompareOp::Equal,
                *revision,
            ));
            deletes.push(TxnOp::delete(old_key.as_str(), None));
        }
        if claim(client, shared, &key, &value, lease, compares, deletes).await? {
            return Ok((subnet_key, (entries, revision)));
        }
        // Someone else changed it between our list and our claim: look again.
    }
}

/// Puts `key` on `lease` if `compares` hold, with `also` in the same transaction.
async fn claim(
    client: &mut Client,
    shared: &Shared,
    key: &str,
    value: &str,
    lease: i64,
    compares: Vec<Compare>,
    also: Vec<TxnOp>,
) -> Result<bool, EtcdError> {
    let mut ops = vec![TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(lease)),
    )];
    ops.extend(also);
    let txn = Txn::new().when(compares).and_then(ops);
    let response = client
        .txn(txn)
        .await
        .map_err(shared.error("claiming a subnet"))?;
    Ok(response.succeeded())
}

/// The subnet entries at one revision, and that revision.
type Listing = (BTreeMap<String, Entry>, i64);

/// This node's lease as the watch loop holds it: its id, published to the keeper,
/// and the keeper's word when it is gone.
struct Lease {
    id: i64,
    renewed: watch::Sender<i64>,
    lost: mpsc::Receiver<i64>,
}

enum KeepEnd {
    /// The watch loop took another lease.
    Renewed,
    /// etcd says the lease has expired.
    Lost,
    /// The keep-alive stream ended (etcd restarted or unreachable).
    Broken,
    /// The watch loop is gone.
    Closed,
}

/// Keeps this node's lease alive in a task of its own, so nothing else (a burst of
/// changes, a slow agent, a blocked send) can let it expire. Follows the id the watch
/// loop publishes in `lease` and reports a lost lease on `lost`.
async fn keep_alive(
    mut client: LeaseClient,
    endpoints: String,
    ttl: i64,
    mut lease: watch::Receiver<i64>,
    lost: mpsc::Sender<i64>,
) {
    let period = Duration::from_secs((ttl / 3).max(1) as u64);
    loop {
        let id = *lease.borrow_and_update();
        let end = keep_one(&mut client, id, period, &mut lease).await;
        let end = end.unwrap_or_else(|source| {
            let error = EtcdError::Client {
                operation: "keeping the lease alive",
                endpoints: endpoints.clone(),
                source,
            };
            warn!("{error}; retrying");
            KeepEnd::Broken
        });
        match end {
            KeepEnd::Renewed => {}
            KeepEnd::Closed => return,
            KeepEnd::Lost => {
                if lost.send(id).await.is_err() || lease.changed().await.is_err() {
                    return;
                }
            }
            KeepEnd::Broken => {
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    changed = lease.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}

async fn keep_one(
    client: &mut LeaseClient,
    id: i64,
    period: Duration,
    lease: &mut watch::Receiver<i64>,
) -> Result<KeepEnd, etcd_client::Error> {
    // Opening the stream sends the first request.
    let (mut keeper, mut responses) = client.keep_alive(id).await?;
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => keeper.keep_alive().await?,
            response = responses.message() => match response? {
                Some(r) if r.ttl() <= 0 => return Ok(KeepEnd::Lost),
                Some(_) => {}
                None => return Ok(KeepEnd::Broken),
            },
            changed = lease.changed() => {
                return Ok(if changed.is_ok() { KeepEnd::Renewed } else { KeepEnd::Closed });
            }
        }
    }
}

/// Keeps the peers current until the agent goes away. etcd being unreachable only
/// delays updates: the agent keeps the last peers it was sent, so forwarding goes on.
async fn run(
    mut client: Client,
    shared: Shared,
    space: SubnetSpace,
    (mut own, listed): (SubnetKey, Listing),
    mut lease: Lease,
    tx: PeerSender,
) {
    let mut warned = Warned::default();
    let mut listed = Some(listed);
    loop {
        let result = watch(
            &mut client,
            &shared,
            &space,
            (own, listed.take()),
            &tx,
            &mut warned,
            &mut lease,
        )
        .await;
        if tx.is_closed() {
            return;
        }
        match result {
            Ok(WatchEnd::LeaseLost) => {
                warn!(
                    "etcd: lease {:x} is gone; claiming {} again",
                    lease.id,
                    own.key(&shared.config.prefix)
                );
                match renew(&mut client, &shared, &space, own).await {
                    Ok((new_lease, new_own)) => {
                        // Best effort: the old lease may hold nothing any more.
                        let _ = client.lease_revoke(lease.id).await;
                        lease.id = new_lease;
                        lease.renewed.send_replace(new_lease);
                        if new_own != own {
                            warn!(
                                "etcd: {} was taken while our lease was gone; holding {}, but pods keep using the old subnets until the agent restarts",
                                own.key(&shared.config.prefix),
                                new_own.key(&shared.config.prefix)
                            );
                            own = new_own;
                        }
                    }
                    Err(e) => warn!("{e}"),
                }
            }
            Ok(WatchEnd::Broken) => {
                info!("etcd: watch ended (compaction or server restart); listing again")
            }
            Err(e) => warn!("{e}; retrying"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn renew(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    own: SubnetKey,
) -> Result<(i64, SubnetKey), EtcdError> {
    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let (own, _) = acquire(client, shared, space, lease, Some(own)).await?;
    Ok((lease, own))
}

enum WatchEnd {
    Broken,
    LeaseLost,
}

/// Sends the whole peer set of a listing (`listed`, else a new one), then each change
/// the watch brings, until the watch breaks or the lease is lost.
async fn watch(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    (own, listed): (SubnetKey, Option<Listing>),
    tx: &PeerSender,
    warned: &mut Warned,
    lease: &mut Lease,
) -> Result<WatchEnd, EtcdError> {
    let prefix = &shared.config.prefix;
    let own_key = own.key(prefix);
    let (entries, revision) = match listed {
        Some(listed) => listed,
        None => list(client, shared).await?,
    };
    let peers = peers_of(prefix, &own_key, &entries, space, warned);
    drop(entries);
    if tx.send([PeerChange::All(peers)]).is_err() {
        return Ok(WatchEnd::Broken);
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(listing::MAX_MESSAGE)
        .watch(shared.subnets_prefix(), Some(options))
        .await
        .map_err(shared.error("watching subnets"))?;
    loop {
        tokio::select! {
            Some(id) = lease.lost.recv() => {
                if id == lease.id {
                    return Ok(WatchEnd::LeaseLost);
                }
            }
            () = tx.closed() => return Ok(WatchEnd::Broken),
            message = stream.message() => {
                let Some(response) = message.map_err(shared.error("watching subnets"))? else {
                    return Ok(WatchEnd::Broken);
                };
                if response.canceled() || response.compact_revision() != 0 {
                    return Ok(WatchEnd::Broken);
                }
                let mut changes = Vec::new();
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match event.event_type() {
                        EventType::Delete if key == own_key => return Ok(WatchEnd::LeaseLost),
                        EventType::Put if key == own_key => {}
                        EventType::Put => {
                            let peer = listing::entry(kv).and_then(|(key, entry)| {
                                checked(prefix, &key, &entry, space, warned)
                            });
                            changes.push(match peer {
                                Some(peer) => PeerChange::Upsert(peer),
                                // Whatever it was before, it is no peer now.
                                None => PeerChange::Remove(key.to_owned()),
                            });
                        }
                        EventType::Delete => {
                            warned.forget(key);
                            changes.push(PeerChange::Remove(key.to_owned()));
                        }
                    }
                }
                if tx.send(changes).is_err() {
                    return Ok(WatchEnd::Broken);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::{NodeFacts, desired};

    const KEY: &str = "/p/config";

    fn space() -> SubnetSpace {
        SubnetSpace::parse(
            KEY,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        )
        .expect("valid")
    }

    fn dual() -> SubnetSpace {
        SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:244::/32","IPv6SubnetLen":48}"#,
        )
        .expect("valid")
    }

    /// The refusal of `text`, which must name the config key and say `why`.
    fn refused(text: &str, why: &str) {
        match SubnetSpace::parse(KEY, text) {
            Err(EtcdError::BadConfig { key, reason }) => {
                assert_eq!(key, KEY);
                assert!(
                    reason.contains(why),
                    "{text}: {reason:?} does not say {why:?}"
                );
            }
            other => panic!("{text}: accepted or not named: {other:?}"),
        }
    }

    #[test]
    fn flannel_defaults() {
        let s = space();
        assert_eq!(s.v4.subnet_len, 24);
        assert_eq!(s.v4.min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(s.v4.max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(s.v4.subnets().count(), 255);
        assert_eq!(s.v6, None);
        // A small network is cut in four, the first skipped (flannel's CheckNetworkConfig).
        let s = SubnetSpace::parse(KEY, r#"{"Network":"10.0.0.0/26"}"#).expect("valid");
        assert_eq!(s.v4.subnet_len, 28);
        assert_eq!(s.v4.subnets().count(), 3);
        let s = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:244::/32"}"#,
        )
        .expect("valid");
        let v6 = s.v6.expect("IPv6 enabled");
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.min, "fd00:244:0:1::".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            v6.max,
            "fd00:244:ffff:ffff::".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            v6.subnets()
                .take(2)
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["fd00:244:0:1::/64", "fd00:244:0:2::/64"]
        );
    }

    #[test]
    fn network_configs_without_room_for_pods_are_refused_naming_the_key() {
        refused(r#"{"Network":"banana"}"#, "not an IPv4 CIDR");
        refused(r#"{"SubnetLen":24}"#, "Network is missing");
        refused(r#"{"Network":"0.0.0.0/0"}"#, "default route");
        refused(r#"{"Network":"10.0.0.0/29"}"#, "too small");
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#,
            "SubnetLen 8 is too short",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
            "SubnetLen 16 is too short",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#,
            "at least four subnets",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
            "no room for pods",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.99.0.0"}"#,
            "SubnetMin 10.99.0.0 is outside Network 10.244.0.0/16",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.245.0.0"}"#,
            "SubnetMax 10.245.0.0 is outside",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.128"}"#,
            "not on a /24 boundary",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.8.0"}"#,
            "above SubnetMax",
        );
        refused(
            r#"{"EnableIPv4":false,"Network":"10.244.0.0/16"}"#,
            "EnableIPv4",
        );
        // The same for IPv6.
        let v6 = |rest: &str| format!(r#"{{"Network":"10.244.0.0/16","EnableIPv6":true{rest}}}"#);
        refused(&v6(""), "IPv6Network is missing");
        refused(&v6(r#","IPv6Network":"10.0.0.0/8""#), "not an IPv6 CIDR");
        refused(&v6(r#","IPv6Network":"::/0""#), "default route");
        refused(&v6(r#","IPv6Network":"fd00::/125""#), "too small");
        refused(
            &v6(r#","IPv6Network":"fd00::/64","IPv6SubnetLen":64"#),
            "IPv6SubnetLen 64 is too short",
        );
        refused(
            &v6(r#","IPv6Network":"fd00::/64","IPv6SubnetLen":127"#),
            "no room for pods",
        );
        refused(
            &v6(r#","IPv6Network":"fd00:244::/32","IPv6SubnetMin":"fd00:99::""#),
            "IPv6SubnetMin fd00:99:: is outside IPv6Network fd00:244::/32",
        );
        refused(
            &v6(r#","IPv6Network":"fd00:244::/32","IPv6SubnetMax":"fd00:244:0:1:1::""#),
            "not on a /64 boundary",
        );
        // Without EnableIPv6 the IPv6 fields are not read, as in flannel.
        let s = SubnetSpace::parse(KEY, r#"{"Network":"10.244.0.0/16","IPv6Network":"::/0"}"#)
            .expect("IPv6 off");
        assert_eq!(s.v6, None);
    }

    #[test]
    fn a_network_over_the_uplink_is_refused_naming_the_key() {
        let uplink: Vec<IpNet> = vec![
            "172.31.0.1/24".parse().expect("net"),
            "fd00:172:31::1/64".parse().expect("net"),
        ];
        assert!(dual().check_uplink(KEY, &uplink).is_ok());
        let s = SubnetSpace::parse(KEY, r#"{"Network":"172.16.0.0/12"}"#).expect("valid");
        match s.check_uplink(KEY, &uplink) {
            Err(EtcdError::BadConfig { key, reason }) => {
                assert_eq!(key, KEY);
                assert!(
                    reason.contains("overlaps the uplink's network 172.31.0.0/24"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let s = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/16"}"#,
        )
        .expect("valid");
        assert!(s.check_uplink(KEY, &uplink).is_err());
    }

    #[test]
    fn keys_round_trip_as_flannel_writes_them() {
        let v4: Ipv4Net = "10.244.3.0/24".parse().expect("cidr");
        let key = SubnetKey { v4, v6: None };
        assert_eq!(
            key.key("/coreos.com/network"),
            "/coreos.com/network/subnets/10.244.3.0-24"
        );
        assert_eq!(
            SubnetKey::parse("/coreos.com/network", &key.key("/coreos.com/network")),
            Some(key)
        );
        let key = SubnetKey {
            v4,
            v6: Some("fd00:10:244:1::/64".parse().expect("cidr")),
        };
        // flannel's MakeSubnetKey: IPv4 and IPv6 joined by `&`.
        assert_eq!(key.key("/p"), "/p/subnets/10.244.3.0-24&fd00:10:244:1::-64");
        assert_eq!(SubnetKey::parse("/p", &key.key("/p")), Some(key));
        for bad in [
            "/p/subnets/10.244.3.1-24",
            "/p/subnets/10.244.3.0-24&fd00:10:244:1::1-64",
            "/p/subnets/10.244.3.0-24&",
            "/p/subnets/10.244.3.0-24&10.0.0.0-8",
            "/p/subnets/garbage",
            "/q/subnets/10.244.3.0-24",
        ] {
            assert_eq!(SubnetKey::parse("/p", bad), None, "{bad}");
        }
    }

    fn entry(value: &str, create_revision: i64) -> Entry {
        Entry {
            value: value.into(),
            oversize: None,
            lease: 7,
            create_revision,
            mod_revision: create_revision,
        }
    }

    fn uplink() -> Vec<IpNet> {
        vec![
            "172.31.0.1/24".parse().expect("net"),
            "fd00:172:31::1/64".parse().expect("net"),
            "fe80::1/64".parse().expect("net"),
        ]
    }

    /// The peers an agent with `own` would route to: parsed here, checked by the
    /// desired state (as the agent does), oldest first.
    fn peers(space: &SubnetSpace, own: &str, entries: &[(&str, Entry)]) -> Vec<Peer> {
        let entries: BTreeMap<String, Entry> = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let own_key = SubnetKey::parse("/p", own).expect("own key");
        let listed = peers_of("/p", own, &entries, space, &mut Warned::default());
        let network = space.network(own_key);
        let mut public_ips = vec![IpAddr::V4(Ipv4Addr::new(172, 31, 0, 1))];
        if space.v6.is_some() {
            public_ips.push("fd00:172:31::1".parse().expect("ip"));
        }
        let node = NodeFacts {
            uplink_name: "eth0".into(),
            uplink_networks: uplink(),
            addresses: Vec::new(),
            public_ips,
        };
        let state = desired(&network, &listed, Some(&node));
        let mut kept: Vec<Peer> = listed
            .into_iter()
            .filter(|p| {
                state
                    .routes
                    .get(&IpNet::V4(p.pod_cidr))
                    .is_some_and(|hop| hop.key == p.source)
            })
            .collect();
        kept.sort_by_key(|p| p.origin.order());
        kept
    }

    fn sources(peers: &[Peer]) -> Vec<&str> {
        peers.iter().map(|p| p.source.as_str()).collect()
    }

    #[test]
    fn bad_entries_are_skipped_and_good_ones_kept() {
        let own = "/p/subnets/10.244.1.0-24";
        let peers = peers(
            &space(),
            own,
            &[
                (
                    own,
                    entry(r#"{"PublicIP":"172.31.0.1","BackendType":"host-gw"}"#, 1),
                ),
                (
                    "/p/subnets/10.244.2.0-24",
                    entry(r#"{"PublicIP":"172.31.0.2","BackendType":"host-gw"}"#, 2),
                ),
                ("/p/subnets/10.244.3.0-24", entry("not json", 3)),
                (
                    "/p/subnets/10.244.4.0-24",
                    entry(r#"{"PublicIP":"nope"}"#, 4),
                ),
                (
                    "/p/subnets/10.99.0.0-24",
                    entry(r#"{"PublicIP":"172.31.0.5"}"#, 5),
                ),
                (
                    "/p/subnets/10.244.2.0-25",
                    entry(r#"{"PublicIP":"172.31.0.6"}"#, 6),
                ),
                (
                    "/p/subnets/garbage",
                    entry(r#"{"PublicIP":"172.31.0.7"}"#, 7),
                ),
                (
                    "/p/subnets/10.244.1.128-25",
                    entry(r#"{"PublicIP":"172.31.0.8"}"#, 8),
                ),
                // Over the uplink's network (and outside the network: the uplink is said).
                (
                    "/p/subnets/172.31.0.0-24",
                    entry(r#"{"PublicIP":"172.31.0.9"}"#, 9),
                ),
                // A second entry for n2's address, and one for this node's.
                (
                    "/p/subnets/10.244.10.0-24",
                    entry(r#"{"PublicIP":"172.31.0.2"}"#, 10),
                ),
                (
                    "/p/subnets/10.244.11.0-24",
                    entry(r#"{"PublicIP":"172.31.0.1"}"#, 11),
                ),
            ],
        );
        assert_eq!(sources(&peers), ["/p/subnets/10.244.2.0-24"]);
        assert_eq!(peers[0].node_ip, Ipv4Addr::new(172, 31, 0, 2));
        assert_eq!(peers[0].lease, Some(7));
        assert_eq!(peers[0].v6, None);
    }

    /// 300 distinct junk writes to one key: what is remembered to warn once per entry
    /// stays at what etcd holds now, never at everything ever written.
    #[test]
    fn rejected_writes_are_remembered_only_while_they_stand() {
        let own = "/p/subnets/10.244.1.0-24";
        let mut warned = Warned::default();
        for n in 0..300 {
            let junk = format!("junk {n} {}", "x".repeat(10_000));
            let entries = BTreeMap::from([
                ("/p/subnets/10.244.2.0-24".to_owned(), entry(&junk, 2)),
                ("/p/subnets/10.244.3.0-24".to_owned(), entry("not json", 3)),
            ]);
            let peers = peers_of("/p", own, &entries, &space(), &mut warned);
            assert!(peers.is_empty());
        }
        assert!(
            warned.len() <= 2,
            "{} rejected entries remembered, 2 stand",
            warned.len()
        );
    }

    #[test]
    fn the_older_entry_wins_whatever_the_key_order() {
        let own = "/p/subnets/10.244.1.0-24";
        let later = "/p/subnets/10.244.2.0-24";
        let older = "/p/subnets/10.244.9.0-24";
        let peers = peers(
            &space(),
            own,
            &[
                (later, entry(r#"{"PublicIP":"172.31.0.2"}"#, 20)),
                (older, entry(r#"{"PublicIP":"172.31.0.2"}"#, 10)),
            ],
        );
        assert_eq!(sources(&peers), [older]);
    }

    #[test]
    fn a_subnet_over_the_uplink_is_skipped_in_either_family() {
        let space = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"172.16.0.0/12","SubnetLen":24,"IPv6Network":"fd00::/16","IPv6SubnetLen":64}"#,
        )
        .expect("valid");
        let own = "/p/subnets/172.16.1.0-24&fd00:1::-64";
        let peers = peers(
            &space,
            own,
            &[
                (
                    "/p/subnets/172.31.0.0-24&fd00:2::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2"}"#,
                        2,
                    ),
                ),
                (
                    "/p/subnets/172.16.3.0-24&fd00:172:31::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.3","PublicIPv6":"fd00:172:31::3"}"#,
                        3,
                    ),
                ),
                (
                    "/p/subnets/172.16.4.0-24&fd00:4::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.4","PublicIPv6":"fd00:172:31::4"}"#,
                        4,
                    ),
                ),
            ],
        );
        assert_eq!(sources(&peers), ["/p/subnets/172.16.4.0-24&fd00:4::-64"]);
    }

    #[test]
    fn dual_stack_entries_get_the_same_checks_on_their_ipv6_side() {
        let own = "/p/subnets/10.244.1.0-24&fd00:244:1::-48";
        let good = "/p/subnets/10.244.2.0-24&fd00:244:2::-48";
        let v4_only = "/p/subnets/10.244.3.0-24";
        let peers = peers(
            &dual(),
            own,
            &[
                (
                    good,
                    entry(
                        r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2","BackendType":"host-gw"}"#,
                        2,
                    ),
                ),
                (
                    v4_only,
                    entry(r#"{"PublicIP":"172.31.0.3","PublicIPv6":null}"#, 3),
                ),
                (
                    "/p/subnets/10.244.4.0-24&fd00:99::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.4","PublicIPv6":"fd00:172:31::4"}"#,
                        4,
                    ),
                ),
                (
                    "/p/subnets/10.244.5.0-24&fd00:244:2::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.5","PublicIPv6":"fd00:172:31::5"}"#,
                        5,
                    ),
                ),
                (
                    "/p/subnets/10.244.6.0-24&fd00:244:6::-48",
                    entry(r#"{"PublicIP":"172.31.0.6"}"#, 6),
                ),
                (
                    "/p/subnets/10.244.7.0-24&fd00:244:7::-48",
                    entry(r#"{"PublicIP":"172.31.0.7","PublicIPv6":"10.0.0.7"}"#, 7),
                ),
                (
                    "/p/subnets/10.244.8.0-24&fd00:244:8::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.8","PublicIPv6":"fd00:172:31::2"}"#,
                        8,
                    ),
                ),
                (
                    "/p/subnets/10.244.9.0-24&fd00:244:9::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.9","PublicIPv6":"fd00:172:31::1"}"#,
                        9,
                    ),
                ),
                (
                    "/p/subnets/10.244.10.0-24&fd00:244:1:8000::-49",
                    entry(
                        r#"{"PublicIP":"172.31.0.10","PublicIPv6":"fd00:172:31::10"}"#,
                        10,
                    ),
                ),
            ],
        );
        assert_eq!(sources(&peers), [good, v4_only]);
        assert_eq!(
            peers[0].v6,
            Some(PeerV6 {
                node_ip: "fd00:172:31::2".parse().expect("ip"),
                pod_cidr: "fd00:244:2::/48".parse().expect("cidr"),
            })
        );
        assert_eq!(peers[1].v6, None);
        // In an IPv4 network the same entry is an IPv4 peer.
        let peers = self::peers(
            &space(),
            "/p/subnets/10.244.1.0-24",
            &[(
                good,
                entry(
                    r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2"}"#,
                    2,
                ),
            )],
        );
        assert_eq!(sources(&peers), [good]);
        assert_eq!(peers[0].v6, None);
    }

    #[test]
    fn own_entries_fit_as_flannel_says() {
        let key = |s: &str| SubnetKey::parse("/p", s).expect("key");
        let up = uplink();
        assert_eq!(
            own_entry_unfit(key("/p/subnets/10.244.1.0-24"), false, &space(), &up),
            None
        );
        assert!(own_entry_unfit(key("/p/subnets/10.244.0.0-24"), false, &space(), &up).is_some());
        assert!(own_entry_unfit(key("/p/subnets/10.244.1.0-25"), false, &space(), &up).is_some());
        // A reservation may lie outside SubnetMin..SubnetMax, never over the uplink.
        assert_eq!(
            own_entry_unfit(key("/p/subnets/10.244.0.0-25"), true, &space(), &up),
            None
        );
        let over = own_entry_unfit(key("/p/subnets/172.31.0.0-24"), true, &space(), &up);
        assert!(over.is_some_and(|r| r.contains("uplink")));
        // IPv6 exactly when the network has it.
        assert!(own_entry_unfit(key("/p/subnets/10.244.1.0-24"), false, &dual(), &up).is_some());
        assert_eq!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                false,
                &dual(),
                &up
            ),
            None
        );
        assert!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                false,
                &space(),
                &up
            )
            .is_some()
        );
        assert_eq!(
            own_entry_unfit(
                key("/p/subnets/10.244.1.0-24&fd00:244:1::-48"),
                true,
                &space(),
                &up
            ),
            None
        );
    }

    #[test]
    fn the_public_ipv6_is_the_first_global_one() {
        let up: Vec<IpNet> = vec![
            "fe80::1/64".parse().expect("net"),
            "172.31.0.1/24".parse().expect("net"),
            "fd00:172:31::1/64".parse().expect("net"),
        ];
        assert_eq!(
            first_global_ipv6(&up),
            Some("fd00:172:31::1".parse().expect("ip"))
        );
        assert_eq!(first_global_ipv6(&up[..2]), None);
    }
}
