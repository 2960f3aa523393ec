//! The loop: kernel events, peer changes, the periodic resync and retries, each
//! handed to the observed state and the reconciler, and the status published after
//! every pass.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use hgw_common::status::AppliedChange;
use log::{info, warn};
use tokio::sync::watch;

use super::{
    Agent, Shutdown,
    adapters::node_config,
    desired::DesiredState,
    observed::Change,
    sources::{PeerBatch, PeerReceiver},
    startup::{clear_fast_path, step_aside},
};
use crate::{
    kernel::{KernelEvent, Link, RouteKey, RouteOwner, nftables},
    node::forwarding,
    serve::{metrics::Trigger, status::Status},
    tc::Scanner,
};

/// The backstop: everything is compared with the kernel this often.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
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

/// Peers for the reconciler: what a source sent, or a whole set already checked into a
/// desired state (the static peers at the start).
enum Peers {
    Sent(PeerBatch),
    Checked(Box<DesiredState>),
}

impl Agent {
    pub(super) async fn event_loop(
        &mut self,
        mut events: crate::kernel::KernelEvents,
        mut peers: PeerReceiver,
        mut shutdown: Shutdown,
    ) {
        // Subscribed first, then dumped: nothing falls between the two.
        self.resync().await;
        // The first set, checked at the start (the static peers) or already sent:
        // applied at once.
        if let Some(checked) = self.checked_peers.take() {
            self.set_peers(Peers::Checked(Box::new(checked))).await;
        } else if let Some(batch) = peers.try_recv() {
            self.set_peers(Peers::Sent(batch)).await;
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
                    Some(batch) => self.set_peers(Peers::Sent(batch)).await,
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
                    if !self.stop_fast_path_if_needed().await {
                        // Each every second, whatever the others found.
                        let silent = self.poll_silent().await;
                        let netfilter = self.reread_netfilter(false).await;
                        if !(silent | netfilter | self.reread_forwarding()) {
                            continue;
                        }
                    }
                }
            }
            self.reconciler.publish_generation();
            self.publish();
            self.reconciler.resolve_pending(&self.observed).await;
        }
    }

    async fn set_peers(&mut self, peers: Peers) {
        let timer = self.reconciles.time(Trigger::Peers);
        let routes = match peers {
            Peers::Sent(batch) => self.reconciler.apply_peers(batch, &self.observed).await,
            Peers::Checked(state) => {
                self.reconciler
                    .apply_checked_peers(*state, &self.observed)
                    .await
            }
        };
        // A batch that changed nothing (a lease renewed, a Node's other fields) is not
        // what status shows; the first set is, empty or not (the agent's start).
        if routes == 0 && self.last_change.is_some() {
            return;
        }
        self.last_change = Some(AppliedChange {
            routes,
            took_us: micros(timer.elapsed()),
            done_unix_us: micros(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
        });
    }

    async fn on_event(&mut self, event: KernelEvent) {
        // The route on it went too, silently for IPv4: as if it were deleted.
        let event = match event {
            KernelEvent::NexthopDeleted { id } => match self.kernel.route_on_nexthop(id) {
                Some(destination) => KernelEvent::Route {
                    destination,
                    owner: RouteOwner::Hgw {
                        gateway: None,
                        oif: None,
                    },
                    // Any: hgw's route goes whatever its key.
                    key: RouteKey::default(),
                    deleted: true,
                    replaced: false,
                },
                None => return,
            },
            other => other,
        };
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
            Change::Links => {
                self.write_node_config();
                // The bridge's VLAN filtering may have changed with it.
                self.reconciler
                    .on_change(Change::Hooks, &self.observed)
                    .await;
            }
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
                // A new port: its hooks are dumped once hgw is on it, and its pod's end
                // is read at once (until then its pod gets packets through the bridge).
                let joined = matches!(change, Change::Port { joined: true, .. });
                if let Change::Port { index, .. } = change
                    && joined
                {
                    self.tc_dirty.insert(index);
                }
                self.reconciler.on_change(change, &self.observed).await;
                if joined {
                    self.reread_pod_ends().await;
                }
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

    /// Where IPVS came in `established` mode (kube-proxy switched to its ipvs mode), or
    /// an IPsec policy over pod traffic ([`step_aside`]): the fast path goes, as with
    /// `off`, and kernel routes carry everything until an agent starts without them;
    /// status says why. Whether it went.
    async fn stop_fast_path_if_needed(&mut self) -> bool {
        let Some(reason) = step_aside(&mut self.config, Some(&self.network)) else {
            return false;
        };
        if let Some(datapath) = self.reconciler.take_maps() {
            datapath.close(&Scanner::new(self.kernel.handle())).await;
        }
        // Pinned, the links, filters and qdiscs stayed with the pins: they go now.
        clear_fast_path(&self.config, &self.kernel).await;
        self.fast_path_note = Some(reason);
        self.scanner = None;
        // Nothing of the kernel's offer is used any more, as in `off`.
        self.kernel_status = None;
        true
    }

    /// Reads again, each second, what changes without an event: the tcx programs of
    /// the hooked interfaces, the bridge's XDP program (one attached through a BPF link
    /// sends none) and the pods' ends of the ports' veths (a pod's changes to its own
    /// interface send no event to this namespace). One change of the hooks for all of
    /// them; whether there was one.
    async fn poll_silent(&mut self) -> bool {
        let Some(scanner) = &mut self.scanner else {
            return false;
        };
        let tcx = scanner
            .rescan_tcx(&self.observed.hooks)
            .unwrap_or_else(|e| {
                warn!("{e}");
                Vec::new()
            });
        let bridge_xdp = match self.kernel.link(&self.config.bridge).await {
            // Another index: a bridge made again, which its events bring.
            Ok(Some(link)) if link.index == self.observed.bridge.index => Some(link.xdp),
            Ok(_) => None,
            Err(e) => {
                warn!("{e}");
                None
            }
        };
        let pod_ends = self.read_pod_ends().await;
        let Some(change) = self.observed.set_polled(tcx, bridge_xdp, pod_ends) else {
            return false;
        };
        self.reconciler.on_change(change, &self.observed).await;
        true
    }

    /// The pods' ends read again at once (a port joined, a resync), as
    /// [`Self::poll_silent`] reads them each second.
    async fn reread_pod_ends(&mut self) {
        if self.scanner.is_none() {
            return;
        }
        let ends = self.read_pod_ends().await;
        if let Some(change) = self.observed.set_pod_ends(ends) {
            self.reconciler.on_change(change, &self.observed).await;
        }
    }

    /// The pods' ends of the ports' veths (their MTU, a native XDP program), by port.
    /// An end that cannot be read keeps what was read of it last (one never read sends
    /// its pod's packets through the bridge), and the reason is said once.
    async fn read_pod_ends(&mut self) -> HashMap<u32, Link> {
        let peers: Vec<(u32, (i32, u32))> = self
            .observed
            .port_settings
            .iter()
            .filter_map(|(port, settings)| Some((*port, settings.peer?)))
            .collect();
        let mut ends = HashMap::with_capacity(peers.len());
        let mut error = None;
        for (port, (nsid, index)) in peers {
            match self.kernel.link_in(nsid, index).await {
                Ok(Some(end)) => {
                    ends.insert(port, end);
                }
                Ok(None) => {}
                Err(e) => {
                    error = Some(e.to_string());
                    if let Some(known) = self.observed.pod_ends.get(&port) {
                        ends.insert(port, *known);
                    }
                }
            }
        }
        if error != self.pod_end_error {
            match &error {
                Some(e) => warn!(
                    "{e}; the pods whose end of their veth cannot be read get their packets through the bridge"
                ),
                None => info!("the pods' ends of their veths can be read again"),
            }
            self.pod_end_error = error;
        }
        ends
    }

    /// Reads nftables' hooks again if the ruleset changed (`force`: anyway) and lets
    /// the reconciler write the devices map if a hooked interface's changed; whether
    /// one did. Tried three times (a dump the ruleset's change interrupted fails);
    /// while they cannot be read, a chain is assumed on every hook (said once).
    async fn reread_netfilter(&mut self, force: bool) -> bool {
        if self.scanner.is_none() {
            return false;
        }
        let mut read = self.netfilter.changed(force);
        for _ in 0..2 {
            if read.is_ok() {
                break;
            }
            read = self.netfilter.changed(true);
        }
        let hooks = match read {
            Ok(hooks) => {
                if self.netfilter_error.take().is_some() {
                    info!("the nftables hooks can be read again");
                }
                hooks
            }
            Err(e) => {
                let e = e.to_string();
                if self.netfilter_error.as_ref() != Some(&e) {
                    warn!(
                        "{e}; until they can be read, the fast path leaves to the kernel what it would send past any interface's netfilter hooks"
                    );
                    self.netfilter_error = Some(e.clone());
                }
                Some(nftables::unknown(&e))
            }
        };
        let Some(change) = hooks.and_then(|hooks| self.observed.set_netfilter(hooks)) else {
            return false;
        };
        self.reconciler.on_change(change, &self.observed).await;
        true
    }

    /// Reads the forwarding sysctls again (no event tells of a sysctl change) and gives
    /// the programs a change; whether there was one.
    fn reread_forwarding(&mut self) -> bool {
        if self.scanner.is_none() {
            return false;
        }
        let now = forwarding::read_or_safe(
            &self.config.uplink,
            &self.config.bridge,
            &mut self.forwarding_error,
        );
        if now == self.forwarding {
            return false;
        }
        let before = std::mem::replace(&mut self.forwarding, now);
        if !self.write_node_config() {
            // Not given to the programs: the next second tries again.
            self.forwarding = before;
            return false;
        }
        info!(
            "rp_filter is now {} on {} and {} on {}, ip_forward_update_priority {}, IPv6 {}: the fast path does so",
            forwarding::name(now.rp_filter[0]),
            self.config.uplink,
            forwarding::name(now.rp_filter[1]),
            self.config.bridge,
            u8::from(now.update_priority),
            if now.ipv6_forwarded() {
                "forwarded"
            } else {
                "disabled on either"
            },
        );
        true
    }

    /// Gives the programs the node's config as observed; whether they have it.
    fn write_node_config(&mut self) -> bool {
        self.files.uplink_mtu(self.observed.uplink.mtu);
        match node_config(
            &self.network,
            (&self.observed.bridge, &self.observed.uplink),
            &self.config,
            self.forwarding,
        ) {
            Ok(node) => self.reconciler.set_node(node, &self.observed),
            Err(e) => {
                warn!("{e}");
                false
            }
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
            kernel.bridge_view(bridge).await,
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
        self.reread_netfilter(true).await;
        self.reread_pod_ends().await;
        self.write_node_config();
        self.reconciler.resync(&self.observed).await;
    }

    /// A pod the bridge knows but whose port is not known (its forwarding entry was
    /// learned before its neighbour entry appeared): a forwarding dump, when the pod's
    /// search wants one ([`PortSearch`]: a few, with backoff, then none), and at most
    /// every [`FDB_DUMP_EVERY`], whatever the event rate.
    ///
    /// [`PortSearch`]: super::port_search::PortSearch
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
            fast_path_note: self.fast_path_note.clone(),
            rp_filter: if self.scanner.is_some() {
                [&self.config.uplink, &self.config.bridge]
                    .into_iter()
                    .zip(self.forwarding.rp_filter)
                    .map(|(interface, mode)| (interface.clone(), forwarding::name(mode).to_owned()))
                    .collect()
            } else {
                Default::default()
            },
            ipv6_disabled: if self.scanner.is_some() && self.network.v6.is_some() {
                [&self.config.uplink, &self.config.bridge]
                    .into_iter()
                    .zip(self.forwarding.ipv6_disabled)
                    .filter(|(_, disabled)| *disabled)
                    .map(|(interface, _)| interface.clone())
                    .collect()
            } else {
                Vec::new()
            },
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

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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
