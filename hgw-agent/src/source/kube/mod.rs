//! Peers from the Kubernetes API, as flanneld `--kube-subnet-mgr` reads and writes
//! them, so flanneld nodes and hgw nodes see each other:
//!
//! - the network: flannel's `net-conf.json` ([`net_conf`]), host-gw;
//! - this node: its Node's `spec.podCIDRs` (waiting, as flannel's "pod cidr not
//!   assigned", until the controller manager assigns them); announced as flanneld
//!   does, with a strategic merge patch of its annotations through `nodes/status`
//!   (`backend-type: host-gw`, `backend-data: null`, `public-ip`, dual stack
//!   `backend-v6-data` and `public-ipv6`, `kube-subnet-manager: "true"`; a
//!   `public-ip-overwrite` annotation is the public IP), then `NetworkUnavailable`
//!   False;
//! - the peers: every other Node flannel would read ([`nodes`]), from kube-rs's watcher
//!   (list, then watch from its resourceVersion with bookmarks, a new list after `410
//!   Gone` or a broken watch, retried with backoff). The whole peer set goes out after
//!   each whole list, so nothing is swept on a partial view, and each Node's change in
//!   between; while the API server cannot be reached the last peers stand.

mod net_conf;
pub mod nodes;

use std::{collections::BTreeMap, net::IpAddr};

use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::{
    api::core::v1::{Node, NodeCondition},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use log::{info, warn};
use tokio::sync::watch;

use crate::{
    agent::sources::{PeerChange, PeerReceiver, PeerSender, peer_channel},
    config::{KubeConfig, Network, NetworkV6},
    source::etcd::SubnetSpace,
};
use nodes::{
    BACKEND_DATA, BACKEND_TYPE, BACKEND_V6_DATA, Nodes, PUBLIC_IP, PUBLIC_IP_OVERWRITE,
    PUBLIC_IPV6, PUBLIC_IPV6_OVERWRITE, SUBNET_MANAGER, annotation,
};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the network config {path}: {source}")]
    ReadNetConf {
        path: String,
        source: std::io::Error,
    },
    #[error("network config {path}: {reason}")]
    NetConf { path: String, reason: String },
    #[error("kube client config ({from}): {reason}")]
    ClientConfig { from: String, reason: String },
    #[error("kube API {operation}: {}", explain(.source))]
    Api {
        operation: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node}: pod cidr not assigned (its spec.podCIDRs has no {family} CIDR)")]
    NoPodCidr { node: String, family: &'static str },
    #[error("node {node}: {reason}")]
    BadNode { node: String, reason: String },
}

impl KubeError {
    /// What waiting and asking again may cure: the API server, or a pod CIDR not yet
    /// assigned. A bad config is the admin's to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Api { .. } | Self::NoPodCidr { .. })
    }
}

/// A 401 or 403 says which permission is missing; anything else as kube-rs says it.
fn explain(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 401 => format!(
            "401 Unauthorized: the API server does not accept the agent's token (expired or wrong): {}",
            status.message
        ),
        kube::Error::Api(status) if status.code == 403 => format!(
            "403 Forbidden: the agent's account lacks a permission (it needs nodes get, list, watch and nodes/status patch): {}",
            status.message
        ),
        other => other.to_string(),
    }
}

fn watch_error(error: &watcher::Error) -> String {
    match error {
        watcher::Error::InitialListFailed(e) => format!("listing nodes: {}", explain(e)),
        watcher::Error::WatchStartFailed(e) => format!("watching nodes: {}", explain(e)),
        watcher::Error::WatchFailed(e) => format!("watching nodes: {}", explain(e)),
        other => other.to_string(),
    }
}

/// A connected source: this node's network, the public IPs it announces, and the
/// peers as they change.
pub struct KubeSource {
    pub network: Network,
    pub public_ips: Vec<IpAddr>,
    pub peers: PeerReceiver,
    /// Why the API server cannot be followed now (`None`: it can), for status.
    pub trouble: watch::Receiver<Option<String>>,
}

async fn client(config: &KubeConfig) -> Result<Client, KubeError> {
    let (from, result) = match &config.kubeconfig {
        Some(path) => {
            let from = path.display().to_string();
            let config = match Kubeconfig::read_from(path) {
                Ok(file) => {
                    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            (from, config)
        }
        None => (
            "in-cluster service account".to_owned(),
            kube::Config::incluster().map_err(|e| e.to_string()),
        ),
    };
    let bad = |reason: String| KubeError::ClientConfig {
        from: from.clone(),
        reason,
    };
    Client::try_from(result.map_err(bad)?).map_err(|e| bad(e.to_string()))
}

fn api_error(operation: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let operation = operation.into();
    move |source| KubeError::Api { operation, source }
}

/// Reads the network config, this node's Node and pod CIDRs, announces the node and
/// starts following the peers. Fails before the agent changes anything on the node;
/// [`KubeError::is_transient`] errors are worth another try.
pub async fn start(
    config: &KubeConfig,
    node_name: &str,
    uplink: &[IpNet],
) -> Result<KubeSource, KubeError> {
    let space = net_conf::read(&config.net_conf, uplink)?;
    let api: Api<Node> = Api::all(client(config).await?);
    let node = api
        .get(node_name)
        .await
        .map_err(api_error(format!("reading node {node_name}")))?;
    let bad = |reason: String| KubeError::BadNode {
        node: node_name.to_owned(),
        reason,
    };
    let cidrs = nodes::pod_cidrs(&node).map_err(bad)?;
    let missing = |family| KubeError::NoPodCidr {
        node: node_name.to_owned(),
        family,
    };
    let pod_cidr = cidrs.v4.ok_or_else(|| missing("IPv4"))?;
    if space.v6.is_some() && cidrs.v6.is_none() {
        return Err(missing("IPv6"));
    }
    nodes::check_in_network(&cidrs, &space).map_err(bad)?;
    let own = own_addresses(&node, &space, uplink).map_err(bad)?;
    announce(&api, &node, &own).await?;
    let network = Network {
        pod_cidr,
        cluster_cidr: match space.v4.network {
            IpNet::V4(net) => net,
            IpNet::V6(_) => unreachable!("parsed as IPv4"),
        },
        v6: cidrs
            .v6
            .zip(space.v6)
            .and_then(|(pod_cidr, pool)| match pool.network {
                IpNet::V6(cluster_cidr) => Some(NetworkV6 {
                    pod_cidr,
                    cluster_cidr,
                }),
                IpNet::V4(_) => None,
            }),
    };
    info!(
        "kube: node {node_name} has {} (public IP {})",
        network
            .pod_cidrs()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        own.iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (tx, rx) = peer_channel();
    let (trouble_tx, trouble) = watch::channel(None);
    tokio::spawn(follow(api, space, node_name.to_owned(), (tx, trouble_tx)));
    Ok(KubeSource {
        network,
        public_ips: own,
        peers: rx,
        trouble,
    })
}

/// This node's public IPs: a `public-ip(v6)-overwrite` annotation, else the uplink's
/// first IPv4 (and first global IPv6 address with IPv6), as flanneld picks them.
fn own_addresses(
    node: &Node,
    space: &SubnetSpace,
    uplink: &[IpNet],
) -> Result<Vec<IpAddr>, String> {
    let pick = |overwrite: &str, v6: bool| -> Result<IpAddr, String> {
        if let Some(text) = annotation(node, overwrite).filter(|t| !t.is_empty()) {
            return text
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| ip.is_ipv6() == v6)
                .ok_or_else(|| {
                    format!(
                        "{overwrite} {text:?} is not an IPv{} address",
                        if v6 { 6 } else { 4 }
                    )
                });
        }
        uplink
            .iter()
            .map(IpNet::addr)
            .find(|a| match a {
                IpAddr::V4(_) => !v6,
                IpAddr::V6(a) => v6 && !a.is_loopback() && !a.is_unicast_link_local(),
            })
            .ok_or_else(|| {
                format!(
                    "the uplink has no {} address to announce",
                    if v6 { "global IPv6" } else { "IPv4" }
                )
            })
    };
    let mut own = vec![pick(PUBLIC_IP_OVERWRITE, false)?];
    if space.v6.is_some() {
        own.push(pick(PUBLIC_IPV6_OVERWRITE, true)?);
    }
    Ok(own)
}

/// The annotations flanneld's `AcquireLease` writes for a host-gw node.
pub fn annotations(own: &[IpAddr]) -> BTreeMap<&'static str, String> {
    let mut wanted = BTreeMap::from([
        (BACKEND_TYPE, "host-gw".to_owned()),
        (BACKEND_DATA, "null".to_owned()),
        (SUBNET_MANAGER, "true".to_owned()),
    ]);
    for ip in own {
        match ip {
            IpAddr::V4(_) => wanted.insert(PUBLIC_IP, ip.to_string()),
            IpAddr::V6(_) => {
                wanted.insert(BACKEND_V6_DATA, "null".to_owned());
                wanted.insert(PUBLIC_IPV6, ip.to_string())
            }
        };
    }
    wanted
}

/// Patches this node's annotations (only when one differs, as flanneld does) and sets
/// its `NetworkUnavailable` condition to False, both through `nodes/status`.
async fn announce(api: &Api<Node>, node: &Node, own: &[IpAddr]) -> Result<(), KubeError> {
    let name = nodes::name(node);
    let wanted = annotations(own);
    if wanted
        .iter()
        .any(|(key, value)| annotation(node, key) != Some(value.as_str()))
    {
        let patch = serde_json::json!({"metadata": {"annotations": wanted}});
        api.patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .map_err(api_error(format!(
                "patching node {name}'s annotations (nodes/status)"
            )))?;
        info!("kube: announced node {name} as flannel host-gw: {wanted:?}");
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = NodeCondition {
        type_: "NetworkUnavailable".into(),
        status: "False".into(),
        reason: Some("FlannelIsUp".into()),
        message: Some("hgw (flannel host-gw) is running on this node".into()),
        last_transition_time: Some(now.clone()),
        last_heartbeat_time: Some(now),
    };
    let patch = serde_json::json!({"status": {"conditions": [condition]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(api_error(format!(
            "setting node {name}'s NetworkUnavailable condition (nodes/status)"
        )))?;
    Ok(())
}

/// Follows the Nodes for as long as the agent takes their changes.
async fn follow(
    api: Api<Node>,
    space: SubnetSpace,
    own: String,
    (tx, trouble): (PeerSender, watch::Sender<Option<String>>),
) {
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut nodes = Nodes::default();
    // The list in progress; it replaces `nodes` when whole.
    let mut listing: Option<Nodes> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        if event.is_ok() && std::mem::take(&mut failing) {
            info!("kube: following the nodes again");
            trouble.send_replace(None);
        }
        let change = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Nodes::default());
                None
            }
            Ok(watcher::Event::InitApply(node)) => {
                listing.get_or_insert_default().apply(&node, &space);
                None
            }
            Ok(watcher::Event::InitDone) => {
                // The warnings already given stay: said once, not on every list.
                nodes.nodes = listing.take().unwrap_or_default().nodes;
                Some(PeerChange::All(nodes.peers(&own)))
            }
            // (The watcher sends these only after the first whole list.)
            Ok(watcher::Event::Apply(node)) => nodes.apply(&node, &space).then(|| {
                let name = nodes::name(&node);
                match nodes.peer(name, &own) {
                    Some(peer) => PeerChange::Upsert(peer),
                    None => PeerChange::Remove(nodes::key(name)),
                }
            }),
            Ok(watcher::Event::Delete(node)) => nodes
                .delete(&node)
                .then(|| PeerChange::Remove(nodes::key(nodes::name(&node)))),
            Err(e) => {
                let why = watch_error(&e);
                warn!("kube: {why}; retrying with backoff, routes left as they are");
                trouble.send_replace(Some(format!(
                    "the Kubernetes API: {why} (retrying; routes and maps kept)"
                )));
                failing = true;
                None
            }
        };
        if let Some(change) = change
            && tx.send([change]).is_err()
        {
            return;
        }
    }
}
