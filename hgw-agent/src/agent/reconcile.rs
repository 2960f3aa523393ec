//! The reconciler: the only writer to kernel routes and fast-path maps. It brings them
//! to the desired state, given what is observed, touching only what differs: a peer
//! change writes that peer's route and map entry, an event the entries it concerns,
//! and the periodic resync compares everything and writes the differences.
//!
//! It works against two small traits, [`RouteTable`] and [`FastPathMaps`], so its logic
//! is unit-tested without root.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
};

use futures::StreamExt as _;
use hgw_common::{Endpoint, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig};
use ipnet::IpNet;
use log::{Level, debug, info, log, warn};

use super::{
    desired::{Delta, DesiredState},
    observed::{Change, Observed},
    sources::PeerBatch,
};
use crate::{
    datapath::DatapathError,
    kernel::{HgwRoute, KernelError, PrefixOwners, format_mac},
    serve::status::{HookStatus, PeerStatus},
    tc::Role,
};

/// How many route requests are in flight at once: the kernel answers them in order,
/// and waiting for each before sending the next is what makes one-by-one slow.
const IN_FLIGHT: usize = 64;

/// Up to this many new routes in one pass are each named at info; more (a first peer set
/// of thousands) are summed up in one info line and named at debug, since a log line
/// per route is a write per route.
const LOG_EACH_UP_TO: usize = 32;

/// The level that names each of `count` routes written in one pass.
fn each_level(count: usize) -> Level {
    if count <= LOG_EACH_UP_TO {
        Level::Info
    } else {
        Level::Debug
    }
}

/// The kernel's main routing table, and its neighbour resolution.
pub trait RouteTable {
    /// Installs hgw's route, exclusively unless `ours_there` (see `Kernel::install_route`).
    fn install(
        &self,
        destination: IpNet,
        gateway: IpAddr,
        oif: u32,
        ours_there: bool,
    ) -> impl Future<Output = Result<(), KernelError>>;
    /// Deletes hgw's route (only a route with hgw's tag can match).
    fn delete(&self, route: HgwRoute) -> impl Future<Output = Result<(), KernelError>>;
    /// Asks the kernel to resolve (or re-confirm) a next hop.
    fn resolve(&self, oif: u32, ip: IpAddr) -> impl Future<Output = Result<(), KernelError>>;
}

/// What the route and endpoint maps hold.
pub type MapEntries = (Vec<(IpNet, NextHop)>, Vec<(IpAddr, Endpoint)>);

/// The fast path's maps and attachments.
pub trait FastPathMaps {
    fn set_config(&mut self, node: NodeConfig) -> Result<(), DatapathError>;
    fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError>;
    fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError>;
    fn set_endpoint(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<(), DatapathError>;
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    /// Puts the programs on the bridge and the uplink (again, if they were made again).
    fn attach_node(
        &mut self,
        bridge: (&str, u32),
        uplink: (&str, u32),
    ) -> Result<(), DatapathError>;
    /// With `--attach ports`: the program on a bridge port, or off it.
    fn attach_port(&mut self, name: &str, index: u32) -> Result<(), DatapathError>;
    fn detach_port(&mut self, index: u32);
    /// What the route and endpoint maps hold now: an earlier agent's entries when the
    /// maps are pinned.
    fn entries(&self) -> MapEntries;
    /// Sets an interface's `DEVICE_*` bits; 0 removes its entry.
    fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError>;
    /// What the devices map holds now.
    fn devices(&self) -> Vec<(u32, u32)>;
    /// Makes every cached flow stale, with no map write (the kernel's routing changed).
    fn bump_generation(&mut self) -> Result<(), DatapathError>;
    /// Makes the writes since the last call visible to cached flows (one generation
    /// change for all of them).
    fn publish_generation(&mut self) -> Result<(), DatapathError>;
    /// The ids of hgw's own programs.
    fn own_programs(&self) -> Vec<u32>;
}

/// What is known of one desired route in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RouteState {
    Installed,
    /// Someone else's route holds the prefix (its protocol): left alone, and kept out
    /// of the fast path, which must not contradict the kernel's route.
    Foreign(String),
    Failed,
}

pub struct Reconciler<R, M> {
    routes: R,
    maps: Option<M>,
    /// Ports mode: the programs follow the bridge's ports.
    follow_ports: bool,
    desired: DesiredState,
    /// Desired prefixes by next hop, for neighbour events.
    by_hop: HashMap<IpAddr, Vec<IpNet>>,
    /// The source has given its first whole peer set: until then nothing is swept (an
    /// empty set is not yet the truth, and a restart must not delete routes in use).
    peers_known: bool,
    state: HashMap<IpNet, RouteState>,
    /// What status shows of the peers, made again only after something it shows
    /// changed (`None`): most loop passes (a pod, a tc hook, a route's own echo)
    /// change nothing of it.
    peer_status: Option<Vec<PeerStatus>>,
    /// What the fast path's route map holds.
    map: HashMap<IpNet, NextHop>,
    /// What the endpoint map holds: local pods for direct delivery.
    endpoints: HashMap<IpAddr, Endpoint>,
    /// What the devices map holds: ifindex -> `DEVICE_*` bits, never 0.
    devices: HashMap<u32, u32>,
    /// Per hooked interface, the other tcx programs running before hgw's that were
    /// last warned about.
    warned_before: HashMap<u32, Vec<u32>>,
    /// New next hops to ask the kernel for, once the routes and map entries that need
    /// them are written and published ([`Reconciler::resolve_pending`]).
    pending_resolve: HashSet<IpAddr>,
}

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
    pub fn new(routes: R, maps: Option<M>, follow_ports: bool, desired: DesiredState) -> Self {
        // Entries already in the maps (pinned ones) are known, so that the ones no peer
        // wants go once the source has spoken, and the rest cost no write.
        let (map, endpoints) = maps.as_ref().map(M::entries).unwrap_or_default();
        let devices = maps.as_ref().map(M::devices).unwrap_or_default();
        Self {
            routes,
            maps,
            follow_ports,
            desired,
            by_hop: HashMap::new(),
            peers_known: false,
            state: HashMap::new(),
            peer_status: None,
            map: map.into_iter().collect(),
            endpoints: endpoints.into_iter().collect(),
            devices: devices.into_iter().collect(),
            warned_before: HashMap::new(),
            pending_resolve: HashSet::new(),
        }
    }

    pub fn peers_known(&self) -> bool {
        self.peers_known
    }

    pub fn map_entries(&self) -> usize {
        self.map.len()
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    pub fn routes_installed(&self) -> usize {
        self.state
            .values()
            .filter(|s| **s == RouteState::Installed)
            .count()
    }

    /// Takes what a source sent: the desired state follows it change by change, and
    /// only the routes and map entries it changed are written. A whole set (the first,
    /// or a relist) also sweeps whatever hgw holds that no peer wants.
    /// Returns how many pod CIDRs the batch added, moved or removed.
    pub async fn apply_peers(&mut self, batch: PeerBatch, observed: &Observed) -> usize {
        let (delta, whole) = match batch {
            PeerBatch::All(peers) => (self.desired.replace_all(peers), true),
            PeerBatch::Changes(changes) => (self.desired.apply(changes), false),
        };
        let routes = delta.changed.len() + delta.removed.len();
        self.apply_delta(delta, whole, observed).await;
        routes
    }

    async fn apply_delta(&mut self, delta: Delta, whole: bool, observed: &Observed) {
        for skipped in &delta.skipped {
            let cidrs: Vec<String> = skipped.pod_cidrs.iter().map(|c| c.to_string()).collect();
            warn!(
                "peer {} ({}): {}; no route or map entry for {}",
                skipped.peer,
                skipped.source,
                skipped.reason,
                cidrs.join(", ")
            );
        }
        let level = each_level(delta.changed.len());
        for (cidr, old) in &delta.changed {
            let hop = &self.desired.routes[cidr];
            let node_ip = hop.node_ip;
            if old.is_none() {
                log!(
                    level,
                    "peer {} ({}): {cidr} via {node_ip}",
                    hop.peer,
                    hop.source,
                );
            }
            if let Some(old) = old {
                self.unindex(*old, *cidr);
            }
            self.by_hop.entry(node_ip).or_default().push(*cidr);
        }
        if level != Level::Info {
            info!("{} peer routes new or changed", delta.changed.len());
        }
        for (cidr, hop) in &delta.removed {
            info!(
                "peer {} ({}) is gone: removing {cidr} via {}",
                hop.peer, hop.source, hop.node_ip
            );
            self.state.remove(cidr);
            self.peer_status = None;
            self.unindex(hop.node_ip, *cidr);
        }
        if !delta.changed.is_empty() || !delta.removed.is_empty() {
            self.peer_status = None;
        }
        let first = !self.peers_known;
        self.peers_known = true;
        // The new next hops are asked for next (the others every few seconds).
        let new_hops = delta
            .changed
            .iter()
            .filter_map(|(cidr, _)| self.desired.routes.get(cidr))
            .map(|hop| hop.node_ip)
            .filter(|ip| observed.next_hops.get(ip).is_none_or(|n| n.mac.is_none()));
        self.pending_resolve.extend(new_hops);
        let changed: Vec<IpNet> = delta.changed.iter().map(|(cidr, _)| *cidr).collect();
        self.install(changed, observed).await;
        if whole {
            self.remove_unwanted(observed).await;
        } else {
            let gone: Vec<IpNet> = delta.removed.iter().map(|(cidr, _)| *cidr).collect();
            self.remove_gone(gone, observed).await;
        }
        if first {
            // Before the first set nothing was written to the map: write every entry.
            self.write_all_map_entries(observed);
        }
    }

    /// `cidr` no longer goes via `ip`.
    fn unindex(&mut self, ip: IpAddr, cidr: IpNet) {
        if let Some(cidrs) = self.by_hop.get_mut(&ip) {
            cidrs.retain(|c| *c != cidr);
            if cidrs.is_empty() {
                self.by_hop.remove(&ip);
            }
        }
    }

    /// Asks the kernel for the next hops new since the last call that are still wanted
    /// and unknown. Called after the status is published: thousands of neighbour
    /// requests (each an ARP or NS sent) wait behind the routes, not in front of them.
    pub async fn resolve_pending(&mut self, observed: &Observed) {
        if self.pending_resolve.is_empty() {
            return;
        }
        let ips: Vec<IpAddr> = std::mem::take(&mut self.pending_resolve)
            .into_iter()
            .filter(|ip| self.by_hop.contains_key(ip))
            .filter(|ip| observed.next_hops.get(ip).is_none_or(|n| n.mac.is_none()))
            .collect();
        self.resolve(ips, observed).await;
    }

    /// Compares everything with what the kernel holds now (`observed`, fresh from
    /// dumps) and writes only the differences.
    pub async fn resync(&mut self, observed: &Observed) {
        // The next hops' MACs may have changed in the dumps.
        self.peer_status = None;
        let mut install = Vec::new();
        let mut foreign = Vec::new();
        for (cidr, hop) in &self.desired.routes {
            let want = (Some(hop.node_ip), Some(observed.uplink.index));
            match observed.prefixes.get(cidr) {
                Some(PrefixOwners {
                    ours: Some(ours), ..
                }) if *ours == want => {
                    self.state.insert(*cidr, RouteState::Installed);
                }
                Some(PrefixOwners {
                    ours: None,
                    foreign: Some(protocol),
                }) => foreign.push((*cidr, protocol.clone())),
                _ => install.push(*cidr),
            }
        }
        for (cidr, protocol) in foreign {
            self.note_foreign(cidr, protocol);
        }
        self.install(install, observed).await;
        self.remove_unwanted(observed).await;
        self.write_all_map_entries(observed);
        self.sync_all_endpoints(observed);
        self.sync_devices(observed);
        self.resolve_unresolved(observed).await;
    }

    /// Next hops without a MAC: the kernel is asked to resolve them.
    async fn resolve_unresolved(&self, observed: &Observed) {
        let ips: Vec<IpAddr> = self
            .by_hop
            .keys()
            .filter(|ip| observed.next_hops.get(ip).is_none_or(|n| n.mac.is_none()))
            .copied()
            .collect();
        self.resolve(ips, observed).await;
    }

    /// Acts on what one kernel event changed.
    pub async fn on_change(&mut self, change: Change, observed: &Observed) {
        match change {
            Change::NextHop { ip, deleted } => {
                let cidrs = self.by_hop.get(&ip).cloned().unwrap_or_default();
                if !cidrs.is_empty() {
                    // Status shows each next hop's MAC.
                    self.peer_status = None;
                }
                let mac = |m: Option<[u8; 6]>| m.map_or("unresolved".into(), format_mac);
                let old = cidrs
                    .iter()
                    .find_map(|c| self.map.get(c))
                    .map(|h| (h.flags & NEXT_HOP_MAC_KNOWN != 0).then_some(h.dst_mac));
                let new = observed.next_hops.get(&ip).and_then(|n| n.mac);
                if let (Some(old), Some(hop)) =
                    (old, cidrs.first().and_then(|c| self.desired.routes.get(c)))
                    && old != new
                {
                    info!("next hop {} ({ip}): {} -> {}", hop.peer, mac(old), mac(new));
                }
                for cidr in cidrs {
                    self.write_map_entry(cidr, observed);
                }
                if deleted && self.by_hop.contains_key(&ip) {
                    self.resolve(vec![ip], observed).await;
                }
            }
            Change::Prefix(cidr) => self.on_prefix(cidr, observed).await,
            Change::Pods(ips) => {
                for ip in ips {
                    self.sync_endpoint(ip, observed);
                }
            }
            Change::Port {
                index,
                name,
                joined,
            } => {
                if self.follow_ports
                    && let Some(maps) = &mut self.maps
                {
                    if joined {
                        match maps.attach_port(&name, index) {
                            Ok(()) => debug!("fast path on bridge port {name}"),
                            Err(e) => warn!("bridge port {name}: {e}"),
                        }
                    } else {
                        maps.detach_port(index);
                    }
                }
                let on_port: Vec<IpAddr> = self
                    .endpoints
                    .iter()
                    .filter(|(_, e)| e.ifindex == index)
                    .map(|(ip, _)| *ip)
                    .chain(observed.pods.keys().copied())
                    .collect();
                for ip in on_port {
                    self.sync_endpoint(ip, observed);
                }
                // A port gone takes its devices entry along.
                self.sync_devices(observed);
            }
            Change::Hooks => self.sync_devices(observed),
            Change::Routing => self.routing_changed(),
            // The caller writes the node config and redoes the rest, or (tc) dumps the
            // interface's hooks again.
            Change::Links | Change::Resync | Change::Tc(_) => {}
        }
    }

    /// A prefix's owners changed: hgw's route deleted (reinstall), someone else's put
    /// on it (step aside), someone else's gone (take it).
    async fn on_prefix(&mut self, cidr: IpNet, observed: &Observed) {
        let Some(hop) = self.desired.routes.get(&cidr) else {
            return;
        };
        let owners = observed.prefixes.get(&cidr).cloned().unwrap_or_default();
        let want = (Some(hop.node_ip), Some(observed.uplink.index));
        match (&owners.ours, &owners.foreign, self.state.get(&cidr)) {
            (Some(ours), _, _) if *ours == want => {
                self.set_state(cidr, RouteState::Installed);
            }
            (None, Some(protocol), _) => self.note_foreign(cidr, protocol.clone()),
            (None, None, Some(RouteState::Foreign(_))) => {
                info!(
                    "the foreign route to {cidr} is gone; installing hgw's ({})",
                    hop.peer
                );
                self.install(vec![cidr], observed).await;
            }
            (None, None, _) => {
                warn!(
                    "route to {cidr} ({}) was deleted; reinstalling it",
                    hop.peer
                );
                self.install(vec![cidr], observed).await;
            }
            (Some(_), _, _) => self.install(vec![cidr], observed).await,
        }
    }

    fn set_state(&mut self, cidr: IpNet, state: RouteState) {
        if self.state.get(&cidr) != Some(&state) {
            self.state.insert(cidr, state);
            self.peer_status = None;
        }
    }

    fn note_foreign(&mut self, cidr: IpNet, protocol: String) {
        let previous = self
            .state
            .insert(cidr, RouteState::Foreign(protocol.clone()));
        self.peer_status = None;
        if !matches!(previous, Some(RouteState::Foreign(_))) {
            let peer = self.desired.routes.get(&cidr).map(|h| h.peer.as_str());
            warn!(
                "peer {}: {}",
                peer.unwrap_or_default(),
                KernelError::ForeignRoute {
                    destination: cidr,
                    protocol,
                }
            );
        }
        self.remove_map_entry(cidr);
    }

    /// Installs the routes to `cidrs`, many requests in flight at once.
    async fn install(&mut self, cidrs: Vec<IpNet>, observed: &Observed) {
        let oif = observed.uplink.index;
        let jobs: Vec<(IpNet, IpAddr, bool)> = cidrs
            .into_iter()
            .filter_map(|cidr| {
                let hop = self.desired.routes.get(&cidr)?;
                let ours_there = observed
                    .prefixes
                    .get(&cidr)
                    .is_some_and(|o| o.ours.is_some() && o.foreign.is_none());
                Some((cidr, hop.node_ip, ours_there))
            })
            .collect();
        if jobs.is_empty() {
            return;
        }
        let routes = &self.routes;
        let results: Vec<(IpNet, IpAddr, Result<(), KernelError>)> = futures::stream::iter(jobs)
            .map(|(cidr, gateway, ours_there)| async move {
                (
                    cidr,
                    gateway,
                    routes.install(cidr, gateway, oif, ours_there).await,
                )
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let level = each_level(results.len());
        let mut installed = 0;
        for (cidr, gateway, result) in results {
            match result {
                Ok(()) => {
                    let peer = self.desired.routes.get(&cidr).map(|h| h.peer.clone());
                    if self.state.get(&cidr) != Some(&RouteState::Installed) {
                        log!(
                            level,
                            "route {cidr} via {gateway} dev {} ({})",
                            observed.uplink_name,
                            peer.unwrap_or_default()
                        );
                    }
                    self.set_state(cidr, RouteState::Installed);
                    self.write_map_entry(cidr, observed);
                    installed += 1;
                }
                Err(KernelError::ForeignRoute { protocol, .. }) => {
                    self.note_foreign(cidr, protocol)
                }
                Err(e) => {
                    warn!("{e}");
                    self.set_state(cidr, RouteState::Failed);
                }
            }
        }
        if level != Level::Info {
            info!("{installed} routes installed on {}", observed.uplink_name);
        }
    }

    /// The routes and map entries of pod CIDRs no peer wants any more (the stale scan
    /// of what changed only).
    async fn remove_gone(&mut self, gone: Vec<IpNet>, observed: &Observed) {
        let routes: Vec<HgwRoute> = gone
            .iter()
            .filter(|cidr| !self.desired.routes.contains_key(cidr))
            .filter_map(|cidr| {
                let (gateway, oif) = observed.prefixes.get(cidr)?.ours?;
                Some(HgwRoute {
                    destination: *cidr,
                    gateway,
                    oif,
                })
            })
            .collect();
        self.delete_routes(routes).await;
        for cidr in gone {
            if !self.takes(cidr) {
                self.remove_map_entry(cidr);
            }
        }
    }

    /// hgw's routes and map entries no desired route wants: left by an earlier run or
    /// a removed peer. Nothing goes before the first whole peer set.
    async fn remove_unwanted(&mut self, observed: &Observed) {
        if !self.peers_known {
            return;
        }
        let uplink = observed.uplink.index;
        let unwanted: Vec<HgwRoute> = observed
            .prefixes
            .iter()
            .filter_map(|(cidr, owners)| {
                let (gateway, oif) = owners.ours?;
                let wanted = self
                    .desired
                    .routes
                    .get(cidr)
                    .is_some_and(|hop| gateway == Some(hop.node_ip) && oif == Some(uplink));
                (!wanted && !self.desired.routes.contains_key(cidr)).then_some(HgwRoute {
                    destination: *cidr,
                    gateway,
                    oif,
                })
            })
            .collect();
        self.delete_routes(unwanted).await;
        let stale: Vec<IpNet> = self
            .map
            .keys()
            .filter(|cidr| !self.takes(**cidr))
            .copied()
            .collect();
        for cidr in stale {
            self.remove_map_entry(cidr);
        }
    }

    async fn delete_routes(&self, unwanted: Vec<HgwRoute>) {
        let routes = &self.routes;
        let results: Vec<(IpNet, Result<(), KernelError>)> = futures::stream::iter(unwanted)
            .map(|route| async move { (route.destination, routes.delete(route).await) })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (cidr, result) in results {
            match result {
                Ok(()) => info!("removed stale hgw route to {cidr}"),
                Err(e) => warn!("{e}"),
            }
        }
    }

    /// Whether the fast path carries `cidr`: desired, and not held by someone else.
    fn takes(&self, cidr: IpNet) -> bool {
        self.desired.routes.contains_key(&cidr)
            && !matches!(self.state.get(&cidr), Some(RouteState::Foreign(_)))
    }

    fn next_hop(&self, cidr: IpNet, observed: &Observed) -> Option<NextHop> {
        let hop = self.desired.routes.get(&cidr)?;
        let mac = observed.next_hops.get(&hop.node_ip).and_then(|n| n.mac);
        Some(NextHop {
            ifindex: observed.uplink.index,
            mtu: observed.uplink.mtu,
            dst_mac: mac.unwrap_or_default(),
            src_mac: observed.uplink.mac,
            flags: if mac.is_some() { NEXT_HOP_MAC_KNOWN } else { 0 },
        })
    }

    fn write_map_entry(&mut self, cidr: IpNet, observed: &Observed) {
        if !self.takes(cidr) {
            return;
        }
        let Some(next_hop) = self.next_hop(cidr, observed) else {
            return;
        };
        let Some(maps) = &mut self.maps else { return };
        if self.map.get(&cidr) == Some(&next_hop) {
            return;
        }
        match maps.set_route(cidr, next_hop) {
            Ok(()) => {
                self.map.insert(cidr, next_hop);
            }
            Err(e) => warn!("{e}"),
        }
    }

    fn remove_map_entry(&mut self, cidr: IpNet) {
        let Some(maps) = &mut self.maps else { return };
        if !self.map.contains_key(&cidr) {
            return;
        }
        match maps.remove_route(cidr) {
            Ok(()) => {
                self.map.remove(&cidr);
            }
            Err(e) => warn!("{e}"),
        }
    }

    fn write_all_map_entries(&mut self, observed: &Observed) {
        if !self.peers_known {
            return;
        }
        let cidrs: Vec<IpNet> = self.desired.routes.keys().copied().collect();
        for cidr in cidrs {
            self.write_map_entry(cidr, observed);
        }
    }

    /// The node's MACs or MTU changed: the programs' config and every next hop carry
    /// them.
    pub fn set_node(&mut self, node: NodeConfig, observed: &Observed) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.set_config(node) {
            warn!("{e}");
        }
        self.write_all_map_entries(observed);
    }

    /// The programs back on the uplink and the bridge, and on every port.
    pub fn attach(&mut self, observed: &Observed) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.attach_node(
            (&observed.bridge_name, observed.bridge.index),
            (&observed.uplink_name, observed.uplink.index),
        ) {
            warn!("{e}");
        }
        if self.follow_ports {
            for (index, name) in &observed.ports {
                if let Err(e) = maps.attach_port(name, *index) {
                    warn!("bridge port {name}: {e}");
                }
            }
        }
    }

    fn sync_endpoint(&mut self, ip: IpAddr, observed: &Observed) {
        let Some(maps) = &mut self.maps else { return };
        let previous = self.endpoints.get(&ip);
        let endpoint = observed.endpoint(ip, previous);
        if endpoint.as_ref() == previous {
            return;
        }
        let result = match endpoint {
            Some(endpoint) => maps.set_endpoint(ip, endpoint).map(|()| {
                debug!(
                    "pod {ip}: {} on port {}",
                    format_mac(endpoint.mac),
                    endpoint.ifindex
                );
                self.endpoints.insert(ip, endpoint);
            }),
            None => maps.remove_endpoint(ip).map(|()| {
                self.endpoints.remove(&ip);
            }),
        };
        if let Err(e) = result {
            warn!("{e}");
        }
    }

    fn sync_all_endpoints(&mut self, observed: &Observed) {
        let ips: HashSet<IpAddr> = self
            .endpoints
            .keys()
            .chain(observed.pods.keys())
            .copied()
            .collect();
        for ip in ips {
            self.sync_endpoint(ip, observed);
        }
    }

    /// Where an interface sits on the redirect's way, and whether hgw's program runs
    /// on its ingress; `None`: not an interface hgw redirects from or past.
    fn placement(&self, ifindex: u32, observed: &Observed) -> Option<(Role, bool)> {
        if ifindex == observed.uplink.index {
            Some((Role::Uplink, true))
        } else if ifindex == observed.bridge.index {
            Some((Role::Bridge, !self.follow_ports))
        } else if observed.ports.contains_key(&ifindex) {
            Some((Role::Port, self.follow_ports))
        } else {
            None
        }
    }

    fn interface_name<'a>(&self, ifindex: u32, observed: &'a Observed) -> &'a str {
        if ifindex == observed.uplink.index {
            &observed.uplink_name
        } else if ifindex == observed.bridge.index {
            &observed.bridge_name
        } else {
            observed.ports.get(&ifindex).map_or("", String::as_str)
        }
    }

    /// The devices map brought to what the observed hooks say: an entry for each
    /// hooked interface with flags, none for the others; only differences written.
    pub fn sync_devices(&mut self, observed: &Observed) {
        let Some(maps) = &self.maps else { return };
        let own = maps.own_programs();
        self.warn_programs_before(observed, &own);
        let want: HashMap<u32, u32> = observed
            .hooks
            .iter()
            .filter_map(|(ifindex, hooks)| {
                let (role, here) = self.placement(*ifindex, observed)?;
                let flags = hooks.flags(role, here, &own);
                (flags != 0).then_some((*ifindex, flags))
            })
            .collect();
        let mut writes: Vec<(u32, u32)> = want
            .iter()
            .filter(|(ifindex, flags)| self.devices.get(ifindex) != Some(flags))
            .map(|(ifindex, flags)| (*ifindex, *flags))
            .collect();
        writes.extend(
            self.devices
                .keys()
                .filter(|ifindex| !want.contains_key(ifindex))
                .map(|ifindex| (*ifindex, 0)),
        );
        for (ifindex, flags) in writes {
            let name = self.interface_name(ifindex, observed).to_owned();
            let Some(maps) = &mut self.maps else { return };
            match maps.set_device(ifindex, flags) {
                Ok(()) if flags == 0 => {
                    if self.devices.remove(&ifindex).is_some() && !name.is_empty() {
                        info!("tc hooks of {name}: nothing a redirect would skip");
                    }
                }
                Ok(()) => {
                    self.devices.insert(ifindex, flags);
                    info!(
                        "tc hooks of {name} (ifindex {ifindex}): {} (the fast path leaves what they concern to the kernel)",
                        crate::tc::flag_names(flags).join(" and ")
                    );
                }
                Err(e) => warn!("{e}"),
            }
        }
    }

    /// Programs that run before hgw's on a hook it redirects from see every packet
    /// first and may take it: an earlier agent's, pinned in another `pin_dir`, would
    /// take all of hgw's traffic while this agent's counters stay at 0. Without
    /// CAP_SYS_ADMIN they cannot be named (with it, a pinned hgw program elsewhere is
    /// refused at start), so say so once per change, by id.
    fn warn_programs_before(&mut self, observed: &Observed, own: &[u32]) {
        for (ifindex, hooks) in &observed.hooks {
            let Some((role, true)) = self.placement(*ifindex, observed) else {
                continue;
            };
            let (before, _) = hooks.ingress_split(role, true, own);
            if self.warned_before.get(ifindex) == Some(&before) {
                continue;
            }
            if !before.is_empty() {
                warn!(
                    "{} ingress: tcx programs {before:?} run before hgw's and see every packet first; if one is an earlier hgw agent's (pinned in another pin_dir), remove it with `hgw-agent uninstall --pin-dir OLD`",
                    self.interface_name(*ifindex, observed)
                );
            }
            self.warned_before.insert(*ifindex, before);
        }
    }

    /// The maps' writes of this pass reach the cached flows: one generation change.
    pub fn publish_generation(&mut self) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.publish_generation() {
            warn!("{e}");
        }
    }

    /// The kernel's routing changed: every cached flow asks the FIB again.
    pub fn routing_changed(&mut self) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.bump_generation() {
            warn!("{e}");
        }
    }

    /// What shares hgw's hooks: the uplink and the bridge, and each port with
    /// something on it. Program names from `names`, where known.
    pub fn hook_status(
        &self,
        observed: &Observed,
        names: &HashMap<u32, Option<String>>,
    ) -> Vec<HookStatus> {
        let Some(maps) = &self.maps else {
            return Vec::new();
        };
        let own = maps.own_programs();
        let mut ports: Vec<(&String, u32)> = observed
            .ports
            .iter()
            .map(|(ifindex, name)| (name, *ifindex))
            .collect();
        ports.sort();
        [observed.uplink.index, observed.bridge.index]
            .into_iter()
            .chain(ports.into_iter().map(|(_, ifindex)| ifindex))
            .filter_map(|ifindex| {
                let placement = self.placement(ifindex, observed)?;
                let hooks = observed.hooks.get(&ifindex).cloned().unwrap_or_default();
                if placement.0 == Role::Port && !hooks.is_shared(&own) {
                    return None;
                }
                let name = self.interface_name(ifindex, observed);
                Some(hooks.status((name, ifindex), placement, &own, names))
            })
            .collect()
    }

    /// Pods the bridge knows whose port is not known yet, with their MACs: a
    /// forwarding dump would tell. None without the fast path (no endpoints to fill).
    pub fn pods_without_port<'a>(
        &'a self,
        observed: &'a Observed,
    ) -> impl Iterator<Item = (IpAddr, [u8; 6])> + 'a {
        observed
            .pods
            .iter()
            .filter(|(ip, _)| self.maps.is_some() && !self.endpoints.contains_key(ip))
            .map(|(ip, mac)| (*ip, *mac))
    }

    /// The fast path hides its traffic from the kernel's neighbour confirmation, so a
    /// next hop's entry would sit in STALE with a MAC nobody checks. Asking the kernel
    /// to use STALE and unresolved entries makes it probe them: a peer whose MAC
    /// changed without announcing it fails the probe, and the neighbour event brings
    /// the new MAC.
    pub async fn refresh_next_hops(&mut self, observed: &Observed) {
        let ips: Vec<IpAddr> = self
            .by_hop
            .keys()
            .filter(|ip| {
                observed
                    .next_hops
                    .get(ip)
                    .is_none_or(|n| n.stale || n.mac.is_none())
            })
            .copied()
            .collect();
        self.resolve(ips, observed).await;
    }

    async fn resolve(&self, ips: Vec<IpAddr>, observed: &Observed) {
        let oif = observed.uplink.index;
        let routes = &self.routes;
        let errors: Vec<KernelError> = futures::stream::iter(ips)
            .map(|ip| async move { routes.resolve(oif, ip).await.err() })
            .buffer_unordered(IN_FLIGHT)
            .filter_map(std::future::ready)
            .collect()
            .await;
        if let Some(e) = errors.first() {
            warn!("{e} (and {} more)", errors.len() - 1);
        }
    }

    /// Every route installed (or left to its foreign owner) and, with the fast path,
    /// every next hop's MAC known, once the source has spoken.
    pub fn ready(&self, observed: &Observed) -> bool {
        self.peers_known
            && self
                .desired
                .routes
                .iter()
                .all(|(cidr, hop)| match self.state.get(cidr) {
                    Some(RouteState::Installed) => {
                        self.maps.is_none()
                            || observed
                                .next_hops
                                .get(&hop.node_ip)
                                .is_some_and(|n| n.mac.is_some())
                    }
                    Some(RouteState::Foreign(_)) => true,
                    _ => false,
                })
    }

    pub fn peer_status(&mut self, observed: &Observed) -> Vec<PeerStatus> {
        if self.peer_status.is_none() {
            self.peer_status = Some(self.make_peer_status(observed));
        }
        self.peer_status.clone().unwrap_or_default()
    }

    fn make_peer_status(&self, observed: &Observed) -> Vec<PeerStatus> {
        self.desired
            .routes
            .iter()
            .map(|(cidr, hop)| PeerStatus {
                name: hop.peer.clone(),
                node_ip: hop.node_ip.to_string(),
                pod_cidr: cidr.to_string(),
                source: hop.source.clone(),
                lease: hop.lease.map(|l| format!("{l:x}")),
                mac: observed
                    .next_hops
                    .get(&hop.node_ip)
                    .and_then(|n| n.mac)
                    .map(format_mac),
                route: self.state.get(cidr) == Some(&RouteState::Installed),
                foreign_route: match self.state.get(cidr) {
                    Some(RouteState::Foreign(protocol)) => Some(protocol.clone()),
                    _ => None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;
    use crate::agent::fixtures::{self, UPLINK, network, observed};
    use crate::{
        agent::desired::{DesiredState, NodeFacts},
        config::{Origin, Peer},
        kernel::{KernelEvent, Neighbour, RouteOwner},
    };

    /// A main table: prefix -> (hgw's next hop, or someone else's protocol).
    #[derive(Default)]
    struct FakeRoutes {
        table: RefCell<BTreeMap<IpNet, Result<IpAddr, String>>>,
        writes: RefCell<Vec<String>>,
        resolved: RefCell<Vec<IpAddr>>,
    }

    impl RouteTable for &FakeRoutes {
        async fn install(
            &self,
            destination: IpNet,
            gateway: IpAddr,
            oif: u32,
            ours_there: bool,
        ) -> Result<(), KernelError> {
            let mut table = self.table.borrow_mut();
            if let Some(Err(protocol)) = table.get(&destination) {
                return Err(KernelError::ForeignRoute {
                    destination,
                    protocol: protocol.clone(),
                });
            }
            assert_eq!(oif, UPLINK);
            self.writes.borrow_mut().push(format!(
                "{} {destination} via {gateway}",
                if ours_there { "replace" } else { "add" }
            ));
            table.insert(destination, Ok(gateway));
            Ok(())
        }

        async fn delete(&self, route: HgwRoute) -> Result<(), KernelError> {
            let mut table = self.table.borrow_mut();
            if matches!(table.get(&route.destination), Some(Ok(_))) {
                table.remove(&route.destination);
                self.writes
                    .borrow_mut()
                    .push(format!("del {}", route.destination));
            }
            Ok(())
        }

        async fn resolve(&self, _oif: u32, ip: IpAddr) -> Result<(), KernelError> {
            self.resolved.borrow_mut().push(ip);
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeMaps {
        routes: BTreeMap<IpNet, NextHop>,
        devices: BTreeMap<u32, u32>,
        writes: usize,
        generation: u32,
        /// Route writes not yet published (one generation for all of them).
        pending: bool,
    }

    impl FastPathMaps for FakeMaps {
        fn set_config(&mut self, _: NodeConfig) -> Result<(), DatapathError> {
            Ok(())
        }
        fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
            self.writes += 1;
            self.pending = true;
            self.routes.insert(cidr, next_hop);
            Ok(())
        }
        fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
            self.writes += 1;
            self.pending = true;
            self.routes.remove(&cidr);
            Ok(())
        }
        fn set_endpoint(&mut self, _: IpAddr, _: Endpoint) -> Result<(), DatapathError> {
            Ok(())
        }
        fn remove_endpoint(&mut self, _: IpAddr) -> Result<(), DatapathError> {
            Ok(())
        }
        fn attach_node(&mut self, _: (&str, u32), _: (&str, u32)) -> Result<(), DatapathError> {
            Ok(())
        }
        fn attach_port(&mut self, _: &str, _: u32) -> Result<(), DatapathError> {
            Ok(())
        }
        fn detach_port(&mut self, _: u32) {}
        fn entries(&self) -> MapEntries {
            (
                self.routes.iter().map(|(c, h)| (*c, *h)).collect(),
                Vec::new(),
            )
        }
        fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
            self.writes += 1;
            self.generation += 1;
            if flags == 0 {
                self.devices.remove(&ifindex);
            } else {
                self.devices.insert(ifindex, flags);
            }
            Ok(())
        }
        fn devices(&self) -> Vec<(u32, u32)> {
            self.devices.iter().map(|(i, f)| (*i, *f)).collect()
        }
        fn bump_generation(&mut self) -> Result<(), DatapathError> {
            self.generation += 1;
            Ok(())
        }
        fn publish_generation(&mut self) -> Result<(), DatapathError> {
            if std::mem::take(&mut self.pending) {
                self.generation += 1;
            }
            Ok(())
        }
        fn own_programs(&self) -> Vec<u32> {
            vec![HGW_PROGRAM]
        }
    }

    const HGW_PROGRAM: u32 = 100;

    #[test]
    fn the_devices_map_follows_the_hooks_writing_only_differences() {
        use crate::{agent::fixtures::BRIDGE, tc::Hooks};
        use hgw_common::{DEVICE_EGRESS, DEVICE_INGRESS};
        let routes = FakeRoutes::default();
        let mut observed = observed();
        // Left by an earlier agent in a pinned map, for an interface now clean.
        let maps = FakeMaps {
            devices: BTreeMap::from([(UPLINK, DEVICE_INGRESS)]),
            ..FakeMaps::default()
        };
        let mut r = Reconciler::new(&routes, Some(maps), true, desired_state());
        observed.apply(KernelEvent::Link {
            index: 20,
            name: Some("veth20".into()),
            controller: Some(BRIDGE),
            link: None,
            deleted: false,
        });
        let clean = Hooks {
            tcx_ingress: vec![HGW_PROGRAM],
            root_qdisc: Some("noqueue".into()),
            ..Hooks::default()
        };
        let limited = Hooks {
            root_qdisc: Some("tbf".into()),
            ..clean.clone()
        };
        let scanned = HashMap::from([
            (UPLINK, clean.clone()),
            // hgw on the ports: anything on the bridge's ingress is skipped.
            (
                BRIDGE,
                Hooks {
                    tcx_ingress: vec![7],
                    ..Hooks::default()
                },
            ),
            (20, limited),
        ]);
        let change = observed.set_hooks(scanned, true).expect("a change");
        block_on(r.on_change(change, &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(
            maps.devices,
            BTreeMap::from([(BRIDGE, DEVICE_INGRESS), (20, DEVICE_EGRESS)])
        );
        assert_eq!(maps.writes, 3, "two set, one removed");
        assert!(maps.generation >= 3, "every write makes cached flows stale");
        let status = r.hook_status(&observed, &HashMap::new());
        assert_eq!(
            status
                .iter()
                .map(|h| h.interface.as_str())
                .collect::<Vec<_>>(),
            ["eth0", "cni0", "veth20"]
        );
        // The limit is removed: only that entry goes.
        r.maps.as_mut().expect("present").writes = 0;
        let change = observed.set_hooks(HashMap::from([(20, clean)]), false);
        block_on(r.on_change(change.expect("a change"), &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.devices, BTreeMap::from([(BRIDGE, DEVICE_INGRESS)]));
        assert_eq!(maps.writes, 1);
        assert_eq!(r.hook_status(&observed, &HashMap::new()).len(), 2);
        // A routing change: no write, a new generation.
        let generation = maps.generation;
        block_on(r.on_change(Change::Routing, &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!((maps.writes, maps.generation), (1, generation + 1));
    }

    fn node() -> NodeFacts {
        fixtures::node("172.31.0.1/16", &[])
    }

    fn desired_state() -> DesiredState {
        DesiredState::new(network(), Some(node()))
    }

    fn peers(n: u16) -> Vec<Peer> {
        (2..2 + n)
            .map(|i| Peer {
                name: format!("n{i}"),
                node_ip: format!("172.31.{}.{}", i / 250, i % 250 + 2)
                    .parse()
                    .expect("a valid literal"),
                pod_cidr: format!("10.{}.{}.0/24", 100 + i / 250, i % 250)
                    .parse()
                    .expect("a valid literal"),
                v6: None,
                source: "static".into(),
                lease: None,
                origin: Origin::Static { index: i.into() },
                backend: None,
            })
            .collect()
    }

    /// Feeds the fake table's state back as route events, as the kernel would.
    fn observe_routes(observed: &mut Observed, routes: &FakeRoutes) {
        observed.prefixes.clear();
        for (destination, owner) in routes.table.borrow().iter() {
            let owner = match owner {
                Ok(gateway) => RouteOwner::Hgw {
                    gateway: Some(*gateway),
                    oif: Some(UPLINK),
                },
                Err(protocol) => RouteOwner::Foreign(protocol.clone()),
            };
            observed.apply(KernelEvent::Route {
                destination: *destination,
                owner,
                deleted: false,
                replaced: false,
            });
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    #[test]
    fn one_changed_peer_writes_one_route_and_one_map_entry() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        let mut set = peers(1000);
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        block_on(r.resolve_pending(&observed));
        assert_eq!(routes.table.borrow().len(), 1000);
        assert_eq!(r.maps.as_ref().expect("present").routes.len(), 1000);
        assert_eq!(
            routes.resolved.borrow().len(),
            1000,
            "every next hop asked for"
        );
        assert_eq!(r.routes_installed(), 1000);
        observe_routes(&mut observed, &routes);

        routes.writes.borrow_mut().clear();
        r.maps.as_mut().expect("present").writes = 0;
        set[500].node_ip = "172.31.9.9".parse().expect("a valid literal");
        // The new next hop is resolved: its map entry differs from the old one.
        observed.apply(KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex: UPLINK,
                ip: IpAddr::V4(set[500].node_ip),
                mac: Some([2, 9, 9, 9, 9, 9]),
                stale: false,
            },
            deleted: false,
        });
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        let writes = routes.writes.borrow().clone();
        assert_eq!(
            writes,
            vec![format!("replace {} via 172.31.9.9", set[500].pod_cidr)]
        );
        assert_eq!(r.maps.as_ref().expect("present").writes, 1);

        // One peer changed and one gone, as changes: their routes and entries only.
        observe_routes(&mut observed, &routes);
        routes.writes.borrow_mut().clear();
        r.maps.as_mut().expect("present").writes = 0;
        let gone = set[7].clone();
        set[8].node_ip = "172.31.9.8".parse().expect("a valid literal");
        block_on(r.apply_peers(
            PeerBatch::Changes(vec![
                (gone.key().to_owned(), None),
                (set[8].key().to_owned(), Some(set[8].clone())),
            ]),
            &observed,
        ));
        let mut writes = routes.writes.borrow().clone();
        writes.sort();
        assert_eq!(
            writes,
            vec![
                format!("del {}", gone.pod_cidr),
                format!("replace {} via 172.31.9.8", set[8].pod_cidr),
            ]
        );
        // The gone peer's entry removed; the moved one's next hop has no MAC either way,
        // so its entry is the same and not written.
        assert_eq!(r.maps.as_ref().expect("present").writes, 1);
        assert_eq!(r.routes_installed(), 999);
    }

    #[test]
    fn a_resync_with_nothing_changed_writes_nothing() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        block_on(r.apply_peers(PeerBatch::All(peers(50)), &observed));
        observe_routes(&mut observed, &routes);
        routes.writes.borrow_mut().clear();
        r.maps.as_mut().expect("present").writes = 0;
        block_on(r.resync(&observed));
        assert!(routes.writes.borrow().is_empty(), "{:?}", routes.writes);
        assert_eq!(r.maps.as_ref().expect("present").writes, 0);
        // One route deleted behind hgw's back: the resync puts back that one only.
        let gone = *routes.table.borrow().keys().next().expect("present");
        routes.table.borrow_mut().remove(&gone);
        observe_routes(&mut observed, &routes);
        block_on(r.resync(&observed));
        assert_eq!(routes.writes.borrow().len(), 1, "{:?}", routes.writes);
    }

    #[test]
    fn nothing_is_swept_before_the_first_peer_set() {
        let routes = FakeRoutes::default();
        let left: IpNet = "10.200.0.0/24".parse().expect("a valid literal");
        routes
            .table
            .borrow_mut()
            .insert(left, Ok("172.31.0.9".parse().expect("a valid literal")));
        let mut observed = observed();
        observe_routes(&mut observed, &routes);
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        block_on(r.resync(&observed));
        assert!(
            routes.table.borrow().contains_key(&left),
            "kept until the source speaks"
        );
        block_on(r.apply_peers(PeerBatch::All(peers(1)), &observed));
        assert!(
            !routes.table.borrow().contains_key(&left),
            "swept once it has"
        );
    }

    #[test]
    fn a_foreign_route_is_left_alone_and_kept_out_of_the_map() {
        let routes = FakeRoutes::default();
        let set = peers(2);
        let foreign = IpNet::V4(set[0].pod_cidr);
        routes
            .table
            .borrow_mut()
            .insert(foreign, Err("static".into()));
        let mut observed = observed();
        observe_routes(&mut observed, &routes);
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        assert_eq!(routes.table.borrow()[&foreign], Err("static".into()));
        let maps = r.maps.as_ref().expect("present");
        assert!(!maps.routes.contains_key(&foreign));
        assert_eq!(maps.routes.len(), 1);
        let status = r.peer_status(&observed);
        assert_eq!(
            status
                .iter()
                .find(|p| p.pod_cidr == foreign.to_string())
                .and_then(|p| p.foreign_route.clone()),
            Some("static".into())
        );
        // Its owner removes it: hgw takes the prefix.
        routes.table.borrow_mut().remove(&foreign);
        observed.apply(KernelEvent::Route {
            destination: foreign,
            owner: RouteOwner::Foreign("static".into()),
            deleted: true,
            replaced: false,
        });
        block_on(r.on_change(Change::Prefix(foreign), &observed));
        assert!(routes.table.borrow()[&foreign].is_ok());
        assert!(
            r.maps
                .as_ref()
                .expect("present")
                .routes
                .contains_key(&foreign)
        );
    }

    /// A new peer costs one write of its map entry and one generation in its pass:
    /// none at the route's install and another when the rest of the pass runs.
    #[test]
    fn a_new_peer_is_written_once() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        let set = peers(3);
        block_on(r.apply_peers(PeerBatch::All(set[..2].to_vec()), &observed));
        observe_routes(&mut observed, &routes);
        // Its next hop is known already (a neighbour of the node's).
        observed.apply(KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex: UPLINK,
                ip: IpAddr::V4(set[2].node_ip),
                mac: Some([2, 3, 3, 3, 3, 3]),
                stale: false,
            },
            deleted: false,
        });
        r.publish_generation();
        r.maps.as_mut().expect("present").writes = 0;
        let generation = r.maps.as_ref().expect("present").generation;
        block_on(r.apply_peers(
            PeerBatch::Changes(vec![(set[2].key().to_owned(), Some(set[2].clone()))]),
            &observed,
        ));
        // The route's own echo changes nothing more.
        observe_routes(&mut observed, &routes);
        let cidr = IpNet::V4(set[2].pod_cidr);
        block_on(r.on_change(Change::Prefix(cidr), &observed));
        r.publish_generation();
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.writes, 1);
        assert_eq!(maps.routes[&cidr].dst_mac, [2, 3, 3, 3, 3, 3]);
        assert_eq!(
            maps.generation,
            generation + 1,
            "one generation for the pass"
        );
    }

    #[test]
    fn a_next_hop_mac_updates_only_its_map_entries() {
        let routes = FakeRoutes::default();
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        let set = peers(10);
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        assert!(!r.ready(&observed), "no MAC known yet");
        r.maps.as_mut().expect("present").writes = 0;
        let ip = IpAddr::V4(set[3].node_ip);
        let change = observed.apply(KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex: UPLINK,
                ip,
                mac: Some([2, 1, 1, 1, 1, 1]),
                stale: false,
            },
            deleted: false,
        });
        block_on(r.on_change(change.expect("a change"), &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.writes, 1);
        let entry = maps.routes[&IpNet::V4(set[3].pod_cidr)];
        assert_eq!(entry.dst_mac, [2, 1, 1, 1, 1, 1]);
        assert_eq!(entry.flags & NEXT_HOP_MAC_KNOWN, NEXT_HOP_MAC_KNOWN);
    }
}
