//! Links and addresses.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    LinkBridge, LinkUnspec,
    packet_core::Nla as _,
    packet_route::{
        address::AddressAttribute,
        link::{
            InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, LinkAttribute, LinkFlags,
            LinkInfo, LinkMessage, LinkProtoInfoBridge, LinkXdp, XdpAttached,
        },
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
    /// An XDP program is attached (any mode). On a pod's end of a veth it runs on
    /// what the port transmits, not on what `bpf_redirect_peer` puts there: native
    /// XDP runs in `veth_xmit`'s path, and generic XDP passes a redirected skb.
    pub xdp: bool,
}

impl Link {
    pub fn from_message(msg: &LinkMessage) -> Option<Self> {
        let mut mac = None;
        let (mut mtu, mut attached) = (1500, XdpAttached::None);
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::Xdp(xs) => {
                    for x in xs {
                        if let LinkXdp::Attached(a) = x {
                            attached = *a;
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.index,
            mac: mac?,
            mtu,
            up: msg.header.flags.contains(LinkFlags::Up),
            xdp: attached != XdpAttached::None,
        })
    }
}

/// `BR_STATE_FORWARDING`: the one spanning-tree state in which a bridge port takes
/// frames in and sends frames out.
pub const BR_STATE_FORWARDING: u8 = 3;
/// `IFLA_BRPORT_*`, as the bridge's own notifications (family AF_BRIDGE,
/// `IFLA_PROTINFO`) carry them.
const IFLA_BRPORT_STATE: u16 = 1;
const IFLA_BRPORT_UNICAST_FLOOD: u16 = 9;
const IFLA_BRPORT_PROXYARP: u16 = 10;
const IFLA_BRPORT_LOCKED: u16 = 39;

/// A bridge port's own settings that decide what the bridge does with frames through
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgePort {
    /// Its spanning-tree state (`BR_STATE_*`): other than forwarding, the bridge drops
    /// what comes in through it and sends nothing out.
    pub state: u8,
    /// `locked`: what comes in from a MAC the bridge has no entry for on this port is
    /// dropped.
    pub locked: bool,
    /// Unicast flooding off, or proxy ARP on: a frame for a MAC the bridge has no
    /// entry for is not flooded to this port.
    pub no_flood: bool,
    /// The port's MTU (`None`: the message did not say): the bridge drops a frame too
    /// big for it on the way out (`br_dev_queue_push_xmit`).
    pub mtu: Option<u32>,
    /// The other end of the port, where it is a veth in another namespace (a pod's
    /// interface): that namespace's id here and its index there (`None`: not said).
    pub peer: Option<(i32, u32)>,
}

impl BridgePort {
    /// What a link message says of the port's settings: in `IFLA_LINKINFO`'s port data
    /// (a link dump or change) or in `IFLA_PROTINFO` (the bridge's own notifications);
    /// `None` where it says nothing.
    pub fn from_message(msg: &LinkMessage) -> Option<Self> {
        let (mut state, mut locked, mut flood, mut proxy_arp) = (None, false, true, false);
        let (mut mtu, mut peer_index, mut peer_ns, mut veth) = (None, None, None, false);
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::Link(index) => peer_index = Some(*index),
                LinkAttribute::LinkNetNsId(ns) => peer_ns = Some(*ns),
                LinkAttribute::LinkInfo(infos) => {
                    veth |= infos.contains(&LinkInfo::Kind(InfoKind::Veth));
                    for info in infos {
                        let LinkInfo::PortData(InfoPortData::BridgePort(port)) = info else {
                            continue;
                        };
                        for a in port {
                            match a {
                                InfoBridgePort::State(s) => state = Some(u8::from(*s)),
                                InfoBridgePort::Locked(l) => locked = *l,
                                InfoBridgePort::UnicastFlood(f) => flood = *f,
                                InfoBridgePort::ProxyARP(p) => proxy_arp = *p,
                                _ => {}
                            }
                        }
                    }
                }
                LinkAttribute::ProtoInfoBridge(port) => {
                    for a in port {
                        let LinkProtoInfoBridge::Other(nla) = a else {
                            continue;
                        };
                        let mut value = vec![0; nla.value_len()];
                        nla.emit_value(&mut value);
                        match (nla.kind(), value.first()) {
                            (IFLA_BRPORT_STATE, Some(s)) => state = Some(*s),
                            (IFLA_BRPORT_LOCKED, Some(l)) => locked = *l != 0,
                            (IFLA_BRPORT_UNICAST_FLOOD, Some(f)) => flood = *f != 0,
                            (IFLA_BRPORT_PROXYARP, Some(p)) => proxy_arp = *p != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            state: state?,
            locked,
            no_flood: !flood || proxy_arp,
            mtu,
            // A vlan or macvlan port names its lower device the same way.
            peer: peer_ns.zip(peer_index).filter(|_| veth),
        })
    }
}

/// Whether a bridge's message says it filters by VLAN (`None`: it says nothing, as
/// the bridge's own AF_BRIDGE notifications).
pub fn vlan_filtering(msg: &LinkMessage) -> Option<bool> {
    msg.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Data(InfoData::Bridge(bridge)) => bridge.iter().find_map(|b| match b {
                InfoBridge::VlanFiltering(on) => Some(*on),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// A bridge as a link dump shows it: whether it filters by VLAN, and its ports (index,
/// name, settings).
#[derive(Debug, Default)]
pub struct BridgeView {
    pub vlan_filtering: bool,
    pub ports: Vec<(u32, String, Option<BridgePort>)>,
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

    /// Interface `index` of the namespace this one knows as `nsid` (a pod's end of its
    /// veth), or `None` if it is not there (`IFLA_TARGET_NETNSID`; needs CAP_NET_ADMIN
    /// over that namespace).
    pub async fn link_in(&self, nsid: i32, index: u32) -> Result<Option<Link>, KernelError> {
        let mut request = self.handle.link().get().match_index(index);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(nsid));
        match request.execute().try_next().await {
            Ok(msg) => Ok(msg.as_ref().and_then(Link::from_message)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink(
                "looking up the pod's end of",
                format!("{index} in namespace {nsid}"),
            )(e)),
        }
    }

    /// Bridge `bridge` and the interfaces enslaved to it, from one link dump.
    pub async fn bridge_view(&self, bridge: u32) -> Result<BridgeView, KernelError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing ports of bridge", bridge))?;
        Ok(BridgeView {
            vlan_filtering: links
                .iter()
                .find(|l| l.header.index == bridge)
                .and_then(vlan_filtering)
                .unwrap_or(false),
            ports: links
                .iter()
                .filter(|l| port_of(l) == Some(bridge))
                .filter_map(|l| Some((l.header.index, link_name(l)?, BridgePort::from_message(l))))
                .collect(),
        })
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

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::{BridgePortState, InfoPortKind};

    use super::*;

    #[test]
    fn a_ports_settings_come_from_its_link_info_or_the_bridges_notification() {
        let mut dump = LinkMessage::default();
        dump.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![
                InfoBridgePort::State(BridgePortState::Learning),
                InfoBridgePort::Locked(true),
            ])),
        ]));
        dump.attributes.push(LinkAttribute::Mtu(1400));
        assert_eq!(
            BridgePort::from_message(&dump),
            Some(BridgePort {
                state: 2,
                locked: true,
                no_flood: false,
                mtu: Some(1400),
                peer: None,
            })
        );
        let mut notification = LinkMessage::default();
        notification
            .attributes
            .push(LinkAttribute::ProtoInfoBridge(vec![
                LinkProtoInfoBridge::Other(rtnetlink::packet_core::DefaultNla::new(
                    IFLA_BRPORT_STATE,
                    vec![BR_STATE_FORWARDING],
                )),
            ]));
        assert_eq!(
            BridgePort::from_message(&notification),
            Some(BridgePort {
                state: BR_STATE_FORWARDING,
                locked: false,
                no_flood: false,
                mtu: None,
                peer: None,
            })
        );
        // Nothing said of it: nothing known.
        assert_eq!(BridgePort::from_message(&LinkMessage::default()), None);
        assert_eq!(vlan_filtering(&LinkMessage::default()), None);
        let mut bridge = LinkMessage::default();
        bridge
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Data(
                InfoData::Bridge(vec![InfoBridge::VlanFiltering(true)]),
            )]));
        assert_eq!(vlan_filtering(&bridge), Some(true));
    }
}
