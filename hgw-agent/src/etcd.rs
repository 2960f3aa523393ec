//! Peers from etcd v3 in flannel's schema, so an existing flannel etcd can be read as is
//! and flannel can read what hgw writes:
//!
//! - `<prefix>/config`: `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}`
//! - `<prefix>/subnets/10.244.3.0-24`: `{"PublicIP":"172.31.0.3","BackendType":"host-gw"}`,
//!   attached to the owner's lease (a key without a lease is a reservation, respected).
//!
//! This node acquires its subnet in a transaction that succeeds only if the key is new
//! (or still the lease it found for its own PublicIP), keeps the lease alive, and
//! watches the subnets from the listed revision; on a broken watch or a compaction it
//! lists again. Every change sends the whole valid peer set to the agent.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use ipnet::Ipv4Net;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{EtcdConfig, Network, Peer};

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
    #[error("no free subnet left in {network} (SubnetLen {subnet_len}, between {min} and {max})")]
    NoFreeSubnet {
        network: Ipv4Net,
        subnet_len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
}

/// Flannel's network config (`<prefix>/config`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelConfig {
    network: String,
    #[serde(default)]
    subnet_len: u8,
    #[serde(default)]
    subnet_min: Option<String>,
    #[serde(default)]
    subnet_max: Option<String>,
    #[serde(default)]
    backend: Option<Backend>,
}

#[derive(Debug, Deserialize)]
struct Backend {
    #[serde(rename = "Type")]
    kind: String,
}

/// A subnet lease's value, as flannel writes it.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    public_ip: String,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    backend_type: String,
}

/// The subnet space of a flannel network, with flannel's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetSpace {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub min: Ipv4Addr,
    pub max: Ipv4Addr,
}

impl SubnetSpace {
    fn parse(key: &str, text: &str) -> Result<Self, EtcdError> {
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
        let network: Ipv4Net = config
            .network
            .parse()
            .map_err(|_| bad(format!("Network {:?} is not an IPv4 CIDR", config.network)))?;
        let network = network.trunc();
        let prefix = network.prefix_len();
        let subnet_len = match config.subnet_len {
            0 if prefix < 24 => 24,
            0 if prefix < 30 => prefix + 1,
            0 => return Err(bad(format!("Network {network} is too small for subnets"))),
            len if len < prefix || len > 30 => {
                return Err(bad(format!(
                    "SubnetLen {len} does not fit Network {network}"
                )));
            }
            len => len,
        };
        let size = 1u32 << (32 - subnet_len);
        let parse_bound =
            |value: &Option<String>, name: &str, default: u32| -> Result<Ipv4Addr, EtcdError> {
                match value {
                    None => Ok(Ipv4Addr::from(default)),
                    Some(v) => v
                        .parse()
                        .map_err(|_| bad(format!("{name} {v:?} is not an IPv4 address"))),
                }
            };
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast());
        // Flannel skips the first subnet (its network address would clash) by default.
        let min = parse_bound(&config.subnet_min, "SubnetMin", first + size)?;
        let max = parse_bound(&config.subnet_max, "SubnetMax", last + 1 - size)?;
        Ok(Self {
            network,
            subnet_len,
            min,
            max,
        })
    }

    /// Every subnet from min to max, in order.
    fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u64 << (32 - self.subnet_len);
        let (min, max) = (
            u64::from(u32::from(self.min)),
            u64::from(u32::from(self.max)),
        );
        (min..=max)
            .step_by(size as usize)
            .filter_map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len).ok())
    }
}

/// `<prefix>/subnets/10.244.3.0-24` <-> 10.244.3.0/24.
fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{prefix}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

fn subnet_from_key(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("/subnets/")?;
    let (addr, len) = rest.split_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    (net.trunc() == net).then_some(net)
}

/// One entry under `<prefix>/subnets/`, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: String,
    lease: i64,
    mod_revision: i64,
}

/// Turns the subnet entries into peers: this node's own entry and anything malformed,
/// overlapping or outside the network is left out with a warning naming the key.
fn peers_from_entries(
    prefix: &str,
    entries: &BTreeMap<String, Entry>,
    space: &SubnetSpace,
    own: Ipv4Net,
    warned: &mut HashSet<(String, String)>,
) -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::new();
    for (key, entry) in entries {
        let mut skip = |reason: String| {
            if warned.insert((key.clone(), entry.value.clone())) {
                warn!("etcd key {key}: ignored: {reason}");
            }
        };
        let Some(subnet) = subnet_from_key(prefix, key) else {
            skip("not a subnet key (want <prefix>/subnets/A.B.C.D-LEN)".into());
            continue;
        };
        if subnet == own {
            continue;
        }
        let attrs: LeaseAttrs = match serde_json::from_str(&entry.value) {
            Ok(attrs) => attrs,
            Err(e) => {
                skip(format!("value is not a flannel lease: {e}"));
                continue;
            }
        };
        let Ok(node_ip) = attrs.public_ip.parse::<Ipv4Addr>() else {
            skip(format!(
                "PublicIP {:?} is not an IPv4 address",
                attrs.public_ip
            ));
            continue;
        };
        if !space.network.contains(&subnet) {
            skip(format!("{subnet} is outside the network {}", space.network));
            continue;
        }
        if subnet.contains(&own) || own.contains(&subnet) {
            skip(format!("{subnet} overlaps this node's subnet {own}"));
            continue;
        }
        if let Some(other) = peers
            .iter()
            .find(|p| p.pod_cidr.contains(&subnet) || subnet.contains(&p.pod_cidr))
        {
            skip(format!(
                "{subnet} overlaps {} of {}",
                other.pod_cidr, other.source
            ));
            continue;
        }
        peers.push(Peer {
            name: format!("{}-{}", subnet.network(), subnet.prefix_len()),
            node_ip,
            pod_cidr: subnet,
            v6: None,
            source: key.clone(),
            lease: (entry.lease != 0).then_some(entry.lease),
        });
    }
    peers
}

/// A connected source: this node's network, and the peers as they change.
pub struct EtcdSource {
    pub network: Network,
    pub lease: i64,
    pub peers: mpsc::Receiver<Vec<Peer>>,
}

struct Shared {
    config: EtcdConfig,
    public_ip: Ipv4Addr,
    endpoints: String,
}

impl Shared {
    fn error(&self, operation: &'static str) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        move |source| {
            crate::metrics::count_etcd_error();
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

/// Connects, reads the network config, acquires this node's subnet, and starts the
/// lease keeper and the watch. Fails (before the agent changes anything on the node)
/// if etcd cannot be reached or holds no usable config.
pub async fn start(config: EtcdConfig, public_ip: Ipv4Addr) -> Result<EtcdSource, EtcdError> {
    let shared = Shared {
        endpoints: config.endpoints.join(","),
        config,
        public_ip,
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

    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let subnet = acquire(&mut client, &shared, &space, lease, None).await?;
    info!(
        "etcd: this node holds {} (lease {lease:x}, TTL {} s)",
        subnet_key(&shared.config.prefix, subnet),
        shared.config.lease_ttl
    );

    let (tx, rx) = mpsc::channel(16);
    let network = Network {
        pod_cidr: subnet,
        cluster_cidr: space.network,
        v6: None,
    };
    tokio::spawn(run(client, shared, space, subnet, lease, tx));
    Ok(EtcdSource {
        network,
        lease,
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

/// Takes a subnet for this node: its own entry (same PublicIP) if there is one, else
/// `preferred`, else the first free one. Each claim is a transaction that only
/// succeeds if nobody changed the key since we looked, so two nodes never share one.
async fn acquire(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    lease: i64,
    preferred: Option<Ipv4Net>,
) -> Result<Ipv4Net, EtcdError> {
    let prefix = &shared.config.prefix;
    let value = serde_json::to_string(&LeaseAttrs {
        public_ip: shared.public_ip.to_string(),
        backend_type: "host-gw".into(),
    })
    .expect("plain strings serialize");
    loop {
        let (entries, _) = list(client, shared).await?;
        let ip = shared.public_ip.to_string();
        let mine = entries.iter().find(|(key, entry)| {
            subnet_from_key(prefix, key).is_some()
                && serde_json::from_str::<LeaseAttrs>(&entry.value).is_ok_and(|a| a.public_ip == ip)
        });
        let (key, compare) = match mine {
            // A reservation (no lease) for this node is used as it is, never rewritten.
            Some((key, entry)) if entry.lease == 0 => {
                return subnet_from_key(prefix, key).ok_or(EtcdError::BadConfig {
                    key: key.clone(),
                    reason: "not a subnet key".into(),
                });
            }
            Some((key, entry)) => {
                let compare =
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, entry.mod_revision);
                (key.clone(), compare)
            }
            None => {
                let taken: Vec<Ipv4Net> = entries
                    .keys()
                    .filter_map(|k| subnet_from_key(prefix, k))
                    .collect();
                let free = |s: &Ipv4Net| !taken.iter().any(|t| t.contains(s) || s.contains(t));
                let subnet = preferred
                    .filter(|p| free(p))
                    .or_else(|| space.subnets().find(|s| free(s)))
                    .ok_or(EtcdError::NoFreeSubnet {
                        network: space.network,
                        subnet_len: space.subnet_len,
                        min: space.min,
                        max: space.max,
                    })?;
                let key = subnet_key(prefix, subnet);
                let compare = Compare::version(key.as_str(), CompareOp::Equal, 0);
                (key, compare)
            }
        };
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(
            key.as_str(),
            value.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let response = client
            .txn(txn)
            .await
            .map_err(shared.error("claiming a subnet"))?;
        if response.succeeded() {
            return subnet_from_key(prefix, &key).ok_or(EtcdError::BadConfig {
                key,
                reason: "not a subnet key".into(),
            });
        }
        // Someone else changed it between our list and our claim: look again.
    }
}

async fn list(
    client: &mut Client,
    shared: &Shared,
) -> Result<(BTreeMap<String, Entry>, i64), EtcdError> {
    let response = client
        .get(
            shared.subnets_prefix(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(shared.error("listing subnets"))?;
    let revision = response.header().map_or(0, |h| h.revision());
    let entries = response
        .kvs()
        .iter()
        .filter_map(|kv| {
            Some((
                kv.key_str().ok()?.to_owned(),
                Entry {
                    value: kv.value_str().ok()?.to_owned(),
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                },
            ))
        })
        .collect();
    Ok((entries, revision))
}

/// Keeps the lease alive and the peers current until the agent goes away (the
/// receiver is dropped). etcd being unreachable only delays updates: the agent keeps
/// the last peers it was sent, so forwarding goes on.
async fn run(
    mut client: Client,
    shared: Shared,
    space: SubnetSpace,
    mut subnet: Ipv4Net,
    mut lease: i64,
    tx: mpsc::Sender<Vec<Peer>>,
) {
    let mut warned = HashSet::new();
    let mut keepalive = tokio::time::interval(Duration::from_secs(
        (shared.config.lease_ttl / 3).max(1) as u64,
    ));
    loop {
        let result = watch(
            &mut client,
            &shared,
            &space,
            subnet,
            &tx,
            &mut warned,
            &mut keepalive,
            &mut lease,
        )
        .await;
        if tx.is_closed() {
            return;
        }
        match result {
            Ok(WatchEnd::LeaseLost) => {
                warn!("etcd: lease {lease:x} expired; claiming {subnet} again");
                match renew(&mut client, &shared, &space, subnet).await {
                    Ok((new_lease, new_subnet)) => {
                        lease = new_lease;
                        if new_subnet != subnet {
                            warn!(
                                "etcd: {subnet} was taken while our lease was gone; holding {new_subnet}, but pods keep using {subnet} until the agent restarts"
                            );
                            subnet = new_subnet;
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
    subnet: Ipv4Net,
) -> Result<(i64, Ipv4Net), EtcdError> {
    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let subnet = acquire(client, shared, space, lease, Some(subnet)).await?;
    Ok((lease, subnet))
}

enum WatchEnd {
    Broken,
    LeaseLost,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one loop's state, passed down once"
)]
async fn watch(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    own: Ipv4Net,
    tx: &mpsc::Sender<Vec<Peer>>,
    warned: &mut HashSet<(String, String)>,
    keepalive: &mut tokio::time::Interval,
    lease: &mut i64,
) -> Result<WatchEnd, EtcdError> {
    let prefix = &shared.config.prefix;
    let (mut entries, revision) = list(client, shared).await?;
    if tx
        .send(peers_from_entries(prefix, &entries, space, own, warned))
        .await
        .is_err()
    {
        return Ok(WatchEnd::Broken);
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client
        .watch(shared.subnets_prefix(), Some(options))
        .await
        .map_err(shared.error("watching subnets"))?;
    let (mut keeper, mut keepalive_responses) = client
        .lease_keep_alive(*lease)
        .await
        .map_err(shared.error("keeping the lease alive"))?;
    loop {
        tokio::select! {
            _ = keepalive.tick() => {
                keeper.keep_alive().await.map_err(shared.error("keeping the lease alive"))?;
            }
            response = keepalive_responses.message() => {
                match response.map_err(shared.error("keeping the lease alive"))? {
                    Some(r) if r.ttl() <= 0 => return Ok(WatchEnd::LeaseLost),
                    Some(_) => {}
                    None => return Ok(WatchEnd::Broken),
                }
            }
            message = stream.message() => {
                let Some(response) = message.map_err(shared.error("watching subnets"))? else {
                    return Ok(WatchEnd::Broken);
                };
                if response.canceled() || response.compact_revision() != 0 {
                    return Ok(WatchEnd::Broken);
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            let value = kv.value_str().unwrap_or_default().to_owned();
                            entries.insert(key.to_owned(), Entry { value, lease: kv.lease(), mod_revision: kv.mod_revision() });
                        }
                        EventType::Delete => {
                            entries.remove(key);
                            if subnet_from_key(prefix, key) == Some(own) {
                                return Ok(WatchEnd::LeaseLost);
                            }
                        }
                    }
                }
                if tx.send(peers_from_entries(prefix, &entries, space, own, warned)).await.is_err() {
                    return Ok(WatchEnd::Broken);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> SubnetSpace {
        SubnetSpace::parse(
            "k",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        )
        .expect("valid")
    }

    #[test]
    fn flannel_defaults() {
        let s = space();
        assert_eq!(s.subnet_len, 24);
        assert_eq!(s.min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(s.max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(s.subnets().count(), 255);
        let s = SubnetSpace::parse("k", r#"{"Network":"10.0.0.0/26"}"#).expect("valid");
        assert_eq!(s.subnet_len, 27);
        assert!(SubnetSpace::parse("k", r#"{"Network":"10.0.0.0/16","SubnetLen":8}"#).is_err());
        assert!(SubnetSpace::parse("k", r#"{"Network":"banana"}"#).is_err());
    }

    #[test]
    fn keys_round_trip() {
        let net: Ipv4Net = "10.244.3.0/24".parse().expect("cidr");
        let key = subnet_key("/coreos.com/network", net);
        assert_eq!(key, "/coreos.com/network/subnets/10.244.3.0-24");
        assert_eq!(subnet_from_key("/coreos.com/network", &key), Some(net));
        assert_eq!(
            subnet_from_key(
                "/coreos.com/network",
                "/coreos.com/network/subnets/10.244.3.1-24"
            ),
            None
        );
    }

    #[test]
    fn bad_entries_are_skipped_and_good_ones_kept() {
        let prefix = "/p";
        let entry = |v: &str| Entry {
            value: v.into(),
            lease: 7,
            mod_revision: 1,
        };
        let entries: BTreeMap<String, Entry> = [
            (
                "/p/subnets/10.244.1.0-24",
                entry(r#"{"PublicIP":"172.31.0.1","BackendType":"host-gw"}"#),
            ),
            (
                "/p/subnets/10.244.2.0-24",
                entry(r#"{"PublicIP":"172.31.0.2","BackendType":"host-gw"}"#),
            ),
            ("/p/subnets/10.244.3.0-24", entry("not json")),
            ("/p/subnets/10.244.4.0-24", entry(r#"{"PublicIP":"nope"}"#)),
            (
                "/p/subnets/10.99.0.0-24",
                entry(r#"{"PublicIP":"172.31.0.5"}"#),
            ),
            (
                "/p/subnets/10.244.2.0-25",
                entry(r#"{"PublicIP":"172.31.0.6"}"#),
            ),
            ("/p/subnets/garbage", entry(r#"{"PublicIP":"172.31.0.7"}"#)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let own = "10.244.1.0/24".parse().expect("cidr");
        let peers = peers_from_entries(prefix, &entries, &space(), own, &mut HashSet::new());
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].node_ip, Ipv4Addr::new(172, 31, 0, 2));
        assert_eq!(peers[0].lease, Some(7));
    }
}
