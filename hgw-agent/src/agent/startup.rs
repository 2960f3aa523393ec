//! The agent's start: everything checked before anything changes on the node, the
//! source waited for and its network checked, the node set up, the fast path attached,
//! and the loop started.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use hgw_common::loader::KernelFacts;
use ipnet::IpNet;
use log::{error, info, warn};
use tokio::sync::watch;

use super::{
    Agent, AgentError, Reload, Shutdown,
    adapters::node_config,
    desired::{DesiredState, NodeFacts},
    observed::Observed,
    port_search::PortSearch,
    reconcile::Reconciler,
    waiting::{
        Retry, SOURCE_RETRY_FIRST, SocketGuard, bind_status_socket, wait_for_source, waiting_status,
    },
};
use crate::{
    config::{Attach, Config, ConfigError, FastPath, Network, Source, check_peers},
    datapath::{self, Datapath, DatapathError, HookKind},
    kernel::{Kernel, Link, NeighbourLimits, xfrm},
    node::{caps, cni::NodeFiles, conntrack, forwarding, masq, setup},
    serve::{
        http::Health,
        metrics::{self, Reconciles},
        status,
    },
    source::etcd::{self, EtcdError},
    source::kube::{self as kube_source, KubeError},
    tc::Scanner,
};

/// Runs the agent until SIGTERM or SIGINT. Kernel routes stay installed on exit; the
/// programs stay too if pinned (the next agent adopts them), else they are detached.
pub async fn run(mut config: Config, reload: Option<(PathBuf, Reload)>) -> Result<(), AgentError> {
    // IPsec policies are checked once the cluster CIDRs are known, before the attach.
    let mut fast_path_note = step_aside(&mut config, None);
    caps::check(config.fast_path)?;
    let mut kernel = Kernel::connect()?;
    // Everything is checked before anything is changed on the node.
    let uplink = check_interfaces(&kernel, &config).await?;
    // What the kernel offers and how the fast path will use it, decided once.
    let mut fast_path = match crate::datapath::probe::probe(config.fast_path)? {
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
    let mut kernel_status = fast_path.as_ref().map(|(status, ..)| status.clone());
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
        fast_path_note.clone(),
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
    let (peers, checked_peers) = match (peers, config.take_static_peers()) {
        (Some(peers), _) => (peers, None),
        (None, Some(peers)) => {
            // Static peers are the admin's word: one that cannot be reached is a config
            // error, before anything changes on the node. Checked, they are the loop's
            // first set as they are, not sent to be checked again.
            let checked = check_peers(&network, peers, Some(&node))?;
            let changes = crate::source::file::static_peers(reload, config.clone(), &checked);
            (changes, Some(checked))
        }
        (None, None) => unreachable!("every other source has its receiver"),
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
    // Before the attach: once it is done nothing may fail, or the start would leave
    // programs (pinned) or qdiscs behind.
    let events = crate::kernel::subscribe()?;
    // IPVS may have come while the source was waited for.
    if let Some(reason) = step_aside(&mut config, Some(&network)) {
        fast_path = None;
        kernel_status = None;
        fast_path_note = Some(reason);
    }
    let mut forwarding_error = None;
    let forwarding =
        forwarding::read_or_safe(&config.uplink, &config.bridge, &mut forwarding_error);
    let datapath = match fast_path {
        Some((_, hook, facts)) => Some(
            attach_datapath(
                &config,
                (&network, forwarding),
                (&bridge, &uplink),
                (hook, attach, facts),
                &Scanner::new(kernel.handle()),
            )
            .await?,
        ),
        None => {
            clear_fast_path(&config, &kernel).await;
            None
        }
    };
    if let Some(datapath) = &datapath {
        match datapath.counter_reader() {
            Ok(reader) => {
                let _ = counters.set(reader);
            }
            Err(e) => warn!("status will show no counters: {e}"),
        }
    }
    kernel.use_nexthops().await;
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
        checked_peers,
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
        fast_path_note,
        forwarding,
        forwarding_error,
        netfilter: crate::kernel::nftables::Watch::default(),
        netfilter_error: None,
        pod_end_error: None,
    };
    // Every next hop is resolved ahead of traffic: more of them than the kernel's
    // neighbour table keeps is said.
    agent
        .reconciler
        .set_neighbour_limits([NeighbourLimits::read(false), NeighbourLimits::read(true)]);
    std::mem::forget(socket);
    agent.event_loop(events, peers, shutdown).await;
    if agent.config.pin_dir.is_some() && agent.config.fast_path != FastPath::Off {
        info!(
            "shutting down: kernel routes stay, and the pinned fast path keeps forwarding (`hgw-agent uninstall` removes it)"
        );
    } else {
        info!("shutting down: kernel routes stay, fast path detached");
    }
    // The status sender goes with the agent: the metrics server stops taking requests
    // and answers those under way, for as long as a stop may take.
    let server = agent.health.take_server();
    let datapath = agent.reconciler.take_maps();
    let scanner = Scanner::new(agent.kernel.handle());
    drop(agent);
    if let Some(datapath) = datapath {
        datapath.close(&scanner).await;
    }
    if let Some(server) = server
        && tokio::time::timeout(SERVER_STOP, server).await.is_err()
    {
        warn!("metrics: requests still under way after {SERVER_STOP:?} were cut off");
    }
    Ok(())
}

/// How long the metrics server's last requests may hold up the agent's exit.
const SERVER_STOP: Duration = Duration::from_secs(2);

/// The kernel can run `established` mode: its kfuncs and conntrack sysctls are there.
fn check_established() -> Result<KernelFacts, AgentError> {
    let facts = hgw_common::loader::check_kernel(true).map_err(DatapathError::from)?;
    conntrack::timeouts(0)?;
    Ok(facts)
}

/// The fast path runs as `off` beside what makes the kernel decide after routing in a
/// way the programs cannot see: in `established` mode, IPVS (kube-proxy's ipvs mode),
/// whose NAT sets no conntrack NAT bits, so the programs would carry NAT'd replies past
/// the kernel that un-NATs them; in any mode, an IPsec policy over pod traffic, which
/// the kernel applies to forwarded packets and a redirect skips (they would leave
/// unencrypted, or come in unchecked; asked only with the `network`). Switches `config`
/// to `off` and says why, if so.
pub(super) fn step_aside(config: &mut Config, network: Option<&Network>) -> Option<String> {
    if config.fast_path == FastPath::Off {
        return None;
    }
    let reason = if config.fast_path == FastPath::Established && conntrack::ipvs_in_use() {
        format!(
            "IPVS is active in this network namespace ({} lists virtual services: kube-proxy's ipvs mode?); its NAT is invisible to the conntrack checks of the `established` fast path, so the fast path is off and kernel routes carry everything; use kube-proxy's iptables or nftables mode (an agent started without IPVS runs `established` again), or fast_path = \"off\"",
            conntrack::IPVS
        )
    } else if let Some(network) = network {
        let cluster: Vec<IpNet> = network.cluster_cidrs().collect();
        match xfrm::pod_traffic_policy(&cluster) {
            Ok(None) => return None,
            Ok(Some(policy)) => format!(
                "an IPsec (xfrm) {policy} covers pod traffic: the kernel applies it to forwarded packets after routing, which the fast path's redirect would skip, so the fast path is off and kernel routes carry everything (an agent started without such a policy runs the fast path again)"
            ),
            // Unknown is not none: the packets would leave unencrypted.
            Err(e) => format!(
                "{e}; whether a policy covers pod traffic is not known, so the fast path is off and kernel routes carry everything"
            ),
        }
    } else {
        return None;
    };
    error!("{reason}");
    config.fast_path = FastPath::Off;
    Some(reason)
}

/// `off`: hgw's fast path goes from the node's hooks, since it would go on forwarding
/// (pinned programs, cls_bpf filters, which outlive their agent pinned or not), and so
/// do the `clsact` qdiscs hgw added for them where nothing else is left. At start, what
/// an earlier agent left; while running, this agent's own (IPVS came).
pub(super) async fn clear_fast_path(config: &Config, kernel: &Kernel) {
    let taken = datapath::take_off(config.pin_dir.as_deref(), &Scanner::new(kernel.handle())).await;
    match taken.pins {
        Ok(0) => {}
        Ok(n) => info!("fast path off: removed {n} of hgw's pins"),
        Err(e) => warn!(
            "fast path off, but {} could not be cleared: {e}",
            config
                .pin_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
    }
    for (n, what) in [
        (taken.filters, "of hgw's cls_bpf filters"),
        (taken.qdiscs, "clsact qdiscs hgw added"),
    ] {
        if n > 0 {
            info!("fast path off: removed {n} {what}");
        }
    }
    info!("fast path off: kernel routes only");
}

/// The fast path the way `kernel` (the attach and the loader's facts) says. An attach
/// that fails takes off what it put on (unpinned: filters and the qdiscs added for
/// them; pinned, what is attached stays for the next agent, as on any stop).
async fn attach_datapath(
    config: &Config,
    (network, forwarding): (&Network, forwarding::Forwarding),
    (bridge, uplink): (&Link, &Link),
    (hook, attach, facts): (HookKind, Attach, KernelFacts),
    scanner: &Scanner,
) -> Result<Datapath, AgentError> {
    if config.fast_path == FastPath::Established {
        conntrack::ensure_tracking()?;
    }
    let node = node_config(network, (bridge, uplink), config, forwarding)?;
    let mut datapath = Datapath::load(
        &config.bridge,
        &config.uplink,
        node,
        attach,
        (hook, facts),
        config.pin_dir.as_deref(),
    )?;
    if let Err(e) = datapath.attach_node(
        (&config.bridge, bridge.index),
        (&config.uplink, uplink.index),
    ) {
        datapath.close(scanner).await;
        return Err(e.into());
    }
    let to_peer = match attach {
        Attach::Bridge => format!("{} ingress", config.bridge),
        Attach::Ports => format!("ingress of each port of {}", config.bridge),
    };
    info!(
        "fast path ({}) attached: {to_peer} -> peers, {} ingress -> pods",
        config.fast_path.name(),
        config.uplink
    );
    Ok(datapath)
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
