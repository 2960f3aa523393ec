//! Nexthop objects (`ip nexthop`, Linux 5.3+): each of hgw's routes points at a nexthop
//! of its own, tagged with hgw's protocol.
//!
//! Why: the kernel keeps a plain route's gateway in a `fib_info`, found again on every
//! insert in a hash keyed by device, protocol and metric, not by gateway. A host-gw node's
//! routes all go out of one uplink, each via its own peer, so they all share one chain:
//! every insert walks all earlier ones (5,000 routes: 250-380 ms with `ip -batch`,
//! quadratic). A route on a nexthop object is hashed by the nexthop's id (70-90 ms for
//! the same 5,000, nexthops included). Forwarding is the same: the nexthop is the same
//! gateway on the same device, on-link, and with `net.ipv4.nexthop_compat_mode` (1 by
//! default) route dumps and events still carry the gateway and device.
//!
//! netlink-packet-route has no nexthop messages, so this module writes its own
//! (`struct nhmsg` and the `NHA_*` attributes the agent uses) and sends them on a
//! netlink-proto connection of its own.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use futures::StreamExt as _;
use hgw_common::ROUTE_PROTOCOL;
use ipnet::IpNet;
use log::{debug, info};
use rtnetlink::{
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
        NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    },
    proto::ConnectionHandle,
    sys::{SocketAddr, TokioSocket, protocols::NETLINK_ROUTE},
};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
/// `struct nhmsg`: family, scope, protocol, reserved, flags.
const NHMSG_LEN: usize = 8;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One nexthop message: a request hgw sends or a nexthop the kernel lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexthopMessage {
    kind: u16,
    family: u8,
    protocol: u8,
    flags: u32,
    pub id: Option<u32>,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
}

impl NexthopMessage {
    /// Whether the kernel's nexthop carries hgw's tag.
    pub fn is_hgw(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL
    }

    fn attributes(&self) -> Vec<(u16, Vec<u8>)> {
        let mut attrs = Vec::new();
        if let Some(id) = self.id {
            attrs.push((NHA_ID, id.to_ne_bytes().to_vec()));
        }
        if let Some(oif) = self.oif {
            attrs.push((NHA_OIF, oif.to_ne_bytes().to_vec()));
        }
        match self.gateway {
            Some(IpAddr::V4(a)) => attrs.push((NHA_GATEWAY, a.octets().to_vec())),
            Some(IpAddr::V6(a)) => attrs.push((NHA_GATEWAY, a.octets().to_vec())),
            None => {}
        }
        attrs
    }
}

/// An attribute's length on the wire: its 4-byte header and value, padded to 4.
fn attribute_len(value: &[u8]) -> usize {
    (4 + value.len()).next_multiple_of(4)
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        NHMSG_LEN
            + self
                .attributes()
                .iter()
                .map(|(_, v)| attribute_len(v))
                .sum::<usize>()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer.fill(0);
        buffer[0] = self.family;
        buffer[2] = self.protocol;
        buffer[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        let mut at = NHMSG_LEN;
        for (kind, value) in self.attributes() {
            let len = 4 + value.len();
            buffer[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
            buffer[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
            buffer[at + 4..at + len].copy_from_slice(&value);
            at += attribute_len(&value);
        }
    }
}

/// A nexthop message the kernel sent that this module cannot read.
#[derive(Debug, thiserror::Error)]
#[error("malformed nexthop message: {0}")]
pub struct MalformedNexthop(&'static str);

impl NetlinkDeserializable for NexthopMessage {
    type Error = MalformedNexthop;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        let head = payload
            .get(..NHMSG_LEN)
            .ok_or(MalformedNexthop("shorter than struct nhmsg"))?;
        let mut message = NexthopMessage {
            kind: header.message_type,
            family: head[0],
            protocol: head[2],
            flags: u32::from_ne_bytes([head[4], head[5], head[6], head[7]]),
            id: None,
            oif: None,
            gateway: None,
        };
        let mut rest = &payload[NHMSG_LEN..];
        while rest.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            let value = rest
                .get(4..len)
                .ok_or(MalformedNexthop("an attribute overruns the message"))?;
            let word = || value.try_into().ok().map(u32::from_ne_bytes);
            match kind {
                NHA_ID => message.id = word(),
                NHA_OIF => message.oif = word(),
                NHA_GATEWAY => {
                    message.gateway = match value.len() {
                        4 => <[u8; 4]>::try_from(value).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(value).ok().map(IpAddr::from),
                        _ => None,
                    }
                }
                _ => {}
            }
            rest = rest
                .get(len.next_multiple_of(4).max(4)..)
                .unwrap_or_default();
        }
        Ok(message)
    }
}

/// What the kernel answered to a nexthop request.
#[derive(Debug, thiserror::Error)]
pub enum NexthopError {
    #[error("the netlink connection for nexthops is gone")]
    Connection,
    #[error("{0}")]
    Kernel(std::io::Error),
    #[error("the kernel answered a nexthop request with an unexpected message")]
    Unexpected,
}

impl NexthopError {
    /// The errno the kernel answered with, if it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Requests about nexthop objects, on a connection of their own.
#[derive(Clone, Debug)]
pub struct NexthopSocket {
    handle: ConnectionHandle<NexthopMessage>,
}

impl NexthopSocket {
    /// Opens the connection; its I/O runs on a spawned task.
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::proto::new_connection_with_socket::<
            NexthopMessage,
            TokioSocket,
        >(NETLINK_ROUTE)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// `ip nexthop add id ID via GATEWAY dev OIF onlink proto hgw`: exclusively, or
    /// replacing whatever nexthop has the id.
    pub async fn set(
        &self,
        id: u32,
        gateway: IpAddr,
        oif: u32,
        replace: bool,
    ) -> Result<(), NexthopError> {
        let message = NexthopMessage {
            kind: RTM_NEWNEXTHOP,
            family: match gateway {
                IpAddr::V4(_) => AF_INET,
                IpAddr::V6(_) => AF_INET6,
            },
            protocol: ROUTE_PROTOCOL,
            flags: RTNH_F_ONLINK,
            id: Some(id),
            oif: Some(oif),
            gateway: Some(gateway),
        };
        let flags = NLM_F_CREATE | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.acked(message, flags).await
    }

    /// `ip nexthop del id ID`.
    pub async fn delete(&self, id: u32) -> Result<(), NexthopError> {
        let message = NexthopMessage {
            kind: RTM_DELNEXTHOP,
            family: AF_UNSPEC,
            protocol: 0,
            flags: 0,
            id: Some(id),
            oif: None,
            gateway: None,
        };
        self.acked(message, 0).await
    }

    /// Every nexthop of the namespace.
    pub async fn list(&self) -> Result<Vec<NexthopMessage>, NexthopError> {
        let message = NexthopMessage {
            kind: RTM_GETNEXTHOP,
            family: AF_UNSPEC,
            protocol: 0,
            flags: 0,
            id: None,
            oif: None,
            gateway: None,
        };
        let mut responses = self.request(message, NLM_F_DUMP)?;
        let mut nexthops = Vec::new();
        while let Some(response) = responses.next().await {
            match response.payload {
                NetlinkPayload::InnerMessage(m) => nexthops.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(NexthopError::Kernel(e.to_io()));
                }
                NetlinkPayload::Done(_) => break,
                _ => {}
            }
        }
        Ok(nexthops)
    }

    /// Sends a request and waits for its acknowledgement (which netlink-proto takes
    /// itself, ending the stream) or error.
    async fn acked(&self, message: NexthopMessage, flags: u16) -> Result<(), NexthopError> {
        let mut responses = self.request(message, flags | NLM_F_ACK)?;
        match responses.next().await.map(|r| r.payload) {
            Some(NetlinkPayload::Error(e)) if e.code.is_some() => {
                Err(NexthopError::Kernel(e.to_io()))
            }
            None | Some(NetlinkPayload::Error(_) | NetlinkPayload::Done(_)) => Ok(()),
            Some(_) => Err(NexthopError::Unexpected),
        }
    }

    fn request(
        &self,
        message: NexthopMessage,
        flags: u16,
    ) -> Result<impl futures::Stream<Item = NetlinkMessage<NexthopMessage>> + use<>, NexthopError>
    {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        request.finalize();
        self.handle
            .clone()
            .request(request, SocketAddr::new(0, 0))
            .map_err(|_| NexthopError::Connection)
    }
}

/// `RTNLGRP_NEXTHOP`: the kernel's nexthop events.
const RTNLGRP_NEXTHOP: u32 = 32;

/// The ids of hgw's nexthops as they are deleted by a request (`ip nexthop del` or
/// `flush`, anyone's), read by their own task: IPv4 deletes the routes on a nexthop
/// without a route event, so this is how the agent learns that they went. (A device
/// going down drops its nexthops without any event, as it does IPv4 routes; the
/// agent's resync when the uplink comes up puts them back.)
pub fn deleted_nexthops() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<u32>> {
    let (connection, _, mut messages) =
        rtnetlink::proto::new_connection_with_socket::<NexthopMessage, TokioSocket>(NETLINK_ROUTE)?;
    let mut connection = connection;
    let socket = rtnetlink::sys::AsyncSocket::socket_mut(connection.socket_mut());
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(RTNLGRP_NEXTHOP)?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(m) = message.payload
                && m.kind == RTM_DELNEXTHOP
                && m.is_hgw()
                && let Some(id) = m.id
                && tx.send(id).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// The first id hgw hands out ("hg"): clear of the low ids people and other daemons
/// pick by hand; a taken id is skipped (the kernel refuses an exclusive create).
const ID_BASE: u32 = 0x6867_0000;
/// Ids tried for one route before it goes without a nexthop object.
const ID_TRIES: u32 = 64;

/// hgw's nexthop objects, one per route: which id each destination's route points at.
#[derive(Debug)]
pub struct Nexthops {
    socket: NexthopSocket,
    ids: Mutex<HashMap<IpNet, u32>>,
    next: AtomicU32,
}

impl Nexthops {
    /// Takes over the nexthops an earlier agent left: those hgw's routes point at keep
    /// their routes' ids; hgw's others carry no route of ours and are deleted, unless
    /// someone else's route is on one (deleting it would take that route along).
    /// `routes`: hgw's routes that point at a nexthop, with its id; `in_use`: the
    /// nexthop ids of every route.
    pub async fn open(
        routes: &[(IpNet, u32)],
        in_use: &HashSet<u32>,
    ) -> Result<Self, NexthopError> {
        let socket = NexthopSocket::connect().map_err(NexthopError::Kernel)?;
        let ours: HashSet<u32> = socket
            .list()
            .await?
            .iter()
            .filter(|n| n.is_hgw())
            .filter_map(|n| n.id)
            .collect();
        let ids: HashMap<IpNet, u32> = routes
            .iter()
            .filter(|(_, id)| ours.contains(id))
            .copied()
            .collect();
        for id in ours.difference(in_use) {
            match socket.delete(*id).await {
                Ok(()) => info!("removed hgw's unused nexthop {id}"),
                Err(e) => debug!("removing hgw's unused nexthop {id}: {e}"),
            }
        }
        let next = ours.iter().copied().filter(|id| *id >= ID_BASE).max();
        Ok(Self {
            socket,
            ids: Mutex::new(ids),
            next: AtomicU32::new(next.map_or(ID_BASE, |id| id.saturating_add(1))),
        })
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashMap<IpNet, u32>> {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The nexthop for `destination`'s route, set to `gateway` on `oif`: its own one
    /// again (replaced: it may have changed or gone), or a new one. `None` if the kernel
    /// refuses (the route then goes without).
    pub async fn for_route(&self, destination: IpNet, gateway: IpAddr, oif: u32) -> Option<u32> {
        let known = self.ids().get(&destination).copied();
        if let Some(id) = known {
            return match self.socket.set(id, gateway, oif, true).await {
                Ok(()) => Some(id),
                Err(e) => {
                    debug!("nexthop {id} for {destination}: {e}");
                    self.ids().remove(&destination);
                    None
                }
            };
        }
        for _ in 0..ID_TRIES {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            match self.socket.set(id, gateway, oif, false).await {
                Ok(()) => {
                    self.ids().insert(destination, id);
                    return Some(id);
                }
                // Someone else's: the next id.
                Err(e) if e.errno() == Some(libc::EEXIST) => continue,
                Err(e) => {
                    debug!("a nexthop for {destination}: {e}");
                    return None;
                }
            }
        }
        None
    }

    /// The nexthop of `destination`'s route.
    pub fn id_of(&self, destination: IpNet) -> Option<u32> {
        self.ids().get(&destination).copied()
    }

    /// Lets go of `destination`'s nexthop without deleting it (someone else's route may
    /// be on it); its id, if there was one.
    pub fn forget(&self, destination: IpNet) -> Option<u32> {
        self.ids().remove(&destination)
    }

    /// The destination whose route is on nexthop `id`.
    pub fn destination_of(&self, id: u32) -> Option<IpNet> {
        self.ids()
            .iter()
            .find_map(|(destination, i)| (*i == id).then_some(*destination))
    }

    /// Deletes `destination`'s nexthop, once its route is gone.
    pub async fn release(&self, destination: IpNet) {
        let Some(id) = self.ids().remove(&destination) else {
            return;
        };
        match self.socket.delete(id).await {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => debug!("deleting nexthop {id} of {destination}: {e}"),
        }
    }
}

/// Deletes every nexthop carrying hgw's tag (with any route still on one); how many.
pub async fn remove_all() -> Result<usize, NexthopError> {
    let socket = NexthopSocket::connect().map_err(NexthopError::Kernel)?;
    let ours: Vec<u32> = match socket.list().await {
        Ok(all) => all
            .iter()
            .filter(|n| n.is_hgw())
            .filter_map(|n| n.id)
            .collect(),
        // A kernel without nexthop objects has none of hgw's.
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for id in ours {
        match socket.delete(id).await {
            Ok(()) => removed += 1,
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_as_written() {
        let message = NexthopMessage {
            kind: RTM_NEWNEXTHOP,
            family: AF_INET6,
            protocol: ROUTE_PROTOCOL,
            flags: RTNH_F_ONLINK,
            id: Some(0x6867_0001),
            oif: Some(7),
            gateway: Some("fd00:172:31::2".parse().expect("a valid literal")),
        };
        // nhmsg + id (8) + oif (8) + an IPv6 gateway (20).
        assert_eq!(message.buffer_len(), 8 + 8 + 8 + 20);
        let mut buffer = vec![0xff; message.buffer_len()];
        message.serialize(&mut buffer);
        let mut header = NetlinkHeader::default();
        header.message_type = RTM_NEWNEXTHOP;
        let read = NexthopMessage::deserialize(&header, &buffer).expect("well formed");
        assert_eq!(read, message);
        assert!(read.is_hgw());
    }

    #[test]
    fn a_truncated_attribute_is_an_error_not_a_panic() {
        let message = NexthopMessage {
            kind: RTM_NEWNEXTHOP,
            family: AF_INET,
            protocol: 3,
            flags: 0,
            id: Some(1),
            oif: None,
            gateway: Some("172.31.0.2".parse().expect("a valid literal")),
        };
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        let header = NetlinkHeader::default();
        assert!(NexthopMessage::deserialize(&header, &buffer[..buffer.len() - 2]).is_err());
        assert!(NexthopMessage::deserialize(&header, &buffer[..4]).is_err());
        let read = NexthopMessage::deserialize(&header, &buffer).expect("well formed");
        assert!(!read.is_hgw());
    }
}
