//! hgw's routes: installed many at once, put back when deleted, left to a foreign
//! route that holds the prefix (and taken when it goes), and deleted when no peer wants
//! them.

use std::net::IpAddr;

use futures::StreamExt as _;
use ipnet::IpNet;
use log::{Level, info, log, warn};

use super::{FastPathMaps, IN_FLIGHT, Reconciler, RouteState, RouteTable, each_level};
use crate::{
    agent::observed::Observed,
    kernel::{HgwRoute, KernelError},
};

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
    /// A prefix's owners changed: hgw's route deleted (reinstall), someone else's put
    /// on it (step aside), someone else's gone (take it).
    pub(super) async fn on_prefix(&mut self, cidr: IpNet, observed: &Observed) {
        let Some(hop) = self.desired.routes.get(&cidr) else {
            return;
        };
        let owners = observed.prefixes.get(&cidr).cloned().unwrap_or_default();
        let want = (Some(hop.node_ip), Some(observed.uplink.index));
        match (&owners.ours, owners.foreign(&cidr), self.state.get(&cidr)) {
            (Some(ours), _, _) if *ours == want => {
                self.set_state(cidr, RouteState::Installed);
            }
            (None, Some(protocol), _) => self.note_foreign(cidr, protocol.to_owned()).await,
            // The kernel drops the routes (and nexthops) on a device going down, and
            // refuses new ones there: the uplink's coming up resyncs them all, rather
            // than a failed install and a warning per route now.
            (None, None, _) if !observed.uplink.up => self.set_state(cidr, RouteState::Failed),
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

    /// Someone else's route holds `cidr`: out of the fast path, and if it took the
    /// place of hgw's route, what that route held of hgw's is let go (its nexthop
    /// object, which the route that took the place may be on).
    pub(super) async fn note_foreign(&mut self, cidr: IpNet, protocol: String) {
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
        if previous == Some(RouteState::Installed) {
            self.routes.lost(cidr).await;
        }
    }

    /// Installs the routes to `cidrs`, many requests in flight at once.
    pub(super) async fn install(&mut self, cidrs: Vec<IpNet>, observed: &Observed) {
        let oif = observed.uplink.index;
        let jobs: Vec<(IpNet, IpAddr, bool)> = cidrs
            .into_iter()
            .filter_map(|cidr| {
                let hop = self.desired.routes.get(&cidr)?;
                let ours_there = observed
                    .prefixes
                    .get(&cidr)
                    .is_some_and(|o| o.ours.is_some() && o.foreign(&cidr).is_none());
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
                    self.note_foreign(cidr, protocol).await;
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
    pub(super) async fn remove_gone(&mut self, gone: Vec<IpNet>, observed: &Observed) {
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
    pub(super) async fn remove_unwanted(&mut self, observed: &Observed) {
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        FakeMaps, FakeRoutes, block_on, desired_state, observe_routes, peers,
    };
    use super::super::*;
    use crate::agent::fixtures::observed;
    use crate::kernel::{KernelEvent, RouteKey, RouteOwner};

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
    fn a_route_dropped_with_the_uplink_down_waits_for_it_to_come_up() {
        let routes = FakeRoutes::default();
        let set = peers(2);
        let mut observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        block_on(r.apply_peers(PeerBatch::All(set.clone()), &observed));
        observe_routes(&mut observed, &routes);
        assert_eq!(r.routes_installed(), 2);
        let writes = routes.writes.borrow().len();
        // The uplink goes down; the kernel drops the route.
        observed.uplink.up = false;
        let gone = IpNet::V4(set[0].pod_cidr);
        routes.table.borrow_mut().remove(&gone);
        observed.apply(KernelEvent::Route {
            destination: gone,
            owner: RouteOwner::Hgw {
                gateway: None,
                oif: None,
            },
            key: RouteKey::hgw(&gone),
            deleted: true,
            replaced: false,
        });
        block_on(r.on_change(Change::Prefix(gone), &observed));
        assert_eq!(
            routes.writes.borrow().len(),
            writes,
            "no install on a down uplink"
        );
        assert_eq!(r.routes_installed(), 1, "status says the route is missing");
        // Up again: the resync puts it back.
        observed.uplink.up = true;
        block_on(r.resync(&observed));
        assert!(routes.table.borrow().contains_key(&gone));
        assert_eq!(r.routes_installed(), 2);
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
        let in_map = |r: &Reconciler<_, FakeMaps>| {
            r.maps
                .as_ref()
                .expect("present")
                .routes
                .contains_key(&foreign)
        };
        assert!(!in_map(&r));
        assert_eq!(r.maps.as_ref().expect("present").routes.len(), 1);
        let status = r.peer_status(&observed);
        assert_eq!(
            status
                .iter()
                .find(|p| p.pod_cidr == foreign.to_string())
                .and_then(|p| p.foreign_route.clone()),
            Some("static".into())
        );
        // The kernel's event for a static route to the prefix, deleted or put in place.
        let static_route = |deleted, replaced| KernelEvent::Route {
            destination: foreign,
            owner: RouteOwner::Foreign("static".into()),
            key: RouteKey::hgw(&foreign),
            deleted,
            replaced,
        };
        // Its owner removes it: hgw takes the prefix.
        routes.table.borrow_mut().remove(&foreign);
        observed.apply(static_route(true, false));
        block_on(r.on_change(Change::Prefix(foreign), &observed));
        assert!(routes.table.borrow()[&foreign].is_ok());
        assert!(in_map(&r));
        let lost = format!("lost {foreign}");
        assert!(
            !routes.writes.borrow().contains(&lost),
            "a route hgw never had was not lost"
        );
        // Someone replaces hgw's route: hgw lets go of the prefix and, once, of what its
        // route held (`lost`).
        routes
            .table
            .borrow_mut()
            .insert(foreign, Err("static".into()));
        for _ in 0..2 {
            observed.apply(static_route(false, true));
            block_on(r.on_change(Change::Prefix(foreign), &observed));
        }
        assert_eq!(routes.table.borrow()[&foreign], Err("static".into()));
        assert!(!in_map(&r));
        let writes = routes.writes.borrow();
        assert_eq!(
            writes.iter().filter(|w| **w == lost).count(),
            1,
            "{writes:?}"
        );
    }
}
