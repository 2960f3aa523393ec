//! What the agent asks of the kernel over rtnetlink: links and addresses ([`link`]),
//! hgw's routes ([`route`]), neighbour entries ([`neigh`]), and the kernel's events
//! ([`events`]). Routes carry hgw's protocol tag; only routes with it are deleted. And,
//! over NETLINK_XFRM, the IPsec policies a redirect would skip ([`xfrm`]), and over
//! NETLINK_NETFILTER, nftables' hooks on interfaces ([`nftables`]).

mod events;
mod link;
mod neigh;
mod netlink;
mod nexthop;
pub mod nftables;
mod route;
pub mod xfrm;

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use rtnetlink::Handle;

pub use events::{KernelEvent, KernelEvents, RouteOwner, subscribe};
pub use link::{BR_STATE_FORWARDING, BridgePort, BridgeView, Link, link_name, port_of};
pub use neigh::{Neighbour, NeighbourLimits, format_mac};
pub use nexthop::{NexthopError, remove_all as remove_hgw_nexthops};
pub use route::{HgwRoute, PrefixOwners, RouteKey, main_route};

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

/// A handle on the kernel's routing netlink, in the network namespace the agent runs in.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
    /// hgw's nexthop objects, once [`Kernel::use_nexthops`] found them usable.
    nexthops: Option<Arc<nexthop::Nexthops>>,
}

impl Kernel {
    /// Opens a request connection; its I/O runs on a spawned task.
    pub fn connect() -> Result<Self, KernelError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            nexthops: None,
        })
    }

    /// The request handle, for the tc dumps (`crate::tc`).
    pub fn handle(&self) -> rtnetlink::Handle {
        self.handle.clone()
    }
}
