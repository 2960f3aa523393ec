//! The real, loaded programs, run with crafted frames through BPF_PROG_TEST_RUN (no lab,
//! nothing attached): for each case the verdict, every output byte, the IPv4 checksum
//! recomputed from scratch, and the counter that moved.

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use hgw_agent::datapath::PROGRAMS;
use hgw_common::{
    Counter, Endpoint, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS_V4, MAP_ROUTES_V4,
    NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, PROG_TO_PEER, PROG_TO_POD,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe1, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x0b];
const PEER2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x02];
const PEER_WIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe9, 0x09];
const PEER_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe3, 0x32];
const UPLINK_IFINDEX: u32 = 7;
const MTU: u32 = 1500;

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

/// Node n1 owns 10.244.1.0/24. Routes: 10.244.0.0/16 (a wide entry), 10.244.2.0/24 (n2),
/// 10.244.3.0/24 with an unresolved MAC, and the single host 10.244.2.99/32.
fn load() -> Programs {
    let mut ebpf = Ebpf::load(PROGRAMS).expect("load the eBPF object");
    let mut config: Array<MapData, NodeConfig> = ebpf
        .take_map(MAP_CONFIG)
        .expect("config map")
        .try_into()
        .expect("array");
    config
        .set(
            0,
            NodeConfig {
                pod_net_v4: [10, 244, 1, 0],
                pod_mask_v4: [255, 255, 255, 0],
                bridge_ifindex: 3,
                bridge_mtu: MTU,
                bridge_mac: BRIDGE_MAC,
                uplink_mac: UPLINK_MAC,
            },
            0,
        )
        .expect("write config");
    let mut routes: LpmTrie<MapData, [u8; 4], NextHop> = ebpf
        .take_map(MAP_ROUTES_V4)
        .expect("routes map")
        .try_into()
        .expect("lpm trie");
    for (prefix, addr, mac) in [
        (16, [10, 244, 0, 0], Some(PEER_WIDE_MAC)),
        (24, [10, 244, 2, 0], Some(PEER2_MAC)),
        (24, [10, 244, 3, 0], None),
        (32, [10, 244, 2, 99], Some(PEER_HOST_MAC)),
    ] {
        routes
            .insert(&Key::new(prefix, addr), next_hop(mac), 0)
            .expect("insert route");
    }
    let mut endpoints: aya::maps::HashMap<MapData, [u8; 4], Endpoint> = ebpf
        .take_map(MAP_ENDPOINTS_V4)
        .expect("endpoints map")
        .try_into()
        .expect("hash map");
    let pod = Endpoint {
        ifindex: 9,
        mac: POD_MAC,
        _pad: [0; 2],
    };
    endpoints
        .insert([10, 244, 1, 12], pod, 0)
        .expect("insert endpoint");
    let counters = ebpf
        .take_map(MAP_COUNTERS)
        .expect("counters map")
        .try_into()
        .expect("per-cpu array");
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
    fn run(&mut self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(program, frame)
            .expect("BPF_PROG_TEST_RUN refused the frame")
    }

    /// `None` when the kernel refuses to build an skb from `frame` (EINVAL).
    fn try_run(&mut self, program: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .expect("program")
            .try_into()
            .expect("classifier");
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .ok()?;
        out.truncate(result.data_size_out as usize);
        Some((result.return_value, out))
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .expect("read counter")
            .iter()
            .sum()
    }

    /// Runs `frame`, expects it handed to the kernel unchanged, and `reason` counted.
    fn expect_pass(&mut self, program: &str, frame: &[u8], reason: Counter, what: &str) {
        let before = self.counter(reason);
        let (verdict, out) = self.run(program, frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
        assert_eq!(
            out, frame,
            "{what}: a packet left to the kernel must be unchanged"
        );
        assert_eq!(
            self.counter(reason),
            before + 1,
            "{what}: counter {}",
            reason.name()
        );
    }

    /// Runs `frame`, expects a redirect, and returns the output frame after checking
    /// that only the MACs, the TTL and the checksum changed, the TTL by one.
    fn expect_redirect(
        &mut self,
        program: &str,
        frame: &[u8],
        counter: Counter,
        what: &str,
    ) -> Vec<u8> {
        let before = self.counter(counter);
        let (verdict, out) = self.run(program, frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: verdict");
        assert_eq!(
            self.counter(counter),
            before + 1,
            "{what}: counter {}",
            counter.name()
        );
        assert_redirected_well_formed(frame, &out, what);
        out
    }
}

fn assert_redirected_well_formed(input: &[u8], out: &[u8], what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length changed");
    assert_eq!(out[22], input[22] - 1, "{what}: TTL must drop by one");
    assert_eq!(
        ipv4_checksum(&out[14..34]),
        0xffff,
        "{what}: IPv4 header checksum invalid"
    );
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        let may_change = i < 12 || i == 22 || i == 24 || i == 25;
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

/// An Ethernet + IPv4 + UDP frame with a valid header checksum.
fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8) -> Vec<u8> {
    let payload = b"hgw test payload";
    let total = 20 + 8 + payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    f.extend_from_slice(&[ttl, 17, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
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

#[test]
fn bridge_side_hit_rewrites_macs_and_ttl_and_redirects() {
    let mut p = load();
    let input = to_peer([10, 244, 2, 11], 64);
    let out = p.expect_redirect(PROG_TO_PEER, &input, Counter::FwdToPeer, "hit");
    assert_eq!(out[0..6], PEER2_MAC, "destination MAC is the next hop's");
    assert_eq!(out[6..12], UPLINK_MAC, "source MAC is the uplink's");
    assert_eq!(out[22], 63);
}

#[test]
fn the_longest_prefix_wins() {
    let mut p = load();
    for (dst, mac, what) in [
        ([10, 244, 2, 99], PEER_HOST_MAC, "/32 inside a /24"),
        ([10, 244, 2, 98], PEER2_MAC, "/24 inside a /16"),
        ([10, 244, 7, 1], PEER_WIDE_MAC, "only the /16"),
    ] {
        let out = p.expect_redirect(PROG_TO_PEER, &to_peer(dst, 64), Counter::FwdToPeer, what);
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
                Counter::FwdToPeer,
                &format!("ttl {ttl} id {id:#x}"),
            );
        }
    }
}

#[test]
fn bridge_side_leaves_what_it_is_not_sure_of_to_the_kernel() {
    let mut p = load();
    let base = to_peer([10, 244, 2, 11], 64);
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "LPM miss",
            to_peer([10, 99, 0, 1], 64),
            Counter::PassNoRoute,
        ),
        (
            "next hop MAC unknown",
            to_peer([10, 244, 3, 5], 64),
            Counter::PassNoMac,
        ),
        (
            "own pod CIDR",
            to_peer([10, 244, 1, 12], 64),
            Counter::PassLocal,
        ),
        (
            "the gateway itself",
            to_peer([10, 244, 1, 1], 64),
            Counter::PassLocal,
        ),
        ("TTL 1", to_peer([10, 244, 2, 11], 1), Counter::PassTtl),
        ("TTL 0", to_peer([10, 244, 2, 11], 0), Counter::PassTtl),
        (
            "bad header checksum",
            with_bad_checksum(&base),
            Counter::PassMalformed,
        ),
        (
            "IP options",
            with(&base, |f| f[14] = 0x46),
            Counter::PassIpOptions,
        ),
        (
            "IHL < 5",
            with(&base, |f| f[14] = 0x44),
            Counter::PassMalformed,
        ),
        (
            "version 6 in an IPv4 frame",
            with(&base, |f| f[14] = 0x65),
            Counter::PassMalformed,
        ),
        (
            "MF set",
            with(&base, |f| f[20] |= 0x20),
            Counter::PassFragment,
        ),
        (
            "fragment offset",
            with(&base, |f| f[21] = 1),
            Counter::PassFragment,
        ),
        (
            "total length beyond the frame",
            with(&base, |f| f[16..18].copy_from_slice(&500u16.to_be_bytes())),
            Counter::PassMalformed,
        ),
        (
            "total length below a header",
            with(&base, |f| f[16..18].copy_from_slice(&19u16.to_be_bytes())),
            Counter::PassMalformed,
        ),
        (
            "ARP",
            with(&base, |f| {
                f[12..14].copy_from_slice(&0x0806u16.to_be_bytes())
            }),
            Counter::PassNotIpv4,
        ),
        (
            "VLAN-tagged",
            with(&base, |f| {
                f[12..14].copy_from_slice(&0x8100u16.to_be_bytes())
            }),
            Counter::PassNotIpv4,
        ),
        (
            "IPv6",
            with(&base, |f| {
                f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes())
            }),
            Counter::PassNotIpv4,
        ),
        (
            "broadcast MAC",
            with(&base, |f| f[0..6].copy_from_slice(&[0xff; 6])),
            Counter::PassNotUnicast,
        ),
        (
            "multicast MAC",
            with(&base, |f| {
                f[0..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1])
            }),
            Counter::PassNotUnicast,
        ),
        (
            "another host's MAC",
            with(&base, |f| f[0..6].copy_from_slice(&PEER2_MAC)),
            Counter::PassNotUnicast,
        ),
        (
            "multicast IP",
            to_peer([224, 0, 0, 5], 64),
            Counter::PassNotUnicast,
        ),
        (
            "broadcast IP",
            to_peer([255, 255, 255, 255], 64),
            Counter::PassNotUnicast,
        ),
    ];
    for (what, frame, reason) in cases {
        p.expect_pass(PROG_TO_PEER, &frame, reason, what);
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
            Counter::PassMtu,
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
            Counter::FwdToPeer,
            &format!("exactly the MTU, DF {df}"),
        );
    }
}

#[test]
fn truncated_frames_go_to_the_kernel_unchanged() {
    let mut p = load();
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
            Counter::PassMalformed,
            &format!("cut to {len} bytes"),
        );
    }
}

#[test]
fn uplink_side_delivers_to_local_pods_only() {
    let mut p = load();
    let input = frame(UPLINK_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 63);
    let out = p.expect_redirect(PROG_TO_POD, &input, Counter::FwdToPod, "to a local pod");
    assert_eq!(
        out[0..12],
        input[0..12],
        "an unknown pod: MACs are the kernel's job (bpf_redirect_neigh)"
    );
    // A known pod: straight into its veth, addressed as the gateway would.
    let direct = p.counter(Counter::FwdToPodDirect);
    let input = frame(UPLINK_MAC, [10, 244, 2, 11], [10, 244, 1, 12], 63);
    let out = p.expect_redirect(PROG_TO_POD, &input, Counter::FwdToPod, "to a known pod");
    assert_eq!(out[0..6], POD_MAC, "destination MAC is the pod's");
    assert_eq!(out[6..12], BRIDGE_MAC, "source MAC is the gateway's");
    assert_eq!(
        p.counter(Counter::FwdToPodDirect),
        direct + 1,
        "fwd_to_pod_direct"
    );
    p.expect_pass(
        PROG_TO_POD,
        &frame(UPLINK_MAC, [10, 244, 2, 11], [10, 244, 2, 12], 63),
        Counter::PassNotPod,
        "not ours",
    );
    p.expect_pass(
        PROG_TO_POD,
        &frame(UPLINK_MAC, [10, 244, 2, 11], [172, 31, 0, 1], 63),
        Counter::PassNotPod,
        "the node itself",
    );
    p.expect_pass(
        PROG_TO_POD,
        &frame(UPLINK_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 1),
        Counter::PassTtl,
        "TTL 1",
    );
    p.expect_pass(
        PROG_TO_POD,
        &frame(PEER2_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 63),
        Counter::PassNotUnicast,
        "another host's MAC",
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
}

#[test]
fn random_and_mutated_frames_are_either_untouched_or_well_formed_redirects() {
    const SEED: u64 = 0x6867_7721;
    const FRAMES: usize = 100_000;
    let mut p = load();
    let mut rng = Rng(SEED);
    let seeds = [
        to_peer([10, 244, 2, 11], 64),
        to_peer([10, 244, 2, 99], 2),
        to_peer([10, 244, 9, 1], 9),
        frame(UPLINK_MAC, [10, 244, 2, 11], [10, 244, 1, 11], 63),
    ];
    let mut redirects = 0;
    let mut refused = 0;
    for (program, n) in [(PROG_TO_PEER, FRAMES), (PROG_TO_POD, FRAMES)] {
        for i in 0..n {
            let mut f = seeds[rng.below(seeds.len())].clone();
            match rng.below(4) {
                // Flip a few bytes, mostly in the headers.
                0 | 1 => {
                    for _ in 0..1 + rng.below(4) {
                        let span = if rng.below(4) == 0 { f.len() } else { 34 };
                        let at = rng.below(span);
                        f[at] = rng.next() as u8;
                    }
                }
                // Cut or grow the frame.
                2 => f.resize(14 + rng.below(f.len() + 16), rng.next() as u8),
                // Entirely random bytes, with a plausible header now and then.
                _ => {
                    let len = 14 + rng.below(100);
                    f = (0..len).map(|_| rng.next() as u8).collect();
                    if rng.below(2) == 0 && len >= 34 {
                        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                        f[14] = 0x45;
                    }
                }
            }
            if rng.below(2) == 0 && f.len() >= 34 {
                fix_checksum(&mut f);
            }
            let Some((verdict, out)) = p.try_run(program, &f) else {
                refused += 1;
                continue;
            };
            let what = format!("seed {SEED:#x}, {program} frame {i}: {f:02x?}");
            match verdict {
                TC_ACT_OK => assert_eq!(out, f, "{what}: passed to the kernel but changed"),
                TC_ACT_REDIRECT => {
                    assert_redirected_well_formed(&f, &out, &what);
                    redirects += 1;
                }
                other => panic!("{what}: unexpected verdict {other}"),
            }
        }
    }
    assert!(
        refused < FRAMES / 2,
        "the kernel refused {refused} frames: the generator tests too little"
    );
    assert!(
        redirects > 1000,
        "the generator produced too few forwardable frames ({redirects}) to mean anything"
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
