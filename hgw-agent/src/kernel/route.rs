//! hgw's routes in the main table: installed exclusively, replaced or deleted only
//! with hgw's tag.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use futures::TryStreamExt as _;
use hgw_common::ROUTE_PROTOCOL;
use ipnet::IpNet;
use log::{debug, info};
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
    },
};

use super::{Kernel, KernelError, RouteOwner, events::route_owner, netlink};

/// What tells apart routes to one prefix of the main table besides it: the TOS (IPv4)
/// and the metric. `ip route replace` takes the place of the route of its own key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    pub tos: u8,
    pub metric: u32,
}

impl RouteKey {
    /// The key of hgw's routes: no TOS and no metric set, so the kernel's default
    /// metric (IPv4 0, IPv6 1024).
    pub const fn hgw(prefix: &IpNet) -> Self {
        let metric = match prefix {
            IpNet::V4(_) => 0,
            IpNet::V6(_) => 1024,
        };
        Self { tos: 0, metric }
    }

    /// A route message's key (`RTA_PRIORITY` 0 where the kernel sends none).
    pub fn of(msg: &RouteMessage) -> Self {
        let metric = msg
            .attributes
            .iter()
            .find_map(|attr| match attr {
                RouteAttribute::Priority(metric) => Some(*metric),
                _ => None,
            })
            .unwrap_or(0);
        Self {
            tos: msg.header.tos,
            metric,
        }
    }
}

/// Who holds a prefix of the main table: hgw (its route's gateway and interface) and/or
/// others (each route's protocol), by key: routes of different metrics (or TOS) share
/// a prefix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixOwners {
    pub ours: Option<(Option<IpAddr>, Option<u32>)>,
    /// The key of hgw's route (the default without one).
    ours_key: RouteKey,
    /// Others' routes: key -> protocol (routes appended at one key count as one).
    others: BTreeMap<RouteKey, String>,
}

impl PrefixOwners {
    /// The protocol of someone else's route holding `prefix` (this entry's) at the key
    /// hgw's route would have: one of another key leaves hgw's a place beside it.
    pub fn foreign(&self, prefix: &IpNet) -> Option<&str> {
        self.others.get(&RouteKey::hgw(prefix)).map(String::as_str)
    }

    /// A route to the prefix was added (`replaced`: in place of the route of its key,
    /// whose deletion the kernel does not report) or deleted.
    pub fn apply(&mut self, owner: RouteOwner, key: RouteKey, deleted: bool, replaced: bool) {
        if replaced {
            if self.ours.is_some() && self.ours_key == key {
                self.clear_ours();
            }
            self.others.remove(&key);
        }
        match (owner, deleted) {
            (RouteOwner::Hgw { gateway, oif }, false) => {
                self.ours = Some((gateway, oif));
                self.ours_key = key;
            }
            // hgw holds one route per prefix, whatever its key.
            (RouteOwner::Hgw { .. }, true) => self.clear_ours(),
            (RouteOwner::Foreign(protocol), false) => {
                self.others.insert(key, protocol);
            }
            (RouteOwner::Foreign(_), true) => {
                self.others.remove(&key);
            }
        }
    }

    fn clear_ours(&mut self) {
        self.ours = None;
        self.ours_key = RouteKey::default();
    }
}

/// A route carrying hgw's protocol tag, as found in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HgwRoute {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

impl HgwRoute {
    /// `Some` for a unicast route of the main table tagged with hgw's protocol.
    pub fn from_message(msg: &RouteMessage) -> Option<Self> {
        if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
            || msg.header.kind != RouteType::Unicast
            || msg.header.table != RouteHeader::RT_TABLE_MAIN
        {
            return None;
        }
        let mut gateway = None;
        let mut oif = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        Some(Self {
            destination: route_destination(msg)?,
            gateway,
            oif,
        })
    }
}

/// The destination of a main-table route and whether it carries hgw's tag:
/// what the agent needs of any route event.
pub fn main_route(msg: &RouteMessage) -> Option<(IpNet, bool)> {
    // Any kind: a blackhole or unreachable route on a prefix is someone's decision too.
    if msg.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let ours = msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL);
    Some((route_destination(msg)?, ours))
}

/// A route message's destination prefix.
fn route_destination(msg: &RouteMessage) -> Option<IpNet> {
    let addr = msg.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    IpNet::new(addr, msg.header.destination_prefix_length).ok()
}

impl Kernel {
    /// Puts hgw's routes on nexthop objects from now on (see [`super::nexthop`]), taking
    /// over an earlier agent's. Left as plain routes, said once, where the kernel has
    /// no nexthop objects (before 5.3) or its route dumps would not show their gateways
    /// (`net.ipv4.nexthop_compat_mode` 0: the agent reads its routes' gateways there).
    pub async fn use_nexthops(&mut self) {
        let compat = std::fs::read_to_string("/proc/sys/net/ipv4/nexthop_compat_mode");
        if compat.is_ok_and(|c| c.trim() == "0") {
            info!("routes without nexthop objects: net.ipv4.nexthop_compat_mode is 0");
            return;
        }
        let routes = match self.main_table().await {
            Ok(routes) => routes,
            Err(e) => {
                info!("routes without nexthop objects: {e}");
                return;
            }
        };
        let on_nexthops: Vec<(IpNet, u32)> = routes
            .iter()
            .filter(|m| HgwRoute::from_message(m).is_some())
            .filter_map(|m| Some((route_destination(m)?, nexthop_id(m)?)))
            .collect();
        let in_use = routes.iter().filter_map(nexthop_id).collect();
        match super::nexthop::Nexthops::open(&on_nexthops, &in_use).await {
            Ok(nexthops) => {
                info!(
                    "routes on nexthop objects of their own ({} already on them)",
                    on_nexthops.len()
                );
                self.nexthops = Some(Arc::new(nexthops));
            }
            Err(e) => info!("routes without nexthop objects: {e}"),
        }
    }

    /// Lets go of the nexthop object of hgw's route to `destination`, for a route that
    /// went without hgw deleting it (someone else's took its place): not changed or
    /// reused any more, since the route that took the prefix may be on it (`ip route
    /// replace PREFIX nhid N`), and not deleted now, which would take any such route
    /// along (silently, for IPv4). The next agent's start deletes it if no route is on
    /// it ([`super::nexthop::Nexthops::open`]); `uninstall` does in any case.
    pub fn forget_nexthop(&self, destination: IpNet) {
        if let Some(id) = self.nexthops.as_ref().and_then(|n| n.forget(destination)) {
            info!(
                "hgw's route to {destination} was replaced: its nexthop {id} is no longer used or changed (the next start deletes it if no route is on it)"
            );
        }
    }

    /// The destination whose route was on hgw's nexthop `id` (just deleted): IPv4 drops
    /// such a route without an event of its own.
    pub fn route_on_nexthop(&self, id: u32) -> Option<IpNet> {
        self.nexthops.as_ref()?.destination_of(id)
    }

    /// `ip route add DEST nhid ID proto hgw` on a nexthop `via GATEWAY dev OIF onlink`
    /// of the route's own (or, without nexthop objects, `ip route add DEST via GATEWAY
    /// dev OIF onlink proto hgw`), created exclusively: a route already on the prefix is
    /// replaced only if it carries hgw's tag (NLM_F_REPLACE alone would take over
    /// anyone's route); otherwise [`KernelError::ForeignRoute`].
    ///
    /// `ours_there`: the caller's view says hgw's route holds the prefix (a changed next
    /// hop), so it is replaced in one request, without asking who owns the prefix.
    pub async fn install_route(
        &self,
        destination: IpNet,
        gateway: IpAddr,
        oif: u32,
        ours_there: bool,
    ) -> Result<(), KernelError> {
        let plain = plain_route(destination, gateway, oif)?;
        if let Some(nexthops) = &self.nexthops
            && let known = nexthops.id_of(destination).is_some()
            && let Some(id) = nexthops.for_route(destination, gateway, oif).await
        {
            let mut route = route_to(destination);
            route.attributes.push(RouteAttribute::NhId(id));
            match self.put_route(route, destination, ours_there).await {
                Ok(()) => return Ok(()),
                // A nexthop of an earlier route of ours may be what the route there is on
                // (`ip route add PREFIX nhid N` after hgw's route went): let go of it as
                // of a replaced route. One made just now carries nothing: it goes.
                Err(e @ KernelError::ForeignRoute { .. }) if known => {
                    nexthops.forget(destination);
                    return Err(e);
                }
                Err(e @ KernelError::ForeignRoute { .. }) => {
                    nexthops.release(destination).await;
                    return Err(e);
                }
                // Whatever the kernel has against the nexthop, the plain route is what
                // the agent installed before nexthop objects.
                Err(e) => {
                    debug!("{e}; installing it without a nexthop object");
                    nexthops.release(destination).await;
                }
            }
        }
        self.put_route(plain, destination, ours_there).await
    }

    async fn put_route(
        &self,
        route: RouteMessage,
        destination: IpNet,
        ours_there: bool,
    ) -> Result<(), KernelError> {
        if !ours_there {
            match self.handle.route().add(route.clone()).execute().await {
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                other => return other.map_err(netlink("installing route to", destination)),
            }
        }
        // A route is on the prefix already: ours (a changed next hop) is replaced;
        // without ours, the one there belongs to someone else.
        let owners = if ours_there {
            vec![RouteProtocol::Other(ROUTE_PROTOCOL)]
        } else {
            self.route_owners(destination).await?
        };
        if !owners.contains(&RouteProtocol::Other(ROUTE_PROTOCOL)) {
            return Err(KernelError::ForeignRoute {
                destination,
                protocol: owners
                    .first()
                    .map_or_else(|| "unknown".into(), |p| format!("{p:?}").to_lowercase()),
            });
        }
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(netlink("replacing route to", destination))
    }

    /// Who holds each prefix of the main table (both families): one dump, so a
    /// resync over thousands of peers asks the kernel once, not once per peer.
    pub async fn prefix_owners(&self) -> Result<HashMap<IpNet, PrefixOwners>, KernelError> {
        let mut owners: HashMap<IpNet, PrefixOwners> = HashMap::new();
        for message in self.main_table().await? {
            let Some((destination, ours)) = main_route(&message) else {
                continue;
            };
            owners.entry(destination).or_default().apply(
                route_owner(&message, ours),
                RouteKey::of(&message),
                false,
                false,
            );
        }
        Ok(owners)
    }

    /// The protocols of the main table's routes to exactly `destination` at the key of
    /// hgw's route (those of other metrics do not stand in its way).
    async fn route_owners(&self, destination: IpNet) -> Result<Vec<RouteProtocol>, KernelError> {
        let key = RouteKey::hgw(&destination);
        Ok(self
            .main_table()
            .await?
            .iter()
            .filter(|m| main_route(m).is_some_and(|(d, _)| d == destination))
            .filter(|m| RouteKey::of(m) == key)
            .map(|m| m.header.protocol)
            .collect())
    }

    /// Every route in the main table (IPv4 and IPv6) that carries hgw's tag.
    pub async fn hgw_routes(&self) -> Result<Vec<HgwRoute>, KernelError> {
        Ok(self
            .main_table()
            .await?
            .iter()
            .filter_map(HgwRoute::from_message)
            .collect())
    }

    /// Every route the kernel lists, IPv4 then IPv6 (the callers keep the main table's).
    async fn main_table(&self) -> Result<Vec<RouteMessage>, KernelError> {
        let mut routes = Vec::new();
        for (request, family) in [
            (RouteMessageBuilder::<Ipv4Addr>::new().build(), "ipv4"),
            (RouteMessageBuilder::<Ipv6Addr>::new().build(), "ipv6"),
        ] {
            let messages: Vec<RouteMessage> = self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing routes", family))?;
            routes.extend(messages);
        }
        Ok(routes)
    }

    /// Deletes a route hgw installed, then its nexthop: the request carries hgw's tag,
    /// and the kernel deletes only a route with the same protocol, so someone else's
    /// route on the prefix is never taken. Neither gateway nor device is named: the
    /// kernel matches neither against a route on a nexthop object (IPv4 then finds
    /// nothing), and hgw has one route per prefix.
    pub async fn delete_route(&self, route: &HgwRoute) -> Result<(), KernelError> {
        let result = match self
            .handle
            .route()
            .del(route_to(route.destination))
            .execute()
            .await
        {
            // Gone already: done.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            other => other.map_err(netlink("deleting route to", route.destination)),
        };
        if result.is_ok()
            && let Some(nexthops) = &self.nexthops
        {
            nexthops.release(route.destination).await;
        }
        result
    }
}

/// The nexthop object a route is on.
fn nexthop_id(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::NhId(id) => Some(*id),
        _ => None,
    })
}

/// A main-table unicast route to `destination` tagged with hgw's protocol, with no
/// next hop yet.
fn route_to(destination: IpNet) -> RouteMessage {
    match destination {
        IpNet::V4(net) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build(),
        IpNet::V6(net) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build(),
    }
}

/// `DEST via GATEWAY dev OIF onlink proto hgw`.
fn plain_route(destination: IpNet, gateway: IpAddr, oif: u32) -> Result<RouteMessage, KernelError> {
    // The same route for either family, tagged and on-link.
    fn tagged<T>(route: RouteMessageBuilder<T>, oif: u32) -> RouteMessage {
        route
            .output_interface(oif)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .onlink()
            .build()
    }
    match (destination, gateway) {
        (IpNet::V4(net), IpAddr::V4(gateway)) => Ok(tagged(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .gateway(gateway),
            oif,
        )),
        (IpNet::V6(net), IpAddr::V6(gateway)) => Ok(tagged(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .gateway(gateway),
            oif,
        )),
        _ => Err(KernelError::InvalidRoute {
            destination,
            gateway,
            reason: "destination and gateway are of different families".into(),
        }),
    }
}
