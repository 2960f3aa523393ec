//! IPv4 cases, one rule at a time.

use super::*;

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
        // What br_handle_frame drops from a port (hgw on the ports sees it first).
        (
            "an all-zero source MAC",
            with(&base, |f| f[6..12].copy_from_slice(&[0; 6])),
            Slot::V4(PassSourceMac),
        ),
        (
            "a multicast source MAC",
            with(&base, |f| {
                f[6..12].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1])
            }),
            Slot::V4(PassSourceMac),
        ),
        (
            "a broadcast source MAC",
            with(&base, |f| f[6..12].copy_from_slice(&[0xff; 6])),
            Slot::V4(PassSourceMac),
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

/// `ip_forward` sets a forwarded packet's priority from its TOS
/// (`ip_forward_update_priority`, on by default): the qdiscs after the redirect (the
/// uplink's, a pod veth's) see what they would on the kernel path, not the priority the
/// sender's socket gave it. Off, the priority stays; IPv6 forwarding never sets it; a
/// packet handed to the kernel keeps it for the kernel to set.
#[test]
fn forwarded_packets_get_the_priority_of_their_tos() {
    let mut p = load();
    const SENDER: u32 = 3;
    // TOS -> rt_tos2priority: 0x10 low delay -> 6, 0x08 throughput -> 2, 0x18 both ->
    // 4, 0x04 reliability -> 0, 0xb8 (DSCP EF, its TOS bits 0x18) -> 4, 0 -> 0.
    let cases = [
        (0x10u8, 6u32),
        (0x08, 2),
        (0x18, 4),
        (0x04, 0),
        (0xb8, 4),
        (0x00, 0),
    ];
    for (program, base) in [
        (PROG_TO_PEER, to_peer([10, 244, 2, 30], 64)),
        (PROG_TO_POD, to_pod([10, 244, 1, 21], 64)),
    ] {
        for (tos, priority) in cases {
            let frame = with(&base, |f| f[15] = tos);
            p.set_update_priority(true);
            let (verdict, out) = p.run_priority(program, &frame, SENDER);
            assert_eq!(
                verdict, TC_ACT_REDIRECT,
                "{program} TOS {tos:#04x}: verdict"
            );
            assert_eq!(out, priority, "{program} TOS {tos:#04x}: priority");
            p.set_update_priority(false);
            let (_, out) = p.run_priority(program, &frame, SENDER);
            assert_eq!(
                out, SENDER,
                "{program} TOS {tos:#04x}, update off: priority"
            );
        }
    }
    p.set_update_priority(true);
    let ipv6 = with(&to_peer6("fd00:244:2::30", 64), |f| f[14] |= 0x01);
    let (verdict, out) = p.run_priority(PROG_TO_PEER, &ipv6, SENDER);
    assert_eq!(
        (verdict, out),
        (TC_ACT_REDIRECT, SENDER),
        "IPv6 with a traffic class"
    );
    let passed = with(&to_peer([10, 244, 2, 30], 1), |f| f[15] = 0x10);
    let (verdict, out) = p.run_priority(PROG_TO_PEER, &passed, SENDER);
    assert_eq!((verdict, out), (HAND_ON, SENDER), "TTL 1, handed on");
}
