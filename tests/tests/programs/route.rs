//! The kernel's routing decides: on a full decision the programs ask the FIB (tables
//! and rules, from the packet's ingress device) and take a packet only where the kernel
//! would send it, the same device and, towards a peer, the same neighbour as their own
//! next hop. Each case is first shown forwarded, then the admin's route or rule appears
//! in n1's namespace and the same packet is handed on unchanged, counted `pass_route`.

use super::*;

/// An admin's change to n1's routing, as `ip -batch` lines, and the packets it takes off
/// the fast path: (what, program, frame, what forwarding it counted before).
struct Change {
    lines: Vec<String>,
    packets: Vec<(String, &'static str, Vec<u8>, Vec<Slot>)>,
}

impl Programs {
    /// Each of `change`'s packets forwarded as n1 stands; then, with the change made,
    /// each handed on unchanged with `pass_route` (and nothing else) counted.
    fn expect_rerouted(&mut self, change: &Change) {
        for (what, program, frame, forwarded) in &change.packets {
            self.expect_redirect(program, frame, forwarded, &format!("{what}: before"));
        }
        self.ns.ip(&change.lines).expect("the admin's change");
        for (what, program, frame, forwarded) in &change.packets {
            let family = match forwarded[0] {
                Slot::V6(_) => Slot::V6,
                _ => Slot::V4,
            };
            self.expect_pass(program, frame, family(Counter::PassRoute), what);
        }
    }

    /// A second NIC, eth1 (index [`SECOND_NIC_IFINDEX`], on 192.168.50.0/24 and
    /// fd00:192:168:50::/64), with a neighbour 192.168.50.2 (fd00:192:168:50::2) that has
    /// n2's MAC: a way out that differs from the fast path's in the device alone.
    fn add_second_nic(&self) {
        let mac = mac_text(PEER2_MAC);
        self.ns
            .ip(&[
                format!(
                    "link add eth1 index {SECOND_NIC_IFINDEX} type veth peer name eth1p index {}",
                    SECOND_NIC_IFINDEX + progns::PEER_INDEX_OFFSET
                ),
                "link set eth1 up".to_owned(),
                "link set eth1p up".to_owned(),
                "addr add 192.168.50.1/24 dev eth1".to_owned(),
                "addr add fd00:192:168:50::1/64 dev eth1 nodad".to_owned(),
                format!("neigh replace 192.168.50.2 lladdr {mac} dev eth1 nud permanent"),
                format!("neigh replace fd00:192:168:50::2 lladdr {mac} dev eth1 nud permanent"),
            ])
            .expect("a second NIC");
    }
}

/// The second NIC's interface index.
const SECOND_NIC_IFINDEX: u32 = 11;
/// Another router on the uplink's segment, with a MAC no next hop of the map has.
const OTHER_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe6, 0x66];

fn fwd_to_peer(v6: bool) -> Vec<Slot> {
    vec![if v6 {
        Slot::V6(Counter::FwdToPeer)
    } else {
        Slot::V4(Counter::FwdToPeer)
    }]
}

fn fwd_to_pod(v6: bool) -> Vec<Slot> {
    vec![if v6 {
        Slot::V6(Counter::FwdToPod)
    } else {
        Slot::V4(Counter::FwdToPod)
    }]
}

/// A blackhole, unreachable or prohibit route for one pod (a /32, a /128) drops what the
/// kernel would route to it: the fast path hands those packets on, on both sides, and
/// the pod next to it is still forwarded.
#[test]
fn routes_that_drop_send_the_packet_to_the_kernel() {
    let mut p = load();
    for (i, kind) in ["blackhole", "unreachable", "prohibit"].iter().enumerate() {
        let host = 20 + i as u8;
        let (peer4, pod4) = ([10, 244, 2, host], [10, 244, 1, host]);
        let (peer6, pod6) = (format!("fd00:244:2::{host}"), format!("fd00:244:1::{host}"));
        let change = Change {
            lines: vec![
                format!("route add {kind} {}/32", addr_text(&peer4)),
                format!("route add {kind} {}/32", addr_text(&pod4)),
                format!("route add {kind} {peer6}/128"),
                format!("route add {kind} {pod6}/128"),
            ],
            packets: vec![
                (
                    format!("{kind} {peer4:?}"),
                    PROG_TO_PEER,
                    to_peer(peer4, 64),
                    fwd_to_peer(false),
                ),
                (
                    format!("{kind} {pod4:?}"),
                    PROG_TO_POD,
                    to_pod(pod4, 64),
                    fwd_to_pod(false),
                ),
                (
                    format!("{kind} {peer6}"),
                    PROG_TO_PEER,
                    to_peer6(&peer6, 64),
                    fwd_to_peer(true),
                ),
                (
                    format!("{kind} {pod6}"),
                    PROG_TO_POD,
                    to_pod6(&pod6, 64),
                    fwd_to_pod(true),
                ),
            ],
        };
        p.expect_rerouted(&change);
        // Only the one address: its neighbour in the same CIDR still takes the fast path.
        let next = host + 10;
        p.expect_redirect(
            PROG_TO_PEER,
            &to_peer([10, 244, 2, next], 64),
            &fwd_to_peer(false),
            &format!("{kind}: the pod next to it"),
        );
        p.expect_redirect(
            PROG_TO_POD,
            &to_pod6(&format!("fd00:244:1::{next}"), 64),
            &fwd_to_pod(true),
            &format!("{kind}: the IPv6 pod next to it"),
        );
    }
}

/// A more specific route for one peer pod through another router on the uplink (a moved
/// pod, an egress gateway): the same device, another neighbour MAC, so the kernel's way
/// and the fast path's differ. So do a route through a gateway whose MAC the kernel does
/// not know yet, and one out of a second NIC to a neighbour with the very MAC of the
/// fast path's next hop (the device alone differs). A more specific route through n2's
/// own address changes nothing: the kernel's way is the fast path's.
#[test]
fn a_more_specific_route_elsewhere_sends_the_packet_to_the_kernel() {
    let mut p = load();
    p.add_second_nic();
    let uplink = progns::UPLINK;
    let other = mac_text(OTHER_ROUTER_MAC);
    let change = Change {
        lines: vec![
            format!("neigh replace 172.31.0.66 lladdr {other} dev {uplink} nud permanent"),
            format!("neigh replace fd00:172:31::66 lladdr {other} dev {uplink} nud permanent"),
            format!("route add 10.244.2.14/32 via 172.31.0.66 dev {uplink}"),
            format!("route add fd00:244:2::14/128 via fd00:172:31::66 dev {uplink}"),
            // No neighbour entry for .67: the kernel would resolve it first.
            format!("route add 10.244.2.16/32 via 172.31.0.67 dev {uplink}"),
            format!("route add fd00:244:2::16/128 via fd00:172:31::67 dev {uplink}"),
            "route add 10.244.2.17/32 via 192.168.50.2 dev eth1".to_owned(),
            "route add fd00:244:2::17/128 via fd00:192:168:50::2 dev eth1".to_owned(),
            format!("route add 10.244.2.15/32 via 172.31.0.2 dev {uplink}"),
            format!("route add fd00:244:2::15/128 via fd00:172:31::2 dev {uplink}"),
        ],
        packets: vec![
            (
                "via another router".to_owned(),
                PROG_TO_PEER,
                to_peer([10, 244, 2, 14], 64),
                fwd_to_peer(false),
            ),
            (
                "IPv6, via another router".to_owned(),
                PROG_TO_PEER,
                to_peer6("fd00:244:2::14", 64),
                fwd_to_peer(true),
            ),
            (
                "via a router not resolved yet".to_owned(),
                PROG_TO_PEER,
                to_peer([10, 244, 2, 16], 64),
                fwd_to_peer(false),
            ),
            (
                "IPv6, via a router not resolved yet".to_owned(),
                PROG_TO_PEER,
                to_peer6("fd00:244:2::16", 64),
                fwd_to_peer(true),
            ),
            (
                "out of a second NIC, the same MAC".to_owned(),
                PROG_TO_PEER,
                to_peer([10, 244, 2, 17], 64),
                fwd_to_peer(false),
            ),
            (
                "IPv6, out of a second NIC, the same MAC".to_owned(),
                PROG_TO_PEER,
                to_peer6("fd00:244:2::17", 64),
                fwd_to_peer(true),
            ),
        ],
    };
    p.expect_rerouted(&change);
    let out = p.expect_redirect(
        PROG_TO_PEER,
        &to_peer([10, 244, 2, 15], 64),
        &fwd_to_peer(false),
        "a /32 through n2 itself",
    );
    assert_eq!(out[0..6], PEER2_MAC, "a /32 through n2 itself");
    let out = p.expect_redirect(
        PROG_TO_PEER,
        &to_peer6("fd00:244:2::15", 64),
        &fwd_to_peer(true),
        "IPv6, a /128 through n2 itself",
    );
    assert_eq!(out[0..6], PEER2_MAC, "IPv6, a /128 through n2 itself");
}

/// An `ip rule` that sends one pod's traffic, as it comes in on the device the program
/// sits on (`iif`: the lookup is made from the packet's ingress), to a table that routes
/// it elsewhere: that pod's packets go to the kernel, the other pods' stay on the fast
/// path. Bridge side: pod 10.244.1.13's packets to n2 through another router; uplink
/// side: n2's pod 10.244.2.13's packets to n1's pods back out of the uplink.
#[test]
fn an_ip_rule_for_one_source_sends_its_packets_to_the_kernel() {
    let mut p = load();
    let (uplink, bridge) = (progns::UPLINK, progns::BRIDGE);
    let other = mac_text(OTHER_ROUTER_MAC);
    let change = Change {
        lines: vec![
            format!("neigh replace 172.31.0.66 lladdr {other} dev {uplink} nud permanent"),
            format!("neigh replace fd00:172:31::66 lladdr {other} dev {uplink} nud permanent"),
            format!("route add 10.244.0.0/16 via 172.31.0.66 dev {uplink} table 100"),
            format!("route add fd00:244::/32 via fd00:172:31::66 dev {uplink} table 100"),
            format!("rule add iif {bridge} from 10.244.1.13 table 100 pref 100"),
            format!("-6 rule add iif {bridge} from fd00:244:1::13 table 100 pref 100"),
            format!("rule add iif {uplink} from 10.244.2.13 table 100 pref 100"),
            format!("-6 rule add iif {uplink} from fd00:244:2::13 table 100 pref 100"),
        ],
        packets: vec![
            (
                "bridge side, from the pod the rule names".to_owned(),
                PROG_TO_PEER,
                frame(BRIDGE_MAC, [10, 244, 1, 13], [10, 244, 2, 11], 64),
                fwd_to_peer(false),
            ),
            (
                "IPv6, bridge side, from the pod the rule names".to_owned(),
                PROG_TO_PEER,
                with_src6(&to_peer6("fd00:244:2::11", 64), "fd00:244:1::13"),
                fwd_to_peer(true),
            ),
            (
                "uplink side, from the pod the rule names".to_owned(),
                PROG_TO_POD,
                frame(UPLINK_MAC, [10, 244, 2, 13], [10, 244, 1, 11], 64),
                fwd_to_pod(false),
            ),
            (
                "IPv6, uplink side, from the pod the rule names".to_owned(),
                PROG_TO_POD,
                with_src6(&to_pod6("fd00:244:1::11", 64), "fd00:244:2::13"),
                fwd_to_pod(true),
            ),
        ],
    };
    p.expect_rerouted(&change);
    // The other pods: the main table, the fast path's way.
    p.expect_redirect(
        PROG_TO_PEER,
        &to_peer([10, 244, 2, 11], 64),
        &fwd_to_peer(false),
        "bridge side, another pod",
    );
    p.expect_redirect(
        PROG_TO_PEER,
        &to_peer6("fd00:244:2::11", 64),
        &fwd_to_peer(true),
        "IPv6, bridge side, another pod",
    );
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod([10, 244, 1, 11], 64),
        &fwd_to_pod(false),
        "uplink side, another pod",
    );
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::11", 64),
        &fwd_to_pod(true),
        "IPv6, uplink side, another pod",
    );
}

/// Uplink side: a /32 (/128) route for one of this node's pods out of another device
/// than the bridge (a pod on a second NIC) takes its packets off the fast path, the
/// pod with an endpoint entry (delivered straight into its veth) too.
#[test]
fn a_local_pod_routed_off_the_bridge_is_the_kernels() {
    let mut p = load();
    p.add_second_nic();
    let both = |v6| {
        let mut slots = fwd_to_pod(v6);
        slots.push(if v6 {
            Slot::V6(Counter::FwdToPodDirect)
        } else {
            Slot::V4(Counter::FwdToPodDirect)
        });
        slots
    };
    let change = Change {
        lines: [
            "route add 10.244.1.15/32 dev eth1",
            "route add 10.244.1.12/32 dev eth1",
            "route add fd00:244:1::15/128 dev eth1",
            "route add fd00:244:1::12/128 dev eth1",
        ]
        .map(str::to_owned)
        .to_vec(),
        packets: vec![
            (
                "a pod".to_owned(),
                PROG_TO_POD,
                to_pod([10, 244, 1, 15], 64),
                fwd_to_pod(false),
            ),
            (
                "the pod with an endpoint entry".to_owned(),
                PROG_TO_POD,
                to_pod([10, 244, 1, 12], 64),
                both(false),
            ),
            (
                "IPv6, a pod".to_owned(),
                PROG_TO_POD,
                to_pod6("fd00:244:1::15", 64),
                fwd_to_pod(true),
            ),
            (
                "IPv6, the pod with an endpoint entry".to_owned(),
                PROG_TO_POD,
                to_pod6("fd00:244:1::12", 64),
                both(true),
            ),
        ],
    };
    p.expect_rerouted(&change);
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod([10, 244, 1, 11], 64),
        &fwd_to_pod(false),
        "a pod still on the bridge",
    );
}

/// Addresses of the pod CIDR that the kernel's local table holds (the model's
/// `kernel_local`): the subnet broadcast, the IPv6 subnet-router anycast. The kernel
/// forwards nothing to them, so neither does the fast path; the pods next to them are
/// forwarded.
#[test]
fn the_kernels_own_addresses_in_the_pod_cidr_are_not_forwarded() {
    let mut p = load();
    p.expect_pass(
        PROG_TO_POD,
        &to_pod([10, 244, 1, 255], 64),
        Slot::V4(Counter::PassRoute),
        "the subnet broadcast",
    );
    p.expect_pass(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::", 64),
        Slot::V6(Counter::PassRoute),
        "the subnet-router anycast",
    );
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod([10, 244, 1, 254], 64),
        &fwd_to_pod(false),
        "next to the broadcast",
    );
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::2", 64),
        &fwd_to_pod(true),
        "next to the anycast",
    );
}

/// The kernel checks the packet against the MTU of the device it would leave by: when
/// that is less than the map's (the uplink's MTU lowered, the agent not caught up yet,
/// or the pod's bridge with a resolved neighbour), the FIB says "fragmentation needed"
/// and the packet goes to the kernel as `pass_mtu`, which answers as a router must.
#[test]
fn the_egress_devices_own_mtu_holds() {
    let mut p = load();
    const SMALLER: u32 = 1400;
    // Well above the lowered MTU (the FIB's check of the skb against the device, which
    // some kernels do instead of the length's, allows a VLAN header's 4 bytes more).
    const ABOVE: u32 = SMALLER + 50;
    let sized = |f: Vec<u8>, ip_len: u32| {
        let mut f = f;
        f.resize(14 + ip_len as usize, 0xab);
        if ether_type(&f) == ETH_P_IPV4 {
            fix_ip_len(&mut f);
            fix_checksum(&mut f);
        } else {
            fix_payload_len(&mut f);
        }
        f
    };
    let (uplink, bridge) = (progns::UPLINK, progns::BRIDGE);
    // The pod's neighbour is known: only then does the FIB answer for the bridge with a
    // MAC, and check the MTU (for an unresolved one the program's own check stands).
    let pod = mac_text(POD_MAC);
    p.ip(&[
        &format!("neigh replace 10.244.1.12 lladdr {pod} dev {bridge} nud permanent"),
        &format!("neigh replace fd00:244:1::12 lladdr {pod} dev {bridge} nud permanent"),
    ]);
    let direct = |v6| {
        if v6 {
            vec![
                Slot::V6(Counter::FwdToPod),
                Slot::V6(Counter::FwdToPodDirect),
            ]
        } else {
            vec![
                Slot::V4(Counter::FwdToPod),
                Slot::V4(Counter::FwdToPodDirect),
            ]
        }
    };
    let cases = [
        (
            "to a peer",
            PROG_TO_PEER,
            to_peer([10, 244, 2, 11], 64),
            fwd_to_peer(false),
        ),
        (
            "IPv6, to a peer",
            PROG_TO_PEER,
            to_peer6("fd00:244:2::11", 64),
            fwd_to_peer(true),
        ),
        (
            "to a pod",
            PROG_TO_POD,
            to_pod([10, 244, 1, 12], 64),
            direct(false),
        ),
        (
            "IPv6, to a pod",
            PROG_TO_POD,
            to_pod6("fd00:244:1::12", 64),
            direct(true),
        ),
    ];
    for (what, program, base, forwarded) in &cases {
        let big = sized(base.clone(), ABOVE);
        p.expect_redirect(program, &big, forwarded, &format!("{what}: before"));
    }
    p.ip(&[
        &format!("link set {uplink} mtu {SMALLER}"),
        &format!("link set {bridge} mtu {SMALLER}"),
    ]);
    for (what, program, base, forwarded) in cases {
        let family = match forwarded[0] {
            Slot::V6(_) => Slot::V6,
            _ => Slot::V4,
        };
        let big = sized(base.clone(), ABOVE);
        p.expect_pass(program, &big, family(Counter::PassMtu), what);
        let fits = sized(base, SMALLER);
        p.expect_redirect(program, &fits, &forwarded, &format!("{what}: fits"));
    }
}

/// A route's own locked MTU (`ip route ... mtu lock N`), and the bridge's MTU for a pod
/// whose neighbour is not resolved yet, hold as the egress device's does: a packet
/// larger goes to the kernel as `pass_mtu`. (An unlocked route MTU, which forwarding
/// also honours (ip_dst_mtu_maybe_forward), is invisible to bpf_fib_lookup
/// (ip_mtu_from_fib_result reads it only when locked or with ip_forward_use_pmtu): a
/// limit the README states.)
#[test]
fn a_routes_own_mtu_holds() {
    let mut p = load();
    let uplink = progns::UPLINK;
    let sized = |mut f: Vec<u8>| {
        f.resize(14 + 1450, 0xab);
        fix_ip_len(&mut f);
        fix_checksum(&mut f);
        f
    };
    p.ip(&[&format!(
        "route add 10.244.2.40/32 via 172.31.0.2 dev {uplink} mtu lock 1400"
    )]);
    p.expect_pass(
        PROG_TO_PEER,
        &sized(to_peer([10, 244, 2, 40], 64)),
        Slot::V4(Counter::PassMtu),
        "a /32 with mtu 1400",
    );
    p.ip(&[&format!("link set {} mtu 1400", progns::BRIDGE)]);
    p.expect_pass(
        PROG_TO_POD,
        &sized(to_pod([10, 244, 1, 11], 64)),
        Slot::V4(Counter::PassMtu),
        "the bridge's MTU lowered, the pod's MAC not resolved",
    );
}

/// Uplink side: a route for the pod with an endpoint entry through another host on the
/// bridge (`via` a gateway on the same device) sends its packets to that host's MAC on
/// the kernel path; the fast path must not deliver them straight into the pod.
#[test]
fn a_local_pod_routed_through_another_host_on_the_bridge_is_not_delivered_directly() {
    let mut p = load();
    let bridge = progns::BRIDGE;
    let other = mac_text(OTHER_ROUTER_MAC);
    p.ip(&[
        &format!("neigh replace 10.244.1.99 lladdr {other} dev {bridge} nud permanent"),
        &format!("route add 10.244.1.12/32 via 10.244.1.99 dev {bridge}"),
    ]);
    let input = to_pod([10, 244, 1, 12], 64);
    let (verdict, out) = p.try_run(PROG_TO_POD, &input).expect("the frame runs");
    assert!(
        verdict == HAND_ON || out[0..6] != POD_MAC,
        "delivered straight into the pod, past the kernel's gateway"
    );
}

/// The kernel's reverse-path filter (IPv4 `rp_filter`, as the agent reads it for the
/// uplink and the bridge): a packet is taken only if the kernel would let its source
/// in. Loose wants some route back to the source, strict one out of the interface the
/// packet came in on (the bridge, for a pod's packets); off, nothing is asked. IPv6
/// routing has no such check.
#[test]
fn the_reverse_path_filter_sends_what_it_would_drop_to_the_kernel() {
    let mut p = load();
    p.add_second_nic();
    let from_peer = to_pod([10, 244, 1, 21], 64);
    let from_pod = to_peer([10, 244, 2, 30], 64);
    let modes = [
        ("off", RP_FILTER_OFF),
        ("strict", RP_FILTER_STRICT),
        ("loose", RP_FILTER_LOOSE),
    ];
    let check = |p: &mut Programs, mode: u32, taken: bool, what: &str| {
        p.set_rp_filter(mode, mode);
        for (program, frame, forwarded, side) in [
            (
                PROG_TO_POD,
                &from_peer,
                fwd_to_pod(false),
                "from a peer's pod",
            ),
            (
                PROG_TO_PEER,
                &from_pod,
                fwd_to_peer(false),
                "from a local pod",
            ),
        ] {
            let what = format!("{what}, {side}");
            if taken {
                p.expect_redirect(program, frame, &forwarded, &what);
            } else {
                p.expect_pass(program, frame, Slot::V4(Counter::PassRpFilter), &what);
            }
        }
    };
    // Each step: what changes on the node (`ip -batch` lines, kept for the next steps)
    // and the modes that still forward both sources.
    let steps: [(&str, &[&str], &[u32]); 4] = [
        // As hgw leaves the node, each source's route leads back out of where it came in.
        (
            "routes back as hgw's",
            &[],
            &[RP_FILTER_OFF, RP_FILTER_STRICT, RP_FILTER_LOOSE],
        ),
        // The kernel looks the way back up as coming in from the forward route's
        // device (the uplink for a local pod's packet, the bridge for a peer's), not
        // from `lo`: a rule on that device sending the sources through eth1.
        (
            "a rule sends the way back through eth1",
            &[
                "route add 10.244.2.11/32 via 192.168.50.2 dev eth1 table 200",
                "route add 10.244.1.11/32 via 192.168.50.2 dev eth1 table 200",
                "rule add pref 50 iif cni0 lookup 200",
                "rule add pref 51 iif eth0 lookup 200",
            ],
            &[RP_FILTER_OFF, RP_FILTER_LOOSE],
        ),
        (
            "the way back through eth1",
            &[
                "rule del pref 50",
                "rule del pref 51",
                "route add 10.244.2.11/32 via 192.168.50.2 dev eth1",
                "route add 10.244.1.11/32 via 192.168.50.2 dev eth1",
            ],
            &[RP_FILTER_OFF, RP_FILTER_LOOSE],
        ),
        (
            "no way back",
            &[
                "route replace blackhole 10.244.2.11/32",
                "route replace unreachable 10.244.1.11/32",
            ],
            &[RP_FILTER_OFF],
        ),
    ];
    for (what, lines, forwarding) in steps {
        if !lines.is_empty() {
            p.ns.ip(lines).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        for (name, mode) in modes {
            check(
                &mut p,
                mode,
                forwarding.contains(&mode),
                &format!("{name}, {what}"),
            );
        }
    }
    // IPv6 sources are not checked: the same with no way back, strict.
    p.ns.ip(&[
        "route add blackhole fd00:244:2::11/128".to_owned(),
        "route add blackhole fd00:244:1::11/128".to_owned(),
    ])
    .expect("no IPv6 way back");
    p.set_rp_filter(RP_FILTER_STRICT, RP_FILTER_STRICT);
    p.expect_redirect(
        PROG_TO_POD,
        &to_pod6("fd00:244:1::21", 64),
        &fwd_to_pod(true),
        "IPv6 from a peer's pod, strict, no way back",
    );
    p.expect_redirect(
        PROG_TO_PEER,
        &to_peer6("fd00:244:2::30", 64),
        &fwd_to_peer(true),
        "IPv6 from a local pod, strict, no way back",
    );
}
