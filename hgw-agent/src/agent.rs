//! The node agent: checks the node against the config, sets it up on request, attaches
//! the fast path, and keeps kernel routes and the fast-path map equal to the desired
//! state, reacting to netlink events (a deleted route, a changed neighbour, the uplink
//! changing) rather than polling; a slow periodic resync is the backstop.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt as _;
use hgw_common::{Endpoint, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig};
use ipnet::IpNet;
use log::{debug, info, warn};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{AddressFamily, RouteNetlinkMessage, link::LinkMessage},
};
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::{Attach, Config, ConfigError, EtcdConfig, FastPath, Network, Peer, Source},
    conntrack::{self, ConntrackError},
    datapath::{Datapath, DatapathError},
    etcd::{self, EtcdError, EtcdSource},
    kernel::{
        Kernel, KernelError, Link, Neighbour, PrefixOwners, format_mac, link_name, main_route,
        port_of,
    },
    setup::{self, SetupError},
    status::{self, PeerStatus, Status},
};

const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How soon an unreachable etcd is asked again at start, doubling up to the maximum.
const ETCD_RETRY_FIRST: Duration = Duration::from_secs(1);
const ETCD_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often unresolved next hops are asked for again; meanwhile the kernel path
/// carries their traffic (and resolves them itself when a packet needs it).
const RESOLVE_RETRY_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("status socket {path}: {reason}")]
    StatusSocket { path: String, reason: String },
    #[error("listening for netlink events: {0}")]
    Events(#[source] std::io::Error),
    #[error("installing a signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// One route of a peer: a dual-stack peer has one per family.
struct PeerState {
    peer: Peer,
    pod_cidr: IpNet,
    node_ip: IpAddr,
    mac: Option<[u8; 6]>,
    /// The kernel's entry is STALE: not confirmed lately.
    stale: bool,
    route: bool,
    /// Someone else's route holds the prefix (its protocol): hgw leaves it, and keeps
    /// the prefix out of the fast path, which must not contradict the kernel's route.
    foreign: Option<String>,
}

pub struct Agent {
    config: Config,
    network: Network,
    kernel: Kernel,
    uplink: Link,
    bridge: Link,
    /// The uplink's networks: a peer must be on one of them (host-gw is one hop).
    uplink_networks: Vec<IpNet>,
    datapath: Option<Datapath>,
    peers: Vec<PeerState>,
    /// The source has given its first whole peer set (static: at start; etcd: its
    /// first listing). Until then nothing is swept: an empty set is not yet the truth,
    /// and a restart must not delete the routes traffic is using.
    peers_known: bool,
    /// Peer routes left out because host-gw cannot reach them (warned about once).
    skipped: Vec<(IpNet, IpAddr)>,
    /// What the fast-path map holds, to write only what changed.
    map: HashMap<IpNet, NextHop>,
    /// What the endpoint map holds: local pods for direct delivery.
    endpoints: HashMap<IpAddr, Endpoint>,
}

/// Runs the agent until SIGTERM or SIGINT. Kernel routes stay installed on exit; the
/// programs are detached (their tcx links close with the process).
/// Reads the config again (the same file and flags).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// How often the config file is checked for changes.
const FILE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub async fn run(config: Config, reload: Option<(PathBuf, Reload)>) -> Result<(), AgentError> {
    let kernel = Kernel::connect()?;
    // Everything is checked before anything is changed on the node.
    let uplink = check_interfaces(&kernel, &config).await?;
    if config.fast_path == FastPath::Established {
        // The kernel can run this mode: its kfuncs and conntrack sysctls are there.
        hgw_common::loader::check_kernel().map_err(DatapathError::from)?;
        conntrack::timeouts()?;
        // IPVS (kube-proxy's ipvs mode) rewrites a flow's reply tuple without setting
        // conntrack's NAT bits, which is all the programs can see of NAT.
        if conntrack::ipvs_in_use() {
            return Err(ConfigError::invalid(
                "fast_path",
                FastPath::Established.name(),
                format!(
                    "IPVS is active in this network namespace ({}: kube-proxy's ipvs mode?); its NAT is invisible to the conntrack checks of this mode; use \"off\", or kube-proxy's iptables or nftables mode",
                    conntrack::IPVS
                ),
            )
            .into());
        }
    }
    let uplink_networks = kernel.networks(uplink.index).await?;
    let mut early_listener = None;
    let (network, peers, updates) = match &config.source {
        Source::Static { network, peers } => {
            check_static_peers(&config, peers, &uplink_networks)?;
            let updates = reload.map(|(path, reload)| watch_file(path, reload, config.clone()));
            (*network, peers.clone(), updates)
        }
        Source::Etcd(etcd) => {
            let public_ip = match etcd.public_ip {
                Some(ip) => ip,
                None => first_ipv4(&uplink_networks).ok_or_else(|| {
                    ConfigError::invalid(
                        "etcd.public_ip",
                        "",
                        format!("not set, and uplink {} has no IPv4 address", config.uplink),
                    )
                })?,
            };
            // Bound now, so that status can say the agent waits for etcd.
            let listener = bind_status_socket(&config)?;
            let Some(source) =
                wait_for_etcd(&config, etcd, public_ip, &uplink_networks, &listener).await?
            else {
                let _ = std::fs::remove_file(&config.status_socket);
                info!("stopped while waiting for etcd: routes left as they were");
                return Ok(());
            };
            early_listener = Some(listener);
            (source.network, Vec::new(), Some(source.peers))
        }
    };
    let addresses = kernel.addresses(None).await?;
    let bridge_index = kernel.link(&config.bridge).await?.map(|l| l.index);
    let from = match config.source {
        Source::Static { .. } => "",
        Source::Etcd(_) => "etcd network: ",
    };
    if let Err(e) = check_network(&network, &uplink_networks, &addresses, bridge_index, from) {
        if early_listener.is_some() {
            let _ = std::fs::remove_file(&config.status_socket);
        }
        return Err(e.into());
    }
    let listener = match early_listener {
        Some(listener) => listener,
        None => bind_status_socket(&config)?,
    };

    let bridge = if config.setup_node {
        setup::apply(&kernel, &config, &network).await?
    } else {
        kernel
            .link(&config.bridge)
            .await?
            .ok_or_else(|| ConfigError::invalid("bridge", &config.bridge, "no such interface"))?
    };
    let datapath = if config.fast_path != FastPath::Off {
        let conntrack = config.fast_path == FastPath::Established;
        if conntrack {
            conntrack::ensure_tracking()?;
        }
        let node = node_config(&network, &bridge, &uplink, config.fast_path)?;
        let datapath = Datapath::attach(
            (&config.bridge, bridge.index),
            (&config.uplink, uplink.index),
            node,
            config.attach,
            conntrack,
        )?;
        let to_peer = match config.attach {
            Attach::Bridge => format!("{} ingress", config.bridge),
            Attach::Ports => format!("ingress of each port of {}", config.bridge),
        };
        info!(
            "fast path ({}) attached: {to_peer} -> peers, {} ingress -> pods",
            config.fast_path.name(),
            config.uplink
        );
        Some(datapath)
    } else {
        info!("fast path off: kernel routes only");
        None
    };

    let mut agent = Agent {
        config,
        network,
        kernel,
        uplink,
        bridge,
        uplink_networks,
        datapath,
        peers: Vec::new(),
        peers_known: false,
        skipped: Vec::new(),
        map: HashMap::new(),
        endpoints: HashMap::new(),
    };
    if matches!(agent.config.source, Source::Static { .. }) {
        agent.set_peers(peers).await;
    }
    agent.event_loop(listener, updates).await?;
    info!("shutting down: kernel routes stay, fast path detached");
    Ok(())
}

/// Sends the static peers again whenever the config file changes and still reads as a
/// valid config. Only the peers are applied live; any other change is named in a
/// warning and waits for a restart.
fn watch_file(path: PathBuf, reload: Reload, running: Config) -> mpsc::Receiver<Vec<Peer>> {
    let (tx, rx) = mpsc::channel(4);
    let stamp = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    tokio::spawn(async move {
        let mut seen = stamp(&path);
        let mut tick = tokio::time::interval(FILE_CHECK_EVERY);
        loop {
            tick.tick().await;
            let now = stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            let config = match reload() {
                Ok(config) => config,
                Err(e) => {
                    warn!("{}: changed but not applied: {e}", path.display());
                    continue;
                }
            };
            let (Source::Static { network, peers }, Source::Static { network: old, .. }) =
                (&config.source, &running.source)
            else {
                warn!(
                    "{}: changed to etcd; restart the agent to apply it",
                    path.display()
                );
                continue;
            };
            if network != old
                || config.uplink != running.uplink
                || config.bridge != running.bridge
                || config.node_name != running.node_name
                || config.fast_path != running.fast_path
                || config.setup_node != running.setup_node
            {
                warn!(
                    "{}: only peers are applied without a restart; the rest waits for one",
                    path.display()
                );
            }
            info!(
                "{}: changed; applying its {} peers",
                path.display(),
                peers.len()
            );
            if tx.send(peers.clone()).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn first_ipv4(networks: &[IpNet]) -> Option<Ipv4Addr> {
    networks.iter().find_map(|n| match n.addr() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    })
}

/// What the programs need to know of this node, with the conntrack timeouts as they
/// are now.
fn node_config(
    network: &Network,
    bridge: &Link,
    uplink: &Link,
    fast_path: FastPath,
) -> Result<NodeConfig, ConntrackError> {
    let v6 = network.v6;
    Ok(NodeConfig {
        pod_net_v4: network.pod_cidr.network().octets(),
        pod_mask_v4: network.pod_cidr.netmask().octets(),
        pod_net_v6: network
            .v6
            .map(|v6| v6.pod_cidr.network().octets())
            .unwrap_or_default(),
        pod_mask_v6: network
            .v6
            .map(|v6| v6.pod_cidr.netmask().octets())
            .unwrap_or_default(),
        bridge_ifindex: bridge.index,
        bridge_mtu: bridge.mtu,
        bridge_mac: bridge.mac,
        uplink_mac: uplink.mac,
        gateway_v4: network.gateway().octets(),
        gateway_v6: network.gateway_v6().map(|g| g.octets()).unwrap_or_default(),
        cluster_net_v4: network.cluster_cidr.network().octets(),
        cluster_mask_v4: network.cluster_cidr.netmask().octets(),
        cluster_net_v6: v6
            .map(|v6| v6.cluster_cidr.network().octets())
            .unwrap_or_default(),
        cluster_mask_v6: v6
            .map(|v6| v6.cluster_cidr.netmask().octets())
            .unwrap_or_default(),
        // Only `established` mode uses them (and only it needs conntrack at all).
        ct: if fast_path == FastPath::Established {
            conntrack::timeouts()?
        } else {
            Default::default()
        },
    })
}

/// The uplink exists, and so does the bridge unless the agent is to create it.
async fn check_interfaces(kernel: &Kernel, config: &Config) -> Result<Link, AgentError> {
    let uplink = kernel
        .link(&config.uplink)
        .await?
        .ok_or_else(|| ConfigError::invalid("uplink", &config.uplink, "no such interface"))?;
    if !config.setup_node && kernel.link(&config.bridge).await?.is_none() {
        return Err(ConfigError::invalid(
            "bridge",
            &config.bridge,
            "no such interface (create it, or let the agent do so with --setup-node)",
        )
        .into());
    }
    Ok(uplink)
}

/// Why a peer's node IP cannot be reached the host-gw way from this uplink, if it
/// cannot.
fn off_link(node_ip: IpAddr, uplink: &str, networks: &[IpNet]) -> Option<String> {
    if networks.iter().any(|n| n.addr() == node_ip) {
        return Some("is this node's own uplink address".into());
    }
    if networks.iter().any(|n| n.contains(&node_ip)) {
        return None;
    }
    let have: Vec<String> = networks
        .iter()
        .filter(|n| n.addr().is_ipv4() == node_ip.is_ipv4())
        .map(|n| n.to_string())
        .collect();
    let family = if node_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    Some(format!(
        "not on the subnet of uplink {uplink} ({}): host-gw needs every peer on the same L2 segment",
        if have.is_empty() {
            format!("no {family} address")
        } else {
            have.join(", ")
        }
    ))
}

/// Static peers are the admin's word: one that cannot be reached is a config error.
fn check_static_peers(
    config: &Config,
    peers: &[Peer],
    networks: &[IpNet],
) -> Result<(), ConfigError> {
    for (i, peer) in peers.iter().enumerate() {
        for (_, node_ip) in peer.hops() {
            if let Some(reason) = off_link(node_ip, &config.uplink, networks) {
                let field = if node_ip.is_ipv4() {
                    "node_ip"
                } else {
                    "node_ip_v6"
                };
                return Err(ConfigError::invalid(
                    format!("peers[{i}].{field}"),
                    node_ip,
                    reason,
                ));
            }
        }
    }
    Ok(())
}

/// This node's CIDRs must never take the node's own traffic (SSH included) for pods:
/// no default route, no overlap with the uplink's networks, no address of the node's
/// inside them but the bridge's (the gateway).
fn check_network(
    network: &Network,
    uplink_networks: &[IpNet],
    addresses: &[(u32, IpNet)],
    bridge: Option<u32>,
    from: &str,
) -> Result<(), ConfigError> {
    let mut cidrs = vec![
        ("pod_cidr", IpNet::V4(network.pod_cidr)),
        ("cluster_cidr", IpNet::V4(network.cluster_cidr)),
    ];
    if let Some(v6) = network.v6 {
        cidrs.push(("pod_cidr_v6", IpNet::V6(v6.pod_cidr)));
        cidrs.push(("cluster_cidr_v6", IpNet::V6(v6.cluster_cidr)));
    }
    for (field, cidr) in cidrs {
        let invalid = |reason: String| ConfigError::invalid(format!("{from}{field}"), cidr, reason);
        if cidr.prefix_len() == 0 {
            return Err(invalid(
                "a default route: it would take all of the node's traffic for pods".into(),
            ));
        }
        let overlaps = |net: &IpNet| cidr.contains(&net.network()) || net.contains(&cidr.network());
        if let Some(net) = uplink_networks.iter().find(|net| overlaps(&net.trunc())) {
            return Err(invalid(format!(
                "overlaps the uplink's network {}",
                net.trunc()
            )));
        }
        if let Some((_, addr)) = addresses
            .iter()
            .find(|(index, addr)| Some(*index) != bridge && cidr.contains(&addr.addr()))
        {
            return Err(invalid(format!(
                "contains the node's own address {}",
                addr.addr()
            )));
        }
    }
    Ok(())
}

/// `etcd::start`, retried while etcd cannot be reached, as flanneld does (backoff from
/// 1 s, doubling, up to 30 s): meanwhile the node keeps the routes it has (nothing is
/// swept and no program attached before etcd answers) and the status socket says what
/// the agent waits for. `None` when SIGTERM or SIGINT came first.
async fn wait_for_etcd(
    config: &Config,
    etcd: &EtcdConfig,
    public_ip: Ipv4Addr,
    uplink_networks: &[IpNet],
    listener: &UnixListener,
) -> Result<Option<EtcdSource>, AgentError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut backoff = ETCD_RETRY_FIRST;
    let mut waiting = waiting_status(config, "waiting for etcd: connecting".into());
    loop {
        let attempt = etcd::start(etcd.clone(), public_ip, uplink_networks);
        tokio::pin!(attempt);
        let error = loop {
            tokio::select! {
                result = &mut attempt => match result {
                    Ok(source) => return Ok(Some(source)),
                    Err(error @ EtcdError::Client { .. }) => break error,
                    Err(error) => return Err(error.into()),
                },
                _ = sigterm.recv() => return Ok(None),
                _ = sigint.recv() => return Ok(None),
                accepted = listener.accept() => serve_status(accepted, &waiting).await,
            }
        };
        warn!("{error}; retrying in {backoff:?}, routes left as they are");
        waiting = waiting_status(config, format!("waiting for etcd: {error}"));
        let retry = tokio::time::sleep(backoff);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = &mut retry => break,
                _ = sigterm.recv() => return Ok(None),
                _ = sigint.recv() => return Ok(None),
                accepted = listener.accept() => serve_status(accepted, &waiting).await,
            }
        }
        backoff = (backoff * 2).min(ETCD_RETRY_MAX);
    }
}

/// What status says before the agent knows its network: not ready, and why.
fn waiting_status(config: &Config, waiting: String) -> Status {
    Status {
        node: config.node_name.clone(),
        pod_cidr: String::new(),
        pod_cidr_v6: None,
        uplink: config.uplink.clone(),
        bridge: config.bridge.clone(),
        ready: false,
        fast_path: config.fast_path.name().to_owned(),
        peers: Vec::new(),
        counters: Default::default(),
        endpoints: 0,
        map_entries: 0,
        waiting: Some(waiting),
    }
}

async fn serve_status(
    accepted: std::io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)>,
    status: &Status,
) {
    match accepted {
        Ok((stream, _)) => {
            if let Err(e) = status::serve(stream, status).await {
                debug!("status client went away: {e}");
            }
        }
        Err(e) => warn!("status socket: {e}"),
    }
}

/// The next peer set from a dynamic source; never ready without one.
async fn next_update(updates: &mut Option<mpsc::Receiver<Vec<Peer>>>) -> Option<Vec<Peer>> {
    match updates {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn bind_status_socket(config: &Config) -> Result<UnixListener, AgentError> {
    let path = &config.status_socket;
    let error = |reason: String| AgentError::StatusSocket {
        path: path.display().to_string(),
        reason,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(error("another agent is answering on it".into()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| error(e.to_string()))?;
    }
    // A socket file left by an agent that is gone.
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| error(e.to_string()))
}

impl Agent {
    async fn event_loop(
        &mut self,
        listener: UnixListener,
        mut updates: Option<mpsc::Receiver<Vec<Peer>>>,
    ) -> Result<(), AgentError> {
        let (connection, _, mut events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Link,
        ])
        .map_err(AgentError::Events)?;
        tokio::spawn(connection);
        // Events may have been missed between the first resync and the subscription.
        self.resync().await;

        let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        let mut retry = tokio::time::interval(RESOLVE_RETRY_EVERY);
        resync.tick().await;
        retry.tick().await;
        loop {
            tokio::select! {
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
                Some((message, _)) = events.next() => {
                    if let NetlinkPayload::InnerMessage(message) = message.payload {
                        self.on_event(message).await;
                    }
                }
                accepted = listener.accept() => serve_status(accepted, &self.status()).await,
                _ = resync.tick() => self.resync().await,
                _ = retry.tick() => self.refresh_neighbours().await,
                Some(peers) = next_update(&mut updates) => self.set_peers(peers).await,
            }
        }
    }

    /// Makes `peers` the desired set: keeps what is known of unchanged peer routes,
    /// leaves out (with a warning) routes host-gw cannot reach, and applies the
    /// difference.
    async fn set_peers(&mut self, peers: Vec<Peer>) {
        self.peers_known = true;
        let mut next = Vec::with_capacity(peers.len());
        let mut skipped = Vec::new();
        for peer in peers {
            for (pod_cidr, node_ip) in peer.hops() {
                if let Some(reason) = off_link(node_ip, &self.config.uplink, &self.uplink_networks)
                {
                    if !self.skipped.contains(&(pod_cidr, node_ip)) {
                        warn!(
                            "peer {} ({}): node IP {node_ip} {reason}; no route or map entry for {pod_cidr}",
                            peer.name, peer.source
                        );
                    }
                    skipped.push((pod_cidr, node_ip));
                    continue;
                }
                let old = self
                    .peers
                    .iter()
                    .find(|p| p.pod_cidr == pod_cidr && p.node_ip == node_ip);
                if old.is_none() {
                    info!(
                        "peer {} ({}): {pod_cidr} via {node_ip}",
                        peer.name, peer.source
                    );
                }
                next.push(PeerState {
                    mac: old.and_then(|o| o.mac),
                    stale: old.is_some_and(|o| o.stale),
                    route: old.is_some_and(|o| o.route),
                    foreign: old.and_then(|o| o.foreign.clone()),
                    peer: peer.clone(),
                    pod_cidr,
                    node_ip,
                });
            }
        }
        for gone in self.peers.iter().filter(|p| {
            !next
                .iter()
                .any(|n| n.pod_cidr == p.pod_cidr && n.node_ip == p.node_ip)
        }) {
            info!(
                "peer {} ({}) is gone: removing {} via {}",
                gone.peer.name, gone.peer.source, gone.pod_cidr, gone.node_ip
            );
        }
        self.skipped = skipped;
        self.peers = next;
        self.resync().await;
    }

    async fn on_event(&mut self, message: RouteNetlinkMessage) {
        match message {
            RouteNetlinkMessage::NewNeighbour(msg) | RouteNetlinkMessage::DelNeighbour(msg)
                if msg.header.family == AddressFamily::Bridge
                    || msg.header.ifindex == self.bridge.index =>
            {
                // A pod's MAC (bridge neighbour table) or its port (forwarding table).
                self.sync_endpoints().await;
            }
            RouteNetlinkMessage::NewNeighbour(msg) => {
                if let Some(n) = Neighbour::from_message(&msg) {
                    self.on_neighbour(n, false).await;
                }
            }
            RouteNetlinkMessage::DelNeighbour(msg) => {
                if let Some(n) = Neighbour::from_message(&msg) {
                    self.on_neighbour(
                        Neighbour {
                            mac: None,
                            stale: false,
                            ..n
                        },
                        true,
                    )
                    .await;
                }
            }
            RouteNetlinkMessage::DelRoute(msg) => {
                let Some((destination, ours)) = main_route(&msg) else {
                    return;
                };
                let Some(i) = self.peers.iter().position(|p| p.pod_cidr == destination) else {
                    return;
                };
                if ours {
                    warn!(
                        "route to {destination} ({}) was deleted; reinstalling it",
                        self.peers[i].peer.name
                    );
                } else if self.peers[i].foreign.is_some() {
                    info!(
                        "the foreign route to {destination} is gone; installing hgw's ({})",
                        self.peers[i].peer.name
                    );
                } else {
                    return;
                }
                self.peers[i].route = false;
                self.install_route(i).await;
            }
            RouteNetlinkMessage::NewRoute(msg) => {
                // Someone else's route put on a peer's prefix (e.g. `ip route replace`
                // over hgw's): find out whose it is now, and keep the fast path out.
                let Some((destination, false)) = main_route(&msg) else {
                    return;
                };
                if let Some(i) = self
                    .peers
                    .iter()
                    .position(|p| p.pod_cidr == destination && p.foreign.is_none())
                {
                    self.install_route(i).await;
                }
            }
            RouteNetlinkMessage::NewLink(msg) if self.is_recreated(&msg) => {
                // Same name, new device: the programs go onto it and every next hop
                // takes its ifindex and MAC.
                info!(
                    "{} was created again (ifindex {}); attaching to it",
                    link_name(&msg).unwrap_or_default(),
                    msg.header.index
                );
                self.resync().await;
            }
            RouteNetlinkMessage::NewLink(msg) | RouteNetlinkMessage::DelLink(msg)
                if msg.header.index == self.uplink.index
                    || msg.header.index == self.bridge.index =>
            {
                // A MAC or MTU may have changed (a bridge takes a new MAC as ports come
                // and go): the node config and every next hop carry them.
                self.resync().await;
            }
            RouteNetlinkMessage::NewLink(msg) => {
                self.on_port(&msg, false);
                self.sync_endpoints().await;
            }
            RouteNetlinkMessage::DelLink(msg) => {
                self.on_port(&msg, true);
                self.sync_endpoints().await;
            }
            _ => {}
        }
    }

    /// Whether `msg` announces the uplink or the bridge under a new ifindex.
    fn is_recreated(&self, msg: &LinkMessage) -> bool {
        let index = msg.header.index;
        link_name(msg).is_some_and(|name| {
            (name == self.config.uplink && index != self.uplink.index)
                || (name == self.config.bridge && index != self.bridge.index)
        })
    }

    /// With Attach::Ports: a pod's veth joined the bridge (attach), or left it or
    /// vanished (forget).
    fn on_port(&mut self, msg: &LinkMessage, deleted: bool) {
        if self.config.attach != Attach::Ports {
            return;
        }
        let Some(datapath) = &mut self.datapath else {
            return;
        };
        let index = msg.header.index;
        if !deleted && port_of(msg) == Some(self.bridge.index) {
            let Some(name) = link_name(msg) else { return };
            match datapath.attach_port(&name, index) {
                Ok(()) => debug!("fast path on bridge port {name}"),
                Err(e) => warn!("bridge port {name}: {e}"),
            }
        } else if datapath.ports().any(|p| p == index) {
            datapath.detach_port(index);
        }
    }

    /// Local pods the uplink program can deliver to directly: IP -> MAC from the
    /// bridge's neighbour table, MAC -> port from the bridge's forwarding table. A pod
    /// keeps its port after the forwarding entry ages out (pods do not move between
    /// veths); it loses its endpoint when its neighbour entry or its port goes, and the
    /// uplink program then delivers through the bridge.
    async fn sync_endpoints(&mut self) {
        if self.datapath.is_none() {
            return;
        }
        let (neighbours, learned, ports) = match (
            self.kernel.neighbours(self.bridge.index).await,
            self.kernel.learned_macs().await,
            self.kernel.bridge_ports(self.bridge.index).await,
        ) {
            (Ok(n), Ok(l), Ok(p)) => (n, l, p),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return warn!("{e}"),
        };
        let is_port = |index: u32| ports.iter().any(|(p, _)| *p == index);
        let mut desired = HashMap::new();
        for n in neighbours.values() {
            let Some(mac) = n.mac else { continue };
            if !self.network.pod_cidrs().any(|cidr| cidr.contains(&n.ip)) {
                continue;
            }
            let port = learned
                .get(&mac)
                .copied()
                .or_else(|| {
                    self.endpoints
                        .get(&n.ip)
                        .filter(|e| e.mac == mac)
                        .map(|e| e.ifindex)
                })
                .filter(|p| is_port(*p));
            if let Some(ifindex) = port {
                desired.insert(
                    n.ip,
                    Endpoint {
                        ifindex,
                        mac,
                        _pad: [0; 2],
                    },
                );
            }
        }
        let Some(datapath) = &mut self.datapath else {
            return;
        };
        self.endpoints.retain(|ip, _| {
            desired.contains_key(ip) || {
                if let Err(e) = datapath.remove_endpoint(*ip) {
                    warn!("{e}");
                }
                false
            }
        });
        for (ip, endpoint) in desired {
            if self.endpoints.get(&ip) != Some(&endpoint) {
                match datapath.set_endpoint(ip, endpoint) {
                    Ok(()) => {
                        debug!(
                            "pod {ip}: {} on port {}",
                            format_mac(endpoint.mac),
                            endpoint.ifindex
                        );
                        self.endpoints.insert(ip, endpoint);
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        }
    }

    /// With Attach::Ports: the program on every current port of the bridge.
    async fn attach_ports(&mut self) {
        if self.config.attach != Attach::Ports {
            return;
        }
        let Some(datapath) = &mut self.datapath else {
            return;
        };
        match self.kernel.bridge_ports(self.bridge.index).await {
            Ok(ports) => {
                for (index, name) in ports {
                    if let Err(e) = datapath.attach_port(&name, index) {
                        warn!("bridge port {name}: {e}");
                    }
                }
            }
            Err(e) => warn!("{e}"),
        }
    }

    async fn on_neighbour(&mut self, neighbour: Neighbour, deleted: bool) {
        if neighbour.ifindex != self.uplink.index {
            return;
        }
        let Some(i) = self.peers.iter().position(|p| p.node_ip == neighbour.ip) else {
            return;
        };
        self.peers[i].stale = neighbour.stale;
        if self.peers[i].mac == neighbour.mac {
            return;
        }
        info!(
            "next hop {} ({}): {} -> {}",
            self.peers[i].peer.name,
            neighbour.ip,
            self.peers[i].mac.map_or("unresolved".into(), format_mac),
            neighbour.mac.map_or("unresolved".into(), format_mac)
        );
        self.peers[i].mac = neighbour.mac;
        self.write_map_entry(i);
        if deleted {
            self.resolve(neighbour.ip).await;
        }
    }

    /// Brings routes and map entries to the desired state from what the kernel says now.
    async fn resync(&mut self) {
        match self.kernel.link(&self.config.uplink).await {
            Ok(Some(uplink)) => self.uplink = uplink,
            Ok(None) => warn!(
                "uplink {} is gone; keeping the last known next hops",
                self.config.uplink
            ),
            Err(e) => warn!("{e}"),
        }
        match self.kernel.link(&self.config.bridge).await {
            Ok(Some(bridge)) => self.bridge = bridge,
            Ok(None) => warn!("bridge {} is gone", self.config.bridge),
            Err(e) => warn!("{e}"),
        }
        if let Some(datapath) = &mut self.datapath {
            match node_config(
                &self.network,
                &self.bridge,
                &self.uplink,
                self.config.fast_path,
            ) {
                Ok(node) => {
                    if let Err(e) = datapath.set_config(node) {
                        warn!("{e}");
                    }
                }
                Err(e) => warn!("{e}"),
            }
            if let Err(e) = datapath.attach_node(
                (&self.config.bridge, self.bridge.index),
                (&self.config.uplink, self.uplink.index),
            ) {
                warn!("{e}");
            }
        }
        self.attach_ports().await;
        self.sync_endpoints().await;
        self.remove_unwanted_routes().await;
        self.install_routes().await;
        match self.kernel.neighbours(self.uplink.index).await {
            Ok(neighbours) => {
                for peer in &mut self.peers {
                    let neighbour = neighbours.get(&peer.node_ip);
                    peer.mac = neighbour.and_then(|n| n.mac);
                    peer.stale = neighbour.is_some_and(|n| n.stale);
                }
            }
            Err(e) => warn!("{e}"),
        }
        self.remove_unwanted_map_entries();
        for i in 0..self.peers.len() {
            self.write_map_entry(i);
        }
        self.resolve_unresolved().await;
    }

    /// Every peer's route as it should be, from one dump of the routing table: a route
    /// of hgw's already right costs no request, someone else's on the prefix is noted
    /// as foreign, and only the rest is installed.
    async fn install_routes(&mut self) {
        let owners = match self.kernel.prefix_owners().await {
            Ok(owners) => owners,
            Err(e) => {
                warn!("{e}");
                HashMap::new()
            }
        };
        for i in 0..self.peers.len() {
            let peer = &self.peers[i];
            let want = (Some(peer.node_ip), Some(self.uplink.index));
            match owners.get(&peer.pod_cidr) {
                Some(PrefixOwners {
                    ours: Some(ours), ..
                }) if *ours == want => self.route_installed(i, Ok(())),
                Some(PrefixOwners {
                    ours: None,
                    foreign: Some(protocol),
                }) => {
                    let error = KernelError::ForeignRoute {
                        destination: peer.pod_cidr,
                        protocol: protocol.clone(),
                    };
                    self.route_installed(i, Err(error));
                }
                _ => self.install_route(i).await,
            }
        }
    }

    async fn install_route(&mut self, i: usize) {
        let state = &self.peers[i];
        let result = self
            .kernel
            .install_route(state.pod_cidr, state.node_ip, self.uplink.index)
            .await;
        self.route_installed(i, result);
    }

    /// Takes note of peer `i`'s route: in place, on a prefix someone else holds, or
    /// failed.
    fn route_installed(&mut self, i: usize, result: Result<(), KernelError>) {
        let state = &self.peers[i];
        match result {
            Ok(()) => {
                if !state.route {
                    info!(
                        "route {} via {} dev {} ({})",
                        state.pod_cidr, state.node_ip, self.config.uplink, state.peer.name
                    );
                }
                self.peers[i].route = true;
                self.peers[i].foreign = None;
                self.write_map_entry(i);
            }
            Err(KernelError::ForeignRoute {
                destination,
                protocol,
            }) => {
                if state.foreign.is_none() {
                    warn!(
                        "peer {}: {}",
                        state.peer.name,
                        KernelError::ForeignRoute {
                            destination,
                            protocol: protocol.clone()
                        }
                    );
                }
                self.peers[i].route = false;
                self.peers[i].foreign = Some(protocol);
                self.remove_unwanted_map_entries();
            }
            Err(e) => {
                warn!("{e}");
                self.peers[i].route = false;
            }
        }
    }

    /// Routes with hgw's tag that no peer wants: left by an earlier run or a removed peer.
    async fn remove_unwanted_routes(&mut self) {
        if !self.peers_known {
            return;
        }
        let routes = match self.kernel.hgw_routes().await {
            Ok(routes) => routes,
            Err(e) => return warn!("{e}"),
        };
        for route in routes {
            let wanted = self.peers.iter().any(|p| {
                p.pod_cidr == route.destination
                    && route.gateway == Some(p.node_ip)
                    && route.oif == Some(self.uplink.index)
            });
            if !wanted {
                match self.kernel.delete_route(&route).await {
                    Ok(()) => info!("removed stale hgw route to {}", route.destination),
                    Err(e) => warn!("{e}"),
                }
            }
        }
    }

    fn remove_unwanted_map_entries(&mut self) {
        if !self.peers_known {
            return;
        }
        let Some(datapath) = &mut self.datapath else {
            return;
        };
        let unwanted: Vec<IpNet> = self
            .map
            .keys()
            .filter(|cidr| {
                !self
                    .peers
                    .iter()
                    .any(|p| p.pod_cidr == **cidr && p.foreign.is_none())
            })
            .copied()
            .collect();
        for cidr in unwanted {
            match datapath.remove_route(cidr) {
                Ok(()) => {
                    self.map.remove(&cidr);
                }
                Err(e) => warn!("{e}"),
            }
        }
    }

    fn write_map_entry(&mut self, i: usize) {
        let Some(datapath) = &mut self.datapath else {
            return;
        };
        let peer = &self.peers[i];
        if peer.foreign.is_some() {
            return;
        }
        let next_hop = NextHop {
            ifindex: self.uplink.index,
            mtu: self.uplink.mtu,
            dst_mac: peer.mac.unwrap_or_default(),
            src_mac: self.uplink.mac,
            flags: if peer.mac.is_some() {
                NEXT_HOP_MAC_KNOWN
            } else {
                0
            },
        };
        if self.map.get(&peer.pod_cidr) == Some(&next_hop) {
            return;
        }
        match datapath.set_route(peer.pod_cidr, next_hop) {
            Ok(()) => {
                self.map.insert(peer.pod_cidr, next_hop);
            }
            Err(e) => warn!("{e}"),
        }
    }

    async fn resolve_unresolved(&mut self) {
        let unresolved: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|p| p.mac.is_none())
            .map(|p| p.node_ip)
            .collect();
        for ip in unresolved {
            self.resolve(ip).await;
        }
    }

    /// The fast path hides its traffic from the kernel's neighbour confirmation, so a
    /// peer's entry would sit in STALE with a MAC nobody checks. Asking the kernel to
    /// use STALE entries makes it probe them (a unicast ARP): a peer whose MAC changed
    /// without announcing it then fails the probe, its entry is re-resolved, and the
    /// neighbour event brings the new MAC into the map.
    async fn refresh_neighbours(&mut self) {
        let stale: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|p| p.stale)
            .map(|p| p.node_ip)
            .collect();
        for ip in stale {
            self.resolve(ip).await;
        }
        self.resolve_unresolved().await;
    }

    async fn resolve(&self, ip: IpAddr) {
        if let Err(e) = self.kernel.resolve_neighbour(self.uplink.index, ip).await {
            warn!("{e}");
        }
    }

    fn status(&self) -> Status {
        let counters = match &self.datapath {
            Some(datapath) => match datapath.counters() {
                Ok(counters) => status::counters_by_name(&counters),
                Err(e) => {
                    warn!("{e}");
                    Default::default()
                }
            },
            None => Default::default(),
        };
        let ready = self.peers_known
            && self
                .peers
                .iter()
                .filter(|p| p.foreign.is_none())
                .all(|p| p.route && (self.datapath.is_none() || p.mac.is_some()));
        Status {
            node: self.config.node_name.clone(),
            pod_cidr: self.network.pod_cidr.to_string(),
            pod_cidr_v6: self.network.v6.map(|v6| v6.pod_cidr.to_string()),
            uplink: self.config.uplink.clone(),
            bridge: self.config.bridge.clone(),
            ready,
            fast_path: self.config.fast_path.name().to_owned(),
            peers: self
                .peers
                .iter()
                .map(|p| PeerStatus {
                    name: p.peer.name.clone(),
                    node_ip: p.node_ip.to_string(),
                    pod_cidr: p.pod_cidr.to_string(),
                    source: p.peer.source.clone(),
                    lease: p.peer.lease.map(|l| format!("{l:x}")),
                    mac: p.mac.map(format_mac),
                    route: p.route,
                    foreign_route: p.foreign.clone(),
                })
                .collect(),
            counters,
            endpoints: self.endpoints.len(),
            map_entries: self.map.len(),
            waiting: (!self.peers_known).then(|| "waiting for the first peer set".to_owned()),
        }
    }
}
