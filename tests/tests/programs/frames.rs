//! The tests' frames: hgw_tests' frame builder with n1's pods and peers as the ends.

pub use hgw_tests::frames::*;

use crate::model::ip6;

pub const PAYLOAD: &[u8] = b"hgw test payload";

/// A UDP datagram, port 12345 to 53.
pub fn udp(payload: &[u8]) -> Vec<u8> {
    udp_segment(12345, 53, payload)
}

/// A TCP ACK segment, port 12345 to 443: a header of `header_len` bytes (20 + options)
/// and `payload_len` bytes of payload.
pub fn tcp(header_len: usize, payload_len: usize) -> Vec<u8> {
    tcp_segment(12345, 443, ACK, header_len, &vec![0xcd; payload_len])
}

/// An Ethernet + IPv4 + UDP frame with a valid header checksum.
pub fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    ipv4(dst_mac, src, dst, ttl, IPPROTO_UDP, &udp(PAYLOAD))
}

pub fn to_peer(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    frame(BRIDGE_MAC, [10, 244, 1, 11], dst, ttl)
}

pub fn to_pod(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    frame(UPLINK_MAC, [10, 244, 2, 11], dst, ttl)
}

/// An Ethernet + IPv6 + UDP frame.
pub fn frame6(dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16], hop_limit: u8) -> Vec<u8> {
    ipv6(dst_mac, src, dst, hop_limit, IPPROTO_UDP, &udp(PAYLOAD))
}

pub fn to_peer6(dst: &str, hop_limit: u8) -> Vec<u8> {
    frame6(BRIDGE_MAC, ip6("fd00:244:1::11"), ip6(dst), hop_limit)
}

pub fn to_pod6(dst: &str, hop_limit: u8) -> Vec<u8> {
    frame6(UPLINK_MAC, ip6("fd00:244:2::11"), ip6(dst), hop_limit)
}

/// `base` from another source address.
pub fn with_src6(base: &[u8], src: &str) -> Vec<u8> {
    with(base, |f| f[V6_SRC..V6_SRC + 16].copy_from_slice(&ip6(src)))
}

/// `base` to another destination address.
pub fn with_dst6(base: &[u8], dst: &str) -> Vec<u8> {
    with(base, |f| f[V6_DST..V6_DST + 16].copy_from_slice(&ip6(dst)))
}

/// `base` changed by `change`; an IPv4 frame's checksum is made right again.
pub fn with(base: &[u8], change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = base.to_vec();
    change(&mut f);
    if f.len() >= 34 && ether_type(&f) == ETH_P_IPV4 {
        fix_checksum(&mut f);
    }
    f
}

/// `base` with a wrong IPv4 header checksum.
pub fn with_bad_checksum(base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    f[24] ^= 0x01;
    f
}
