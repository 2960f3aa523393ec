//! The real programs in `established` mode, run through BPF_PROG_TEST_RUN against
//! conntrack entries the test made with the `conntrack` tool: which packets the kernel
//! keeps (no entry, no reply seen, TCP not assured, NAT'd, SYN, not TCP/UDP), that an
//! accepted flow takes the fast path in both directions, and what the programs do to
//! its entry (FIN and RST shorten it, a running-low one is refreshed, once).
//!
//! `bpf_skb_ct_lookup` (netns_id -1) looks in the namespace of the skb's device, which
//! for BPF_PROG_TEST_RUN is a device of the caller's namespace: each test makes a
//! namespace of its own where node n1 exists for real (its bridge, uplink, the route to
//! n2 and n2's neighbour entry, which the programs' FIB lookups consult,
//! [`hgw_tests::progns`]), puts its entries there and runs the programs from inside it,
//! with the skb on the device each program sits on, so the host's conntrack table is
//! neither read nor written. (The lookup finds entries made through ctnetlink without
//! any netfilter rule in the namespace.)
//!
//! Entries made through ctnetlink are always confirmed (the kernel inserts them into
//! the hash table, which is what confirming is): an unconfirmed entry, which exists
//! only while its first packet crosses the stack, cannot be made here. The programs
//! treat one as not accepted with the same status test as an entry without a reply
//! (IPS_CONFIRMED is in the same mask as IPS_SEEN_REPLY).

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use hgw_common::{
    COUNTERS_LEN, Counter, CtTimeouts, FLOW_TO_PEER, Family, FlowSlotV4, FlowSlotV6, MAP_CONFIG,
    MAP_COUNTERS, MAP_FLOWS_V4, MAP_FLOWS_V6, MAP_GENERATION, MAP_ROUTES_V4, MAP_ROUTES_V6,
    NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, PROG_TO_PEER, PROG_TO_POD, RP_FILTER_OFF,
    counter_index, flow_check, flow_slot,
};
use hgw_tests::frames::{
    ACK, BRIDGE_MAC, FIN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, RST, SYN,
    UPLINK_MAC, V4_TTL, V6_HOP_LIMIT, fix_checksum, ip, tcp_segment, udp_segment,
};
use hgw_tests::progns::{self, ProgNetns};
use hgw_tests::run_in_ok;

/// What the programs return for a packet they hand on: TC_ACT_UNSPEC (-1), TCX_NEXT
/// under tcx, as the u32 BPF_PROG_TEST_RUN reports it.
const HAND_ON: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

const PEER2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x02];
/// n2's node addresses on the uplink: the kernel routes' gateways.
const PEER2_V4: &str = "172.31.0.2";
const PEER2_V6: &str = "fd00:172:31::2";
const UPLINK_IFINDEX: u32 = 7;
const BRIDGE_IFINDEX: u32 = 3;
const MTU: u32 = 1500;
/// offsetof(struct __sk_buff, ifindex): the skb's device, which BPF_PROG_TEST_RUN takes
/// from the context.
const SKB_IFINDEX: usize = 40;

/// The node's timeouts, in seconds (the sysctls the agent reads). FIN and RST are far
/// below the established timeouts so that each change shows; entries made with less
/// than `REFRESH_BELOW` left and more than `FIN_S` are refreshed.
const ESTABLISHED: u32 = 120;
const REFRESH_BELOW: u32 = 90;
const FIN_S: u32 = 10;
const RST_S: u32 = 3;

/// `recheck`: jiffies a carried flow's verdict is reused (0: the flow cache off, every
/// packet looks conntrack up, which the cases before the flow cache's own check).
fn timeouts(recheck: u32) -> CtTimeouts {
    let hz = hgw_agent::node::conntrack::hz().expect("the kernel tick");
    CtTimeouts {
        tcp_ms: ESTABLISHED * 1000,
        tcp_refresh_below: REFRESH_BELOW * hz,
        udp_ms: ESTABLISHED * 1000,
        udp_refresh_below: REFRESH_BELOW * hz,
        fin_ms: FIN_S * 1000,
        rst_ms: RST_S * 1000,
        closing: FIN_S.max(RST_S) * hz,
        fin_refresh_below: FIN_S * hz / 2,
        rst_closing: RST_S * hz,
        recheck,
    }
}

/// n1's namespace: the bridge with the gateway addresses, the uplink, and the routes to
/// n2's pod CIDRs via n2's node addresses, whose neighbour entries hold the MAC the
/// programs' next hop has (as the agent would have the kernel hold them).
fn n1_netns() -> ProgNetns {
    let ns = ProgNetns::node(&progns::Node {
        bridge: progns::Device {
            index: BRIDGE_IFINDEX,
            mac: BRIDGE_MAC,
            mtu: MTU,
            addrs: &["10.244.1.1/24", "fd00:244:1::1/64"],
        },
        uplink: progns::Device {
            index: UPLINK_IFINDEX,
            mac: UPLINK_MAC,
            mtu: MTU,
            addrs: &["172.31.0.1/24", "fd00:172:31::1/64"],
        },
        ports: &[],
    })
    .expect("n1's namespace");
    let mac = mac_text(PEER2_MAC);
    let uplink = progns::UPLINK;
    ns.ip(&[
        format!("route add 10.244.2.0/24 via {PEER2_V4} dev {uplink}"),
        format!("route add fd00:244:2::/64 via {PEER2_V6} dev {uplink}"),
        format!("neigh replace {PEER2_V4} lladdr {mac} dev {uplink} nud permanent"),
        format!("neigh replace {PEER2_V6} lladdr {mac} dev {uplink} nud permanent"),
    ])
    .expect("n1's routes to n2");
    ns
}

/// A MAC as `ip` reads it.
fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// A flow between a pod of this node (n1) and a pod of n2, on ports of its own.
#[derive(Clone, Copy, Debug)]
struct Flow {
    proto: Proto,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
}

impl Flow {
    fn family(&self) -> Family {
        if self.local.0.is_ipv6() {
            Family::Ipv6
        } else {
            Family::Ipv4
        }
    }

    /// `conntrack` arguments naming the flow as opened by the local pod (or the remote).
    fn tuple(&self, opened_locally: bool) -> Vec<String> {
        let (from, to) = if opened_locally {
            (self.local, self.remote)
        } else {
            (self.remote, self.local)
        };
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        [
            "-p",
            proto,
            "-s",
            &from.0.to_string(),
            "-d",
            &to.0.to_string(),
            "--sport",
            &from.1.to_string(),
            "--dport",
            &to.1.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The flow cache's key of the local pod's packets, as `hgw_to_peer` builds it
    /// ([`hgw_common::FlowKeyV4`] or `V6`: source, destination, ports, protocol, side,
    /// two zero bytes), as words: two for IPv4, five for IPv6.
    fn peer_side_key(&self) -> Vec<u64> {
        let octets = |ip: IpAddr| match ip {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        let proto = match self.proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        };
        let bytes = [
            octets(self.local.0),
            octets(self.remote.0),
            self.local.1.to_be_bytes().to_vec(),
            self.remote.1.to_be_bytes().to_vec(),
            vec![proto, FLOW_TO_PEER, 0, 0],
        ]
        .concat();
        bytes
            .chunks(8)
            .map(|word| u64::from_ne_bytes(word.try_into().expect("8 bytes")))
            .collect()
    }

    /// The slot of [`Flow::peer_side_key`] in the flow cache.
    fn peer_side_slot(&self) -> u32 {
        flow_slot(self.peer_side_key())
    }

    /// The local pod's packet to the remote: what `hgw_to_peer` sees.
    fn to_peer(self, tcp_flags: u8) -> Vec<u8> {
        self.frame(BRIDGE_MAC, self.local, self.remote, tcp_flags)
    }

    /// The local pod's TCP segment without payload (a bare ACK, or flags only).
    fn to_peer_bare(self, tcp_flags: u8) -> Vec<u8> {
        let tcp = tcp_segment(self.local.1, self.remote.1, tcp_flags, 20, &[]);
        ip(
            BRIDGE_MAC,
            self.local.0,
            self.remote.0,
            64,
            IPPROTO_TCP,
            &tcp,
        )
    }

    /// The remote pod's packet to the local one: what `hgw_to_pod` sees.
    fn to_pod(self, tcp_flags: u8) -> Vec<u8> {
        self.frame(UPLINK_MAC, self.remote, self.local, tcp_flags)
    }

    /// A packet of the flow (TTL 64) from `src` to `dst`.
    fn frame(
        &self,
        dst_mac: [u8; 6],
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        tcp_flags: u8,
    ) -> Vec<u8> {
        const PAYLOAD: &[u8] = b"hgw test payload";
        let (proto, l4) = match self.proto {
            Proto::Tcp => (
                IPPROTO_TCP,
                tcp_segment(src.1, dst.1, tcp_flags, 20, PAYLOAD),
            ),
            Proto::Udp => (IPPROTO_UDP, udp_segment(src.1, dst.1, PAYLOAD)),
        };
        ip(dst_mac, src.0, dst.0, 64, proto, &l4)
    }
}

/// An ICMP echo request (ICMPv6 for IPv6) between the flow's pods.
fn ping(flow: &Flow, to_peer: bool) -> Vec<u8> {
    let (proto, echo) = if flow.family() == Family::Ipv6 {
        (IPPROTO_ICMPV6, 128)
    } else {
        (IPPROTO_ICMP, 8)
    };
    let l4 = [echo, 0, 0, 0, 0, 1, 0, 1];
    if to_peer {
        ip(BRIDGE_MAC, flow.local.0, flow.remote.0, 64, proto, &l4)
    } else {
        ip(UPLINK_MAC, flow.remote.0, flow.local.0, 64, proto, &l4)
    }
}

/// Node n1 (10.244.1.0/24, fd00:244:1::/64; cluster 10.244.0.0/16, fd00:244::/32) with
/// n2's pod CIDRs routed, in `established` mode, with its own namespace for conntrack.
struct Node {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    routes_v4: LpmTrie<MapData, [u8; 4], NextHop>,
    generation: Array<MapData, u32>,
    /// n1, for real: the programs run from inside it, conntrack holds its entries there.
    ns: ProgNetns,
    next_port: u16,
}

fn take_map<T: TryFrom<Map, Error: std::fmt::Debug>>(ebpf: &mut Ebpf, name: &str) -> T {
    let map = ebpf.take_map(name).unwrap_or_else(|| panic!("map {name}"));
    map.try_into()
        .unwrap_or_else(|e| panic!("map {name}: {e:?}"))
}

fn v4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().expect("IPv4").octets()
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().expect("IPv6").octets()
}

impl Node {
    /// Without the flow cache: every packet looks conntrack up.
    fn new() -> Node {
        Node::with_recheck(0)
    }

    fn with_recheck(recheck: u32) -> Node {
        let mut ebpf = hgw_common::loader::load(hgw_agent::datapath::PROGRAMS, true)
            .expect("load the eBPF object in established mode");
        let mask6 = |bits: usize| -> [u8; 16] {
            std::array::from_fn(|i| (0xff00u16 >> (bits.saturating_sub(i * 8).min(8))) as u8)
        };
        let mut config: Array<MapData, NodeConfig> = take_map(&mut ebpf, MAP_CONFIG);
        let node = NodeConfig {
            pod_net_v4: v4("10.244.1.0"),
            pod_mask_v4: v4("255.255.255.0"),
            pod_net_v6: v6("fd00:244:1::"),
            pod_mask_v6: mask6(64),
            bridge_ifindex: BRIDGE_IFINDEX,
            bridge_mtu: MTU,
            bridge_mac: BRIDGE_MAC,
            uplink_mac: UPLINK_MAC,
            gateway_v4: v4("10.244.1.1"),
            gateway_v6: v6("fd00:244:1::1"),
            cluster_net_v4: v4("10.244.0.0"),
            cluster_mask_v4: v4("255.255.0.0"),
            cluster_net_v6: v6("fd00:244::"),
            cluster_mask_v6: mask6(32),
            ct: timeouts(recheck),
            rp_filter_uplink: RP_FILTER_OFF,
            rp_filter_bridge: RP_FILTER_OFF,
            update_priority: 1,
            _pad: 0,
        };
        config.set(0, node, 0).expect("write config");
        let hop = NextHop {
            ifindex: UPLINK_IFINDEX,
            mtu: MTU,
            dst_mac: PEER2_MAC,
            src_mac: UPLINK_MAC,
            flags: NEXT_HOP_MAC_KNOWN,
        };
        let mut routes_v4: LpmTrie<MapData, [u8; 4], NextHop> = take_map(&mut ebpf, MAP_ROUTES_V4);
        routes_v4
            .insert(&Key::new(24, v4("10.244.2.0")), hop, 0)
            .expect("route");
        let mut routes: LpmTrie<MapData, [u8; 16], NextHop> = take_map(&mut ebpf, MAP_ROUTES_V6);
        routes
            .insert(&Key::new(64, v6("fd00:244:2::")), hop, 0)
            .expect("IPv6 route");
        let counters = take_map(&mut ebpf, MAP_COUNTERS);
        let generation = take_map(&mut ebpf, MAP_GENERATION);
        for name in [PROG_TO_PEER, PROG_TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program")
                .try_into()
                .expect("classifier");
            prog.load().expect("the verifier accepts the program");
        }
        Node {
            ebpf,
            counters,
            routes_v4,
            generation,
            ns: n1_netns(),
            next_port: 20_000,
        }
    }

    /// A new flow (ports no other flow of this node uses): local pod 10.244.1.11
    /// (fd00:244:1::11), remote 10.244.2.11 (fd00:244:2::11).
    fn flow(&mut self, ipv6: bool, proto: Proto) -> Flow {
        self.next_port += 1;
        let (local, remote): (IpAddr, IpAddr) = if ipv6 {
            (v6("fd00:244:1::11").into(), v6("fd00:244:2::11").into())
        } else {
            (v4("10.244.1.11").into(), v4("10.244.2.11").into())
        };
        Flow {
            proto,
            local: (local, self.next_port),
            remote: (remote, 8080),
        }
    }

    /// Inserts the flow's entry (opened by the local pod, or the remote one) with
    /// `timeout` seconds to go and `extra` arguments (status, state, NAT).
    fn insert(&self, flow: &Flow, opened_locally: bool, timeout: u32, extra: &[&str]) {
        let mut args = vec!["-I".to_owned()];
        args.extend(flow.tuple(opened_locally));
        args.extend(["-t".to_owned(), timeout.to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.conntrack(&args);
    }

    /// `conntrack ARGS` in the node's namespace; its stdout.
    fn conntrack(&self, args: &[&str]) -> String {
        let out = run_in_ok(self.ns.name(), "conntrack", args).expect("conntrack");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Inserts an entry conntrack has accepted ([`accepted`]).
    fn insert_established(&self, flow: &Flow, opened_locally: bool, timeout: u32) {
        self.insert(flow, opened_locally, timeout, accepted(flow.proto));
    }

    /// Seconds left on the flow's entry, as `conntrack -G` shows them (it finds the
    /// entry by its original tuple: who opened the flow).
    fn seconds_left(&self, flow: &Flow, opened_locally: bool) -> u32 {
        let out = self.entry(flow, opened_locally);
        // "tcp      6 119 ESTABLISHED src=..."
        let field = out.split_whitespace().nth(2);
        field
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{flow:?}: no timeout in {out:?}"))
    }

    /// The flow's entry, or `None` when conntrack has none (or only an expired one).
    fn entry_if_any(&self, flow: &Flow, opened_locally: bool) -> Option<String> {
        let mut args = vec!["-G".to_owned()];
        args.extend(flow.tuple(opened_locally));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = hgw_tests::run_in(self.ns.name(), "conntrack", &args).expect("conntrack");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The flow's entry as `conntrack -G` prints it.
    fn entry(&self, flow: &Flow, opened_locally: bool) -> String {
        let mut args = vec!["-G".to_owned()];
        args.extend(flow.tuple(opened_locally));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.conntrack(&args)
    }

    fn counters(&self) -> Vec<u64> {
        (0..COUNTERS_LEN)
            .map(|i| {
                let per_cpu = self.counters.get(&i, 0).expect("read counter");
                per_cpu.iter().sum()
            })
            .collect()
    }

    /// Runs `frame` through `program` from inside the node's namespace (where the
    /// lookup looks): the verdict and the output frame.
    fn run(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("classifier");
        let mut out = vec![0u8; frame.len() + 256];
        // The skb comes in on the device the program sits on; a __sk_buff up to
        // ifindex, all else zero (as the kernel requires of what it does not take).
        let ingress = if program == PROG_TO_PEER {
            BRIDGE_IFINDEX
        } else {
            UPLINK_IFINDEX
        };
        let mut ctx = [0u8; SKB_IFINDEX + 4];
        ctx[SKB_IFINDEX..].copy_from_slice(&ingress.to_ne_bytes());
        self.ns.enter();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Expects `frame` left to the kernel unchanged with `reason` counted, and no other
    /// counter moved.
    fn expect_pass(
        &self,
        program: &str,
        frame: &[u8],
        family: Family,
        reason: Counter,
        what: &str,
    ) {
        let before = self.counters();
        let (verdict, out) = self.run(program, frame);
        assert_eq!(verdict, HAND_ON, "{what}: verdict");
        assert_eq!(
            out, frame,
            "{what}: a packet left to the kernel must be unchanged"
        );
        assert_counted(&before, &self.counters(), family, &[reason], what);
    }

    /// n2's IPv4 next hop now has `mac`: the kernel's neighbour entry first (the peer's
    /// MAC changed), then the map's next hop; with `new_generation`, as the agent writes
    /// it (then the generation changes).
    fn set_peer_mac(&mut self, mac: [u8; 6], new_generation: bool) {
        let hop = NextHop {
            ifindex: UPLINK_IFINDEX,
            mtu: MTU,
            dst_mac: mac,
            src_mac: UPLINK_MAC,
            flags: NEXT_HOP_MAC_KNOWN,
        };
        let (mac, uplink) = (mac_text(mac), progns::UPLINK);
        self.ns
            .ip(&[format!(
                "neigh replace {PEER2_V4} lladdr {mac} dev {uplink} nud permanent"
            )])
            .expect("n2's new MAC");
        self.routes_v4
            .insert(&Key::new(24, v4("10.244.2.0")), hop, 0)
            .expect("route");
        if new_generation {
            self.bump_generation();
        }
    }

    /// The agent's signal after it wrote a map, or saw a route or rule change: cached
    /// flows are stale.
    fn bump_generation(&mut self) {
        let generation = self.generation.get(&0, 0).expect("generation");
        self.generation
            .set(0, generation + 1, 0)
            .expect("generation");
    }

    /// Expects `frame` forwarded (MACs as the program sets them, TTL - 1, nothing else
    /// changed) with the program's fwd counter and each of `also` counted, nothing else.
    fn expect_forward(
        &self,
        program: &str,
        frame: &[u8],
        family: Family,
        also: &[Counter],
        what: &str,
    ) {
        self.expect_forward_to(program, frame, family, also, PEER2_MAC, what);
    }

    /// [`Node::expect_forward`] twice: the full path (nothing but the forward counted),
    /// then from the flow cache (`ct_cached` too).
    fn expect_full_then_cached(&self, program: &str, frame: &[u8], family: Family, what: &str) {
        self.expect_forward(program, frame, family, &[], what);
        self.expect_forward(
            program,
            frame,
            family,
            &[Counter::CtCached],
            &format!("{what}, cached"),
        );
    }

    /// [`Node::expect_forward`], `hgw_to_peer` sending to `peer_mac`.
    fn expect_forward_to(
        &self,
        program: &str,
        frame: &[u8],
        family: Family,
        also: &[Counter],
        peer_mac: [u8; 6],
        what: &str,
    ) {
        let before = self.counters();
        let (verdict, out) = self.run(program, frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: verdict");
        let mut expected = frame.to_vec();
        let forwarded = if program == PROG_TO_PEER {
            expected[0..12].copy_from_slice(&[peer_mac, UPLINK_MAC].concat());
            Counter::FwdToPeer
        } else {
            // No endpoint entry: bpf_redirect_neigh, the kernel fills in the MACs.
            Counter::FwdToPod
        };
        if family == Family::Ipv4 {
            expected[V4_TTL] -= 1;
            fix_checksum(&mut expected);
        } else {
            expected[V6_HOP_LIMIT] -= 1;
        }
        assert_eq!(out, expected, "{what}: output frame");
        let counted = [&[forwarded], also].concat();
        assert_counted(&before, &self.counters(), family, &counted, what);
    }
}

/// `conntrack -I` arguments of an entry conntrack has accepted: UDP with a reply seen,
/// TCP established and assured.
fn accepted(proto: Proto) -> &'static [&'static str] {
    match proto {
        Proto::Tcp => &["--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED"],
        Proto::Udp => &["-u", "SEEN_REPLY"],
    }
}

/// Every counter slot is where `before` had it but `moved`, up by one each.
fn assert_counted(before: &[u64], after: &[u64], family: Family, moved: &[Counter], what: &str) {
    for (index, (was, is)) in (0u32..).zip(before.iter().zip(after)) {
        let up = moved
            .iter()
            .filter(|&&c| counter_index(family, c) == index)
            .count() as u64;
        assert_eq!(*is, was + up, "{what}: counter slot {index}");
    }
}

fn both_sides(flow: &Flow, tcp_flags: u8) -> [(&'static str, Vec<u8>); 2] {
    [
        (PROG_TO_PEER, flow.to_peer(tcp_flags)),
        (PROG_TO_POD, flow.to_pod(tcp_flags)),
    ]
}

#[test]
fn flows_conntrack_has_not_accepted_go_to_the_kernel() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let flow = node.flow(ipv6, proto);
            let family = flow.family();
            let what = |case: &str| format!("{proto:?}, {family:?}: {case}");
            for (program, frame) in both_sides(&flow, ACK) {
                node.expect_pass(
                    program,
                    &frame,
                    family,
                    Counter::PassCtNew,
                    &what("no entry"),
                );
            }
            // Opened, no reply seen.
            let unreplied: &[&str] = match proto {
                Proto::Tcp => &["--state", "SYN_SENT"],
                Proto::Udp => &[],
            };
            node.insert(&flow, true, 60, unreplied);
            for (program, frame) in both_sides(&flow, ACK) {
                node.expect_pass(
                    program,
                    &frame,
                    family,
                    Counter::PassCtNew,
                    &what("no reply"),
                );
            }
        }
        // TCP: a reply seen, but the handshake not done (not assured).
        let flow = node.flow(ipv6, Proto::Tcp);
        let family = flow.family();
        node.insert(
            &flow,
            true,
            60,
            &["--state", "SYN_RECV", "-u", "SEEN_REPLY"],
        );
        for (program, frame) in both_sides(&flow, ACK) {
            let what = format!("TCP, {family:?}: not assured");
            node.expect_pass(program, &frame, family, Counter::PassCtNew, &what);
        }
    }
}

#[test]
fn nated_flows_go_to_the_kernel_both_ways() {
    // Accepted as the established entries that take the fast path elsewhere, and NAT'd;
    // pass_ct_nat (not pass_ct_new) also shows that each packet found its entry.
    let mut node = Node::new();
    for ipv6 in [false, true] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let accepted = accepted(proto);
            let addr = |v4: &str, v6: &str| -> IpAddr {
                (if ipv6 { v6 } else { v4 }).parse().expect("address")
            };
            // DNAT (a Service, hostPort): the local pod asked for a virtual address and
            // the remote pod answers from its own; each packet carries its side's view.
            let dnat = node.flow(ipv6, proto);
            let asked = Flow {
                remote: (addr("10.244.2.99", "fd00:244:2::99"), dnat.remote.1),
                ..dnat
            };
            let backend = dnat.remote.0.to_string();
            node.insert(
                &asked,
                true,
                60,
                &[accepted, &["--dst-nat", &backend]].concat(),
            );
            // SNAT on this node: the local pod's flow leaves from another source, and
            // the reply comes back to that one (a pod-CIDR address, not the node's, so
            // that the reply gets past the uplink side's address checks to the lookup).
            let snat = node.flow(ipv6, proto);
            let source = addr("10.244.1.77", "fd00:244:1::77");
            let translated = source.to_string();
            node.insert(
                &snat,
                true,
                60,
                &[accepted, &["--src-nat", &translated]].concat(),
            );
            let reply = Flow {
                local: (source, snat.local.1),
                ..snat
            };
            for (what, program, frame) in [
                ("DNAT, original", PROG_TO_PEER, asked.to_peer(ACK)),
                ("DNAT, reply", PROG_TO_POD, dnat.to_pod(ACK)),
                ("SNAT, original", PROG_TO_PEER, snat.to_peer(ACK)),
                ("SNAT, reply", PROG_TO_POD, reply.to_pod(ACK)),
            ] {
                let family = snat.family();
                let what = format!("{proto:?}, {family:?}: {what}");
                node.expect_pass(program, &frame, family, Counter::PassCtNat, &what);
            }
        }
    }
}

#[test]
fn syns_and_icmp_go_to_the_kernel_even_on_an_established_entry() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Tcp);
        let family = flow.family();
        node.insert_established(&flow, true, ESTABLISHED);
        for (flags, name) in [(SYN, "SYN"), (SYN | ACK, "SYN-ACK")] {
            for (program, frame) in both_sides(&flow, flags) {
                let what = format!("{family:?}, {name}, {program}");
                node.expect_pass(program, &frame, family, Counter::PassTcpSyn, &what);
            }
        }
        // The same entry takes ACKs: only the SYN flag sent those to the kernel.
        for (program, frame) in both_sides(&flow, ACK) {
            node.expect_forward(program, &frame, family, &[], &format!("{family:?}, ACK"));
        }
        for to_peer in [true, false] {
            let what = format!("{family:?}, ICMP echo, to_peer {to_peer}");
            let program = if to_peer { PROG_TO_PEER } else { PROG_TO_POD };
            node.expect_pass(
                program,
                &ping(&flow, to_peer),
                family,
                Counter::PassCtProto,
                &what,
            );
        }
    }
}

#[test]
fn established_flows_take_the_fast_path_both_ways_and_keep_their_entry() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        for proto in [Proto::Tcp, Proto::Udp] {
            // Opened from either side: each packet matches the entry's original tuple
            // or its reply tuple.
            for opened_locally in [true, false] {
                let flow = node.flow(ipv6, proto);
                let family = flow.family();
                node.insert_established(&flow, opened_locally, ESTABLISHED);
                for (program, frame) in both_sides(&flow, ACK) {
                    let what = format!(
                        "{proto:?}, {family:?}, opened locally {opened_locally}, {program}"
                    );
                    // Plenty left: the entry is not touched.
                    node.expect_forward(program, &frame, family, &[], &what);
                }
                let left = node.seconds_left(&flow, opened_locally);
                assert!(
                    (ESTABLISHED - 5..=ESTABLISHED).contains(&left),
                    "{flow:?}: {left} s left, the program changed the entry"
                );
            }
        }
    }
}

/// Conntrack would have marked a two-way UDP flow assured on seeing it go on; it sees
/// nothing of a carried flow, so the program sets the bit (once).
#[test]
fn carried_udp_entries_become_assured() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Udp);
        let family = flow.family();
        node.insert_established(&flow, true, ESTABLISHED);
        let before = node.entry(&flow, true);
        assert!(!before.contains("ASSURED"), "{family:?}: {before}");
        let (program, frame) = both_sides(&flow, 0)[0].clone();
        node.expect_forward(program, &frame, family, &[], &format!("{family:?} UDP"));
        let after = node.entry(&flow, true);
        assert!(
            after.contains("[ASSURED]"),
            "{family:?}: a carried UDP flow's entry is not assured: {after}"
        );
    }
}

#[test]
fn fin_and_rst_shorten_the_entry_once() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        for (flag, name, short) in [(FIN | ACK, "FIN", FIN_S), (RST, "RST", RST_S)] {
            for to_peer in [true, false] {
                let flow = node.flow(ipv6, Proto::Tcp);
                let family = flow.family();
                let (program, frame) = if to_peer {
                    (PROG_TO_PEER, flow.to_peer(flag))
                } else {
                    (PROG_TO_POD, flow.to_pod(flag))
                };
                let what = format!("{family:?}, {name}, {program}");
                node.insert_established(&flow, true, ESTABLISHED);
                node.expect_forward(program, &frame, family, &[Counter::CtClose], &what);
                let left = node.seconds_left(&flow, true);
                assert!(
                    (short - 2..=short).contains(&left),
                    "{what}: {left} s left, expected the {name} timeout, {short} s"
                );
                // A second FIN (or a FIN after the RST) leaves the closing entry as
                // it is: no ct_close, not lengthened; every RST sets CLOSE's timeout,
                // as conntrack does on each RST.
                for (again, again_name) in [(FIN | ACK, "FIN"), (RST, "RST")] {
                    let (program, frame) = if to_peer {
                        (PROG_TO_POD, flow.to_pod(again))
                    } else {
                        (PROG_TO_PEER, flow.to_peer(again))
                    };
                    let what = format!("{what}, then {again_name}");
                    let moved: &[Counter] = if again == RST {
                        &[Counter::CtClose]
                    } else {
                        &[]
                    };
                    node.expect_forward(program, &frame, family, moved, &what);
                    let now = node.seconds_left(&flow, true);
                    assert!(now <= left.max(RST_S), "{what}: {now} s left, was {left}");
                }
            }
        }
    }
}

/// A half-closed connection goes on after its first FIN: its closing entry is kept at
/// TIME_WAIT's timeout while packets use it (set back when half is gone), so it
/// expires only after that long of silence, as in the kernel path.
#[test]
fn a_half_closed_connection_keeps_its_entry() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Tcp);
        let family = flow.family();
        let what = format!("{family:?}");
        // Closing (a FIN passed), less than half of FIN_S left, more than RST_S.
        node.insert_established(&flow, true, FIN_S / 2 - 1);
        node.expect_forward(
            PROG_TO_PEER,
            &flow.to_peer(ACK),
            family,
            &[Counter::CtRefresh],
            &what,
        );
        let left = node.seconds_left(&flow, true);
        assert!(
            (FIN_S - 2..=FIN_S).contains(&left),
            "{what}: {left} s left, expected TIME_WAIT's {FIN_S} s"
        );
        // An entry an RST closed is not lengthened.
        let reset = node.flow(ipv6, Proto::Tcp);
        node.insert_established(&reset, true, RST_S);
        node.expect_forward(PROG_TO_PEER, &reset.to_peer(ACK), family, &[], &what);
        assert!(
            node.seconds_left(&reset, true) <= RST_S,
            "{what}: RST'd entry lengthened"
        );
    }
}

/// A SYN on the 4-tuple of a connection the fast path closed (its FIN carried, so
/// conntrack still says ESTABLISHED) expires the entry, so the kernel starts a new one,
/// as it would after TIME_WAIT; a SYN on a live connection leaves its entry alone.
#[test]
fn a_syn_reopening_a_closed_connection_expires_its_entry() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Tcp);
        let family = flow.family();
        let what = format!("{family:?}");
        node.insert_established(&flow, true, ESTABLISHED);
        node.expect_pass(
            PROG_TO_PEER,
            &flow.to_peer(SYN),
            family,
            Counter::PassTcpSyn,
            &format!("{what}, live"),
        );
        let left = node.seconds_left(&flow, true);
        assert!(
            left > ESTABLISHED - 5,
            "{what}: a live entry was touched: {left} s"
        );

        node.expect_forward(
            PROG_TO_PEER,
            &flow.to_peer(FIN | ACK),
            family,
            &[Counter::CtClose],
            &what,
        );
        let before = node.counters();
        let frame = flow.to_peer(SYN);
        let (verdict, out) = node.run(PROG_TO_PEER, &frame);
        assert_eq!((verdict, &out), (HAND_ON, &frame), "{what}: SYN verdict");
        assert_counted(
            &before,
            &node.counters(),
            family,
            &[Counter::PassTcpSyn, Counter::CtReopen],
            &format!("{what}, reopen"),
        );
        let entry = node.entry_if_any(&flow, true);
        assert!(
            entry
                .as_deref()
                .is_none_or(|e| e.split_whitespace().nth(2) == Some("0")),
            "{what}: the closed connection's entry is still alive: {entry:?}"
        );
    }
}

#[test]
fn running_low_entries_are_refreshed_once_and_closing_ones_never() {
    let mut node = Node::new();
    for ipv6 in [false, true] {
        for proto in [Proto::Tcp, Proto::Udp] {
            for to_peer in [true, false] {
                let flow = node.flow(ipv6, proto);
                let family = flow.family();
                let frame = |flow: &Flow| {
                    if to_peer {
                        flow.to_peer(ACK)
                    } else {
                        flow.to_pod(ACK)
                    }
                };
                let program = if to_peer { PROG_TO_PEER } else { PROG_TO_POD };
                let what = format!("{proto:?}, {family:?}, {program}");
                // Below REFRESH_BELOW, above the closing timeouts.
                node.insert_established(&flow, true, 20);
                node.expect_forward(program, &frame(&flow), family, &[Counter::CtRefresh], &what);
                let left = node.seconds_left(&flow, true);
                assert!(
                    (ESTABLISHED - 5..=ESTABLISHED).contains(&left),
                    "{what}: {left} s left after the refresh, expected {ESTABLISHED}"
                );
                // Full again: the next packet does not refresh it.
                node.expect_forward(
                    program,
                    &frame(&flow),
                    family,
                    &[],
                    &format!("{what}, again"),
                );
                if proto == Proto::Tcp {
                    // As little left as a closing entry (a FIN or RST passed): never
                    // refreshed, so a closed connection's entry still goes.
                    let closing = node.flow(ipv6, proto);
                    node.insert_established(&closing, true, FIN_S - 1);
                    let what = format!("{what}, closing");
                    node.expect_forward(program, &frame(&closing), family, &[], &what);
                    let left = node.seconds_left(&closing, true);
                    assert!(
                        left < FIN_S,
                        "{what}: {left} s left, the entry was lengthened"
                    );
                }
            }
        }
    }
}

/// `ms` in jiffies, rounded up.
fn recheck_jiffies(ms: u32) -> u32 {
    let hz = hgw_agent::node::conntrack::hz().expect("the kernel tick");
    (ms * hz).div_ceil(1000)
}

/// A carried flow's next packets skip conntrack (`ct_cached`) on both sides; once its
/// entry is gone, the flow falls back to the kernel within the recheck time, as a
/// flow of netfilter's flowtable does within its garbage collection's interval.
#[test]
fn a_cached_flow_looks_conntrack_up_again_within_its_recheck_time() {
    const RECHECK_MS: u32 = 300;
    let mut node = Node::with_recheck(recheck_jiffies(RECHECK_MS));
    for ipv6 in [false, true] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let flow = node.flow(ipv6, proto);
            let family = flow.family();
            node.insert_established(&flow, true, ESTABLISHED);
            for (program, frame) in both_sides(&flow, ACK) {
                let what = format!("{proto:?}, {family:?}, {program}");
                node.expect_forward(program, &frame, family, &[], &format!("{what}: first"));
                for i in 0..3 {
                    node.expect_forward(
                        program,
                        &frame,
                        family,
                        &[Counter::CtCached],
                        &format!("{what}: packet {i} after the first"),
                    );
                }
            }
            let mut delete = vec!["-D".to_owned()];
            delete.extend(flow.tuple(true));
            node.conntrack(&delete.iter().map(String::as_str).collect::<Vec<_>>());
            std::thread::sleep(std::time::Duration::from_millis(
                u64::from(RECHECK_MS) + 100,
            ));
            for (program, frame) in both_sides(&flow, ACK) {
                let what = format!("{proto:?}, {family:?}, {program}, entry deleted");
                node.expect_pass(program, &frame, family, Counter::PassCtNew, &what);
                node.expect_pass(
                    program,
                    &frame,
                    family,
                    Counter::PassCtNew,
                    &format!("{what}, again"),
                );
            }
        }
    }
}

/// A map written (the agent changes the generation after each write) makes every
/// cached flow look its route up again: a peer's new MAC applies to the next packet.
#[test]
fn a_map_write_makes_cached_flows_look_up_again() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    let flow = node.flow(false, Proto::Udp);
    let family = flow.family();
    node.insert_established(&flow, true, ESTABLISHED);
    let frame = flow.to_peer(0);
    node.expect_full_then_cached(PROG_TO_PEER, &frame, family, "first");
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x99];
    // Without a new generation the cached next hop stands: the check below can fail.
    node.set_peer_mac(NEW_MAC, false);
    node.expect_forward(
        PROG_TO_PEER,
        &frame,
        family,
        &[Counter::CtCached],
        "same generation",
    );
    node.set_peer_mac(NEW_MAC, true);
    node.expect_forward_to(PROG_TO_PEER, &frame, family, &[], NEW_MAC, "new generation");
    node.expect_forward_to(
        PROG_TO_PEER,
        &frame,
        family,
        &[Counter::CtCached],
        NEW_MAC,
        "new generation, cached again",
    );
}

/// A new generation with nothing changed for the flow: its next packet takes the full
/// path once (conntrack and the route looked up again), which confirms the same next
/// hop, and the flow is cached again, on both sides.
#[test]
fn a_new_generation_alone_is_one_full_decision_then_cached_again() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Udp);
        let family = flow.family();
        node.insert_established(&flow, true, ESTABLISHED);
        for (program, frame) in [
            (PROG_TO_PEER, flow.to_peer(0)),
            (PROG_TO_POD, flow.to_pod(0)),
        ] {
            let what = format!("{family:?} {program}");
            node.expect_full_then_cached(program, &frame, family, &format!("{what}: first"));
            node.bump_generation();
            node.expect_full_then_cached(program, &frame, family, &format!("{what}: rechecked"));
        }
    }
}

/// SYN, FIN and RST always take the full path (conntrack sees what the kernel path
/// would make of them) and the flow's next packet looks conntrack up again: a SYN
/// reopening the 4-tuple must not find the old connection's verdict.
#[test]
fn syn_fin_and_rst_are_never_cached_and_forget_the_flow() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        for (flags, name) in [(FIN | ACK, "FIN"), (RST, "RST"), (SYN, "SYN")] {
            let flow = node.flow(ipv6, Proto::Tcp);
            let family = flow.family();
            node.insert_established(&flow, true, ESTABLISHED);
            let what = format!("{family:?}, {name}");
            let data = flow.to_peer(ACK);
            node.expect_full_then_cached(PROG_TO_PEER, &data, family, &format!("{what}: first"));
            let flagged = flow.to_peer(flags);
            if flags == SYN {
                node.expect_pass(PROG_TO_PEER, &flagged, family, Counter::PassTcpSyn, &what);
            } else {
                node.expect_forward(PROG_TO_PEER, &flagged, family, &[Counter::CtClose], &what);
            }
            // Looked up again, not cached: the full path's answer (forwarded without
            // a counter of its own, the entry closing but there).
            node.expect_forward(
                PROG_TO_PEER,
                &data,
                family,
                &[],
                &format!("{what}: the next packet"),
            );
        }
    }
}

/// The last ACK of a closed connection (a bare segment on a closing entry) takes the
/// full path and is not remembered: its FINs made the flow forget it both ways, so a
/// closed connection leaves nothing behind in the cache to evict live flows. The data
/// of a half-closed connection is remembered as before.
#[test]
fn a_closed_connections_last_ack_is_not_cached_but_its_data_is() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Tcp);
        let family = flow.family();
        // Closing (a FIN passed: TIME_WAIT's timeout), not running low.
        node.insert_established(&flow, true, FIN_S);
        let bare = flow.to_peer_bare(ACK);
        for n in ["first", "again"] {
            let what = format!("{family:?}: bare ACK, {n}");
            node.expect_forward(PROG_TO_PEER, &bare, family, &[], &what);
        }
        let data = flow.to_peer(ACK);
        let what = format!("{family:?}: data");
        node.expect_forward(PROG_TO_PEER, &data, family, &[], &what);
        let what = format!("{family:?}: data, again");
        node.expect_forward(PROG_TO_PEER, &data, family, &[Counter::CtCached], &what);
    }
}

/// The FIB is asked on full decisions only: a flow the cache carries keeps its way
/// while the generation stands (the agent changes it when a route or rule changes).
/// With a new generation its next packets, each side, ask the kernel's FIB again: a
/// blackhole route for the remote pod (bridge side) and for the local one (uplink side)
/// sends them to the kernel (`pass_route`), uncached; with the routes gone and a new
/// generation the flow is back on the fast path, and cached again.
#[test]
fn a_route_change_moves_a_cached_flow_on_its_next_packets() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Udp);
        let family = flow.family();
        let bits = if ipv6 { 128 } else { 32 };
        let blackholes = [flow.remote.0, flow.local.0].map(|addr| format!("{addr}/{bits}"));
        node.insert_established(&flow, true, ESTABLISHED);
        for (program, frame) in both_sides(&flow, 0) {
            let what = format!("{family:?}, {program}");
            node.expect_full_then_cached(program, &frame, family, &format!("{what}: first"));
        }
        let add: Vec<String> = blackholes
            .iter()
            .map(|dst| format!("route add blackhole {dst}"))
            .collect();
        node.ns.ip(&add).expect("the blackhole routes");
        for (program, frame) in both_sides(&flow, 0) {
            let what = format!("{family:?}, {program}, blackholed");
            // The cache's verdict stands until the agent says otherwise.
            node.expect_forward(
                program,
                &frame,
                family,
                &[Counter::CtCached],
                &format!("{what}, same generation"),
            );
        }
        node.bump_generation();
        for (program, frame) in both_sides(&flow, 0) {
            let what = format!("{family:?}, {program}, blackholed, new generation");
            node.expect_pass(program, &frame, family, Counter::PassRoute, &what);
            node.expect_pass(
                program,
                &frame,
                family,
                Counter::PassRoute,
                &format!("{what}, again"),
            );
        }
        let delete: Vec<String> = blackholes
            .iter()
            .map(|dst| format!("route del blackhole {dst}"))
            .collect();
        node.ns.ip(&delete).expect("the blackhole routes gone");
        node.bump_generation();
        for (program, frame) in both_sides(&flow, 0) {
            let what = format!("{family:?}, {program}, the routes gone");
            node.expect_full_then_cached(program, &frame, family, &what);
        }
    }
}

/// The flow cache's slot of `flow` on the bridge side, as its 64-bit words (IPv4: 8,
/// IPv6: the first 11: key, flow, check).
fn read_slot(node: &Node, flow: &Flow) -> Vec<u64> {
    let index = flow.peer_side_slot();
    if flow.family() == Family::Ipv4 {
        let map: Array<&MapData, FlowSlotV4> =
            Array::try_from(node.ebpf.map(MAP_FLOWS_V4).expect("IPv4 flows")).expect("array");
        bytemuck::cast::<_, [u64; 8]>(map.get(&index, 0).expect("slot")).to_vec()
    } else {
        let map: Array<&MapData, FlowSlotV6> =
            Array::try_from(node.ebpf.map(MAP_FLOWS_V6).expect("IPv6 flows")).expect("array");
        bytemuck::cast::<_, [u64; 12]>(map.get(&index, 0).expect("slot"))[..11].to_vec()
    }
}

fn write_slot(node: &mut Node, flow: &Flow, words: &[u64]) {
    let index = flow.peer_side_slot();
    if flow.family() == Family::Ipv4 {
        let mut map: Array<&mut MapData, FlowSlotV4> =
            Array::try_from(node.ebpf.map_mut(MAP_FLOWS_V4).expect("IPv4 flows")).expect("array");
        let slot: [u64; 8] = words.try_into().expect("8 words");
        map.set(index, bytemuck::cast::<_, FlowSlotV4>(slot), 0)
            .expect("write slot");
    } else {
        let mut map: Array<&mut MapData, FlowSlotV6> =
            Array::try_from(node.ebpf.map_mut(MAP_FLOWS_V6).expect("IPv6 flows")).expect("array");
        let slot: [u64; 12] = std::array::from_fn(|i| words.get(i).copied().unwrap_or(0));
        map.set(index, bytemuck::cast::<_, FlowSlotV6>(slot), 0)
            .expect("write slot");
    }
}

/// The check word a slot's key and flow (all its words but the last) call for.
fn sealed(words: &[u64]) -> Vec<u64> {
    let (body, _) = words.split_at(words.len() - 1);
    [body, &[flow_check(body.iter().copied())]].concat()
}

/// The full path wrote the slot again, whole, with `whole`'s key, next hop and
/// generation, and a recheck time no earlier than `whole`'s (the rewrite's own: a
/// tick may have passed since).
fn assert_rewritten(slot: &[u64], whole: &[u64], what: &str) {
    assert_eq!(slot, sealed(slot), "{what}: the slot written whole");
    // Key, next hop (three words), generation: all but the recheck time and check.
    let kept = whole.len() - 2;
    assert_eq!(
        slot[..kept],
        whole[..kept],
        "{what}: key, next hop, generation"
    );
    assert!(
        slot[kept] >= whole[kept],
        "{what}: recheck at {} before the first write's {}",
        slot[kept],
        whole[kept]
    );
}

/// Slots are written by several CPUs without a lock, 8 bytes at a time: a slot whose
/// check word does not match its words (a write half done, two writers' words mixed)
/// is never used, even when it holds the packet's key; nor is a whole slot of another
/// flow. The packet takes the full path, which writes the slot again.
#[test]
fn a_torn_slot_or_another_flows_is_not_used() {
    const WRONG_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe2, 0x66];
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        let flow = node.flow(ipv6, Proto::Udp);
        let family = flow.family();
        node.insert_established(&flow, true, ESTABLISHED);
        let frame = flow.to_peer(0);
        let what = format!("{family:?}");
        node.expect_full_then_cached(PROG_TO_PEER, &frame, family, &format!("{what}: first"));
        let whole = read_slot(&node, &flow);
        assert_eq!(whole, sealed(&whole), "{what}: the program's slot is whole");
        let key_words = flow.peer_side_key().len();
        assert_eq!(
            whole[..key_words],
            flow.peer_side_key(),
            "{what}: the slot's key"
        );

        // The next hop's MAC (the first six bytes of the hop's second word) changed
        // without its check: a torn write.
        let mut torn = whole.clone();
        let mac_word = key_words + 1;
        let mut bytes = torn[mac_word].to_le_bytes();
        bytes[..6].copy_from_slice(&WRONG_MAC);
        torn[mac_word] = u64::from_le_bytes(bytes);
        assert_ne!(
            torn[mac_word], whole[mac_word],
            "{what}: the MAC word changed"
        );
        write_slot(&mut node, &flow, &torn);
        node.expect_forward(PROG_TO_PEER, &frame, family, &[], &format!("{what}: torn"));
        assert_rewritten(&read_slot(&node, &flow), &whole, &format!("{what}: torn"));
        node.expect_forward(
            PROG_TO_PEER,
            &frame,
            family,
            &[Counter::CtCached],
            &format!("{what}: cached again"),
        );

        // The same wrong MAC in a whole slot of another flow (another source port):
        // the key does not match.
        let mut other = torn.clone();
        other[key_words - 1] ^= 1 << 8;
        write_slot(&mut node, &flow, &sealed(&other));
        node.expect_forward(
            PROG_TO_PEER,
            &frame,
            family,
            &[],
            &format!("{what}: another flow's slot"),
        );
        assert_rewritten(
            &read_slot(&node, &flow),
            &whole,
            &format!("{what}: another flow's slot"),
        );
    }
}

/// Two flows whose keys hash to one slot: each takes the slot from the other (the
/// full path, then cached while it holds the slot), and both are forwarded right.
#[test]
fn two_flows_of_one_slot_take_it_in_turn() {
    let mut node = Node::with_recheck(recheck_jiffies(60_000));
    for ipv6 in [false, true] {
        let a = node.flow(ipv6, Proto::Udp);
        let slot = a.peer_side_slot();
        // Another flow between the same pods whose ports put it in the same slot
        // (one in 65,536: found within a few hundred thousand port pairs).
        let b = (1..=u16::MAX)
            .flat_map(|remote| (1024..=u16::MAX).map(move |local| (local, remote)))
            .map(|(local, remote)| Flow {
                local: (a.local.0, local),
                remote: (a.remote.0, remote),
                ..a
            })
            .find(|b| b.peer_side_slot() == slot && (b.local, b.remote) != (a.local, a.remote))
            .expect("a flow of the same slot");
        let family = a.family();
        for flow in [&a, &b] {
            node.insert_established(flow, true, ESTABLISHED);
        }
        let what = format!("{family:?}");
        for round in 0..2 {
            for (name, flow) in [("a", &a), ("b", &b)] {
                let frame = flow.to_peer(0);
                let what = format!("{what} round {round}: {name}");
                node.expect_full_then_cached(PROG_TO_PEER, &frame, family, &what);
            }
        }
    }
}
