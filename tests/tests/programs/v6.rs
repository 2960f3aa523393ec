//! IPv6 cases, one rule at a time, and GSO packets of both families.

use super::*;

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
    for (what, mac) in [
        ("an all-zero source MAC", [0; 6]),
        ("a multicast source MAC", [0x33, 0x33, 0, 0, 0, 1]),
    ] {
        case(
            what,
            with(&base, |f| f[6..12].copy_from_slice(&mac)),
            Slot::V6(PassSourceMac),
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
