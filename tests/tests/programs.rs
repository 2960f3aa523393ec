//! The real, loaded programs, run with crafted frames through BPF_PROG_TEST_RUN (no lab,
//! nothing attached): for each case the verdict, every output byte, the IPv4 checksum
//! recomputed from scratch, and the counter that moved (and that no other one did).

use std::net::Ipv6Addr;

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use hgw_common::{
    COUNTER_NOT_IP, COUNTER_NOT_IP_NAME, COUNTERS_LEN, COUNTERS_PER_FAMILY, Counter, CtTimeouts,
    Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS_V4, MAP_ENDPOINTS_V6, MAP_ROUTES_V4,
    MAP_ROUTES_V6, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, PROG_TO_PEER, PROG_TO_POD,
    counter_index,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets in a frame (Ethernet header first).
const V4_TTL: usize = 22;
const V6_PAYLOAD_LEN: usize = 18;
const V6_NEXT_HEADER: usize = 20;
const V6_HOP_LIMIT: usize = 21;
const V6_SRC: usize = 22;
const V6_DST: usize = 38;
/// Ethernet + fixed IPv6 header.
const V6_HEADERS: usize = 54;
/// The IPv6 extension headers the programs leave to the kernel as `pass_ip_options`
/// (the fragment header, 44, is `pass_fragment`).
const V6_EXTENSION_HEADERS: [u8; 9] = [0, 43, 51, 60, 135, 139, 140, 253, 254];
const NEXTHDR_FRAGMENT: u8 = 44;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe1, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x0b];
const PEER2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x02];
const PEER_WIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe9, 0x09];
const PEER_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe3, 0x32];
const PEER5_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe5, 0x05];
const UPLINK_IFINDEX: u32 = 7;
const BRIDGE_IFINDEX: u32 = 3;
const POD_IFINDEX: u32 = 9;
const MTU: u32 = 1500;
/// offsetof(struct __sk_buff, gso_size): BPF_PROG_TEST_RUN takes it from the context.
const SKB_GSO_SIZE: usize = 176;

/// A counter slot: one family's counter, or the family-less one for frames that are not IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    V4(Counter),
    V6(Counter),
    NotIp,
}

impl Slot {
    fn index(self) -> u32 {
        match self {
            Slot::V4(counter) => counter_index(Family::Ipv4, counter),
            Slot::V6(counter) => counter_index(Family::Ipv6, counter),
            Slot::NotIp => COUNTER_NOT_IP,
        }
    }
}

/// "ipv6 fwd_to_peer", as the agent would show the slot.
fn slot_name(index: u32) -> String {
    if index == COUNTER_NOT_IP {
        return COUNTER_NOT_IP_NAME.to_string();
    }
    let family = Family::ALL[(index / COUNTERS_PER_FAMILY) as usize];
    let counter = Counter::ALL[(index % COUNTERS_PER_FAMILY) as usize];
    format!("{} {}", family.name(), counter.name())
}

/// One family's forwarding state on node n1, as `load_node` writes it into the maps (and
/// as the frame model of the random test reads it).
struct Table {
    /// The node's own pod CIDR: network, prefix length.
    own: (Vec<u8>, u32),
    /// Peer pod CIDRs: prefix length, network, next hop MAC (`None`: not resolved yet).
    routes: Vec<(u32, Vec<u8>, Option<[u8; 6]>)>,
    /// The one local pod with an endpoint entry.
    endpoint: Vec<u8>,
    /// The node's own address in its pod CIDR (the bridge's): never a pod's.
    gateway: Vec<u8>,
    /// The cluster CIDR: network, prefix length.
    cluster: (Vec<u8>, u32),
}

/// n1 owns 10.244.1.0/24, gateway 10.244.1.1, in cluster 10.244.0.0/16. Routes:
/// 10.244.0.0/16 (a wide entry), 10.244.2.0/24 (n2), 10.244.3.0/24 with an unresolved
/// MAC, and the single host 10.244.2.99/32.
fn table_v4() -> Table {
    Table {
        own: (vec![10, 244, 1, 0], 24),
        routes: vec![
            (16, vec![10, 244, 0, 0], Some(PEER_WIDE_MAC)),
            (24, vec![10, 244, 2, 0], Some(PEER2_MAC)),
            (24, vec![10, 244, 3, 0], None),
            (32, vec![10, 244, 2, 99], Some(PEER_HOST_MAC)),
        ],
        endpoint: vec![10, 244, 1, 12],
        gateway: vec![10, 244, 1, 1],
        cluster: (vec![10, 244, 0, 0], 16),
    }
}

/// The same in IPv6: n1 owns fd00:244:1::/64, gateway fd00:244:1::1, in cluster
/// fd00:244::/32; routes fd00:244::/48 (a wide entry),
/// fd00:244:2::/64 (n2), fd00:244:3::/64 with an unresolved MAC, and the single host
/// fd00:244:2::99/128. The /48 is fd00:244:0::/48, which holds none of the node /64s
/// (fd00:244:N::), so n5's fd00:244:0:5::/64 is added for a /64 inside the /48.
fn table_v6() -> Table {
    Table {
        own: (ip6("fd00:244:1::").to_vec(), 64),
        routes: vec![
            (48, ip6("fd00:244::").to_vec(), Some(PEER_WIDE_MAC)),
            (64, ip6("fd00:244:2::").to_vec(), Some(PEER2_MAC)),
            (64, ip6("fd00:244:3::").to_vec(), None),
            (128, ip6("fd00:244:2::99").to_vec(), Some(PEER_HOST_MAC)),
            (64, ip6("fd00:244:0:5::").to_vec(), Some(PEER5_MAC)),
        ],
        endpoint: ip6("fd00:244:1::12").to_vec(),
        gateway: ip6("fd00:244:1::1").to_vec(),
        cluster: (ip6("fd00:244::").to_vec(), 32),
    }
}

fn ip6(addr: &str) -> [u8; 16] {
    addr.parse::<Ipv6Addr>().expect("IPv6 address").octets()
}

/// A netmask of `bits` ones, `len` bytes long.
fn netmask(bits: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|byte| {
            let ones = bits.saturating_sub(byte * 8).min(8);
            !(0xffu16 >> ones) as u8
        })
        .collect()
}

fn prefix_matches(addr: &[u8], net: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|bit| {
        let mask = 0x80 >> (bit % 8);
        addr[bit / 8] & mask == net[bit / 8] & mask
    })
}

struct Programs {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
}

fn next_hop(mac: Option<[u8; 6]>) -> NextHop {
    NextHop {
        ifindex: UPLINK_IFINDEX,
        mtu: MTU,
        dst_mac: mac.unwrap_or_default(),
        src_mac: UPLINK_MAC,
        flags: if mac.is_some() { NEXT_HOP_MAC_KNOWN } else { 0 },
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> T
where
    T: TryFrom<Map>,
    T::Error: std::fmt::Debug,
{
    ebpf.take_map(name)
        .unwrap_or_else(|| panic!("map {name} missing"))
        .try_into()
        .unwrap_or_else(|e| panic!("map {name}: {e:?}"))
}

/// Node n1 with both families (see [`table_v4`], [`table_v6`]).
fn load() -> Programs {
    load_node(true)
}

/// Node n1; without `ipv6` it has no IPv6 pod CIDR, though the IPv6 routes and endpoint
/// are there all the same (so only the missing CIDR can stop the fast path).
fn load_node(ipv6: bool) -> Programs {
    load_with_cluster(ipv6, table_v4().cluster, table_v6().cluster)
}

/// Node n1 with other cluster CIDRs (network, prefix length) than [`table_v4`]'s and
/// [`table_v6`]'s.
fn load_with_cluster(
    ipv6: bool,
    cluster_v4: (Vec<u8>, u32),
    cluster_v6: (Vec<u8>, u32),
) -> Programs {
    // `all` mode: these cases are about the header rules, not conntrack
    // (programs_conntrack.rs has those).
    let mut ebpf = hgw_common::loader::load(hgw_agent::datapath::PROGRAMS, false)
        .expect("load the eBPF object");
    let (v4, v6) = (table_v4(), table_v6());
    let mut config: Array<MapData, NodeConfig> = take_map(&mut ebpf, MAP_CONFIG);
    let (pod_net_v6, pod_mask_v6) = if ipv6 {
        (
            v6.own.0.clone().try_into().expect("16 bytes"),
            netmask(v6.own.1, 16).try_into().expect("16 bytes"),
        )
    } else {
        ([0; 16], [0; 16])
    };
    config
        .set(
            0,
            NodeConfig {
                pod_net_v4: v4.own.0.clone().try_into().expect("4 bytes"),
                pod_mask_v4: netmask(v4.own.1, 4).try_into().expect("4 bytes"),
                pod_net_v6,
                pod_mask_v6,
                bridge_ifindex: BRIDGE_IFINDEX,
                bridge_mtu: MTU,
                bridge_mac: BRIDGE_MAC,
                uplink_mac: UPLINK_MAC,
                gateway_v4: v4.gateway.clone().try_into().expect("4 bytes"),
                gateway_v6: v6.gateway.clone().try_into().expect("16 bytes"),
                cluster_net_v4: cluster_v4.0.try_into().expect("4 bytes"),
                cluster_mask_v4: netmask(cluster_v4.1, 4).try_into().expect("4 bytes"),
                cluster_net_v6: cluster_v6.0.try_into().expect("16 bytes"),
                cluster_mask_v6: netmask(cluster_v6.1, 16).try_into().expect("16 bytes"),
                ct: CtTimeouts::default(),
            },
            0,
        )
        .expect("write config");
    let pod = Endpoint {
        ifindex: POD_IFINDEX,
        mac: POD_MAC,
        _pad: [0; 2],
    };
    let mut routes: LpmTrie<MapData, [u8; 4], NextHop> = take_map(&mut ebpf, MAP_ROUTES_V4);
    for (prefix, addr, mac) in &v4.routes {
        let addr = addr.clone().try_into().expect("4 bytes");
        routes
            .insert(&Key::new(*prefix, addr), next_hop(*mac), 0)
            .expect("insert route");
    }
    let mut routes: LpmTrie<MapData, [u8; 16], NextHop> = take_map(&mut ebpf, MAP_ROUTES_V6);
    for (prefix, addr, mac) in &v6.routes {
        let addr = addr.clone().try_into().expect("16 bytes");
        routes
            .insert(&Key::new(*prefix, addr), next_hop(*mac), 0)
            .expect("insert IPv6 route");
    }
    let mut endpoints: aya::maps::HashMap<MapData, [u8; 4], Endpoint> =
        take_map(&mut ebpf, MAP_ENDPOINTS_V4);
    let addr: [u8; 4] = v4.endpoint.try_into().expect("4 bytes");
    endpoints.insert(addr, pod, 0).expect("insert endpoint");
    let mut endpoints: aya::maps::HashMap<MapData, [u8; 16], Endpoint> =
        take_map(&mut ebpf, MAP_ENDPOINTS_V6);
    let addr: [u8; 16] = v6.endpoint.try_into().expect("16 bytes");
    endpoints
        .insert(addr, pod, 0)
        .expect("insert IPv6 endpoint");
    let counters = take_map(&mut ebpf, MAP_COUNTERS);
    for name in [PROG_TO_PEER, PROG_TO_POD] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("classifier");
        prog.load().expect("verifier accepts the program");
    }
    Programs { ebpf, counters }
}

impl Programs {
    /// `None` when the kernel refuses to build an skb from `frame` (EINVAL).
    fn try_run(&mut self, program: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        self.try_run_gso(program, frame, 0)
    }

    /// As [`Programs::try_run`], with skb's gso_size set (0: not a GSO packet).
    fn try_run_gso(
        &mut self,
        program: &str,
        frame: &[u8],
        gso_size: u32,
    ) -> Option<(u32, Vec<u8>)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .expect("program")
            .try_into()
            .expect("classifier");
        // A __sk_buff up to and including gso_size, all else zero (the kernel requires
        // that of the fields it does not take from the context).
        let mut ctx = [0u8; SKB_GSO_SIZE + 4];
        ctx[SKB_GSO_SIZE..].copy_from_slice(&gso_size.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: (gso_size != 0).then_some(&ctx[..]),
                ..TestRunOptions::new()
            })
            .ok()?;
        out.truncate(result.data_size_out as usize);
        Some((result.return_value, out))
    }

    fn counter(&self, slot: Slot) -> u64 {
        self.slot_value(slot.index())
    }

    fn slot_value(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .expect("read counter")
            .iter()
            .sum()
    }

    /// Every slot, in index order.
    fn counters(&self) -> Vec<u64> {
        (0..COUNTERS_LEN).map(|i| self.slot_value(i)).collect()
    }

    /// Runs `frame`, expects it handed to the kernel unchanged, `reason` counted and
    /// nothing else.
    fn expect_pass(&mut self, program: &str, frame: &[u8], reason: Slot, what: &str) {
        self.expect_pass_gso(program, frame, 0, reason, what);
    }

    fn expect_pass_gso(
        &mut self,
        program: &str,
        frame: &[u8],
        gso_size: u32,
        reason: Slot,
        what: &str,
    ) {
        let before = self.counters();
        let (verdict, out) = self
            .try_run_gso(program, frame, gso_size)
            .unwrap_or_else(|| panic!("{what}: BPF_PROG_TEST_RUN refused the frame"));
        assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
        assert_eq!(
            out, frame,
            "{what}: a packet left to the kernel must be unchanged"
        );
        assert_counted(&before, &self.counters(), &[reason], what);
    }

    /// Runs `frame`, expects a redirect with each of `counted` up by one (and no other
    /// counter moved), and returns the output frame after checking that only the MACs,
    /// the TTL (hop limit) and the IPv4 checksum changed, the TTL by one.
    fn expect_redirect(
        &mut self,
        program: &str,
        frame: &[u8],
        counted: &[Slot],
        what: &str,
    ) -> Vec<u8> {
        self.expect_redirect_gso(program, frame, 0, counted, what)
    }

    fn expect_redirect_gso(
        &mut self,
        program: &str,
        frame: &[u8],
        gso_size: u32,
        counted: &[Slot],
        what: &str,
    ) -> Vec<u8> {
        let before = self.counters();
        let (verdict, out) = self
            .try_run_gso(program, frame, gso_size)
            .unwrap_or_else(|| panic!("{what}: BPF_PROG_TEST_RUN refused the frame"));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: verdict");
        assert_counted(&before, &self.counters(), counted, what);
        assert_redirected_well_formed(frame, &out, what);
        out
    }
}

/// Every counter slot is where `before` had it, except each of `moved`: up by one.
fn assert_counted(before: &[u64], after: &[u64], moved: &[Slot], what: &str) {
    for (index, (was, is)) in (0..).zip(before.iter().zip(after)) {
        let expected = was + moved.iter().filter(|s| s.index() == index).count() as u64;
        assert_eq!(*is, expected, "{what}: counter {}", slot_name(index));
    }
}

fn ether_type(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// A redirect may change the MACs, the TTL (hop limit), by exactly one, and for IPv4 the
/// header checksum, which must stay valid; nothing else.
fn assert_redirected_well_formed(input: &[u8], out: &[u8], what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length changed");
    let (ttl_at, checksum_at) = match ether_type(input) {
        ETH_P_IPV4 => {
            assert_eq!(
                ipv4_checksum(&out[14..34]),
                0xffff,
                "{what}: IPv4 header checksum invalid"
            );
            (V4_TTL, Some(24))
        }
        ETH_P_IPV6 => (V6_HOP_LIMIT, None),
        other => panic!("{what}: ethertype {other:#06x} redirected"),
    };
    assert!(
        input[ttl_at] > 1,
        "{what}: forwarded with TTL {}",
        input[ttl_at]
    );
    assert_eq!(
        out[ttl_at],
        input[ttl_at] - 1,
        "{what}: TTL must drop by one"
    );
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        let may_change = i < 12 || i == ttl_at || checksum_at.is_some_and(|c| i == c || i == c + 1);
        assert!(
            may_change || a == b,
            "{what}: byte {i} changed ({a:#x} -> {b:#x})"
        );
    }
}

/// One's complement sum of the header: 0xffff when the checksum is right.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

const PAYLOAD: &[u8] = b"hgw test payload";

/// UDP header (checksum left as is: nobody on the way verifies it) + payload.
fn udp(payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0x30, 0x39, 0x00, 0x35];
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0x5a, 0xa5]);
    l4.extend_from_slice(payload);
    l4
}

/// TCP header of `header_len` bytes (20 + options) + `payload_len` bytes of payload.
fn tcp(header_len: usize, payload_len: usize) -> Vec<u8> {
    let mut l4 = vec![0u8; header_len];
    l4[0..4].copy_from_slice(&[0x30, 0x39, 0x01, 0xbb]);
    l4[12] = ((header_len / 4) as u8) << 4;
    l4[13] = 0x10; // ACK
    l4.extend(std::iter::repeat_n(0xcd, payload_len));
    l4
}

/// An Ethernet + IPv4 + UDP frame with a valid header checksum.
fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    ipv4(dst_mac, src, dst, ttl, IPPROTO_UDP, &udp(PAYLOAD))
}

fn ipv4(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut f = Vec::new();
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

fn fix_checksum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let check = !ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&check.to_be_bytes());
}

fn to_peer(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    frame(BRIDGE_MAC, [10, 244, 1, 11], dst, ttl)
}

fn to_pod(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    frame(UPLINK_MAC, [10, 244, 2, 11], dst, ttl)
}

/// An Ethernet + IPv6 + UDP frame. Traffic class and flow label are set, so a rewrite
/// that touched them would show.
fn frame6(dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16], hop_limit: u8) -> Vec<u8> {
    ipv6(dst_mac, src, dst, hop_limit, IPPROTO_UDP, &udp(PAYLOAD))
}

fn ipv6(
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    next_header: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
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

/// Sets the IPv6 payload length to what follows the fixed header in the frame.
fn fix_payload_len(f: &mut [u8]) {
    let len = (f.len() - V6_HEADERS) as u16;
    f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
}

/// Makes the IP header's length field (IPv4 total length, IPv6 payload length) span the
/// rest of the frame, where the frame holds that header.
fn fix_ip_len(f: &mut [u8]) {
    match ether_type(f) {
        ETH_P_IPV4 if f.len() >= 34 => {
            let len = (f.len() - 14) as u16;
            f[16..18].copy_from_slice(&len.to_be_bytes());
        }
        ETH_P_IPV6 if f.len() >= V6_HEADERS => fix_payload_len(f),
        _ => {}
    }
}

fn to_peer6(dst: &str, hop_limit: u8) -> Vec<u8> {
    frame6(BRIDGE_MAC, ip6("fd00:244:1::11"), ip6(dst), hop_limit)
}

fn to_pod6(dst: &str, hop_limit: u8) -> Vec<u8> {
    frame6(UPLINK_MAC, ip6("fd00:244:2::11"), ip6(dst), hop_limit)
}

fn with_src6(base: &[u8], src: &str) -> Vec<u8> {
    with(base, |f| f[V6_SRC..V6_SRC + 16].copy_from_slice(&ip6(src)))
}

fn with_dst6(base: &[u8], dst: &str) -> Vec<u8> {
    with(base, |f| f[V6_DST..V6_DST + 16].copy_from_slice(&ip6(dst)))
}

#[test]
fn bridge_side_hit_rewrites_macs_and_ttl_and_redirects() {
    let mut p = load();
    let input = to_peer([10, 244, 2, 11], 64);
    let out = p.expect_redirect(PROG_TO_PEER, &input, &[Slot::V4(Counter::FwdToPeer)], "hit");
    assert_eq!(out[0..6], PEER2_MAC, "destination MAC is the next hop's");
    assert_eq!(out[6..12], UPLINK_MAC, "source MAC is the uplink's");
    assert_eq!(out[V4_TTL], 63);
}

#[test]
fn the_longest_prefix_wins() {
    let mut p = load();
    for (dst, mac, what) in [
        ([10, 244, 2, 99], PEER_HOST_MAC, "/32 inside a /24"),
        ([10, 244, 2, 98], PEER2_MAC, "/24 inside a /16"),
        ([10, 244, 7, 1], PEER_WIDE_MAC, "only the /16"),
    ] {
        let out = p.expect_redirect(
            PROG_TO_PEER,
            &to_peer(dst, 64),
            &[Slot::V4(Counter::FwdToPeer)],
            what,
        );
        assert_eq!(out[0..6], mac, "{what}");
    }
}

#[test]
fn checksum_carry_wraps_correctly() {
    // Every TTL from 2 to 255 and a spread of IDs exercise the end-around carry.
    let mut p = load();
    for ttl in 2..=255u8 {
        for id in [0u16, 0x00ff, 0xfeff, 0xffff] {
            let mut input = to_peer([10, 244, 2, 11], ttl);
            input[18..20].copy_from_slice(&id.to_be_bytes());
            fix_checksum(&mut input);
            p.expect_redirect(
                PROG_TO_PEER,
                &input,
                &[Slot::V4(Counter::FwdToPeer)],
                &format!("ttl {ttl} id {id:#x}"),
            );
        }
    }
}

#[test]
fn bridge_side_leaves_what_it_is_not_sure_of_to_the_kernel() {
    use Counter::*;
    let mut p = load();
    let base = to_peer([10, 244, 2, 11], 64);
    let sent_from = |src: [u8; 4]| frame(BRIDGE_MAC, src, [10, 244, 2, 11], 64);
    let cases: Vec<(&str, Vec<u8>, Slot)> = vec![
        (
            "LPM miss",
            to_peer([10, 99, 0, 1], 64),
            Slot::V4(PassNoRoute),
        ),
        (
            "next hop MAC unknown",
            to_peer([10, 244, 3, 5], 64),
            Slot::V4(PassNoMac),
        ),
        (
            "own pod CIDR",
            to_peer([10, 244, 1, 12], 64),
            Slot::V4(PassLocal),
        ),
        (
            "the gateway itself",
            to_peer([10, 244, 1, 1], 64),
            Slot::V4(PassLocal),
        ),
        ("TTL 1", to_peer([10, 244, 2, 11], 1), Slot::V4(PassTtl)),
        ("TTL 0", to_peer([10, 244, 2, 11], 0), Slot::V4(PassTtl)),
        (
            "bad header checksum",
            with_bad_checksum(&base),
            Slot::V4(PassMalformed),
        ),
        (
            "IP options",
            with(&base, |f| f[14] = 0x46),
            Slot::V4(PassIpOptions),
        ),
        (
            "IHL < 5",
            with(&base, |f| f[14] = 0x44),
            Slot::V4(PassMalformed),
        ),
        (
            "version 6 in an IPv4 frame",
            with(&base, |f| f[14] = 0x65),
            Slot::V4(PassMalformed),
        ),
        (
            "MF set",
            with(&base, |f| f[20] |= 0x20),
            Slot::V4(PassFragment),
        ),
        (
            "fragment offset",
            with(&base, |f| f[21] = 1),
            Slot::V4(PassFragment),
        ),
        (
            "total length beyond the frame",
            with(&base, |f| f[16..18].copy_from_slice(&500u16.to_be_bytes())),
            Slot::V4(PassMalformed),
        ),
        (
            "total length below a header",
            with(&base, |f| f[16..18].copy_from_slice(&19u16.to_be_bytes())),
            Slot::V4(PassMalformed),
        ),
        (
            "source 127.0.0.1",
            sent_from([127, 0, 0, 1]),
            Slot::V4(PassMartian),
        ),
        (
            "source 127.255.255.254",
            sent_from([127, 255, 255, 254]),
            Slot::V4(PassMartian),
        ),
        (
            "source 0.0.0.1",
            sent_from([0, 0, 0, 1]),
            Slot::V4(PassMartian),
        ),
        (
            "source 0.0.0.0",
            sent_from([0, 0, 0, 0]),
            Slot::V4(PassMartian),
        ),
        (
            "source 224.0.0.1",
            sent_from([224, 0, 0, 1]),
            Slot::V4(PassMartian),
        ),
        (
            "source 239.255.255.255",
            sent_from([239, 255, 255, 255]),
            Slot::V4(PassMartian),
        ),
        (
            "source 240.0.0.1",
            sent_from([240, 0, 0, 1]),
            Slot::V4(PassMartian),
        ),
        (
            "source 255.255.255.255",
            sent_from([255, 255, 255, 255]),
            Slot::V4(PassMartian),
        ),
        (
            "ARP",
            with(&base, |f| {
                f[12..14].copy_from_slice(&0x0806u16.to_be_bytes())
            }),
            Slot::NotIp,
        ),
        (
            // Not what TC sees of a tagged frame: the kernel moves the tag into
            // skb->vlan_present/vlan_tci before TC ingress, and the programs leave such
            // skbs to the kernel (not_ip), but BPF_PROG_TEST_RUN cannot set vlan_present
            // (it refuses a context with the vlan fields set). An inline 802.1Q header is
            // still no IP frame to the programs: not_ip as well.
            "VLAN-tagged",
            with(&base, |f| {
                f[12..14].copy_from_slice(&0x8100u16.to_be_bytes())
            }),
            Slot::NotIp,
        ),
        (
            "an IPv4 header under the IPv6 ethertype",
            with(&base, |f| {
                f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes())
            }),
            Slot::V6(PassMalformed),
        ),
        (
            "broadcast MAC",
            with(&base, |f| f[0..6].copy_from_slice(&[0xff; 6])),
            Slot::V4(PassNotUnicast),
        ),
        (
            "multicast MAC",
            with(&base, |f| {
                f[0..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1])
            }),
            Slot::V4(PassNotUnicast),
        ),
        (
            "another host's MAC",
            with(&base, |f| f[0..6].copy_from_slice(&PEER2_MAC)),
            Slot::V4(PassNotUnicast),
        ),
        (
            "the uplink's MAC",
            with(&base, |f| f[0..6].copy_from_slice(&UPLINK_MAC)),
            Slot::V4(PassNotUnicast),
        ),
        (
            "multicast IP",
            to_peer([224, 0, 0, 5], 64),
            Slot::V4(PassNotUnicast),
        ),
        (
            "broadcast IP",
            to_peer([255, 255, 255, 255], 64),
            Slot::V4(PassNotUnicast),
        ),
    ];
    for (what, frame, reason) in cases {
        p.expect_pass(PROG_TO_PEER, &frame, reason, what);
    }
}

#[test]
fn sources_next_to_the_martian_ranges_are_forwarded() {
    // The edges of the martian ranges: one address past them is an ordinary source. Such
    // sources are outside every pod CIDR, so they are forwarded on the uplink side only,
    // of a node whose cluster CIDR holds them (half the address space each), and the
    // bridge side stops them for their source, not as martians.
    let low = load_with_cluster(true, (vec![0, 0, 0, 0], 1), (ip6("::").to_vec(), 1));
    let high = load_with_cluster(true, (vec![128, 0, 0, 0], 1), (ip6("8000::").to_vec(), 1));
    let mut bridge_side = load();
    let mut nodes = [low, high];
    for src in [
        [1, 0, 0, 0],
        [126, 255, 255, 255],
        [128, 0, 0, 0],
        [223, 255, 255, 255],
    ] {
        nodes[usize::from(src[0] >= 128)].expect_redirect(
            PROG_TO_POD,
            &frame(UPLINK_MAC, src, [10, 244, 1, 11], 64),
            &[Slot::V4(Counter::FwdToPod)],
            &format!("uplink side, source {src:?}"),
        );
        bridge_side.expect_pass(
            PROG_TO_PEER,
            &frame(BRIDGE_MAC, src, [10, 244, 2, 11], 64),
            Slot::V4(Counter::PassSource),
            &format!("bridge side, source {src:?}"),
        );
    }
    let to_pod = to_pod6("fd00:244:1::11", 64);
    let to_peer = to_peer6("fd00:244:2::11", 64);
    for src in [
        "::2",
        "fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "fec0::1",
        "feff::1",
        "fc00::1",
        "2001:db8::1",
    ] {
        nodes[usize::from(ip6(src)[0] >= 0x80)].expect_redirect(
            PROG_TO_POD,
            &with_src6(&to_pod, src),
            &[Slot::V6(Counter::FwdToPod)],
            &format!("uplink side, source {src}"),
        );
        bridge_side.expect_pass(
            PROG_TO_PEER,
            &with_src6(&to_peer, src),
            Slot::V6(Counter::PassSource),
            &format!("bridge side, source {src}"),
        );
    }
}

#[test]
fn each_side_forwards_only_its_own_sources() {
    use Counter::*;
    let mut p = load();
    /// Ok: forwarded, counted there; Err: left to the kernel for that reason.
    type Case = (&'static str, Vec<u8>, Result<Slot, Slot>, String);
    let mut cases: Vec<Case> = vec![];
    // Bridge side: only this node's pods (10.244.1.0/24), never the gateway's address.
    for (src, verdict, what) in [
        ([10, 244, 1, 11], Ok(FwdToPeer), "a pod of this node"),
        ([10, 244, 1, 255], Ok(FwdToPeer), "the pod CIDR's far end"),
        ([10, 244, 1, 1], Err(PassSource), "the gateway"),
        ([10, 244, 2, 11], Err(PassSource), "a pod of another node"),
        (
            [10, 244, 0, 255],
            Err(PassSource),
            "just below the pod CIDR",
        ),
        ([10, 244, 2, 0], Err(PassSource), "just above the pod CIDR"),
        (
            [172, 31, 0, 1],
            Err(PassSource),
            "the node's uplink address",
        ),
        ([192, 0, 2, 1], Err(PassSource), "outside the cluster"),
    ] {
        let f = frame(BRIDGE_MAC, src, [10, 244, 2, 11], 64);
        let what = format!("bridge side, source {src:?}, {what}");
        cases.push((
            PROG_TO_PEER,
            f,
            verdict.map(Slot::V4).map_err(Slot::V4),
            what,
        ));
    }
    for (src, verdict, what) in [
        ("fd00:244:1::11", Ok(FwdToPeer), "a pod of this node"),
        (
            "fd00:244:1:0:ffff:ffff:ffff:ffff",
            Ok(FwdToPeer),
            "the pod CIDR's far end",
        ),
        ("fd00:244:1::1", Err(PassSource), "the gateway"),
        ("fd00:244:2::11", Err(PassSource), "a pod of another node"),
        (
            "fd00:244:0:ffff:ffff:ffff:ffff:ffff",
            Err(PassSource),
            "just below the pod CIDR",
        ),
        (
            "fd00:244:1:1::11",
            Err(PassSource),
            "just above the pod CIDR",
        ),
        (
            "fd00:172:31::1",
            Err(PassSource),
            "the node's uplink address",
        ),
    ] {
        let f = with_src6(&to_peer6("fd00:244:2::11", 64), src);
        let what = format!("bridge side, source {src}, {what}");
        cases.push((
            PROG_TO_PEER,
            f,
            verdict.map(Slot::V6).map_err(Slot::V6),
            what,
        ));
    }
    // Uplink side: only sources in the cluster CIDR (10.244.0.0/16); a node address
    // (after masquerade) or an outside host is the kernel's to judge.
    for (src, verdict, what) in [
        ([10, 244, 2, 11], Ok(FwdToPod), "a pod of another node"),
        ([10, 244, 0, 0], Ok(FwdToPod), "the cluster CIDR's near end"),
        (
            [10, 244, 255, 255],
            Ok(FwdToPod),
            "the cluster CIDR's far end",
        ),
        (
            [172, 31, 0, 2],
            Err(PassSource),
            "a masqueraded node address",
        ),
        (
            [10, 244, 1, 12],
            Err(PassSource),
            "this node's own pod (it is behind the bridge)",
        ),
        (
            [10, 243, 255, 255],
            Err(PassSource),
            "just below the cluster CIDR",
        ),
        (
            [10, 245, 0, 0],
            Err(PassSource),
            "just above the cluster CIDR",
        ),
    ] {
        let f = frame(UPLINK_MAC, src, [10, 244, 1, 11], 64);
        let what = format!("uplink side, source {src:?}, {what}");
        cases.push((
            PROG_TO_POD,
            f,
            verdict.map(Slot::V4).map_err(Slot::V4),
            what,
        ));
    }
    for (src, verdict, what) in [
        ("fd00:244:2::11", Ok(FwdToPod), "a pod of another node"),
        (
            "fd00:244:ffff:ffff:ffff:ffff:ffff:ffff",
            Ok(FwdToPod),
            "the cluster CIDR's far end",
        ),
        (
            "fd00:172:31::2",
            Err(PassSource),
            "a masqueraded node address",
        ),
        (
            "fd00:244:1::12",
            Err(PassSource),
            "this node's own pod (it is behind the bridge)",
        ),
        (
            "fd00:243:ffff:ffff:ffff:ffff:ffff:ffff",
            Err(PassSource),
            "just below the cluster CIDR",
        ),
        ("fd00:245::", Err(PassSource), "just above the cluster CIDR"),
        ("2001:db8::1", Err(PassSource), "outside the cluster"),
    ] {
        let f = with_src6(&to_pod6("fd00:244:1::11", 64), src);
        let what = format!("uplink side, source {src}, {what}");
        cases.push((
            PROG_TO_POD,
            f,
            verdict.map(Slot::V6).map_err(Slot::V6),
            what,
        ));
    }
    for (program, f, verdict, what) in cases {
        match verdict {
            Ok(forwarded) => drop(p.expect_redirect(program, &f, &[forwarded], &what)),
            Err(reason) => p.expect_pass(program, &f, reason, &what),
        }
    }
}

#[test]
fn larger_than_the_mtu_goes_to_the_kernel_with_or_without_df() {
    let mut p = load();
    for df in [true, false] {
        let mut f = to_peer([10, 244, 2, 11], 64);
        let extra = MTU as usize + 1 - (f.len() - 14);
        f.extend(std::iter::repeat_n(0xab, extra));
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[20] = if df { 0x40 } else { 0 };
        fix_checksum(&mut f);
        p.expect_pass(
            PROG_TO_PEER,
            &f,
            Slot::V4(Counter::PassMtu),
            &format!("MTU + 1, DF {df}"),
        );
        // Exactly the MTU still takes the fast path.
        let mut fits = f.clone();
        fits.pop();
        fits[16..18].copy_from_slice(&(total - 1).to_be_bytes());
        fix_checksum(&mut fits);
        p.expect_redirect(
            PROG_TO_PEER,
            &fits,
            &[Slot::V4(Counter::FwdToPeer)],
            &format!("exactly the MTU, DF {df}"),
        );
    }
}

#[test]
fn truncated_frames_go_to_the_kernel_unchanged() {
    let mut p = load();
    // Runts never reach a program: the kernel builds no skb without an Ethernet header.
    for len in 1..14 {
        assert!(
            p.try_run(PROG_TO_PEER, &[0xff; 13][..len]).is_none(),
            "{len}-byte runt: the kernel now accepts these; test them (not_ip)"
        );
    }
    let full = to_peer([10, 244, 2, 11], 64);
    // BPF_PROG_TEST_RUN builds no IPv4 skb shorter than Ethernet + IPv4 header (EINVAL),
    // so the shortest frames are checked as far as the kernel lets us feed them: every
    // cut between the end of the IPv4 header and the end of the frame.
    for len in 14..34 {
        assert!(
            p.try_run(PROG_TO_PEER, &full[..len]).is_none(),
            "{len} bytes: the kernel now accepts these; test them"
        );
    }
    for len in 34..full.len() {
        p.expect_pass(
            PROG_TO_PEER,
            &full[..len],
            Slot::V4(Counter::PassMalformed),
            &format!("cut to {len} bytes"),
        );
    }
}

#[test]
fn uplink_side_delivers_to_local_pods_only() {
    use Counter::*;
    let mut p = load();
    let input = to_pod([10, 244, 1, 11], 63);
    let out = p.expect_redirect(PROG_TO_POD, &input, &[Slot::V4(FwdToPod)], "to a local pod");
    assert_eq!(
        out[0..12],
        input[0..12],
        "an unknown pod: MACs are the kernel's job (bpf_redirect_neigh)"
    );
    // A known pod: straight into its veth, addressed as the gateway would.
    let input = to_pod([10, 244, 1, 12], 63);
    let out = p.expect_redirect(
        PROG_TO_POD,
        &input,
        &[Slot::V4(FwdToPod), Slot::V4(FwdToPodDirect)],
        "to a known pod",
    );
    assert_eq!(out[0..6], POD_MAC, "destination MAC is the pod's");
    assert_eq!(out[6..12], BRIDGE_MAC, "source MAC is the gateway's");
    for (what, frame, reason) in [
        (
            "not ours",
            to_pod([10, 244, 2, 12], 63),
            Slot::V4(PassNotPod),
        ),
        (
            "the node itself",
            to_pod([172, 31, 0, 1], 63),
            Slot::V4(PassNotPod),
        ),
        (
            // In the pod CIDR, but the node's own address: for the node, not a pod.
            "the gateway",
            to_pod([10, 244, 1, 1], 63),
            Slot::V4(PassLocal),
        ),
        ("TTL 1", to_pod([10, 244, 1, 11], 1), Slot::V4(PassTtl)),
        (
            "another host's MAC",
            frame(PEER2_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 63),
            Slot::V4(PassNotUnicast),
        ),
        (
            "the bridge's MAC",
            frame(BRIDGE_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 63),
            Slot::V4(PassNotUnicast),
        ),
        (
            "source 127.0.0.1",
            frame(UPLINK_MAC, [127, 0, 0, 1], [10, 244, 1, 11], 63),
            Slot::V4(PassMartian),
        ),
    ] {
        p.expect_pass(PROG_TO_POD, &frame, reason, what);
    }
}

#[test]
fn ipv6_bridge_side_hit_rewrites_macs_and_hop_limit_and_redirects() {
    let mut p = load();
    let input = to_peer6("fd00:244:2::11", 64);
    let before = p.counter(Slot::V4(Counter::FwdToPeer));
    // expect_redirect also holds every other counter still, the IPv4 ones included.
    let out = p.expect_redirect(
        PROG_TO_PEER,
        &input,
        &[Slot::V6(Counter::FwdToPeer)],
        "IPv6 hit",
    );
    assert_eq!(out[0..6], PEER2_MAC, "destination MAC is the next hop's");
    assert_eq!(out[6..12], UPLINK_MAC, "source MAC is the uplink's");
    assert_eq!(out[V6_HOP_LIMIT], 63);
    assert_eq!(
        p.counter(Slot::V4(Counter::FwdToPeer)),
        before,
        "an IPv6 packet counts in the IPv6 block only"
    );
    // Every hop limit that may be forwarded, and the upper-layer protocols (ESP
    // included: opaque payload to a router) that are no extension header.
    for hop_limit in 2..=255u8 {
        p.expect_redirect(
            PROG_TO_PEER,
            &to_peer6("fd00:244:2::11", hop_limit),
            &[Slot::V6(Counter::FwdToPeer)],
            &format!("hop limit {hop_limit}"),
        );
    }
    for next_header in [IPPROTO_TCP, IPPROTO_UDP, 50, 58, 59] {
        p.expect_redirect(
            PROG_TO_PEER,
            &with(&input, |f| f[V6_NEXT_HEADER] = next_header),
            &[Slot::V6(Counter::FwdToPeer)],
            &format!("next header {next_header}"),
        );
    }
}

#[test]
fn ipv6_the_longest_prefix_wins() {
    let mut p = load();
    for (dst, mac, what) in [
        ("fd00:244:2::99", PEER_HOST_MAC, "/128 inside a /64"),
        ("fd00:244:2::98", PEER2_MAC, "/64, next to the /128"),
        (
            "fd00:244:2::9:99",
            PEER2_MAC,
            "/64, the /128's bits one group up",
        ),
        ("fd00:244:2:0:8000::99", PEER2_MAC, "/64, far end"),
        ("fd00:244:0:5::1", PEER5_MAC, "/64 inside a /48"),
        ("fd00:244:0:7::1", PEER_WIDE_MAC, "only the /48"),
        (
            "fd00:244:0:4::1",
            PEER_WIDE_MAC,
            "next to the /64: only the /48",
        ),
        ("fd00:244::", PEER_WIDE_MAC, "/48, near end"),
        (
            "fd00:244:0:ffff:ffff:ffff:ffff:ffff",
            PEER_WIDE_MAC,
            "/48, far end",
        ),
    ] {
        let out = p.expect_redirect(
            PROG_TO_PEER,
            &to_peer6(dst, 64),
            &[Slot::V6(Counter::FwdToPeer)],
            what,
        );
        assert_eq!(out[0..6], mac, "{what}");
    }
}

#[test]
fn ipv6_bridge_side_leaves_what_it_is_not_sure_of_to_the_kernel() {
    use Counter::*;
    let mut p = load();
    let base = to_peer6("fd00:244:2::11", 64);
    let mut cases: Vec<(String, Vec<u8>, Slot)> = vec![];
    let mut case = |what: &str, frame: Vec<u8>, reason: Slot| {
        cases.push((what.to_string(), frame, reason));
    };
    case(
        "LPM miss",
        to_peer6("fd00:99::1", 64),
        Slot::V6(PassNoRoute),
    );
    case(
        "past the /48 (fd00:244:0::/48)",
        to_peer6("fd00:244:4::", 64),
        Slot::V6(PassNoRoute),
    );
    case(
        "next to n2's /64",
        to_peer6("fd00:244:2:1::99", 64),
        Slot::V6(PassNoRoute),
    );
    case(
        "another /32",
        to_peer6("fd00:245::1", 64),
        Slot::V6(PassNoRoute),
    );
    case(
        "just below the /48",
        to_peer6("fd00:243:ffff:ffff:ffff:ffff:ffff:ffff", 64),
        Slot::V6(PassNoRoute),
    );
    case(
        "next hop MAC unknown",
        to_peer6("fd00:244:3::5", 64),
        Slot::V6(PassNoMac),
    );
    case(
        "own pod CIDR",
        to_peer6("fd00:244:1::12", 64),
        Slot::V6(PassLocal),
    );
    case(
        "the gateway itself",
        to_peer6("fd00:244:1::1", 64),
        Slot::V6(PassLocal),
    );
    case(
        "own pod CIDR, far end",
        to_peer6("fd00:244:1:0:ffff:ffff:ffff:ffff", 64),
        Slot::V6(PassLocal),
    );
    case(
        "hop limit 1",
        to_peer6("fd00:244:2::11", 1),
        Slot::V6(PassTtl),
    );
    case(
        "hop limit 0",
        to_peer6("fd00:244:2::11", 0),
        Slot::V6(PassTtl),
    );
    for next_header in V6_EXTENSION_HEADERS {
        case(
            &format!("extension header {next_header}"),
            with(&base, |f| f[V6_NEXT_HEADER] = next_header),
            Slot::V6(PassIpOptions),
        );
    }
    case(
        "fragment header",
        with(&base, |f| f[V6_NEXT_HEADER] = NEXTHDR_FRAGMENT),
        Slot::V6(PassFragment),
    );
    let payload_len = (base.len() - V6_HEADERS) as u16;
    case(
        "payload length one beyond the frame",
        with(&base, |f| {
            f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&(payload_len + 1).to_be_bytes())
        }),
        Slot::V6(PassMalformed),
    );
    case(
        "payload length 65535",
        with(&base, |f| {
            f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&[0xff, 0xff])
        }),
        Slot::V6(PassMalformed),
    );
    case(
        "version 4 in an IPv6 frame",
        with(&base, |f| f[14] = 0x4b),
        Slot::V6(PassMalformed),
    );
    case(
        "version 7 in an IPv6 frame",
        with(&base, |f| f[14] = 0x7b),
        Slot::V6(PassMalformed),
    );
    case(
        "an IPv6 header under the IPv4 ethertype",
        with(&base, |f| {
            f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes())
        }),
        Slot::V4(PassMalformed),
    );
    for dst in ["ff02::1", "ff05::1:3", "ff0e::101", "ff00::", "ffff::1"] {
        case(
            &format!("multicast destination {dst}"),
            with_dst6(&base, dst),
            Slot::V6(PassNotUnicast),
        );
    }
    for src in [
        "ff02::1",
        "ff0e::1",
        "::",
        "::1",
        "fe80::1",
        "fe80::",
        "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ] {
        case(
            &format!("source {src}"),
            with_src6(&base, src),
            Slot::V6(PassMartian),
        );
    }
    for (what, mac) in [
        ("broadcast MAC", [0xff; 6]),
        ("all-nodes multicast MAC", [0x33, 0x33, 0, 0, 0, 1]),
        (
            "solicited-node multicast MAC",
            [0x33, 0x33, 0xff, 0, 0, 0x11],
        ),
        ("another host's MAC", PEER2_MAC),
        ("the uplink's MAC", UPLINK_MAC),
    ] {
        case(
            what,
            with(&base, |f| f[0..6].copy_from_slice(&mac)),
            Slot::V6(PassNotUnicast),
        );
    }
    for (what, frame, reason) in cases {
        p.expect_pass(PROG_TO_PEER, &frame, reason, &what);
    }
}

#[test]
fn ipv6_larger_than_the_mtu_goes_to_the_kernel() {
    let mut p = load();
    for (program, base, forwarded) in [
        (
            PROG_TO_PEER,
            to_peer6("fd00:244:2::11", 64),
            vec![Slot::V6(Counter::FwdToPeer)],
        ),
        (
            PROG_TO_POD,
            to_pod6("fd00:244:1::11", 64),
            vec![Slot::V6(Counter::FwdToPod)],
        ),
    ] {
        // 40 + payload length: the MTU counts the IPv6 header, not the Ethernet one.
        let mut f = base.clone();
        f.resize(14 + MTU as usize + 1, 0xab);
        fix_payload_len(&mut f);
        p.expect_pass(
            program,
            &f,
            Slot::V6(Counter::PassMtu),
            &format!("{program}: MTU + 1"),
        );
        f.pop();
        fix_payload_len(&mut f);
        p.expect_redirect(
            program,
            &f,
            &forwarded,
            &format!("{program}: exactly the MTU"),
        );
    }
}

#[test]
fn gso_packets_larger_than_the_mtu_take_the_fast_path_when_their_segments_fit() {
    // One large TCP/UDP packet from a pod's veth leaves as segments of gso_size: they fit
    // when the IP + L4 headers + gso_size do. Any other protocol has no segments to fit.
    let mut p = load();
    const SIZE: usize = 2900;
    for v6 in [false, true] {
        let (ip_len, family): (u32, fn(Counter) -> Slot) =
            if v6 { (40, Slot::V6) } else { (20, Slot::V4) };
        let build = |program: &str, proto: u8, l4: &[u8]| {
            let to_peer = program == PROG_TO_PEER;
            match (v6, to_peer) {
                (false, true) => ipv4(
                    BRIDGE_MAC,
                    [10, 244, 1, 11],
                    [10, 244, 2, 11],
                    64,
                    proto,
                    l4,
                ),
                (false, false) => ipv4(
                    UPLINK_MAC,
                    [10, 244, 2, 11],
                    [10, 244, 1, 11],
                    64,
                    proto,
                    l4,
                ),
                (true, true) => ipv6(
                    BRIDGE_MAC,
                    ip6("fd00:244:1::11"),
                    ip6("fd00:244:2::11"),
                    64,
                    proto,
                    l4,
                ),
                (true, false) => ipv6(
                    UPLINK_MAC,
                    ip6("fd00:244:2::11"),
                    ip6("fd00:244:1::11"),
                    64,
                    proto,
                    l4,
                ),
            }
        };
        for (program, forwarded) in [
            (PROG_TO_PEER, Counter::FwdToPeer),
            (PROG_TO_POD, Counter::FwdToPod),
        ] {
            for (what, proto, l4, l4_header) in [
                ("TCP", IPPROTO_TCP, tcp(20, SIZE), 20),
                ("TCP with options", IPPROTO_TCP, tcp(32, SIZE), 32),
                ("UDP", IPPROTO_UDP, udp(&[0xee; SIZE]), 8),
            ] {
                let f = build(program, proto, &l4);
                let what = format!("{program}, IPv{}, {what}", if v6 { 6 } else { 4 });
                let fits = MTU - ip_len - l4_header;
                p.expect_pass(
                    program,
                    &f,
                    family(Counter::PassMtu),
                    &format!("{what}: not GSO"),
                );
                p.expect_redirect_gso(
                    program,
                    &f,
                    fits,
                    &[family(forwarded)],
                    &format!("{what}: segments of exactly the MTU"),
                );
                p.expect_redirect_gso(
                    program,
                    &f,
                    536,
                    &[family(forwarded)],
                    &format!("{what}: small segments"),
                );
                p.expect_pass_gso(
                    program,
                    &f,
                    fits + 1,
                    family(Counter::PassMtu),
                    &format!("{what}: segments of MTU + 1"),
                );
            }
            let icmp = if v6 { 58 } else { 1 };
            let f = build(program, icmp, &[0x08; SIZE]);
            p.expect_pass_gso(
                program,
                &f,
                536,
                family(Counter::PassMtu),
                &format!("{program}, ICMP with a gso_size"),
            );
        }
    }
}

#[test]
fn ipv6_truncated_frames_go_to_the_kernel_unchanged() {
    let mut p = load();
    for (program, full) in [
        (PROG_TO_PEER, to_peer6("fd00:244:2::11", 64)),
        (PROG_TO_POD, to_pod6("fd00:244:1::11", 64)),
    ] {
        // As for IPv4: no IPv6 skb shorter than Ethernet + IPv6 header (EINVAL).
        for len in 14..V6_HEADERS {
            assert!(
                p.try_run(program, &full[..len]).is_none(),
                "{program}, {len} bytes: the kernel now accepts these; test them"
            );
        }
        // Every cut from the end of the fixed header on: payload length beyond the frame.
        for len in V6_HEADERS..full.len() {
            p.expect_pass(
                program,
                &full[..len],
                Slot::V6(Counter::PassMalformed),
                &format!("{program}: cut to {len} bytes"),
            );
        }
    }
}

#[test]
fn ipv6_uplink_side_delivers_to_local_pods_only() {
    use Counter::*;
    let mut p = load();
    let input = to_pod6("fd00:244:1::12", 63);
    let out = p.expect_redirect(
        PROG_TO_POD,
        &input,
        &[Slot::V6(FwdToPod), Slot::V6(FwdToPodDirect)],
        "to a known pod",
    );
    assert_eq!(out[0..6], POD_MAC, "destination MAC is the pod's");
    assert_eq!(out[6..12], BRIDGE_MAC, "source MAC is the gateway's");
    assert_eq!(out[V6_HOP_LIMIT], 62);
    for dst in ["fd00:244:1::11", "fd00:244:1::2", "fd00:244:1:0:ffff::1"] {
        let input = to_pod6(dst, 63);
        let out = p.expect_redirect(
            PROG_TO_POD,
            &input,
            &[Slot::V6(FwdToPod)],
            &format!("to {dst}, a pod without an endpoint"),
        );
        assert_eq!(
            out[0..12],
            input[0..12],
            "{dst}: MACs are the kernel's job (bpf_redirect_neigh, NDP)"
        );
    }
    let base = to_pod6("fd00:244:1::11", 63);
    for (what, frame, reason) in [
        (
            "a peer's pod",
            to_pod6("fd00:244:2::12", 63),
            Slot::V6(PassNotPod),
        ),
        (
            "next to the own /64",
            to_pod6("fd00:244:1:1::11", 63),
            Slot::V6(PassNotPod),
        ),
        (
            "the node itself",
            to_pod6("2001:db8::1", 63),
            Slot::V6(PassNotPod),
        ),
        (
            // In the pod CIDR, but the node's own address: for the node, not a pod.
            "the gateway",
            to_pod6("fd00:244:1::1", 63),
            Slot::V6(PassLocal),
        ),
        (
            "hop limit 1",
            to_pod6("fd00:244:1::12", 1),
            Slot::V6(PassTtl),
        ),
        (
            "hop limit 0",
            to_pod6("fd00:244:1::12", 0),
            Slot::V6(PassTtl),
        ),
        (
            "another host's MAC",
            with(&base, |f| f[0..6].copy_from_slice(&PEER2_MAC)),
            Slot::V6(PassNotUnicast),
        ),
        (
            "the bridge's MAC",
            with(&base, |f| f[0..6].copy_from_slice(&BRIDGE_MAC)),
            Slot::V6(PassNotUnicast),
        ),
        (
            "multicast destination",
            with_dst6(&base, "ff02::1"),
            Slot::V6(PassNotUnicast),
        ),
        (
            "link-local source",
            with_src6(&base, "fe80::1"),
            Slot::V6(PassMartian),
        ),
        (
            "hop-by-hop options",
            with(&base, |f| f[V6_NEXT_HEADER] = 0),
            Slot::V6(PassIpOptions),
        ),
        (
            "fragment header",
            with(&base, |f| f[V6_NEXT_HEADER] = NEXTHDR_FRAGMENT),
            Slot::V6(PassFragment),
        ),
    ] {
        p.expect_pass(PROG_TO_POD, &frame, reason, what);
    }
}

#[test]
fn ipv6_on_a_node_without_an_ipv6_pod_cidr_goes_to_the_kernel() {
    // Routes and the endpoint are in the maps: only the missing CIDR says no.
    let mut p = load_node(false);
    p.expect_pass(
        PROG_TO_PEER,
        &to_peer6("fd00:244:2::11", 64),
        Slot::V6(Counter::PassFamilyOff),
        "bridge side",
    );
    p.expect_pass(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::12", 63),
        Slot::V6(Counter::PassFamilyOff),
        "uplink side, a known pod",
    );
    p.expect_pass(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::11", 63),
        Slot::V6(Counter::PassFamilyOff),
        "uplink side",
    );
    // IPv4 is not affected.
    p.expect_redirect(
        PROG_TO_PEER,
        &to_peer([10, 244, 2, 11], 64),
        &[Slot::V4(Counter::FwdToPeer)],
        "IPv4 on the same node",
    );
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod([10, 244, 1, 12], 63),
        &[
            Slot::V4(Counter::FwdToPod),
            Slot::V4(Counter::FwdToPodDirect),
        ],
        "IPv4 to a known pod on the same node",
    );
}

/// xorshift64*: a seeded generator, so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// What a program must do with `f`, worked out from the rules it implements (not from
/// its code) and the maps `load` wrote: `Some(macs)` for a redirect whose output starts
/// with these destination + source MACs, `None` for the kernel.
fn expected_redirect(program: &str, f: &[u8]) -> Option<[u8; 12]> {
    let to_peer = program == PROG_TO_PEER;
    let our_mac = if to_peer { BRIDGE_MAC } else { UPLINK_MAC };
    if f.len() < 14 || f[0..6] != our_mac {
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
        let (_, _, mac) = table
            .routes
            .iter()
            .filter(|(bits, net, _)| prefix_matches(dst, net, *bits))
            .max_by_key(|(bits, _, _)| *bits)?;
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
        if dst == table.endpoint {
            macs[..6].copy_from_slice(&POD_MAC);
            macs[6..].copy_from_slice(&BRIDGE_MAC);
        } else {
            macs.copy_from_slice(&f[..12]);
        }
    }
    Some(macs)
}

/// Destinations next to the programs' decisions: routes of each length, the own CIDR,
/// the endpoint, misses, multicast.
fn interesting_dsts_v4() -> Vec<[u8; 4]> {
    vec![
        [10, 244, 2, 11],
        [10, 244, 2, 99],
        [10, 244, 7, 1],
        [10, 244, 3, 5],
        [10, 244, 1, 11],
        [10, 244, 1, 12],
        [10, 244, 1, 1],
        [10, 99, 0, 1],
        [224, 0, 0, 5],
        [255, 255, 255, 255],
    ]
}

fn interesting_dsts_v6() -> Vec<[u8; 16]> {
    [
        "fd00:244:2::11",
        "fd00:244:2::99",
        "fd00:244:0:7::1",
        "fd00:244:0:5::1",
        "fd00:244:7::1",
        "fd00:244:3::5",
        "fd00:244:1::11",
        "fd00:244:1::12",
        "fd00:244:1::1",
        "fd00:245::1",
        "ff02::1",
    ]
    .map(ip6)
    .to_vec()
}

/// Sources next to the source rules: this node's pods, its gateway, other nodes' pods,
/// the edges of the pod and cluster CIDRs, a node address.
fn interesting_srcs_v4() -> Vec<[u8; 4]> {
    vec![
        [10, 244, 1, 11],
        [10, 244, 1, 1],
        [10, 244, 1, 0],
        [10, 244, 2, 11],
        [10, 244, 0, 255],
        [10, 244, 255, 255],
        [10, 245, 0, 0],
        [10, 243, 255, 255],
        [172, 31, 0, 2],
    ]
}

fn interesting_srcs_v6() -> Vec<[u8; 16]> {
    [
        "fd00:244:1::11",
        "fd00:244:1::1",
        "fd00:244:1::",
        "fd00:244:2::11",
        "fd00:244:1:1::11",
        "fd00:244:ffff:ffff:ffff:ffff:ffff:ffff",
        "fd00:245::",
        "fd00:243:ffff:ffff:ffff:ffff:ffff:ffff",
        "fd00:172:31::2",
    ]
    .map(ip6)
    .to_vec()
}

/// Sets one header field to a value at or next to an edge the programs decide on.
fn poke_edge(f: &mut [u8], rng: &mut Rng) {
    match ether_type(f) {
        ETH_P_IPV4 if f.len() >= 34 => match rng.below(7) {
            0 => f[14] = rng.pick(&[0x45, 0x46, 0x4f, 0x44, 0x40, 0x55, 0x65]),
            1 => f[V4_TTL] = rng.pick(&[0, 1, 2, 255]),
            2 => f[20..22].copy_from_slice(&rng.pick::<[u8; 2]>(&[
                [0, 0],
                [0x40, 0],
                [0x20, 0],
                [0, 1],
            ])),
            3 => {
                let len = (f.len() - 14 + rng.below(3)).saturating_sub(1) as u16;
                f[16..18].copy_from_slice(&len.to_be_bytes());
            }
            4 => f[26] = rng.pick(&[0, 1, 126, 127, 128, 223, 224, 239, 240, 255]),
            5 => f[26..30].copy_from_slice(&rng.pick(&interesting_srcs_v4())),
            _ => f[30..34].copy_from_slice(&rng.pick(&interesting_dsts_v4())),
        },
        ETH_P_IPV6 if f.len() >= V6_HEADERS => match rng.below(7) {
            0 => f[14] = rng.pick(&[0x60, 0x6f, 0x40, 0x70, 0x00]),
            1 => {
                f[V6_NEXT_HEADER] = rng.pick(&[
                    0, 6, 17, 43, 44, 50, 51, 58, 59, 60, 135, 139, 140, 253, 254,
                ])
            }
            2 => f[V6_HOP_LIMIT] = rng.pick(&[0, 1, 2, 255]),
            3 => {
                let len = (f.len() - V6_HEADERS + rng.below(3)).saturating_sub(1) as u16;
                f[V6_PAYLOAD_LEN..V6_PAYLOAD_LEN + 2].copy_from_slice(&len.to_be_bytes());
            }
            4 => {
                let src = rng.pick(&[
                    "ff02::1", "fe80::1", "febf::1", "fec0::1", "::", "::1", "::2",
                ]);
                f[V6_SRC..V6_SRC + 16].copy_from_slice(&ip6(src));
            }
            5 => f[V6_SRC..V6_SRC + 16].copy_from_slice(&rng.pick(&interesting_srcs_v6())),
            _ => f[V6_DST..V6_DST + 16].copy_from_slice(&rng.pick(&interesting_dsts_v6())),
        },
        _ => {}
    }
}

#[test]
fn random_and_mutated_frames_are_either_untouched_or_well_formed_redirects() {
    const SEED: u64 = 0x6867_7721;
    /// Frames the programs ran (the kernel did not refuse), per program and family.
    const FRAMES: usize = 100_000;
    let mut p = load();
    let mut rng = Rng(SEED);
    let seeds_v4 = [
        to_peer([10, 244, 2, 11], 64),
        to_peer([10, 244, 2, 99], 2),
        to_peer([10, 244, 9, 1], 9),
        to_pod([10, 244, 1, 11], 63),
        to_pod([10, 244, 1, 12], 63),
    ];
    let seeds_v6 = [
        to_peer6("fd00:244:2::11", 64),
        to_peer6("fd00:244:2::99", 2),
        to_peer6("fd00:244:0:9::1", 9),
        to_peer6("fd00:244:3::5", 64),
        to_pod6("fd00:244:1::11", 63),
        to_pod6("fd00:244:1::12", 63),
    ];
    let start = p.counters();
    // What the counters must have gained by the end: every redirect's own counters, and
    // per family (and not-IP) one pass counter per frame left to the kernel (which one
    // depends on the order of the checks, so only the sum is held to).
    let mut forwarded = vec![0u64; COUNTERS_LEN as usize];
    let not_ip = Family::ALL.len();
    let mut passed = vec![0u64; not_ip + 1];
    for program in [PROG_TO_PEER, PROG_TO_POD] {
        let our_mac = if program == PROG_TO_PEER {
            BRIDGE_MAC
        } else {
            UPLINK_MAC
        };
        for (v6, seeds) in [(false, &seeds_v4[..]), (true, &seeds_v6[..])] {
            let (header_end, ether_type_ip, version) = if v6 {
                (V6_HEADERS, ETH_P_IPV6, 0x6b)
            } else {
                (34, ETH_P_IPV4, 0x45)
            };
            let mut redirects = 0;
            let mut refused = 0;
            let mut ran = 0;
            for i in 0.. {
                if ran == FRAMES {
                    break;
                }
                let mut f = seeds[rng.below(seeds.len())].clone();
                match rng.below(5) {
                    // Flip a few bytes, mostly in the headers.
                    0 | 1 => {
                        for _ in 0..1 + rng.below(4) {
                            let span = if rng.below(4) == 0 {
                                f.len()
                            } else {
                                header_end
                            };
                            let at = rng.below(span);
                            f[at] = rng.next() as u8;
                        }
                    }
                    // Cut or grow the frame, now and then to around the MTU, and often
                    // with the IP length made to match.
                    2 => {
                        let len = if rng.below(8) == 0 {
                            14 + MTU as usize - 4 + rng.below(8)
                        } else {
                            14 + rng.below(f.len() + 16)
                        };
                        f.resize(len, rng.next() as u8);
                        if rng.below(2) == 0 {
                            fix_ip_len(&mut f);
                        }
                    }
                    3 => poke_edge(&mut f, &mut rng),
                    // Entirely random bytes, with a plausible header now and then.
                    _ => {
                        let len = 14 + rng.below(100);
                        f = (0..len).map(|_| rng.next() as u8).collect();
                        if rng.below(2) == 0 && len >= header_end {
                            f[12..14].copy_from_slice(&ether_type_ip.to_be_bytes());
                            f[14] = version;
                        }
                    }
                }
                // Aim at the program every other time, so that mutants of the other
                // side's seeds get past the MAC check.
                if rng.below(2) == 0 {
                    f[0..6].copy_from_slice(&our_mac);
                }
                if rng.below(2) == 0 && f.len() >= header_end {
                    match ether_type(&f) {
                        ETH_P_IPV4 => fix_checksum(&mut f),
                        ETH_P_IPV6 => fix_payload_len(&mut f),
                        _ => {}
                    }
                }
                let Some((verdict, out)) = p.try_run(program, &f) else {
                    refused += 1;
                    continue;
                };
                ran += 1;
                let what = || format!("seed {SEED:#x}, {program} frame {i} (v6 {v6}): {f:02x?}");
                let family = match ether_type(&f) {
                    ETH_P_IPV4 => Some(Family::Ipv4),
                    ETH_P_IPV6 => Some(Family::Ipv6),
                    _ => None,
                };
                match (verdict, expected_redirect(program, &f)) {
                    (TC_ACT_OK, None) => {
                        assert_eq!(out, f, "{}: passed to the kernel but changed", what());
                        passed[family.map_or(not_ip, |family| family as usize)] += 1;
                    }
                    (TC_ACT_REDIRECT, Some(macs)) => {
                        assert_redirected_well_formed(&f, &out, &what());
                        assert_eq!(out[..12], macs, "{}: MACs", what());
                        let family = family.expect("only IP is redirected");
                        let mut count = |counter| {
                            forwarded[counter_index(family, counter) as usize] += 1;
                        };
                        if program == PROG_TO_PEER {
                            count(Counter::FwdToPeer);
                        } else {
                            count(Counter::FwdToPod);
                            if macs[..6] == POD_MAC {
                                count(Counter::FwdToPodDirect);
                            }
                        }
                        redirects += 1;
                    }
                    (TC_ACT_OK, Some(macs)) => {
                        panic!(
                            "{}: left to the kernel, expected a redirect to {macs:02x?}",
                            what()
                        )
                    }
                    (TC_ACT_REDIRECT, None) => {
                        panic!(
                            "{}: redirected to {:02x?}, expected for the kernel",
                            what(),
                            &out[..12]
                        )
                    }
                    (other, _) => panic!("{}: unexpected verdict {other}", what()),
                }
            }
            let what = format!("{program}, v6 {v6}");
            assert!(
                refused < FRAMES / 2,
                "{what}: the kernel refused {refused} frames: the generator tests too little"
            );
            assert!(
                redirects > FRAMES / 20,
                "{what}: the generator produced too few forwardable frames ({redirects}) to mean anything"
            );
        }
    }
    let end = p.counters();
    let gained = |index: u32| end[index as usize] - start[index as usize];
    for &family in Family::ALL {
        let mut passes = 0;
        for &counter in Counter::ALL {
            let index = counter_index(family, counter);
            if matches!(
                counter,
                Counter::FwdToPeer | Counter::FwdToPod | Counter::FwdToPodDirect
            ) {
                assert_eq!(
                    gained(index),
                    forwarded[index as usize],
                    "counter {}",
                    slot_name(index)
                );
            } else {
                passes += gained(index);
            }
        }
        assert_eq!(
            passes,
            passed[family as usize],
            "{}: the pass_* counters together",
            family.name()
        );
    }
    assert_eq!(
        gained(COUNTER_NOT_IP),
        passed[not_ip],
        "{COUNTER_NOT_IP_NAME}"
    );
}

fn with(base: &[u8], change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = base.to_vec();
    change(&mut f);
    if f.len() >= 34 && f[12..14] == [0x08, 0x00] {
        fix_checksum(&mut f);
    }
    f
}

fn with_bad_checksum(base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    f[24] ^= 0x01;
    f
}
