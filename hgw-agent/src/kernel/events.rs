//! The kernel's multicast events, typed for the agent.

use std::net::IpAddr;

use futures::StreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{AddressFamily, RouteNetlinkMessage, route::RouteMessage},
};

use super::{
    KernelError,
    link::{BridgePort, Link, link_name, port_of},
    neigh::{Neighbour, fdb_entry},
    route::{HgwRoute, RouteKey, main_route},
};

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
        /// Its TOS and metric: a prefix may hold routes of several.
        key: RouteKey,
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
        /// A bridge port's settings, where the message carries them.
        port: Option<BridgePort>,
        /// A bridge's VLAN filtering, where the message carries it.
        vlan_filtering: Option<bool>,
        deleted: bool,
    },
    /// A qdisc or a tc filter was added, changed or deleted on interface `ifindex`
    /// (`None`: on a shared filter block, which may be on any interface).
    Tc { ifindex: Option<u32> },
    /// A route outside the main table, or a routing rule, was added or deleted: the
    /// kernel's routing decisions may have changed (main-table routes come as
    /// [`KernelEvent::Route`], which means the same besides).
    Routing,
    /// One of hgw's nexthop objects was deleted, and the routes on it with it.
    NexthopDeleted { id: u32 },
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
                    key: RouteKey::of(&msg),
                    deleted,
                    replaced: !deleted && flags & rtnetlink::packet_core::NLM_F_REPLACE != 0,
                })
            }
            M::NewLink(msg) => Some(Self::Link {
                index: msg.header.index,
                name: link_name(&msg),
                controller: port_of(&msg),
                // The bridge's own notifications (AF_BRIDGE) leave out what the
                // interface's carry (its XDP): they say nothing of it.
                link: (msg.header.interface_family != AddressFamily::Bridge)
                    .then(|| Link::from_message(&msg))
                    .flatten(),
                port: BridgePort::from_message(&msg),
                vlan_filtering: super::link::vlan_filtering(&msg),
                deleted,
            }),
            _ => None,
        }
    }
}

pub(super) fn route_owner(msg: &RouteMessage, ours: bool) -> RouteOwner {
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

/// How many kernel events may wait for the agent; past that they are dropped and the
/// agent is told to resync from dumps (bounded memory under an event flood). The
/// agent's own first pass makes one route event per peer while it is busy installing:
/// 4,096 made every start with 5,000 peers end in a warning and a resync.
const EVENT_QUEUE: usize = 16_384;
/// The multicast socket's receive buffer: a burst of events waits there, not lost.
const EVENT_SOCKET_BUFFER: usize = 4 << 20;

/// Kernel events as they come, from a multicast connection read by its own task.
pub struct KernelEvents {
    pub events: tokio::sync::mpsc::Receiver<KernelEvent>,
    /// Set when events were dropped: the receiver's view must be rebuilt from dumps.
    pub overflowed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Subscribes to neighbour, route, rule, link and tc (qdisc and filter) events, and to
/// the deletion of hgw's nexthops (on a socket of their own: rtnetlink's messages do
/// not include nexthops).
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
    // A kernel without nexthop objects refuses the group; hgw's routes are plain there.
    if let Ok(mut deleted) = super::nexthop::deleted_nexthops() {
        let tx = tx.clone();
        let flag = overflowed.clone();
        tokio::spawn(async move {
            while let Some(id) = deleted.recv().await {
                match tx.try_send(KernelEvent::NexthopDeleted { id }) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        flag.store(true, Ordering::Relaxed);
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
    }
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
