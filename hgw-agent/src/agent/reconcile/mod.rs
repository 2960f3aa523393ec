//! The reconciler: the only writer to kernel routes and fast-path maps. It brings them
//! to the desired state, given what is observed, touching only what differs: a peer
//! change writes that peer's route and map entry, an event the entries it concerns,
//! and the periodic resync compares everything and writes the differences.
//!
//! It works against two small traits, [`RouteTable`] and [`FastPathMaps`], so its logic
//! is unit-tested without root.
//!
//! This module holds the traits, the [`Reconciler`] and what it is handed (a peer
//! batch, a kernel change, the resync); `routes` writes hgw's routes, `maps` the route
//! and endpoint map entries, `devices` the programs' attachments and the devices map,
//! `next_hops` asks the kernel for next hops, and `status` is what status shows of it.

mod devices;
mod maps;
mod next_hops;
mod routes;
mod status;
#[cfg(test)]
mod test_support;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
};

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
    kernel::{HgwRoute, KernelError, format_mac},
    serve::status::PeerStatus,
};
use next_hops::NeighbourWatch;

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
    /// hgw's route to `destination` went without hgw deleting it (someone else's took
    /// its place): what it held of hgw's in the kernel (its nexthop object) is let go.
    fn lost(&self, destination: IpNet) -> impl Future<Output = ()>;
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
    /// The kernel's neighbour tables ([`Reconciler::set_neighbour_limits`]) against
    /// the next hops.
    neighbours: NeighbourWatch,
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
            neighbours: NeighbourWatch::default(),
        }
    }

    /// Takes the fast path's maps away, for the agent's stop or the fast path's (IPVS
    /// came): from now on nothing is written to them, and nothing is counted as in
    /// them (`None`: fast path off).
    pub fn take_maps(&mut self) -> Option<M> {
        self.map.clear();
        self.endpoints.clear();
        self.devices.clear();
        self.warned_before.clear();
        self.peer_status = None;
        self.maps.take()
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

    /// Takes a whole peer set already checked into a desired state (the static peers,
    /// at the start) as [`Reconciler::apply_peers`] takes it sent: as it is in place of a
    /// state that holds no peers yet, else peer by peer.
    pub async fn apply_checked_peers(
        &mut self,
        checked: DesiredState,
        observed: &Observed,
    ) -> usize {
        let delta = if self.desired.peers().next().is_none() {
            self.desired = checked;
            self.desired.everything()
        } else {
            self.desired.replace_all(checked.into_peers())
        };
        let routes = delta.changed.len() + delta.removed.len();
        self.apply_delta(delta, true, observed).await;
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
        for warning in self.neighbour_warnings() {
            warn!("{warning}");
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

    /// Compares everything with what the kernel holds now (`observed`, fresh from
    /// dumps) and writes only the differences.
    pub async fn resync(&mut self, observed: &Observed) {
        // The next hops' MACs may have changed in the dumps.
        self.peer_status = None;
        let mut install = Vec::new();
        let mut foreign = Vec::new();
        for (cidr, hop) in &self.desired.routes {
            let want = (Some(hop.node_ip), Some(observed.uplink.index));
            let owners = observed.prefixes.get(cidr);
            match owners.map(|o| (o.ours, o.foreign(cidr))) {
                Some((Some(ours), _)) if ours == want => {
                    self.state.insert(*cidr, RouteState::Installed);
                }
                Some((None, Some(protocol))) => foreign.push((*cidr, protocol.to_owned())),
                _ => install.push(*cidr),
            }
        }
        for (cidr, protocol) in foreign {
            self.note_foreign(cidr, protocol).await;
        }
        self.install(install, observed).await;
        self.remove_unwanted(observed).await;
        self.write_all_map_entries(observed);
        self.sync_all_endpoints(observed);
        self.sync_devices(observed);
        self.resolve_unresolved(observed).await;
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
}

#[cfg(test)]
mod tests {
    use super::test_support::{
        FakeMaps, FakeRoutes, block_on, desired_state, observe_routes, peers,
    };
    use super::*;
    use crate::agent::fixtures::{UPLINK, observed};
    use crate::kernel::{KernelEvent, Neighbour};

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
    fn a_checked_set_is_applied_as_the_same_set_sent_whole() {
        let observed = observed();
        let (sent_routes, held_routes) = (FakeRoutes::default(), FakeRoutes::default());
        let mut sent = Reconciler::new(
            &sent_routes,
            Some(FakeMaps::default()),
            false,
            desired_state(),
        );
        let n = block_on(sent.apply_peers(PeerBatch::All(peers(50)), &observed));
        let checked = || {
            let mut checked = desired_state();
            checked.replace_all(peers(50));
            checked
        };
        let mut held = Reconciler::new(
            &held_routes,
            Some(FakeMaps::default()),
            false,
            desired_state(),
        );
        assert_eq!(block_on(held.apply_checked_peers(checked(), &observed)), n);
        assert_eq!(n, 50);
        assert!(held.peers_known(), "the first whole set");
        assert_eq!(*held_routes.table.borrow(), *sent_routes.table.borrow());
        let maps = |r: &Reconciler<&FakeRoutes, FakeMaps>| {
            r.maps.as_ref().expect("present").routes.clone()
        };
        assert_eq!(maps(&held), maps(&sent));
        assert_eq!(held.pending_resolve, sent.pending_resolve);
        // Each route written once (a start that installed them twice took 26 s at
        // 5,000 peers).
        assert_eq!(held_routes.writes.borrow().len(), n, "one write per route");
        // Over peers held already, the same set again changes nothing.
        assert_eq!(block_on(held.apply_checked_peers(checked(), &observed)), 0);
        assert_eq!(*held_routes.table.borrow(), *sent_routes.table.borrow());
        assert_eq!(
            held_routes.writes.borrow().len(),
            n,
            "nothing written again"
        );
    }
}
