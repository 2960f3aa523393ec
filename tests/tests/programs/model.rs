//! Node n1 as the tests load it into the maps and into its namespace's kernel (the same
//! routes, with the same next hop MACs as neighbour entries), and the rules the programs
//! implement, worked out independently of their code: what the random test checks
//! against.

use std::net::Ipv6Addr;

use hgw_common::PROG_TO_PEER;

use crate::MTU;
use crate::frames::*;

/// n1's uplink addresses: the peers' node addresses are on the same segments.
pub const UPLINK_V4: &str = "172.31.0.1/24";
pub const UPLINK_V6: &str = "fd00:172:31::1/64";
pub const PEER2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x02];
pub const PEER_WIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe9, 0x09];
pub const PEER_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe3, 0x32];
pub const PEER5_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe5, 0x05];
/// The IPv6 extension headers the programs leave to the kernel as `pass_ip_options`
/// (the fragment header, 44, is `pass_fragment`).
pub const V6_EXTENSION_HEADERS: [u8; 9] = [0, 43, 51, 60, 135, 139, 140, 253, 254];
pub const NEXTHDR_FRAGMENT: u8 = 44;

/// A peer pod CIDR: prefix length, network, next hop MAC (`None`: not resolved yet), and
/// the peer node's address on the uplink (the kernel route's gateway).
pub type Route = (u32, Vec<u8>, Option<[u8; 6]>, Vec<u8>);

/// One family's forwarding state on node n1, as `load_node` writes it into the maps (and
/// as the frame model of the random test reads it).
pub struct Table {
    /// The node's own pod CIDR: network, prefix length.
    pub own: (Vec<u8>, u32),
    /// Peer pod CIDRs.
    pub routes: Vec<Route>,
    /// The one local pod with an endpoint entry.
    pub endpoint: Vec<u8>,
    /// The node's own address in its pod CIDR (the bridge's): never a pod's.
    pub gateway: Vec<u8>,
    /// The cluster CIDR: network, prefix length.
    pub cluster: (Vec<u8>, u32),
    /// The addresses in the pod CIDR, besides the gateway, that the kernel's local table
    /// holds once the gateway's address is on the bridge and forwarding is on: the
    /// subnet's broadcast (IPv4), its subnet-router anycast (IPv6). The kernel forwards
    /// nothing to them.
    pub kernel_local: Vec<Vec<u8>>,
}

/// n1 owns 10.244.1.0/24, gateway 10.244.1.1, in cluster 10.244.0.0/16. Routes:
/// 10.244.0.0/16 (a wide entry, via 172.31.0.9), 10.244.2.0/24 (n2, 172.31.0.2),
/// 10.244.3.0/24 with an unresolved MAC (172.31.0.3), and the single host 10.244.2.99/32
/// (172.31.0.32).
pub fn table_v4() -> Table {
    Table {
        own: (vec![10, 244, 1, 0], 24),
        routes: vec![
            (
                16,
                vec![10, 244, 0, 0],
                Some(PEER_WIDE_MAC),
                vec![172, 31, 0, 9],
            ),
            (
                24,
                vec![10, 244, 2, 0],
                Some(PEER2_MAC),
                vec![172, 31, 0, 2],
            ),
            (24, vec![10, 244, 3, 0], None, vec![172, 31, 0, 3]),
            (
                32,
                vec![10, 244, 2, 99],
                Some(PEER_HOST_MAC),
                vec![172, 31, 0, 32],
            ),
        ],
        endpoint: vec![10, 244, 1, 12],
        gateway: vec![10, 244, 1, 1],
        cluster: (vec![10, 244, 0, 0], 16),
        kernel_local: vec![vec![10, 244, 1, 255]],
    }
}

/// The same in IPv6: n1 owns fd00:244:1::/64, gateway fd00:244:1::1, in cluster
/// fd00:244::/32; routes fd00:244::/48 (a wide entry),
/// fd00:244:2::/64 (n2), fd00:244:3::/64 with an unresolved MAC, and the single host
/// fd00:244:2::99/128. The /48 is fd00:244:0::/48, which holds none of the node /64s
/// (fd00:244:N::), so n5's fd00:244:0:5::/64 is added for a /64 inside the /48. The
/// peers' node addresses are those of [`table_v4`] in fd00:172:31::/64.
pub fn table_v6() -> Table {
    let node = |host: &str| ip6(&format!("fd00:172:31::{host}")).to_vec();
    Table {
        own: (ip6("fd00:244:1::").to_vec(), 64),
        routes: vec![
            (
                48,
                ip6("fd00:244::").to_vec(),
                Some(PEER_WIDE_MAC),
                node("9"),
            ),
            (64, ip6("fd00:244:2::").to_vec(), Some(PEER2_MAC), node("2")),
            (64, ip6("fd00:244:3::").to_vec(), None, node("3")),
            (
                128,
                ip6("fd00:244:2::99").to_vec(),
                Some(PEER_HOST_MAC),
                node("32"),
            ),
            (
                64,
                ip6("fd00:244:0:5::").to_vec(),
                Some(PEER5_MAC),
                node("5"),
            ),
        ],
        endpoint: ip6("fd00:244:1::12").to_vec(),
        gateway: ip6("fd00:244:1::1").to_vec(),
        cluster: (ip6("fd00:244::").to_vec(), 32),
        kernel_local: vec![ip6("fd00:244:1::").to_vec()],
    }
}

/// An address as `ip` reads it.
pub fn addr_text(addr: &[u8]) -> String {
    match addr.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(addr).expect("4 bytes")).to_string(),
        _ => Ipv6Addr::from(<[u8; 16]>::try_from(addr).expect("16 bytes")).to_string(),
    }
}

/// A MAC as `ip` reads it.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// What hgw has the kernel hold for `table`, as `ip -batch` lines: each peer pod CIDR via
/// its node's address on the uplink, and for each resolved next hop a permanent
/// neighbour entry with the MAC the map holds (an unresolved one has none).
pub fn kernel_routes(table: &Table, uplink: &str) -> Vec<String> {
    let mut lines = vec![];
    for (bits, net, mac, via) in &table.routes {
        let (net, via) = (addr_text(net), addr_text(via));
        lines.push(format!("route add {net}/{bits} via {via} dev {uplink}"));
        if let Some(mac) = mac {
            let mac = mac_text(*mac);
            lines.push(format!(
                "neigh replace {via} lladdr {mac} dev {uplink} nud permanent"
            ));
        }
    }
    lines
}

pub fn ip6(addr: &str) -> [u8; 16] {
    addr.parse::<Ipv6Addr>().expect("IPv6 address").octets()
}

/// A netmask of `bits` ones, `len` bytes long.
pub fn netmask(bits: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|byte| {
            let ones = bits.saturating_sub(byte * 8).min(8);
            !(0xffu16 >> ones) as u8
        })
        .collect()
}

pub fn prefix_matches(addr: &[u8], net: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|bit| {
        let mask = 0x80 >> (bit % 8);
        addr[bit / 8] & mask == net[bit / 8] & mask
    })
}

/// What a program must do with `f`, worked out from the rules it implements (not from
/// its code) and the maps `load` wrote: `Some(macs)` for a redirect whose output starts
/// with these destination + source MACs, `None` for the kernel.
pub fn expected_redirect(program: &str, f: &[u8]) -> Option<[u8; 12]> {
    let to_peer = program == PROG_TO_PEER;
    let our_mac = if to_peer { BRIDGE_MAC } else { UPLINK_MAC };
    if f.len() < 14 || f[0..6] != our_mac {
        return None;
    }
    // From a pod: a source MAC the bridge refuses (multicast, all zeros).
    if to_peer && (f[6] & 1 == 1 || f[6..12] == [0; 6]) {
        return None;
    }
    let ip = &f[14..];
    let (table, src, dst, ttl, packet_len) = match ether_type(f) {
        ETH_P_IPV4 if ip.len() >= 20 => {
            let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            let plain = ip[0] == 0x45
                && (20..=ip.len()).contains(&tot_len)
                && ipv4_checksum(&ip[..20]) == 0xffff
                && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0;
            let unicast = dst[0] & 0xf0 != 0xe0 && dst != [255; 4];
            let martian = src[0] == 0 || src[0] == 127 || src[0] >= 224;
            if !plain || !unicast || martian {
                return None;
            }
            (table_v4(), src, dst, ip[8], tot_len)
        }
        ETH_P_IPV6 if ip.len() >= 40 => {
            let packet_len = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let (src, dst) = (&ip[8..24], &ip[24..40]);
            let plain = ip[0] >> 4 == 6
                && packet_len <= ip.len()
                && !V6_EXTENSION_HEADERS.contains(&ip[6])
                && ip[6] != NEXTHDR_FRAGMENT;
            let unicast = dst[0] != 0xff;
            let martian = src[0] == 0xff
                || src[..15] == [0; 15] && src[15] <= 1
                || src[0] == 0xfe && src[1] & 0xc0 == 0x80;
            if !plain || !unicast || martian {
                return None;
            }
            (table_v6(), src, dst, ip[7], packet_len)
        }
        _ => return None,
    };
    if ttl <= 1 || packet_len > MTU as usize {
        return None;
    }
    let owns = |addr| prefix_matches(addr, &table.own.0, table.own.1);
    let own = owns(dst);
    let mut macs = [0u8; 12];
    if to_peer {
        // Sent from this node's pods only, the gateway (the node itself) excepted.
        if own || !owns(src) || src == table.gateway {
            return None;
        }
        // The kernel routes as the map does (the same routes, the same MACs).
        let (_, _, mac, _) = table
            .routes
            .iter()
            .filter(|(bits, net, _, _)| prefix_matches(dst, net, *bits))
            .max_by_key(|(bits, _, _, _)| *bits)?;
        macs[..6].copy_from_slice(&(*mac)?);
        macs[6..].copy_from_slice(&UPLINK_MAC);
    } else {
        // To this node's pods (not to the node's own gateway address), from the cluster
        // but not from this node's own pod CIDR (which is behind the bridge).
        let in_cluster = prefix_matches(src, &table.cluster.0, table.cluster.1);
        let src_own = owns(src);
        if !own || dst == table.gateway || !in_cluster || src_own {
            return None;
        }
        // The kernel's FIB does not forward to its own broadcast or anycast addresses.
        if table.kernel_local.iter().any(|local| local == dst) {
            return None;
        }
        if dst == table.endpoint {
            macs[..6].copy_from_slice(&POD_MAC);
            macs[6..].copy_from_slice(&BRIDGE_MAC);
        } else {
            macs.copy_from_slice(&f[..12]);
        }
    }
    Some(macs)
}
