//! hgw's routes in the main table: installed exclusively, replaced or deleted only
//! with hgw's tag.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use hgw_common::ROUTE_PROTOCOL;
use ipnet::IpNet;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
    },
};

use super::{Kernel, KernelError, netlink};

/// Who holds a prefix of the main table: hgw (its route's gateway and interface) and/or
/// someone else (the protocol of their route).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixOwners {
    pub ours: Option<(Option<IpAddr>, Option<u32>)>,
    pub foreign: Option<String>,
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
    /// `ip route add DEST via GATEWAY dev OIF onlink proto hgw`, created exclusively:
    /// a route already on the prefix is replaced only if it carries hgw's tag
    /// (NLM_F_REPLACE alone would take over anyone's route); otherwise
    /// [`KernelError::ForeignRoute`].
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
        // The same route for either family, tagged and on-link.
        fn tagged<T>(route: RouteMessageBuilder<T>, oif: u32) -> RouteMessage {
            route
                .output_interface(oif)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .onlink()
                .build()
        }
        let route = match (destination, gateway) {
            (IpNet::V4(net), IpAddr::V4(gateway)) => tagged(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(net.network(), net.prefix_len())
                    .gateway(gateway),
                oif,
            ),
            (IpNet::V6(net), IpAddr::V6(gateway)) => tagged(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(net.network(), net.prefix_len())
                    .gateway(gateway),
                oif,
            ),
            _ => {
                return Err(KernelError::InvalidRoute {
                    destination,
                    gateway,
                    reason: "destination and gateway are of different families".into(),
                });
            }
        };
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
            let entry = owners.entry(destination).or_default();
            if ours {
                let route = HgwRoute::from_message(&message);
                entry.ours = Some((
                    route.as_ref().and_then(|r| r.gateway),
                    route.as_ref().and_then(|r| r.oif),
                ));
            } else if entry.foreign.is_none() {
                entry.foreign = Some(format!("{:?}", message.header.protocol).to_lowercase());
            }
        }
        Ok(owners)
    }

    /// The protocols of the main table's routes to exactly `destination`.
    async fn route_owners(&self, destination: IpNet) -> Result<Vec<RouteProtocol>, KernelError> {
        Ok(self
            .main_table()
            .await?
            .iter()
            .filter(|m| main_route(m).is_some_and(|(d, _)| d == destination))
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

    /// Deletes a route hgw installed: the request carries hgw's tag, and the kernel
    /// deletes only a route with the same protocol, so someone else's route on the
    /// prefix is never taken.
    pub async fn delete_route(&self, route: &HgwRoute) -> Result<(), KernelError> {
        fn tagged<T>(route: RouteMessageBuilder<T>, oif: Option<u32>) -> RouteMessage {
            let route = route.protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
            match oif {
                Some(oif) => route.output_interface(oif).build(),
                None => route.build(),
            }
        }
        let message = match (route.destination, route.gateway) {
            (IpNet::V4(net), gateway) => {
                let builder = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(net.network(), net.prefix_len());
                match gateway {
                    Some(IpAddr::V4(gateway)) => tagged(builder.gateway(gateway), route.oif),
                    _ => tagged(builder, route.oif),
                }
            }
            (IpNet::V6(net), gateway) => {
                let builder = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(net.network(), net.prefix_len());
                match gateway {
                    Some(IpAddr::V6(gateway)) => tagged(builder.gateway(gateway), route.oif),
                    _ => tagged(builder, route.oif),
                }
            }
        };
        match self.handle.route().del(message).execute().await {
            // Gone already: done.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            other => other.map_err(netlink("deleting route to", route.destination)),
        }
    }
}
