//! The next hops' neighbour entries: new ones asked for after the routes are written,
//! unresolved and stale ones asked for again.

use std::net::IpAddr;

use futures::StreamExt as _;
use log::warn;

use super::{FastPathMaps, IN_FLIGHT, Reconciler, RouteTable};
use crate::{
    agent::observed::Observed,
    kernel::{KernelError, NeighbourLimits},
};

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
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

    /// Next hops without a MAC: the kernel is asked to resolve them.
    pub(super) async fn resolve_unresolved(&self, observed: &Observed) {
        let ips: Vec<IpAddr> = self
            .by_hop
            .keys()
            .filter(|ip| observed.next_hops.get(ip).is_none_or(|n| n.mac.is_none()))
            .copied()
            .collect();
        self.resolve(ips, observed).await;
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

    pub(super) async fn resolve(&self, ips: Vec<IpAddr>, observed: &Observed) {
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

    /// The kernel's neighbour tables (IPv4, IPv6), read at the start where they are to
    /// be seen: next hops beyond them are said in a warning.
    pub fn set_neighbour_limits(&mut self, limits: [Option<NeighbourLimits>; 2]) {
        self.neighbours.limits = limits;
    }

    /// What to say of next hops that outgrew their family's neighbour table since the
    /// last call.
    pub(super) fn neighbour_warnings(&mut self) -> Vec<String> {
        let by_hop = &self.by_hop;
        self.neighbours
            .check(|ipv6| by_hop.keys().filter(|ip| ip.is_ipv6() == ipv6).count())
    }
}

/// The kernel's neighbour tables (IPv4, IPv6) where known, and whether each family's
/// next hops outgrew its table: said once, until they fit again.
#[derive(Debug, Default)]
pub(super) struct NeighbourWatch {
    limits: [Option<NeighbourLimits>; 2],
    outgrown: [bool; 2],
}

impl NeighbourWatch {
    /// What to say, given the next hops of a family (`true`: IPv6), counted only
    /// where its table is known.
    fn check(&mut self, next_hops: impl Fn(bool) -> usize) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, ipv6) in [false, true].into_iter().enumerate() {
            let Some(limits) = self.limits[i] else {
                continue;
            };
            let warning = outgrown(next_hops(ipv6), limits, ipv6);
            if !self.outgrown[i] {
                warnings.extend(warning.clone());
            }
            self.outgrown[i] = warning.is_some();
        }
        warnings
    }
}

/// Why `next_hops` peers' next hops of one family cannot all keep their neighbour
/// entries, if they cannot. The agent asks the kernel to resolve every next hop ahead of
/// traffic and to probe stale ones; beyond the table's soft limit the kernel evicts
/// entries, and those next hops' traffic takes the kernel path until resolved again.
fn outgrown(next_hops: usize, limits: NeighbourLimits, ipv6: bool) -> Option<String> {
    if next_hops <= limits.soft {
        return None;
    }
    let (family, sysctl) = if ipv6 {
        ("IPv6", "net.ipv6.neigh.default")
    } else {
        ("IPv4", "net.ipv4.neigh.default")
    };
    Some(format!(
        "{next_hops} {family} next hops, more than {sysctl}.gc_thresh2 ({}) neighbour entries (at most gc_thresh3, {}, for every interface and namespace): the kernel evicts next hops' entries, whose traffic then takes the kernel path until they are resolved again; raise gc_thresh1-3 for this many nodes",
        limits.soft, limits.hard
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fixtures::observed;
    use crate::agent::reconcile::test_support::{
        FakeMaps, FakeRoutes, block_on, desired_state, peers,
    };
    use crate::agent::sources::PeerBatch;

    #[test]
    fn next_hops_beyond_the_neighbour_table_are_said_once() {
        let limits = NeighbourLimits { soft: 10, hard: 20 };
        assert_eq!(outgrown(10, limits, false), None);
        let said = outgrown(11, limits, false).expect("over the soft limit");
        assert!(
            said.starts_with("11 IPv4 next hops")
                && said.contains("net.ipv4.neigh.default.gc_thresh2 (10)")
                && said.contains("gc_thresh3, 20"),
            "{said}"
        );
        let mut watch = NeighbourWatch {
            limits: [Some(limits), None],
            ..NeighbourWatch::default()
        };
        let counts = |v4: usize, v6: usize| move |ipv6: bool| if ipv6 { v6 } else { v4 };
        assert!(watch.check(counts(10, 99)).is_empty(), "fits; IPv6 unknown");
        assert_eq!(watch.check(counts(11, 99)), [said]);
        assert!(watch.check(counts(12, 0)).is_empty(), "said once");
        assert!(watch.check(counts(5, 0)).is_empty(), "fits again");
        assert_eq!(watch.check(counts(30, 0)).len(), 1, "said again");

        // The reconciler checks after applying peers.
        let routes = FakeRoutes::default();
        let observed = observed();
        let mut r = Reconciler::new(&routes, Some(FakeMaps::default()), false, desired_state());
        r.set_neighbour_limits([Some(limits), Some(limits)]);
        block_on(r.apply_peers(PeerBatch::All(peers(5)), &observed));
        assert_eq!(r.neighbours.outgrown, [false, false]);
        block_on(r.apply_peers(PeerBatch::All(peers(12)), &observed));
        assert_eq!(r.neighbours.outgrown, [true, false], "said while applying");
        assert!(r.neighbour_warnings().is_empty(), "said once");
    }
}
