//! The node agent. Data flows one way:
//!
//! ```text
//! peer sources (file, etcd) --> desired state --> reconciler --> kernel routes, BPF maps
//!                                    kernel events --> observed --^      status snapshot
//! ```
//!
//! Sources publish their peers' changes ([`sources`]); the desired state follows them,
//! checking every peer, as a pure function of the network, the peers and the node
//! ([`desired`]); what the kernel holds is
//! observed from dumps and typed events ([`observed`]); the [`reconcile::Reconciler`] is
//! the only writer, and writes only differences. Status is served from a snapshot the
//! loop publishes, on tasks of its own.

pub mod desired;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod observed;
mod port_search;
pub mod reconcile;
pub mod sources;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use hgw_common::{
    Endpoint, NextHop, NodeConfig,
    loader::KernelFacts,
    status::{AppliedChange, KernelStatus},
};
use ipnet::IpNet;
use log::{info, warn};
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

pub use crate::source::file::Reload;
use crate::{
    config::{Attach, Config, ConfigError, FastPath, Network, Source, check_peers},
    datapath::{self, Datapath, DatapathError, HookKind},
    kernel::{HgwRoute, Kernel, KernelError, KernelEvent, Link},
    node::{
        caps::{self, CapsError},
        cni::{CniError, NodeFiles},
        conntrack::{self, ConntrackError},
        lock::AgentLock,
        masq::{self, MasqError},
        setup::{self, SetupError},
    },
    serve::{
        http::Health,
        metrics::{self, MetricsError, Reconciles, Trigger},
        status::{self, Status},
    },
    source::etcd::{self, EtcdError},
    source::kube::{self as kube_source, KubeError},
    tc::Scanner,
};
use desired::{DesiredState, NodeFacts};
use observed::{Change, Observed};
use port_search::PortSearch;
use reconcile::{FastPathMaps, MapEntries, Reconciler, RouteTable};
use sources::{PeerBatch, PeerReceiver};

/// The backstop: everything is compared with the kernel this often.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How soon an unreachable source (etcd, the Kubernetes API) is asked again at start,
/// doubling up to the maximum.
const SOURCE_RETRY_FIRST: Duration = Duration::from_secs(1);
const SOURCE_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often unresolved and stale next hops are asked for again; meanwhile the kernel
/// path carries their traffic (and resolves them itself when a packet needs it).
const RESOLVE_RETRY_EVERY: Duration = Duration::from_secs(10);
/// At most one forwarding-table dump this often, for pods whose port is not known.
const FDB_DUMP_EVERY: Duration = Duration::from_secs(1);
/// Events taken in one go before the loop looks at anything else.
const EVENT_BATCH: usize = 1024;
/// How often the tcx hooks are queried: attaching or detaching a tcx program sends no
/// netlink event.
const TCX_QUERY_EVERY: Duration = Duration::from_secs(1);

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
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Masq(#[from] MasqError),
    #[error("status socket {path}: {reason}")]
    StatusSocket { path: String, reason: String },
    #[error("installing a signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Probe(#[from] crate::datapath::probe::ProbeError),
    #[error(transparent)]
    AnotherAgent(#[from] crate::node::lock::LockError),
}

/// SIGTERM and SIGINT, as one future.
struct Shutdown {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn new() -> Result<Self, AgentError> {
        Ok(Self {
            sigterm: signal(SignalKind::terminate()).map_err(AgentError::Signal)?,
            sigint: signal(SignalKind::interrupt()).map_err(AgentError::Signal)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.sigterm.recv() => {}
            _ = self.sigint.recv() => {}
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. Kernel routes stay installed on exit; the
/// programs are detached (their tcx links close with the process).
pub async fn run(config: Config, reload: Option<(PathBuf, Reload)>) -> Result<(), AgentError> {
    caps::check(config.fast_path)?;
    let kernel = Kernel::connect()?;
    // Everything is checked before anything is changed on the node.
    let uplink = check_interfaces(&kernel, &config).await?;
    // What the kernel offers and how the fast path will use it, decided once.
    let fast_path = match crate::datapath::probe::probe(config.fast_path)? {
        None => None,
        Some((mut status, hook)) => {
            let facts = if config.fast_path == FastPath::Established {
                check_established()?
            } else {
                hgw_common::loader::check_kernel(false).map_err(DatapathError::from)?
            };
            status.conntrack_kfuncs = facts.home().map(|home| home.to_string());
            info!("{status}");
            Some((status, hook, facts))
        }
    };
    let kernel_status = fast_path.as_ref().map(|(status, ..)| status.clone());
    let attach = match &fast_path {
        Some((_, hook, _)) => hook.placement(config.attach),
        // Nothing is attached (`off`).
        None => config.attach.unwrap_or(Attach::Ports),
    };
    let uplink_networks = kernel.networks(uplink.index).await?;
    let mut shutdown = Shutdown::new()?;
    let (listener, _lock) = bind_status_socket(&config)?;
    // The status socket is removed whenever the agent stops before its loop.
    let socket = SocketGuard(config.status_socket.clone());
    let (snapshot, snapshot_rx) = watch::channel(Arc::new(waiting_status(
        &config,
        kernel_status.clone(),
        "starting".into(),
    )));
    let counters = Arc::new(OnceLock::new());
    status::spawn_server(listener, snapshot_rx.clone(), counters.clone());
    let reconciles = Reconciles::default();
    let health = match config.metrics_addr {
        Some(addr) => {
            metrics::spawn_server(addr, reconciles.clone(), snapshot_rx, counters.clone())?
        }
        None => Health::default(),
    };

    // What a source that is running into trouble says (the kube source), for status.
    let mut source_trouble = None;
    // The static source starts once the node's facts are known (its peers are
    // checked against them); the others have answered by then.
    let (network, peers, public_ips) = match &config.source {
        Source::Static { network, .. } => (*network, None, Vec::new()),
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
            let nets = &uplink_networks[..];
            let wait = wait_for_source(
                "etcd",
                &snapshot,
                || etcd::start(etcd.clone(), public_ip, nets),
                |e: &EtcdError| matches!(e, EtcdError::Client { .. }).then_some(Retry::Backoff),
            );
            let source = tokio::select! {
                source = wait => Some(source?),
                () = shutdown.recv() => None,
            };
            let Some(source) = source else {
                info!("stopped while waiting for etcd: routes left as they were");
                return Ok(());
            };
            (source.network, Some(source.peers), source.public_ips)
        }
        Source::Kube(kube) => {
            let nets = &uplink_networks[..];
            // A Node gets its pod CIDR within seconds of joining: asked every second.
            let wait = wait_for_source(
                "the Kubernetes API",
                &snapshot,
                || kube_source::start(kube, &config.node_name, nets),
                |e: &KubeError| match e {
                    KubeError::NoPodCidr { .. } => Some(Retry::Every(SOURCE_RETRY_FIRST)),
                    e if e.is_transient() => Some(Retry::Backoff),
                    _ => None,
                },
            );
            let source = tokio::select! {
                source = wait => Some(source?),
                () = shutdown.recv() => None,
            };
            let Some(source) = source else {
                info!("stopped while waiting for the Kubernetes API: routes left as they were");
                return Ok(());
            };
            source_trouble = Some(source.trouble);
            (source.network, Some(source.peers), source.public_ips)
        }
    };
    let addresses = kernel.addresses(None).await?;
    let bridge_index = kernel.link(&config.bridge).await?.map(|l| l.index);
    let from = match config.source {
        Source::Static { .. } => "",
        Source::Etcd(_) => "etcd network: ",
        Source::Kube(_) => "kube network: ",
    };
    check_network(&network, &uplink_networks, &addresses, bridge_index, from)?;
    let node = NodeFacts {
        uplink_name: config.uplink.clone(),
        addresses: other_addresses(&addresses, bridge_index),
        uplink_networks,
        public_ips,
    };
    let peers = match (peers, &config.source) {
        (Some(peers), _) => peers,
        (None, Source::Static { peers, .. }) => {
            // Static peers are the admin's word: one that cannot be reached is a config
            // error, before anything changes on the node.
            let checked = check_peers(&network, peers, Some(&node))?;
            crate::source::file::static_peers(peers.clone(), reload, config.clone(), checked)
        }
        (None, _) => unreachable!("every other source has its receiver"),
    };

    let bridge = if config.setup_node {
        setup::apply(&kernel, &config, &network).await?
    } else {
        kernel
            .link(&config.bridge)
            .await?
            .ok_or_else(|| ConfigError::invalid("bridge", &config.bridge, "no such interface"))?
    };
    masq::set(config.ip_masq, &network)?;
    let files = NodeFiles::write(&config, &network, uplink.mtu)?;
    let datapath = attach_datapath(
        &config,
        &network,
        (&bridge, &uplink),
        fast_path.map(|(_, hook, facts)| (hook, attach, facts)),
    )?;
    if let Some(datapath) = &datapath {
        match datapath.counter_reader() {
            Ok(reader) => {
                let _ = counters.set(reader);
            }
            Err(e) => warn!("status will show no counters: {e}"),
        }
    }
    let events = crate::kernel::subscribe()?;
    // Without the fast path nothing is redirected, so nothing is skipped.
    let scanner = datapath.is_some().then(|| Scanner::new(kernel.handle()));
    let mut agent = Agent {
        kernel_status,
        observed: Observed::new(
            (&config.uplink, uplink),
            (&config.bridge, bridge),
            network.pod_cidrs().collect(),
        ),
        reconciler: Reconciler::new(
            kernel.clone(),
            datapath,
            attach == Attach::Ports,
            DesiredState::new(network, Some(node)),
        ),
        config,
        network,
        kernel,
        snapshot,
        last_fdb_dump: None,
        port_search: PortSearch::default(),
        fdb_due: None,
        files,
        reconciles,
        health,
        scanner,
        tc_dirty: HashSet::new(),
        tc_all_dirty: false,
        routing_dirty: false,
        source_trouble,
        last_change: None,
    };
    std::mem::forget(socket);
    agent.event_loop(events, peers, shutdown).await;
    if agent.config.pin_dir.is_some() && agent.config.fast_path != FastPath::Off {
        info!(
            "shutting down: kernel routes stay, and the pinned fast path keeps forwarding (`hgw-agent uninstall` removes it)"
        );
    } else {
        info!("shutting down: kernel routes stay, fast path detached");
    }
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Removes the status socket when the agent stops before it runs.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The kernel can run `established` mode: its kfuncs and conntrack sysctls are there,
/// and IPVS (kube-proxy's ipvs mode), whose NAT sets no conntrack NAT bits, is not in
/// use.
fn check_established() -> Result<KernelFacts, AgentError> {
    let facts = hgw_common::loader::check_kernel(true).map_err(DatapathError::from)?;
    conntrack::timeouts(0)?;
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
    Ok(facts)
}

/// The fast path the way `kernel` (the attach and the loader's facts, `None` with
/// `off`) says.
fn attach_datapath(
    config: &Config,
    network: &Network,
    (bridge, uplink): (&Link, &Link),
    kernel: Option<(HookKind, Attach, KernelFacts)>,
) -> Result<Option<Datapath>, AgentError> {
    let Some((hook, attach, facts)) = kernel else {
        // Programs an earlier agent pinned would go on forwarding: off means none.
        if let Some(dir) = &config.pin_dir {
            match datapath::remove_pins(dir) {
                Ok(0) => {}
                Ok(n) => info!("fast path off: removed {n} pins an earlier agent left"),
                Err(e) => warn!(
                    "fast path off, but {} could not be cleared: {e}",
                    dir.display()
                ),
            }
        }
        // So would an earlier agent's cls_bpf filters (they outlive it, pinned or not).
        match datapath::remove_filters() {
            0 => {}
            n => info!("fast path off: removed {n} cls_bpf filters an earlier agent left"),
        }
        info!("fast path off: kernel routes only");
        return Ok(None);
    };
    if config.fast_path == FastPath::Established {
        conntrack::ensure_tracking()?;
    }
    let node = node_config(network, bridge, uplink, config)?;
    let datapath = Datapath::attach(
        (&config.bridge, bridge.index),
        (&config.uplink, uplink.index),
        node,
        attach,
        (hook, facts),
        config.pin_dir.as_deref(),
    )?;
    let to_peer = match attach {
        Attach::Bridge => format!("{} ingress", config.bridge),
        Attach::Ports => format!("ingress of each port of {}", config.bridge),
    };
    info!(
        "fast path ({}) attached: {to_peer} -> peers, {} ingress -> pods",
        config.fast_path.name(),
        config.uplink
    );
    Ok(Some(datapath))
}

struct Agent {
    config: Config,
    /// What the kernel offers the fast path, as probed at start (`None` with `off`).
    kernel_status: Option<KernelStatus>,
    network: Network,
    kernel: Kernel,
    observed: Observed,
    reconciler: Reconciler<Kernel, Datapath>,
    snapshot: watch::Sender<Arc<Status>>,
    last_fdb_dump: Option<Instant>,
    /// Which pods without a port are still looked for, and when.
    port_search: PortSearch,
    /// When the next forwarding dump may run, if one is wanted.
    fdb_due: Option<Instant>,
    /// subnet.env and the CNI config, which carry the uplink's MTU.
    files: NodeFiles,
    reconciles: Reconciles,
    health: Health,
    /// Dumps what shares hgw's tc hooks (`None`: no fast path).
    scanner: Option<Scanner>,
    /// Interfaces whose qdiscs or filters changed since their last dump.
    tc_dirty: HashSet<u32>,
    /// A change that may concern any interface (a shared filter block).
    tc_all_dirty: bool,
    /// The kernel's routing changed since the generation was last bumped.
    routing_dirty: bool,
    source_trouble: Option<watch::Receiver<Option<String>>>,
    last_change: Option<AppliedChange>,
}

impl Agent {
    async fn event_loop(
        &mut self,
        mut events: crate::kernel::KernelEvents,
        mut peers: PeerReceiver,
        mut shutdown: Shutdown,
    ) {
        // Subscribed first, then dumped: nothing falls between the two.
        self.resync().await;
        // What the source has already sent (the static peers): applied at once.
        if let Some(batch) = peers.try_recv() {
            self.set_peers(batch).await;
        }
        self.reconciler.publish_generation();
        self.publish();
        self.reconciler.resolve_pending(&self.observed).await;
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        let mut retry = tokio::time::interval(RESOLVE_RETRY_EVERY);
        let mut tcx = tokio::time::interval(TCX_QUERY_EVERY);
        tcx.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        retry.tick().await;
        tcx.tick().await;
        let mut peers_open = true;
        loop {
            tokio::select! {
                _ = shutdown.recv() => return,
                event = events.events.recv() => {
                    let Some(event) = event else {
                        warn!("the kernel event subscription ended; subscribing again");
                        match crate::kernel::subscribe() {
                            Ok(again) => events = again,
                            Err(e) => {
                                warn!("{e}");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        self.resync().await;
                        continue;
                    };
                    let timer = self.reconciles.time(Trigger::Events);
                    self.on_event(event).await;
                    // Take what is waiting, up to a batch, before publishing once.
                    for _ in 1..EVENT_BATCH {
                        let Ok(event) = events.events.try_recv() else { break };
                        self.on_event(event).await;
                    }
                    if events.overflowed.swap(false, Ordering::Relaxed) {
                        warn!("kernel events came faster than the agent took them; resyncing");
                        self.routing_dirty = true;
                        self.resync().await;
                    }
                    // Once per batch: a burst of tc or route changes costs one dump
                    // per interface and one generation.
                    self.rescan_dirty_hooks().await;
                    if std::mem::take(&mut self.routing_dirty) {
                        self.reconciler.routing_changed();
                    }
                    drop(timer);
                    self.dump_fdb_if_needed().await;
                }
                batch = peers.recv(), if peers_open => match batch {
                    Some(batch) => self.set_peers(batch).await,
                    None => peers_open = false,
                },
                () = sleep_until(self.fdb_due), if self.fdb_due.is_some() => {
                    self.dump_fdb_if_needed().await;
                }
                Ok(()) = trouble_changed(&mut self.source_trouble) => {}
                _ = resync.tick() => self.resync().await,
                reply = self.health.ping() => {
                    let _ = reply.send(());
                    continue;
                }
                _ = retry.tick() => {
                    self.reconciler.refresh_next_hops(&self.observed).await;
                    self.dump_fdb_if_needed().await;
                }
                _ = tcx.tick() => {
                    if !self.rescan_tcx().await {
                        continue;
                    }
                }
            }
            self.reconciler.publish_generation();
            self.publish();
            self.reconciler.resolve_pending(&self.observed).await;
        }
    }

    async fn set_peers(&mut self, batch: PeerBatch) {
        let _timer = self.reconciles.time(Trigger::Peers);
        let start = Instant::now();
        let routes = self.reconciler.apply_peers(batch, &self.observed).await;
        // A batch that changed nothing (a lease renewed, a Node's other fields) is not
        // what status shows; the first set is, empty or not (the agent's start).
        if routes == 0 && self.last_change.is_some() {
            return;
        }
        self.last_change = Some(AppliedChange {
            routes,
            took_us: micros(start.elapsed()),
            done_unix_us: micros(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
        });
    }

    async fn on_event(&mut self, event: KernelEvent) {
        // A route of any table (hgw's own too: a flow the FIB sent elsewhere while
        // hgw's route was missing must look again) and a link going away or down
        // (IPv4 drops its routes without a word) change what the FIB answers.
        if matches!(event, KernelEvent::Route { .. } | KernelEvent::Link { .. }) {
            self.routing_dirty = true;
        }
        let Some(change) = self.observed.apply(event) else {
            return;
        };
        match change {
            Change::Links => self.write_node_config(),
            Change::Resync => {
                info!(
                    "the uplink or the bridge was created again or came up, or events were lost; resyncing"
                );
                self.routing_dirty = true;
                self.resync().await;
            }
            Change::Routing => self.routing_dirty = true,
            Change::Tc(Some(ifindex)) => {
                self.tc_dirty.insert(ifindex);
            }
            Change::Tc(None) => self.tc_all_dirty = true,
            change => {
                // A new port: its hooks are dumped once hgw is on it.
                if let Change::Port {
                    index,
                    joined: true,
                    ..
                } = change
                {
                    self.tc_dirty.insert(index);
                }
                self.reconciler.on_change(change, &self.observed).await;
            }
        }
    }

    /// Dumps the hooks of the interfaces whose qdiscs or filters changed (all of them
    /// after a shared block's change) and hands what changed to the reconciler.
    async fn rescan_dirty_hooks(&mut self) {
        let all = std::mem::take(&mut self.tc_all_dirty);
        let dirty = std::mem::take(&mut self.tc_dirty);
        if !all && dirty.is_empty() {
            return;
        }
        let ifindexes: Vec<u32> = if all {
            self.observed.hooked()
        } else {
            dirty.into_iter().collect()
        };
        self.scan_hooks(&ifindexes, all).await;
    }

    /// Dumps the hooks of `ifindexes` (`all`: every hooked interface) into the
    /// observed state, and lets the reconciler write the devices map if they changed.
    async fn scan_hooks(&mut self, ifindexes: &[u32], all: bool) {
        let Some(scanner) = &mut self.scanner else {
            return;
        };
        match scanner.scan(ifindexes).await {
            Ok(scanned) => {
                if let Some(change) = self.observed.set_hooks(scanned, all) {
                    self.reconciler.on_change(change, &self.observed).await;
                }
            }
            Err(e) => warn!("{e}"),
        }
    }

    /// Queries the tcx hooks again (no event tells of tcx changes); whether any
    /// changed.
    async fn rescan_tcx(&mut self) -> bool {
        let Some(scanner) = &mut self.scanner else {
            return false;
        };
        match scanner.rescan_tcx(&self.observed.hooks) {
            Ok(changed) if changed.is_empty() => false,
            Ok(changed) => {
                let change = self
                    .observed
                    .set_hooks(changed.into_iter().collect(), false);
                if let Some(change) = change {
                    self.reconciler.on_change(change, &self.observed).await;
                }
                true
            }
            Err(e) => {
                warn!("{e}");
                false
            }
        }
    }

    fn write_node_config(&mut self) {
        self.files.uplink_mtu(self.observed.uplink.mtu);
        match node_config(
            &self.network,
            &self.observed.bridge,
            &self.observed.uplink,
            &self.config,
        ) {
            Ok(node) => self.reconciler.set_node(node, &self.observed),
            Err(e) => warn!("{e}"),
        }
    }

    /// Rebuilds the observed state from dumps, then lets the reconciler compare
    /// everything and write the differences.
    async fn resync(&mut self) {
        let _timer = self.reconciles.time(Trigger::Resync);
        let kernel = &self.kernel;
        match kernel.link(&self.config.uplink).await {
            Ok(Some(uplink)) => self.observed.uplink = uplink,
            Ok(None) => warn!(
                "uplink {} is gone; keeping the last known next hops",
                self.config.uplink
            ),
            Err(e) => warn!("{e}"),
        }
        match kernel.link(&self.config.bridge).await {
            Ok(Some(bridge)) => self.observed.bridge = bridge,
            Ok(None) => warn!("bridge {} is gone", self.config.bridge),
            Err(e) => warn!("{e}"),
        }
        match kernel.prefix_owners().await {
            Ok(prefixes) => self.observed.prefixes = prefixes,
            Err(e) => warn!("{e}"),
        }
        match kernel.neighbours(self.observed.uplink.index).await {
            Ok(neighbours) => self.observed.set_next_hops(neighbours.into_values()),
            Err(e) => warn!("{e}"),
        }
        let bridge = self.observed.bridge.index;
        match (
            kernel.neighbours(bridge).await,
            kernel.learned_macs().await,
            kernel.bridge_ports(bridge).await,
        ) {
            (Ok(neighbours), Ok(learned), Ok(ports)) => {
                self.observed
                    .set_bridge(neighbours.into_values(), learned, ports);
                self.last_fdb_dump = Some(Instant::now());
            }
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => warn!("{e}"),
        }
        self.reconciler.attach(&self.observed);
        // After the attach: hgw's place on each hook is part of what is dumped.
        self.tc_dirty.clear();
        self.tc_all_dirty = false;
        let hooked = self.observed.hooked();
        self.scan_hooks(&hooked, true).await;
        self.write_node_config();
        self.reconciler.resync(&self.observed).await;
    }

    /// A pod the bridge knows but whose port is not known (its forwarding entry was
    /// learned before its neighbour entry appeared): a forwarding dump, when the pod's
    /// search wants one ([`PortSearch`]: a few, with backoff, then none), and at most
    /// every [`FDB_DUMP_EVERY`], whatever the event rate.
    async fn dump_fdb_if_needed(&mut self) {
        let now = Instant::now();
        let missing = self.reconciler.pods_without_port(&self.observed);
        let Some(wanted) = self.port_search.update(missing, now) else {
            self.fdb_due = None;
            return;
        };
        let allowed = self.last_fdb_dump.map_or(now, |at| at + FDB_DUMP_EVERY);
        let due = wanted.max(allowed);
        if due > now {
            // Not yet: the loop waits for it.
            self.fdb_due = Some(due);
            return;
        }
        self.last_fdb_dump = Some(now);
        self.port_search.dumped(now);
        // The next search's turn, if a pod still waits for one.
        self.fdb_due = self.port_search.due();
        match self.kernel.learned_macs().await {
            Ok(learned) => {
                let macs: Vec<[u8; 6]> = self.observed.pods.values().copied().collect();
                let mut changed = Vec::new();
                for (mac, port) in learned {
                    if macs.contains(&mac) && self.observed.fdb.insert(mac, port) != Some(port) {
                        changed.extend(
                            self.observed
                                .pods
                                .iter()
                                .filter(|(_, m)| **m == mac)
                                .map(|(ip, _)| *ip),
                        );
                    }
                }
                if !changed.is_empty() {
                    self.reconciler
                        .on_change(Change::Pods(changed), &self.observed)
                        .await;
                }
            }
            Err(e) => warn!("{e}"),
        }
    }

    /// Publishes what status shows. Never waits: readers take the latest snapshot.
    fn publish(&mut self) {
        let peers_known = self.reconciler.peers_known();
        let status = Status {
            node: self.config.node_name.clone(),
            pod_cidr: Some(self.network.pod_cidr.to_string()),
            pod_cidr_v6: self.network.v6.map(|v6| v6.pod_cidr.to_string()),
            uplink: self.config.uplink.clone(),
            bridge: self.config.bridge.clone(),
            ready: self.reconciler.ready(&self.observed),
            fast_path: self.config.fast_path.name().to_owned(),
            peers: self.reconciler.peer_status(&self.observed),
            counters: Default::default(),
            endpoints: self.reconciler.endpoints(),
            map_entries: self.reconciler.map_entries(),
            waiting: match &self.source_trouble {
                _ if !peers_known => Some("waiting for the first peer set".to_owned()),
                Some(trouble) => trouble.borrow().clone(),
                None => None,
            },
            hooks: match &self.scanner {
                Some(scanner) => self.reconciler.hook_status(&self.observed, scanner.names()),
                None => Vec::new(),
            },
            kernel: self.kernel_status.clone(),
            last_change: self.last_change,
        };
        self.snapshot.send_replace(Arc::new(status));
    }
}

impl RouteTable for Kernel {
    async fn install(
        &self,
        destination: IpNet,
        gateway: IpAddr,
        oif: u32,
        ours_there: bool,
    ) -> Result<(), KernelError> {
        self.install_route(destination, gateway, oif, ours_there)
            .await
    }

    async fn delete(&self, route: HgwRoute) -> Result<(), KernelError> {
        self.delete_route(&route).await
    }

    async fn resolve(&self, oif: u32, ip: IpAddr) -> Result<(), KernelError> {
        self.resolve_neighbour(oif, ip).await
    }
}

impl FastPathMaps for Datapath {
    fn set_config(&mut self, node: NodeConfig) -> Result<(), DatapathError> {
        Datapath::set_config(self, node)
    }

    fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
        Datapath::set_route(self, cidr, next_hop)
    }

    fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        Datapath::remove_route(self, cidr)
    }

    fn set_endpoint(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<(), DatapathError> {
        Datapath::set_endpoint(self, ip, endpoint)
    }

    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        Datapath::remove_endpoint(self, ip)
    }

    fn attach_node(
        &mut self,
        bridge: (&str, u32),
        uplink: (&str, u32),
    ) -> Result<(), DatapathError> {
        Datapath::attach_node(self, bridge, uplink)
    }

    fn attach_port(&mut self, name: &str, index: u32) -> Result<(), DatapathError> {
        Datapath::attach_port(self, name, index)
    }

    fn detach_port(&mut self, index: u32) {
        Datapath::detach_port(self, index);
    }

    fn entries(&self) -> MapEntries {
        (self.routes(), self.endpoints())
    }

    fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        if flags == 0 {
            Datapath::remove_device(self, ifindex)
        } else {
            Datapath::set_device(self, ifindex, flags)
        }
    }

    fn devices(&self) -> Vec<(u32, u32)> {
        Datapath::devices(self)
    }

    fn bump_generation(&mut self) -> Result<(), DatapathError> {
        Datapath::bump_generation(self)
    }
    fn publish_generation(&mut self) -> Result<(), DatapathError> {
        Datapath::publish_generation(self)
    }

    fn own_programs(&self) -> Vec<u32> {
        Datapath::own_programs(self).to_vec()
    }
}

fn first_ipv4(networks: &[IpNet]) -> Option<Ipv4Addr> {
    networks.iter().find_map(|n| match n.addr() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    })
}

/// The node's addresses on interfaces other than the bridge (whose gateway address
/// is inside the pod CIDR by design).
fn other_addresses(addresses: &[(u32, IpNet)], bridge: Option<u32>) -> Vec<IpNet> {
    addresses
        .iter()
        .filter(|(index, _)| Some(*index) != bridge)
        .map(|(_, net)| *net)
        .collect()
}

/// What the programs need to know of this node, with the conntrack timeouts as they
/// are now.
fn node_config(
    network: &Network,
    bridge: &Link,
    uplink: &Link,
    config: &Config,
) -> Result<NodeConfig, ConntrackError> {
    let v6 = network.v6;
    Ok(NodeConfig {
        pod_net_v4: network.pod_cidr.network().octets(),
        pod_mask_v4: network.pod_cidr.netmask().octets(),
        pod_net_v6: v6
            .map(|v6| v6.pod_cidr.network().octets())
            .unwrap_or_default(),
        pod_mask_v6: v6
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
        // Only `established` mode needs conntrack at all; `all` mode caches flows'
        // route verdicts too.
        ct: if config.fast_path == FastPath::Established {
            conntrack::timeouts(config.ct_recheck_ms)?
        } else {
            conntrack::recheck_only(config.ct_recheck_ms)?
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
        if let Some(net) = uplink_networks
            .iter()
            .find(|net| crate::cidr::overlaps(cidr, net.trunc()))
        {
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
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What status says before the agent knows its network: not ready, and why.
fn waiting_status(config: &Config, kernel: Option<KernelStatus>, waiting: String) -> Status {
    Status {
        node: config.node_name.clone(),
        pod_cidr: None,
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
        hooks: Vec::new(),
        kernel,
        last_change: None,
    }
}

/// Says, in status, what the agent waits for now.
fn set_waiting(snapshot: &watch::Sender<Arc<Status>>, waiting: String) {
    snapshot.send_modify(|status| {
        let mut next = Status::clone(status);
        next.waiting = Some(waiting);
        *status = Arc::new(next);
    });
}

/// The status socket (mode 0600), and the network namespace's agent lock.
fn bind_status_socket(config: &Config) -> Result<(UnixListener, AgentLock), AgentError> {
    let path = &config.status_socket;
    let error = |reason: String| AgentError::StatusSocket {
        path: path.display().to_string(),
        reason,
    };
    // The status socket's directory is the agent's runtime directory, which holds its lock.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| error(e.to_string()))?;
    let lock = AgentLock::take(dir)?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(error("another agent is answering on it".into()));
    }
    // A socket left by an agent that is gone; never anything else.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)
                .map_err(|e| error(format!("removing a stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(error(
                "exists and is not a socket: left as it is; remove it or choose another status_socket".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| error(e.to_string()))?;
    // Status names the node's peers and addresses: for root (and the agent's user).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| error(format!("setting mode 0600: {e}")))?;
    Ok((listener, lock))
}

/// How a source that could not start is tried again.
enum Retry {
    /// From 1 s, doubling, up to 30 s, as flanneld retries etcd.
    Backoff,
    /// Every so often: something that comes by itself soon (a Node's pod CIDR).
    Every(Duration),
}

/// A source's `start`, retried while `retry` says how (an error it gives no way is
/// returned): meanwhile the node keeps the routes it has (nothing is swept and no
/// program attached before the source answers) and status says what the agent waits
/// for (`what`). The caller stops waiting on SIGTERM or SIGINT.
async fn wait_for_source<S, E, Fut>(
    what: &str,
    snapshot: &watch::Sender<Arc<Status>>,
    mut start: impl FnMut() -> Fut,
    retry: impl Fn(&E) -> Option<Retry>,
) -> Result<S, AgentError>
where
    Fut: Future<Output = Result<S, E>>,
    E: std::fmt::Display + Into<AgentError>,
{
    let mut backoff = SOURCE_RETRY_FIRST;
    set_waiting(snapshot, format!("waiting for {what}: connecting"));
    loop {
        let error = match start().await {
            Ok(source) => return Ok(source),
            Err(error) => error,
        };
        let wait = match retry(&error) {
            None => return Err(error.into()),
            Some(Retry::Every(wait)) => wait,
            Some(Retry::Backoff) => {
                let wait = backoff;
                backoff = (backoff * 2).min(SOURCE_RETRY_MAX);
                wait
            }
        };
        warn!("{error}; retrying in {wait:?}, routes left as they are");
        set_waiting(snapshot, format!("waiting for {what}: {error}"));
        tokio::time::sleep(wait).await;
    }
}

/// A change of what the source says is wrong; never, without such a source.
async fn trouble_changed(
    trouble: &mut Option<watch::Receiver<Option<String>>>,
) -> Result<(), watch::error::RecvError> {
    match trouble {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}
