//! Links and addresses.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    LinkBridge, LinkUnspec,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
};

use super::{Kernel, KernelError, netlink};

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

impl Kernel {
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
