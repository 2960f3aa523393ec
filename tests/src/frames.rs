//! Ethernet frames for BPF_PROG_TEST_RUN: IPv4 and IPv6 headers over TCP, UDP or any
//! payload, as a pod or a peer node would send them to hgw's programs. Shared by the
//! program tests (tests/programs, tests/programs_conntrack.rs) and the cost bench
//! ([`crate::cost`]).

use std::net::IpAddr;

/// The node's bridge (cni0): what a pod sends to, so what `hgw_to_peer` takes.
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
/// The node's uplink: what a peer node sends to, so what `hgw_to_pod` takes.
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe1, 0x01];
/// Every frame's source MAC (and the local pod's MAC in the programs' endpoint entries).
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x0b];

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Offsets in a frame (Ethernet header first).
pub const V4_TTL: usize = 22;
pub const V4_CHECKSUM: usize = 24;
pub const V6_PAYLOAD_LEN: usize = 18;
pub const V6_NEXT_HEADER: usize = 20;
pub const V6_HOP_LIMIT: usize = 21;
pub const V6_SRC: usize = 22;
pub const V6_DST: usize = 38;
/// Ethernet + fixed IPv6 header.
pub const V6_HEADERS: usize = 54;

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A UDP header and `payload`. The checksum field holds a fixed value: nobody on the
/// programs' way verifies it.
pub fn udp_segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0x5a, 0xa5]);
    l4.extend_from_slice(payload);
    l4
}

/// A TCP header of `header_len` bytes (20, or more with zeroed options) with `flags`,
/// and `payload`.
pub fn tcp_segment(
    sport: u16,
    dport: u16,
    flags: u8,
    header_len: usize,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = vec![0u8; header_len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    l4[12] = ((header_len / 4) as u8) << 4;
    l4[13] = flags;
    l4[14] = 0x40; // window
    l4.extend_from_slice(payload);
    l4
}

/// Ethernet (from [`POD_MAC`]) + IPv4 (id 0x1234, DF, a valid header checksum) + `l4`.
pub fn ipv4(
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    f.extend_from_slice(&[ttl, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    fix_checksum(&mut f);
    f
}

/// Ethernet (from [`POD_MAC`]) + IPv6 + `l4`. Traffic class and flow label are set, so
/// a rewrite that touched them would show.
pub fn ipv6(
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    next_header: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(V6_HEADERS + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    // Version 6, traffic class 0xb8, flow label 0x12345.
    f.extend_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next_header, hop_limit]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    f
}

/// [`ipv4`] or [`ipv6`], by the addresses' family.
///
/// # Panics
/// When `src` and `dst` are of different families.
pub fn ip(dst_mac: [u8; 6], src: IpAddr, dst: IpAddr, ttl: u8, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(dst_mac, s.octets(), d.octets(), ttl, proto, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(dst_mac, s.octets(), d.octets(), ttl, proto, l4),
        _ => panic!("a frame from {src} to {dst}: mixed families"),
    }
}

pub fn ether_type(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// One's complement sum of an IPv4 header: 0xffff when its checksum is right.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Recomputes the IPv4 header checksum of an IPv4 frame.
pub fn fix_checksum(f: &mut [u8]) {
    f[V4_CHECKSUM..V4_CHECKSUM + 2].fill(0);
    let check = !ipv4_checksum(&f[14..34]);
    f[V4_CHECKSUM..V4_CHECKSUM + 2].copy_from_slice(&check.to_be_bytes());
}

/// Sets the IPv6 payload length to what follows the fixed header in the frame.
pub fn fix_payload_len(f: &mut [u8]) {
    let len = (f.len() - V6_HEADERS) as u16;
    f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
}

/// Makes the IP header's length field (IPv4 total length, IPv6 payload length) span the
/// rest of the frame, where the frame holds that header.
pub fn fix_ip_len(f: &mut [u8]) {
    match ether_type(f) {
        ETH_P_IPV4 if f.len() >= 34 => {
            let len = (f.len() - 14) as u16;
            f[16..18].copy_from_slice(&len.to_be_bytes());
        }
        ETH_P_IPV6 if f.len() >= V6_HEADERS => fix_payload_len(f),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_frames_carry_a_valid_checksum_and_their_lengths() {
        let f = ipv4(
            BRIDGE_MAC,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            64,
            IPPROTO_UDP,
            &udp_segment(1, 2, b"x"),
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 1);
        assert_eq!(ipv4_checksum(&f[14..34]), 0xffff);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 29);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 9, "UDP length");
    }

    #[test]
    fn ipv6_frames_carry_their_payload_length() {
        let l4 = tcp_segment(1, 2, SYN, 32, &[0; 10]);
        let f = ipv6(UPLINK_MAC, [1; 16], [2; 16], 64, IPPROTO_TCP, &l4);
        assert_eq!(f.len(), V6_HEADERS + 42);
        assert_eq!(
            u16::from_be_bytes([f[V6_PAYLOAD_LEN], f[V6_PAYLOAD_LEN + 1]]),
            42
        );
        assert_eq!(f[V6_HEADERS + 12] >> 4, 8, "TCP data offset");
        assert_eq!(f[V6_HEADERS + 13], SYN);
    }
}
