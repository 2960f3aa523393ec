//! What the agent asks of the kernel over rtnetlink: links, addresses, hgw's routes and
//! neighbour entries. Routes carry hgw's protocol tag; only routes with it are deleted.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt as _, TryStreamExt as _};
use hgw_common::ROUTE_PROTOCOL;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkBridge, LinkUnspec, MulticastGroup, RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
        },
    },
};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{operation} {object}: {source}")]
    Netlink {
        operation: &'static str,
        object: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} has no MAC address")]
    NoMac(String),
    #[error(
        "a route to {destination} exists and is not hgw's (proto {protocol}): left as it is, and the fast path does not take {destination}"
    )]
    ForeignRoute {
        destination: IpNet,
        protocol: String,
    },
    #[error("route to {destination} via {gateway}: {reason}")]
    InvalidRoute {
        destination: IpNet,
        gateway: IpAddr,
        reason: String,
    },
}

fn netlink(
    operation: &'static str,
    object: impl ToString,
) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    move |source| {
        crate::serve::metrics::count_netlink_error();
        KernelError::Netlink {
            operation,
            object: object.to_string(),
            source,
        }
    }
}

/// What the agent needs to know of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
}

impl Link {
    pub fn from_message(msg: &LinkMessage) -> Option<Self> {
        let mut mac = None;
        let mut mtu = 1500;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.index,
            mac: mac?,
            mtu,
            up: msg.header.flags.contains(LinkFlags::Up),
        })
    }
}

/// A neighbour entry: the MAC when the kernel holds one it would send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    /// NUD_STALE: the MAC is usable but has not been confirmed lately.
    pub stale: bool,
}

impl Neighbour {
    pub fn from_message(msg: &NeighbourMessage) -> Option<Self> {
        let mut ip = None;
        let mut lladdr = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    ip = Some(IpAddr::V4(*a))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    ip = Some(IpAddr::V6(*a))
                }
                NeighbourAttribute::LinkLayerAddress(a) => {
                    lladdr = <[u8; 6]>::try_from(a.as_slice()).ok()
                }
                _ => {}
            }
        }
        // INCOMPLETE, FAILED and NONE entries carry no MAC the kernel would use.
        let usable = matches!(
            msg.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        Some(Self {
            ifindex: msg.header.ifindex,
            ip: ip?,
            mac: lladdr.filter(|_| usable),
            stale: msg.header.state == NeighbourState::Stale,
        })
    }
}

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

/// A handle on the kernel's routing netlink, in the network namespace the agent runs in.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
}

impl Kernel {
    /// Opens a request connection; its I/O runs on a spawned task.
    pub fn connect() -> Result<Self, KernelError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The request handle, for the tc dumps (`crate::tc`).
    pub fn handle(&self) -> rtnetlink::Handle {
        self.handle.clone()
    }

    /// The interface called `name`, or `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, KernelError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Link::from_message(&msg)
                .map(Some)
                .ok_or_else(|| KernelError::NoMac(name.to_owned())),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for a name it does not know.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink("looking up interface", name)(e)),
        }
    }

    /// The interfaces enslaved to bridge `bridge` (index, name).
    pub async fn bridge_ports(&self, bridge: u32) -> Result<Vec<(u32, String)>, KernelError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing ports of bridge", bridge))?;
        Ok(links
            .iter()
            .filter(|l| port_of(l) == Some(bridge))
            .filter_map(|l| Some((l.header.index, link_name(l)?)))
            .collect())
    }

    /// The networks assigned to interface `index` (address + prefix), IPv4 and IPv6;
    /// IPv6 link-local ones left out (no pod route goes through them).
    pub async fn networks(&self, index: u32) -> Result<Vec<IpNet>, KernelError> {
        Ok(self
            .addresses(Some(index))
            .await?
            .into_iter()
            .map(|(_, net)| net)
            .collect())
    }

    /// Every address of interface `index`, or of every interface, with its interface
    /// index; IPv6 link-local addresses left out.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>, KernelError> {
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let messages: Vec<_> = request.execute().try_collect().await.map_err(netlink(
            "listing addresses of interface",
            index.unwrap_or(0),
        ))?;
        Ok(messages
            .iter()
            .filter(|m| index.is_none_or(|i| m.header.index == i))
            .flat_map(|m| {
                // IPv4 addresses come as IFA_LOCAL, IPv6 ones only as IFA_ADDRESS.
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Local(ip @ IpAddr::V4(_))
                    | AddressAttribute::Address(ip @ IpAddr::V6(_)) => {
                        IpNet::new(*ip, m.header.prefix_len)
                            .ok()
                            .map(|net| (m.header.index, net))
                    }
                    _ => None,
                })
            })
            .filter(|(_, net)| match net {
                IpNet::V6(v6) => !v6.addr().is_unicast_link_local(),
                IpNet::V4(_) => true,
            })
            .collect())
    }

    /// Creates bridge `name` unless it exists, and sets it up.
    pub async fn ensure_bridge(&self, name: &str) -> Result<Link, KernelError> {
        if self.link(name).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(netlink("creating bridge", name))?;
        }
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| KernelError::NoMac(name.to_owned()))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(netlink("setting up interface", name))?;
        Ok(link)
    }

    /// Adds `net` (address/prefix) to interface `index`, keeping it if present.
    pub async fn ensure_address(&self, index: u32, net: IpNet) -> Result<(), KernelError> {
        if self.networks(index).await?.contains(&net) {
            return Ok(());
        }
        self.handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(netlink("adding address", net))
    }

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

    /// The neighbour entries (ARP and NDP) of interface `index`, by IP.
    pub async fn neighbours(&self, index: u32) -> Result<HashMap<IpAddr, Neighbour>, KernelError> {
        let mut neighbours = HashMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let messages: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing neighbours of interface", index))?;
            neighbours.extend(
                messages
                    .iter()
                    .filter_map(Neighbour::from_message)
                    .filter(|n| n.ifindex == index)
                    .map(|n| (n.ip, n)),
            );
        }
        Ok(neighbours)
    }

    /// The bridge's learned forwarding entries: MAC -> port ifindex (the ports' own
    /// addresses, which the bridge keeps as permanent entries, left out).
    pub async fn learned_macs(&self) -> Result<HashMap<[u8; 6], u32>, KernelError> {
        let messages: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing", "bridge forwarding entries"))?;
        Ok(messages.iter().filter_map(fdb_entry).collect())
    }

    /// Asks the kernel to resolve `ip` on interface `index` (NTF_USE: it sends an ARP
    /// request or a neighbour solicitation as if a packet were waiting), without
    /// sending any packet ourselves.
    pub async fn resolve_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
            .map_err(netlink("resolving neighbour", ip))
    }
}

/// The bridge (or other controller) a link is enslaved to.
pub fn port_of(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

pub fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// What happened in the kernel, as the agent needs it: the typed form of rtnetlink's
/// multicast messages (their types stop at this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// An ARP/NDP entry changed (`mac: None`: unusable) or was deleted.
    Neighbour { neighbour: Neighbour, deleted: bool },
    /// A bridge forwarding entry: `mac` is behind port `port`.
    Fdb {
        mac: [u8; 6],
        port: u32,
        deleted: bool,
    },
    /// A main-table route was added or deleted.
    Route {
        destination: IpNet,
        owner: RouteOwner,
        deleted: bool,
        /// Added in place of the route that was there (`ip route replace`): the
        /// kernel sends no deletion for the one replaced.
        replaced: bool,
    },
    /// An interface was added, changed or deleted.
    Link {
        index: u32,
        name: Option<String>,
        /// The bridge it is a port of.
        controller: Option<u32>,
        /// Its MAC and MTU (`None` for a link without a MAC).
        link: Option<Link>,
        deleted: bool,
    },
    /// A qdisc or a tc filter was added, changed or deleted on interface `ifindex`
    /// (`None`: on a shared filter block, which may be on any interface).
    Tc { ifindex: Option<u32> },
    /// A route outside the main table, or a routing rule, was added or deleted: the
    /// kernel's routing decisions may have changed (main-table routes come as
    /// [`KernelEvent::Route`], which means the same besides).
    Routing,
    /// Events were lost (the socket's buffer overran): what is known must be rebuilt
    /// from dumps.
    Lost,
}

/// Whose a main-table route is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOwner {
    Hgw {
        gateway: Option<IpAddr>,
        oif: Option<u32>,
    },
    /// Someone else's (its protocol).
    Foreign(String),
}

impl KernelEvent {
    /// The event a multicast message announces, if the agent cares about its kind.
    pub fn from_message(message: RouteNetlinkMessage, flags: u16) -> Option<Self> {
        use RouteNetlinkMessage as M;
        let (message, deleted) = match message {
            M::NewQueueDiscipline(msg)
            | M::DelQueueDiscipline(msg)
            | M::NewTrafficFilter(msg)
            | M::DelTrafficFilter(msg) => {
                // A shared block's filters come with the magic index -1.
                let ifindex = u32::try_from(msg.header.index).ok().filter(|i| *i != 0);
                return Some(Self::Tc { ifindex });
            }
            M::NewRule(_) | M::DelRule(_) => return Some(Self::Routing),
            M::DelNeighbour(msg) => (M::NewNeighbour(msg), true),
            M::DelRoute(msg) => (M::NewRoute(msg), true),
            M::DelLink(msg) => (M::NewLink(msg), true),
            other => (other, false),
        };
        match message {
            M::NewNeighbour(msg) if msg.header.family == AddressFamily::Bridge => {
                let (mac, port) = fdb_entry(&msg)?;
                Some(Self::Fdb { mac, port, deleted })
            }
            M::NewNeighbour(msg) => {
                let neighbour = Neighbour::from_message(&msg)?;
                Some(Self::Neighbour {
                    neighbour: if deleted {
                        Neighbour {
                            mac: None,
                            stale: false,
                            ..neighbour
                        }
                    } else {
                        neighbour
                    },
                    deleted,
                })
            }
            M::NewRoute(msg) => {
                let Some((destination, ours)) = main_route(&msg) else {
                    return Some(Self::Routing);
                };
                Some(Self::Route {
                    destination,
                    owner: route_owner(&msg, ours),
                    deleted,
                    replaced: !deleted && flags & rtnetlink::packet_core::NLM_F_REPLACE != 0,
                })
            }
            M::NewLink(msg) => Some(Self::Link {
                index: msg.header.index,
                name: link_name(&msg),
                controller: port_of(&msg),
                link: Link::from_message(&msg),
                deleted,
            }),
            _ => None,
        }
    }
}

fn route_owner(msg: &RouteMessage, ours: bool) -> RouteOwner {
    if ours {
        let route = HgwRoute::from_message(msg);
        RouteOwner::Hgw {
            gateway: route.and_then(|r| r.gateway),
            oif: route.and_then(|r| r.oif),
        }
    } else {
        RouteOwner::Foreign(format!("{:?}", msg.header.protocol).to_lowercase())
    }
}

/// A learned bridge forwarding entry (MAC, port); the ports' own addresses, which the
/// bridge keeps as permanent entries, are not learned ones.
fn fdb_entry(msg: &NeighbourMessage) -> Option<([u8; 6], u32)> {
    if matches!(
        msg.header.state,
        NeighbourState::Permanent | NeighbourState::Noarp
    ) {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => Some((
            <[u8; 6]>::try_from(mac.as_slice()).ok()?,
            msg.header.ifindex,
        )),
        _ => None,
    })
}

/// How many kernel events may wait for the agent; past that they are dropped and the
/// agent is told to resync from dumps (bounded memory under an event flood).
const EVENT_QUEUE: usize = 4096;
/// The multicast socket's receive buffer: a burst of events waits there, not lost.
const EVENT_SOCKET_BUFFER: usize = 4 << 20;

/// Kernel events as they come, from a multicast connection read by its own task.
pub struct KernelEvents {
    pub events: tokio::sync::mpsc::Receiver<KernelEvent>,
    /// Set when events were dropped: the receiver's view must be rebuilt from dumps.
    pub overflowed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Subscribes to neighbour, route, rule, link and tc (qdisc and filter) events.
pub fn subscribe() -> Result<KernelEvents, KernelError> {
    use std::sync::atomic::Ordering;
    let (mut connection, _, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
        MulticastGroup::Link,
        MulticastGroup::Tc,
    ])
    .map_err(KernelError::Connect)?;
    // Best effort: a smaller buffer only makes an overflow (and a resync) likelier.
    let _ = rtnetlink::sys::AsyncSocket::socket_mut(connection.socket_mut())
        .set_rx_buf_sz(EVENT_SOCKET_BUFFER);
    tokio::spawn(connection);
    let (tx, events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let overflowed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = overflowed.clone();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let flags = message.header.flags;
            let event = match message.payload {
                NetlinkPayload::InnerMessage(message) => {
                    let Some(event) = KernelEvent::from_message(message, flags) else {
                        continue;
                    };
                    event
                }
                NetlinkPayload::Overrun(_) => KernelEvent::Lost,
                _ => continue,
            };
            match tx.try_send(event) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    flag.store(true, Ordering::Relaxed);
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    Ok(KernelEvents { events, overflowed })
}
