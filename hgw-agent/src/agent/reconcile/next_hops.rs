//! The next hops' neighbour entries: new ones asked for after the routes are written,
//! unresolved and stale ones asked for again.

use std::net::IpAddr;

use futures::StreamExt as _;
use log::warn;

use super::{FastPathMaps, IN_FLIGHT, Reconciler, RouteTable};
use crate::{agent::observed::Observed, kernel::KernelError};

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
}
