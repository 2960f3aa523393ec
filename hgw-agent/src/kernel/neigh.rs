//! Neighbour entries: next hops' MACs and the bridge's learned addresses.

use std::{collections::HashMap, net::IpAddr};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    AddressFamily,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
};

use super::{Kernel, KernelError, netlink};

/// A neighbour entry: the MAC when the kernel holds one it would send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    /// NUD_STALE: the MAC is usable but has not been confirmed lately.
    pub stale: bool,
}

/// The kernel's neighbour table of one family, one for every network namespace: above
/// `soft` entries (`gc_thresh2`) it evicts entries unused for 5 s, and it holds at most
/// `hard` (`gc_thresh3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighbourLimits {
    pub soft: usize,
    pub hard: usize,
}

impl NeighbourLimits {
    /// The running kernel's for IPv4 or IPv6; `None` where its sysctls are not to be
    /// seen (they are only in the host's network namespace).
    pub fn read(ipv6: bool) -> Option<Self> {
        let family = if ipv6 { "ipv6" } else { "ipv4" };
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/{family}/neigh/default/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Self {
            soft: read("gc_thresh2")?,
            hard: read("gc_thresh3")?,
        })
    }
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

impl Kernel {
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

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A learned bridge forwarding entry (MAC, port); the ports' own addresses, which the
/// bridge keeps as permanent entries, are not learned ones.
pub(super) fn fdb_entry(msg: &NeighbourMessage) -> Option<([u8; 6], u32)> {
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
