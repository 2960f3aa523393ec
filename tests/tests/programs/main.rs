//! The real, loaded programs, run with crafted frames through BPF_PROG_TEST_RUN (no lab,
//! nothing attached): for each case the verdict, every output byte, the IPv4 checksum
//! recomputed from scratch, and the counter that moved (and that no other one did).
//!
//! The node the programs run for is n1 ([`model`]); the frames are hgw_tests' frame
//! builder with the node's addresses ([`frames`]). [`v4`] and [`v6`] hold the cases per
//! family, [`fuzz`] random and mutated frames checked against the model, [`route`] the
//! kernel's routing decisions the programs follow, [`hooks`] the tc hooks and qdiscs
//! they do not skip.
//!
//! The programs ask the kernel's FIB on every full decision, in the namespace of the
//! thread that runs them: each [`Programs`] has a namespace of its own where n1 exists
//! for real ([`hgw_tests::progns`]), with the interface indexes, MACs, addresses, routes
//! and neighbours the maps name, and runs the programs from inside it, with the skb on
//! the device the program sits on (the uplink, the bridge or a port).

mod frames;
mod fuzz;
mod hooks;
mod model;
mod route;
mod v4;
mod v6;

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use hgw_common::{
    COUNTER_NOT_IP, COUNTER_NOT_IP_NAME, COUNTERS_LEN, COUNTERS_PER_FAMILY, Counter, CtTimeouts,
    Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_DEVICES, MAP_ENDPOINTS_V4, MAP_ENDPOINTS_V6,
    MAP_ROUTES_V4, MAP_ROUTES_V6, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, PROG_TO_PEER,
    PROG_TO_POD, RP_FILTER_LOOSE, RP_FILTER_OFF, RP_FILTER_STRICT, counter_index,
};
use hgw_tests::progns::{self, ProgNetns};

use crate::frames::*;
use crate::model::*;

/// What the programs return for a packet they hand on: TC_ACT_UNSPEC (-1), TCX_NEXT
/// under tcx, as the u32 BPF_PROG_TEST_RUN reports it.
const HAND_ON: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

const UPLINK_IFINDEX: u32 = 7;
const BRIDGE_IFINDEX: u32 = 3;
/// The host veth of the pod with the endpoint entry, a port of the bridge.
const POD_IFINDEX: u32 = 9;
/// Another pod's host veth, a port of the bridge too.
const OTHER_PORT_IFINDEX: u32 = 10;
const MTU: u32 = 1500;
/// offsetof(struct __sk_buff, ifindex): the skb's device, which BPF_PROG_TEST_RUN takes
/// from the context (it must exist in the caller's namespace).
const SKB_IFINDEX: usize = 40;
/// `__sk_buff.priority`.
const SKB_PRIORITY: usize = 32;
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

struct Programs {
    ebpf: Ebpf,
    /// `HGW_CONFIG`, as written at the load.
    config: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    /// `HGW_DEVICES`: interface index -> `DEVICE_*` bits.
    devices: aya::maps::HashMap<MapData, u32, u32>,
    /// The device `hgw_to_peer` runs on: the bridge, or one of its ports.
    to_peer_ingress: u32,
    /// n1, for real; the programs run from inside it. Deleted on drop.
    ns: ProgNetns,
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
                rp_filter_uplink: RP_FILTER_OFF,
                rp_filter_bridge: RP_FILTER_OFF,
                update_priority: 1,
                _pad: 0,
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
    for (prefix, addr, mac, _) in &v4.routes {
        let addr = addr.clone().try_into().expect("4 bytes");
        routes
            .insert(&Key::new(*prefix, addr), next_hop(*mac), 0)
            .expect("insert route");
    }
    let mut routes: LpmTrie<MapData, [u8; 16], NextHop> = take_map(&mut ebpf, MAP_ROUTES_V6);
    for (prefix, addr, mac, _) in &v6.routes {
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
    let devices = take_map(&mut ebpf, MAP_DEVICES);
    for name in [PROG_TO_PEER, PROG_TO_POD] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("program")
            .try_into()
            .expect("classifier");
        prog.load().expect("verifier accepts the program");
    }
    Programs {
        ebpf,
        config,
        counters,
        devices,
        to_peer_ingress: BRIDGE_IFINDEX,
        ns: n1_netns(),
    }
}

/// n1's namespace: the bridge (gateway addresses in both pod CIDRs) with the pod's host
/// veth and another pod's as ports, the uplink, and the routes and neighbours hgw has the
/// kernel hold for the peers ([`kernel_routes`]).
fn n1_netns() -> ProgNetns {
    let (v4, v6) = (table_v4(), table_v6());
    let bridge_v4 = format!("{}/{}", addr_text(&v4.gateway), v4.own.1);
    let bridge_v6 = format!("{}/{}", addr_text(&v6.gateway), v6.own.1);
    let ns = ProgNetns::node(&progns::Node {
        bridge: progns::Device {
            index: BRIDGE_IFINDEX,
            mac: BRIDGE_MAC,
            mtu: MTU,
            addrs: &[&bridge_v4, &bridge_v6],
        },
        uplink: progns::Device {
            index: UPLINK_IFINDEX,
            mac: UPLINK_MAC,
            mtu: MTU,
            addrs: &[UPLINK_V4, UPLINK_V6],
        },
        ports: &[POD_IFINDEX, OTHER_PORT_IFINDEX],
    })
    .expect("n1's namespace");
    let mut lines = kernel_routes(&v4, progns::UPLINK);
    lines.extend(kernel_routes(&v6, progns::UPLINK));
    ns.ip(&lines).expect("n1's routes and neighbours");
    ns
}

impl Programs {
    /// The reverse-path filter the agent would have read for the uplink and the bridge
    /// (`RP_FILTER_*`).
    fn set_rp_filter(&mut self, uplink: u32, bridge: u32) {
        let mut node = self.config.get(&0, 0).expect("read config");
        node.rp_filter_uplink = uplink;
        node.rp_filter_bridge = bridge;
        self.config.set(0, node, 0).expect("write config");
    }

    /// The verdict on `frame` coming in with `skb->priority` = `priority`, and the
    /// priority the skb leaves with.
    fn run_priority(&mut self, program: &str, frame: &[u8], priority: u32) -> (u32, u32) {
        let (verdict, _, priority) = self
            .run_skb(program, frame, 0, priority)
            .expect("BPF_PROG_TEST_RUN");
        (verdict, priority)
    }

    /// Whether forwarded IPv4 packets get their TOS's priority (the agent's
    /// `ip_forward_update_priority`).
    fn set_update_priority(&mut self, on: bool) {
        let mut node = self.config.get(&0, 0).expect("read config");
        node.update_priority = u32::from(on);
        self.config.set(0, node, 0).expect("write config");
    }

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
        self.run_skb(program, frame, gso_size, 0)
            .map(|(verdict, out, _)| (verdict, out))
    }

    /// Runs `program` on `frame` in an skb with `gso_size` and `priority`: the verdict,
    /// the frame as it left and the skb's priority then. `None` when the kernel refuses
    /// to build an skb from `frame` (EINVAL).
    fn run_skb(
        &mut self,
        program: &str,
        frame: &[u8],
        gso_size: u32,
        priority: u32,
    ) -> Option<(u32, Vec<u8>, u32)> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .expect("program")
            .try_into()
            .expect("classifier");
        // The device the program sits on: where the skb comes in, as the kernel would
        // have it.
        let ingress = if program == PROG_TO_PEER {
            self.to_peer_ingress
        } else {
            UPLINK_IFINDEX
        };
        // A __sk_buff up to and including gso_size, all else zero (the kernel requires
        // that of the fields it does not take from the context).
        let mut ctx = [0u8; SKB_GSO_SIZE + 4];
        ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ingress.to_ne_bytes());
        ctx[SKB_PRIORITY..SKB_PRIORITY + 4].copy_from_slice(&priority.to_ne_bytes());
        ctx[SKB_GSO_SIZE..].copy_from_slice(&gso_size.to_ne_bytes());
        // The whole __sk_buff comes back (192 bytes on 6.x): room for it.
        let mut ctx_out = [0u8; 256];
        let mut out = vec![0u8; frame.len() + 256];
        // The program's FIB lookups see the namespace of the thread that runs it.
        self.ns.enter();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx[..]),
                ctx_out: Some(&mut ctx_out[..]),
                ..TestRunOptions::new()
            })
            .ok()?;
        out.truncate(result.data_size_out as usize);
        let mut word = [0u8; 4];
        word.copy_from_slice(&ctx_out[SKB_PRIORITY..SKB_PRIORITY + 4]);
        Some((result.return_value, out, u32::from_ne_bytes(word)))
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

    /// Marks `ifindex` with `flags` (`DEVICE_*`) in `HGW_DEVICES`, as the agent does;
    /// 0 removes its entry.
    fn set_device(&mut self, ifindex: u32, flags: u32) {
        if flags == 0 {
            // Absent already is as good as removed.
            let _ = self.devices.remove(&ifindex);
        } else {
            self.devices
                .insert(ifindex, flags, 0)
                .expect("write HGW_DEVICES");
        }
    }

    /// `ip -batch` lines run in n1's namespace (routes, rules, neighbours, links).
    fn ip(&self, lines: &[&str]) {
        self.ns.ip(lines).expect("ip in n1's namespace");
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
        assert_eq!(verdict, HAND_ON, "{what}: verdict");
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
