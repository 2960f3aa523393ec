//! hgw's fast path: two TC ingress programs that forward pod traffic between nodes
//! without the kernel's routing and netfilter FORWARD path.
//!
//! - `hgw_to_peer` (bridge ingress): a local pod's packet to a peer's pod CIDR gets the
//!   next hop's MACs, TTL (hop limit) - 1, and is redirected out of the uplink.
//! - `hgw_to_pod` (uplink ingress): a packet to this node's pod CIDR gets TTL - 1 and is
//!   redirected into the pod's veth, or into the bridge, whose neighbour entry supplies
//!   the pod's MAC.
//!
//! Both take IPv4 and IPv6 alike (one generic path over [`IpHeader`]); counters are kept
//! per family.
//!
//! In `established` mode (the default) a packet takes the fast path only when the
//! kernel has already accepted its flow, as netfilter's own flowtable does: conntrack
//! holds a confirmed entry that has seen a reply (TCP: assured, the handshake done) and
//! carries no NAT. Everything else (the first packets of every flow, every NAT'd flow,
//! every SYN, ICMP) is decided by the kernel, with all its netfilter rules. As in the
//! flowtable, an accepted flow is remembered ([`Flow`]): its next packets skip the
//! conntrack and route lookups for a while (`ct.recheck`) or until the agent writes a
//! map, whichever comes first.
//!
//! Every packet the fast path is not sure of goes on unchanged (`TC_ACT_UNSPEC`: under
//! tcx that is `TCX_NEXT`, so later programs, the legacy tc filters and then the kernel
//! see it as if hgw were absent), where the routes the agent installed do the same job
//! more slowly. All checks come before the first write, so a packet handed on is
//! always untouched.
//!
//! The fast path only carries out what the kernel would decide: on every full decision
//! (a flow-cache miss) it asks the kernel's FIB, from the packet's ingress interface so
//! that rules and tables apply, and takes the packet only to the next hop the kernel
//! would choose; and it never redirects past a tc filter, program or qdisc the kernel
//! path would run (the agent marks such interfaces in `HGW_DEVICES`).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_REDIRECT, TC_ACT_UNSPEC},
    helpers::generated::{
        bpf_csum_update, bpf_fib_lookup, bpf_jiffies64, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use hgw_common::{
    BPF_F_MMAPABLE, COUNTER_NOT_IP, COUNTERS_LEN, CachedFlow, Counter, CtTimeouts, DEVICE_EGRESS,
    DEVICE_INGRESS, DEVICE_NF_EGRESS, DEVICES_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, Endpoint,
    FLOW_SLOTS, FLOW_TO_PEER, FLOW_TO_POD, Family, FlowKeyV4, FlowKeyV6, FlowSlotV4, FlowSlotV6,
    IPS_ASSURED, IPS_CONFIRMED, IPS_DST_NAT, IPS_HELPER, IPS_SEEN_REPLY, IPS_SEQ_ADJUST,
    IPS_SRC_NAT, NEXT_HOP_BRIDGE, NEXT_HOP_MAC_KNOWN, NEXT_HOP_POD, NextHop, NodeConfig,
    ROUTES_V4_MAX_ENTRIES, ROUTES_V6_MAX_ENTRIES, RP_FILTER_OFF, RP_FILTER_STRICT, counter_index,
    flow_check_finish, flow_check_term, flow_slot,
};
use network_types::eth::EthHdr;

mod headers;
use headers::{Ip4, Ip6, Ports, TcpHead, halves};

#[map]
static HGW_ROUTES_V4: LpmTrie<[u8; 4], NextHop> =
    LpmTrie::with_max_entries(ROUTES_V4_MAX_ENTRIES, 0);

#[map]
static HGW_ROUTES_V6: LpmTrie<[u8; 16], NextHop> =
    LpmTrie::with_max_entries(ROUTES_V6_MAX_ENTRIES, 0);

#[map]
static HGW_ENDPOINTS: HashMap<[u8; 4], Endpoint> =
    HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

#[map]
static HGW_ENDPOINTS6: HashMap<[u8; 16], Endpoint> =
    HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

#[map]
static HGW_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

#[map]
static HGW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

#[map]
static HGW_FLOWS_V4: Array<FlowSlotV4> = Array::with_max_entries(FLOW_SLOTS, BPF_F_MMAPABLE);

#[map]
static HGW_FLOWS_V6: Array<FlowSlotV6> = Array::with_max_entries(FLOW_SLOTS, BPF_F_MMAPABLE);

#[map]
static HGW_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static HGW_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(DEVICES_MAX_ENTRIES, 0);

// Read-only globals (hgw_common::GLOBAL_*), set by the agent at load time. Being frozen,
// they are constants to the verifier: `all` mode prunes the conntrack code, and the
// nf_conn offsets are the constant offsets a load from a kernel pointer needs.
#[unsafe(no_mangle)]
static HGW_CONNTRACK: u32 = 1;
#[unsafe(no_mangle)]
static HGW_CT_STATUS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static HGW_CT_TIMEOUT_OFF: u32 = 0;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offset of the IP header: no VLAN tags (a tagged frame is not IP to us).
const L3: usize = EthHdr::LEN;
/// `bpf_ct_opts.netns_id`: the netns of the skb's device, the node's.
const BPF_F_CURRENT_NETNS: i32 = -1;
const ENOENT: i32 = 2;
/// What a program returns for a packet it does not take: `TCX_NEXT` under tcx (the next
/// program, then the legacy filters, then the stack), "continue" for a cls_bpf filter.
/// Never `TC_ACT_OK` (0): under tcx that is `TCX_PASS`, which ends the hook's chain.
const HAND_ON: i32 = TC_ACT_UNSPEC;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// `struct bpf_fib_lookup` (64 bytes), its unions flattened to the members used:
/// inputs up to `dst`, outputs `ifindex` (the egress), `dst` (the gateway) and the MACs.
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: [u8; 2],
    dport: [u8; 2],
    /// `tot_len` in, `mtu_result` out. 0: the kernel checks the skb against the egress
    /// MTU itself, GSO aware.
    tot_len: u16,
    /// The ingress interface in, the egress out.
    ifindex: u32,
    /// IPv4: the TOS byte (the rest zero); IPv6: the flow info word.
    tos_or_flowinfo: [u8; 4],
    src: [u8; 16],
    dst: [u8; 16],
    /// `h_vlan_proto`, `h_vlan_TCI` out; `tbid` with BPF_FIB_LOOKUP_DIRECT.
    vlan: [u8; 4],
    /// `mark` in (with BPF_FIB_LOOKUP_MARK only), then `smac`, `dmac` out.
    smac: [u8; 6],
    dmac: [u8; 6],
}
const _: () = assert!(size_of::<FibParams>() == 64);

/// Zeroes `*value` in place, in 4-byte words that LLVM cannot merge: zero stores it may
/// merge become calls to a byte-by-byte `memset` (bpf-linker has LLVM expand memcpy
/// in order, which leaves memset a call), one call per part of a struct zeroed around
/// the fields set. Moving the value afterwards could bring the calls back: fill it in
/// place.
///
/// # Safety
/// `value` must be valid for writes, and all zeros a valid `T`.
#[inline(always)]
unsafe fn zero_in_place<T>(value: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let words = value.cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: word i of the value (the size is a multiple of 4, the alignment at
        // least 4), guaranteed writable by the caller.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// A `T` of all zeros (see [`zero_in_place`]).
///
/// # Safety
/// All zeros must be a valid `T`.
#[inline(always)]
unsafe fn zeroed<T>() -> T {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: a local; all zeros is a valid T (the caller).
    unsafe {
        zero_in_place(value.as_mut_ptr());
        value.assume_init()
    }
}

/// The kernel's `struct nf_conn`, only ever handled through a pointer.
#[repr(C)]
struct NfConn {
    _opaque: [u8; 0],
}

/// `struct bpf_ct_opts` in its first layout (12 bytes, `NF_BPF_CT_OPTS_SZ` before the
/// zone fields): every kernel with the kfuncs accepts this size, newer ones also 16.
/// Without the zone fields the lookup is in the default zone, as with them zeroed.
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}
const _: () = assert!(size_of::<CtOpts>() == hgw_common::CT_OPTS_SIZE as usize);

// Conntrack kfuncs: the agent's loader points each call at the function's id in the BTF
// holding it, vmlinux's or the nf_conntrack module's (rustc emits no BTF for extern
// functions, so aya cannot).
unsafe extern "C" {
    fn bpf_skb_ct_lookup(
        skb: *mut __sk_buff,
        tuple: *mut c_void,
        tuple_len: u32,
        opts: *mut CtOpts,
        opts_len: u32,
    ) -> *mut NfConn;
    fn bpf_ct_release(ct: *mut NfConn);
    fn bpf_ct_change_timeout(ct: *mut NfConn, timeout_ms: u32) -> i32;
    fn bpf_ct_change_status(ct: *mut NfConn, status: u32) -> i32;
}

#[classifier]
fn hgw_to_peer(ctx: TcContext) -> i32 {
    match ethernet(&ctx) {
        Some((eth, ETH_P_IPV4)) => to_peer::<Ip4>(&ctx, eth),
        Some((eth, ETH_P_IPV6)) => to_peer::<Ip6>(&ctx, eth),
        _ => not_ip(),
    }
}

#[classifier]
fn hgw_to_pod(ctx: TcContext) -> i32 {
    match ethernet(&ctx) {
        Some((eth, ETH_P_IPV4)) => to_pod::<Ip4>(&ctx, eth),
        Some((eth, ETH_P_IPV6)) => to_pod::<Ip6>(&ctx, eth),
        _ => not_ip(),
    }
}

#[inline(always)]
fn to_peer<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> i32 {
    verdict::<H>(try_to_peer::<H>(ctx, eth), Counter::FwdToPeer)
}

#[inline(always)]
fn to_pod<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> i32 {
    verdict::<H>(try_to_pod::<H>(ctx, eth), Counter::FwdToPod)
}

/// The Ethernet header (bounds checked once, here) and its ethertype; `None` for a
/// runt, and for a frame whose VLAN tag the kernel already took into the skb (at TC
/// ingress a tag is metadata, not bytes in the frame): the kernel decides on VLANs.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Option<(*mut EthHdr, u16)> {
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return None;
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok()?;
    // SAFETY: ptr_at checked the bounds.
    Some((eth, u16::from_be(unsafe { (*eth).ether_type })))
}

/// ARP, VLAN-tagged frames, runts: the kernel's.
#[inline(always)]
fn not_ip() -> i32 {
    count_slot(COUNTER_NOT_IP);
    HAND_ON
}

/// Counts the outcome; anything but a redirect is handed on.
///
/// The redirect helpers cannot fail here: with flags 0 they return `TC_ACT_REDIRECT`
/// and the kernel acts after the program (a device deleted meanwhile drops the packet,
/// as it would a packet routed to it; the agent removes its entries on the link's
/// deletion event).
#[inline(always)]
fn verdict<H: IpHeader>(result: Result<(), Counter>, forwarded: Counter) -> i32 {
    match result {
        Ok(()) => {
            count(H::FAMILY, forwarded);
            TC_ACT_REDIRECT
        }
        Err(reason) => {
            count(H::FAMILY, reason);
            HAND_ON
        }
    }
}

fn try_to_peer<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> Result<(), Counter> {
    let config = enabled::<H>()?;
    let ip = parse::<H>(ctx, eth, config.bridge_mac)?;
    // From a port, the bridge drops such a frame before anything else
    // (br_handle_frame); on the bridge, none arrives.
    if !unicast_source(eth) {
        return Err(Counter::PassSourceMac);
    }
    // SAFETY: parse checked that the whole IP header is inside the packet.
    let (src, dst) = unsafe { ((*ip).src(), (*ip).dst()) };
    if H::owns(config, dst) {
        return Err(Counter::PassLocal);
    }
    // Only this node's pods are forwarded from the bridge; the gateway address is the
    // node's own, whoever claims it.
    if !H::owns(config, src) || H::is_gateway(config, src) {
        return Err(Counter::PassSource);
    }
    forward(
        ctx,
        eth,
        ip,
        config,
        dst,
        FLOW_TO_PEER,
        send_to_peer,
        to_peer_full_path,
    )
}

/// A local pod's packet to `dst`, a peer's pod: the next hop, if the kernel would send
/// it there and conntrack accepted its flow.
#[inline(always)]
fn to_peer_full_path<H: IpHeader>(
    ctx: &TcContext,
    ip: *mut H,
    config: &NodeConfig,
    dst: H::Addr,
    l4: Result<Transport, Counter>,
) -> Result<(NextHop, Cache), Counter> {
    let next_hop = *H::route(dst).ok_or(Counter::PassNoRoute)?;
    // An unknown (or just deleted) MAC goes to the kernel rather than to
    // bpf_redirect_neigh with the node IP: the agent's route resolves it and queues
    // the packet just the same, and the kernel path stays the one place where all
    // of a router's duties (ICMP errors, netfilter) apply while the fast path
    // cannot act.
    if next_hop.flags & NEXT_HOP_MAC_KNOWN == 0 {
        return Err(Counter::PassNoMac);
    }
    let wire_len = check_ttl_and_mtu(ctx, ip, next_hop.mtu)?;
    // The redirect skips what follows on this hook and, from a port, the bridge's
    // own ingress, where the kernel path goes next; the uplink's tc egress it keeps,
    // its netfilter egress hook not.
    let ingress = ingress_ifindex(ctx);
    if device_has(ingress, DEVICE_INGRESS)
        || (ingress != config.bridge_ifindex && device_has(config.bridge_ifindex, DEVICE_INGRESS))
        || device_has(next_hop.ifindex, DEVICE_NF_EGRESS)
    {
        return Err(Counter::PassTcHook);
    }
    let cache = accepted_by_conntrack(ctx, ip, l4, &config.ct)?;
    // Last, so that only packets about to be forwarded pay for it (never a SYN):
    // routed by the kernel, the packet enters the stack on the bridge; the fast
    // path goes only where the kernel would, the same interface and neighbour.
    // (Conntrack's side effects above are what the kernel does on seeing the
    // packet anyway.)
    let route = kernel_route(ctx, ip, &l4, config.bridge_ifindex, wire_len);
    match route.rc {
        BPF_FIB_LKUP_RET_SUCCESS
            if route.ifindex == next_hop.ifindex && route.dmac == next_hop.dst_mac => {}
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Counter::PassMtu),
        _ => return Err(Counter::PassRoute),
    }
    check_source_route(
        ctx,
        ip,
        &l4,
        config.rp_filter_bridge,
        (config.bridge_ifindex, next_hop.ifindex),
    )?;
    Ok((next_hop, cache))
}

/// What the full path decides for a packet: its next hop and whether the flow cache may
/// remember it, or why it goes to the kernel.
type FullPath<H> = fn(
    &TcContext,
    *mut H,
    &NodeConfig,
    <H as IpHeader>::Addr,
    Result<Transport, Counter>,
) -> Result<(NextHop, Cache), Counter>;

/// Forwards a packet whose IP header and addresses the caller checked: with the
/// flow's cached next hop if the flow cache holds a verdict that stands, else with
/// what `full_path` finds (the lookups and conntrack's judgement, given the packet's
/// transport header), which the cache then remembers or forgets.
///
/// `full_path` and `send` are functions, not closures: a constant at each inlined call,
/// each is inlined unless it says otherwise, where rustc's closure was left out of line,
/// and a BPF-to-BPF call and its return cost more than the code they would share.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call per direction, inlined")]
fn forward<H: IpHeader>(
    ctx: &TcContext,
    eth: *mut EthHdr,
    ip: *mut H,
    config: &NodeConfig,
    dst: H::Addr,
    side: u8,
    send: unsafe fn(&TcContext, *mut EthHdr, *mut H, &NextHop),
    full_path: FullPath<H>,
) -> Result<(), Counter> {
    let l4 = transport(ctx, ip);
    let mut flow = Flow::<H>::of(&l4, ip, side, &config.ct);
    if let Some(hop) = flow.as_mut().and_then(Flow::cached) {
        check_ttl_and_mtu(ctx, ip, hop.mtu)?;
        set_forward_priority(ctx, ip, config);
        // SAFETY: eth and ip point into the packet (bounds checked by ethernet() and
        // parse).
        unsafe { send(ctx, eth, ip, &hop) };
        count(H::FAMILY, Counter::CtCached);
        return Ok(());
    }
    let result = full_path(ctx, ip, config, dst, l4);
    if let Some(flow) = flow {
        flow.remember(result.as_ref().ok());
    }
    let (hop, _) = result?;
    set_forward_priority(ctx, ip, config);
    // SAFETY: as above.
    unsafe { send(ctx, eth, ip, &hop) };
    Ok(())
}

/// What `ip_forward` does to a packet it forwards (IPv4, with
/// `net.ipv4.ip_forward_update_priority`, on by default): `skb->priority` becomes its
/// TOS's (`rt_tos2priority`), which egress qdiscs (pfifo_fast's bands, prio, mqprio's
/// traffic classes) and a VLAN's egress QoS map go by. Without it the packet would keep
/// the priority its sender's socket gave it.
#[inline(always)]
fn set_forward_priority<H: IpHeader>(ctx: &TcContext, ip: *const H, config: &NodeConfig) {
    if config.update_priority == 0 {
        return;
    }
    // SAFETY: the caller got ip from parse.
    if let Some(priority) = unsafe { (*ip).forward_priority() } {
        // SAFETY: the context is the program's skb; tc programs may write priority.
        unsafe { (*ctx.skb.skb).priority = priority };
    }
}

/// The next hop's MACs, TTL - 1, out of the uplink.
///
/// # Safety
/// `eth` and `ip` must point to whole, writable headers inside the packet.
#[inline(always)]
unsafe fn send_to_peer<H: IpHeader>(
    ctx: &TcContext,
    eth: *mut EthHdr,
    ip: *mut H,
    next_hop: &NextHop,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*eth).dst_addr = next_hop.dst_mac;
        (*eth).src_addr = next_hop.src_mac;
        H::decrement_ttl(ctx, ip);
    }
    // SAFETY: plain helper call; flags 0 = egress of `ifindex`.
    unsafe { bpf_redirect(next_hop.ifindex, 0) };
}

fn try_to_pod<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> Result<(), Counter> {
    let config = enabled::<H>()?;
    let ip = parse::<H>(ctx, eth, config.uplink_mac)?;
    // SAFETY: parse checked that the whole IP header is inside the packet.
    let (src, dst) = unsafe { ((*ip).src(), (*ip).dst()) };
    if !H::owns(config, dst) {
        return Err(Counter::PassNotPod);
    }
    // The gateway address lies in the pod CIDR but belongs to the node itself.
    if H::is_gateway(config, dst) {
        return Err(Counter::PassLocal);
    }
    // Only pod traffic of the cluster: anything else (a node's address after
    // masquerade, an outside host) is the kernel's to judge; and never this node's own
    // pods' addresses, which cannot come from the uplink (rp_filter's business).
    if !H::in_cluster(config, src) || H::owns(config, src) {
        return Err(Counter::PassSource);
    }
    forward(
        ctx,
        eth,
        ip,
        config,
        dst,
        FLOW_TO_POD,
        send_to_pod,
        to_pod_full_path,
    )
}

/// A packet from the uplink to `dst`, a local pod: the way in, if the kernel would
/// deliver it there and conntrack accepted its flow.
///
/// A subprogram of its own (its arguments by reference: a BPF call takes five
/// registers): inlined, LLVM gives one stack slot to a packet pointer on one path and
/// to the next hop on another, which Linux 6.1's verifier cannot tell apart ("pointer
/// arithmetic with <<= operator prohibited"); newer ones can.
#[inline(always)]
fn to_pod_full_path<H: IpHeader>(
    ctx: &TcContext,
    ip: *mut H,
    config: &NodeConfig,
    dst: H::Addr,
    l4: Result<Transport, Counter>,
) -> Result<(NextHop, Cache), Counter> {
    to_pod_decision(&PodPacket {
        ctx,
        ip,
        config,
        dst,
        l4,
    })
}

/// [`to_pod_full_path`]'s arguments.
struct PodPacket<'a, H: IpHeader> {
    ctx: &'a TcContext,
    ip: *mut H,
    config: &'a NodeConfig,
    dst: H::Addr,
    l4: Result<Transport, Counter>,
}

#[inline(never)]
fn to_pod_decision<H: IpHeader>(packet: &PodPacket<'_, H>) -> Result<(NextHop, Cache), Counter> {
    let PodPacket {
        ctx,
        ip,
        config,
        dst,
        l4,
    } = *packet;
    let wire_len = check_ttl_and_mtu(ctx, ip, config.bridge_mtu)?;
    let ingress = ingress_ifindex(ctx);
    // Into the bridge or past it, a redirect skips the bridge's netfilter egress hook.
    let bridge = device_flags(config.bridge_ifindex);
    if device_has(ingress, DEVICE_INGRESS) || bridge & DEVICE_NF_EGRESS != 0 {
        return Err(Counter::PassTcHook);
    }
    let cache = accepted_by_conntrack(ctx, ip, l4, &config.ct)?;
    // The kernel would send it into the bridge to the pod itself (the pod CIDR's
    // connected route, no gateway); the pod's MAC is the bridge's business, so an
    // unresolved one is no reason.
    let route = kernel_route(ctx, ip, &l4, ingress, wire_len);
    match route.rc {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH
            if route.ifindex == config.bridge_ifindex && route.direct => {}
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Counter::PassMtu),
        _ => return Err(Counter::PassRoute),
    }
    check_source_route(
        ctx,
        ip,
        &l4,
        config.rp_filter_uplink,
        (ingress, config.bridge_ifindex),
    )?;
    // A known pod: straight into its namespace, past the bridge, as the gateway
    // would have sent it, unless a qdisc or filter on the bridge's or the pod's
    // egress would be skipped (a pod's bandwidth limit). Otherwise through the
    // bridge, whose egress and the port's run as on the kernel path, and whose
    // neighbour table (ARP or NDP) knows the pod's MAC, or resolves it while the
    // packet waits.
    let hop = match H::endpoint(dst) {
        Some(endpoint)
            if !device_has(endpoint.ifindex, DEVICE_EGRESS | DEVICE_NF_EGRESS)
                && bridge & DEVICE_EGRESS == 0 =>
        {
            NextHop {
                ifindex: endpoint.ifindex,
                mtu: config.bridge_mtu,
                dst_mac: endpoint.mac,
                src_mac: config.bridge_mac,
                flags: NEXT_HOP_POD,
            }
        }
        _ => NextHop {
            ifindex: config.bridge_ifindex,
            mtu: config.bridge_mtu,
            flags: NEXT_HOP_BRIDGE,
            // SAFETY: NextHop is Pod; the bridge's neighbour entry fills in the MACs.
            ..unsafe { zeroed() }
        },
    };
    Ok((hop, cache))
}

/// TTL - 1, into the pod: with its MAC from the bridge's, or through the bridge, whose
/// neighbour entry fills in both MACs.
///
/// # Safety
/// `eth` and `ip` must point to whole, writable headers inside the packet.
#[inline(always)]
unsafe fn send_to_pod<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr, ip: *mut H, hop: &NextHop) {
    // SAFETY: guaranteed by the caller.
    unsafe { H::decrement_ttl(ctx, ip) };
    if hop.flags & NEXT_HOP_POD != 0 {
        // SAFETY: guaranteed by the caller.
        unsafe {
            (*eth).dst_addr = hop.dst_mac;
            (*eth).src_addr = hop.src_mac;
        }
        // SAFETY: plain helper call; flags must be 0.
        unsafe { bpf_redirect_peer(hop.ifindex, 0) };
        count(H::FAMILY, Counter::FwdToPodDirect);
    } else {
        // SAFETY: a null params pointer asks the kernel to use the packet's destination.
        unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) };
    }
}

/// The interface the packet arrived on (the one the program runs on).
#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Whether the agent marked `ifindex` with `flag` (`DEVICE_*`): something of the
/// kernel's own on it that a redirect would skip.
#[inline(always)]
fn device_has(ifindex: u32, flag: u32) -> bool {
    device_flags(ifindex) & flag != 0
}

/// The `DEVICE_*` bits of `ifindex` (0: no entry).
#[inline(always)]
fn device_flags(ifindex: u32) -> u32 {
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { HGW_DEVICES.get(ifindex) }.copied().unwrap_or(0)
}

/// What the kernel's routing decides for a packet entering the stack on `ingress`:
/// `bpf_fib_lookup` with the tables and rules (no BPF_FIB_LOOKUP_DIRECT), the packet's
/// TOS or flow label, protocol and ports, so `ip rule` selectors apply as they would.
struct KernelRoute {
    /// `BPF_FIB_LKUP_RET_*`, or a negative errno.
    rc: i64,
    /// The egress interface (set for SUCCESS and NO_NEIGH).
    ifindex: u32,
    /// The next hop's MAC (SUCCESS only).
    dmac: [u8; 6],
    /// The route has no gateway: the destination itself is the next hop (the lookup
    /// writes a gateway over the destination).
    direct: bool,
}

#[inline(always)]
fn kernel_route<H: IpHeader>(
    ctx: &TcContext,
    ip: *const H,
    l4: &Result<Transport, Counter>,
    ingress: u32,
    wire_len: u32,
) -> KernelRoute {
    let mut request = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: the caller got ip from parse.
    let params = unsafe { fib_request(&mut request, ip) };
    params.ifindex = ingress;
    // With a length, the kernel checks it against the route's MTU (the egress
    // device's, a locked route MTU, the path MTU) before the neighbour lookup.
    params.tot_len = wire_len.min(u32::from(u16::MAX)) as u16;
    let destination = params.dst;
    if let Ok(l4) = l4 {
        params.sport = [l4.ports[0], l4.ports[1]];
        params.dport = [l4.ports[2], l4.ports[3]];
    }
    let rc = fib_lookup(ctx, params);
    KernelRoute {
        rc,
        ifindex: params.ifindex,
        dmac: params.dmac,
        direct: params.dst == destination,
    }
}

/// A request for the packet at `ip`, in `request`: zeroed (the empty request), then
/// [`IpHeader::fib_params`].
///
/// # Safety
/// `ip` must point to a whole header inside the packet.
#[inline(always)]
unsafe fn fib_request<H: IpHeader>(
    request: &mut core::mem::MaybeUninit<FibParams>,
    ip: *const H,
) -> &mut FibParams {
    // SAFETY: a local, filled in place; guaranteed by the caller.
    unsafe {
        zero_in_place(request.as_mut_ptr());
        let params = request.assume_init_mut();
        H::fib_params(ip, params);
        params
    }
}

/// `bpf_fib_lookup` of `params` for the program's packet, through the tables and rules
/// (no flags); `BPF_FIB_LKUP_RET_*` or a negative errno.
#[inline(always)]
fn fib_lookup(ctx: &TcContext, params: &mut FibParams) -> i64 {
    // SAFETY: params is a whole `struct bpf_fib_lookup`; the context is the program's
    // skb.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            (&raw mut *params).cast(),
            size_of::<FibParams>() as i32,
            0,
        )
    }
}

/// The kernel's reverse-path filter (IPv4 `rp_filter`, `mode` as the agent read it for
/// `dev`, where the packet enters the stack): for a packet it forwards out of `out`,
/// `fib_validate_source` looks the source up as a destination coming in from `out`
/// (`__mkroute_input` hands it the forward route's device), with the packet's TOS and
/// its protocol and ports swapped; loose wants a route there, strict one that leaves by
/// `dev`. A multipath route back that the lookup resolves to another of its paths, or
/// anything else this lookup cannot answer as the kernel's would, goes to the kernel
/// too: it may only cost speed.
#[inline(always)]
fn check_source_route<H: IpHeader>(
    ctx: &TcContext,
    ip: *const H,
    l4: &Result<Transport, Counter>,
    mode: u32,
    (dev, out): (u32, u32),
) -> Result<(), Counter> {
    if !H::REVERSE_PATH_FILTER || mode == RP_FILTER_OFF {
        return Ok(());
    }
    let mut request = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: the caller got ip from parse.
    let params = unsafe { fib_request(&mut request, ip) };
    core::mem::swap(&mut params.src, &mut params.dst);
    params.ifindex = out;
    // Any length, so that the kernel does not hold the packet against the MTU of the
    // way back (with 0 it would).
    params.tot_len = 1;
    if let Ok(l4) = l4 {
        params.sport = [l4.ports[2], l4.ports[3]];
        params.dport = [l4.ports[0], l4.ports[1]];
    }
    let rc = fib_lookup(ctx, params);
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH
            if mode != RP_FILTER_STRICT || params.ifindex == dev =>
        {
            Ok(())
        }
        _ => Err(Counter::PassRpFilter),
    }
}

/// A TCP or UDP packet's ports (the first four bytes of either header, network order)
/// and TCP flags (0 for UDP), read with one bounds check (of a TCP header's first 16
/// bytes); what else it is, as the error conntrack's judgement would give:
/// `PassCtProto` or `PassMalformed`.
#[derive(Clone, Copy)]
struct Transport {
    proto: u8,
    ports: [u8; 4],
    tcp_flags: u8,
}

#[inline(always)]
fn transport<H: IpHeader>(ctx: &TcContext, ip: *const H) -> Result<Transport, Counter> {
    // SAFETY: the caller got ip from parse.
    let proto = unsafe { (*ip).transport() };
    let (ports, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHead = ptr_at(ctx, L3 + H::LEN)?;
            // SAFETY: ptr_at checked the bounds.
            let tcp = unsafe { &*tcp };
            (tcp.ports, tcp.flags)
        }
        IPPROTO_UDP => {
            let udp: *const Ports = ptr_at(ctx, L3 + H::LEN)?;
            // SAFETY: ptr_at checked the bounds.
            (unsafe { (*udp).0 }, 0)
        }
        _ => return Err(Counter::PassCtProto),
    };
    Ok(Transport {
        proto,
        ports,
        tcp_flags,
    })
}

/// A packet's flow in the flow cache (`established` mode with `ct.recheck` set): the
/// flowtable model's fast lane. A flow conntrack accepted is remembered with its next
/// hop; its further packets skip the conntrack and route lookups until `recheck`
/// jiffies have passed (then one packet looks again, refreshing the entry as it goes)
/// or any map changed (the generation). SYN, FIN and RST always take the full path and
/// forget the flow, as netfilter's flowtable hands them back to conntrack.
///
/// The cache is direct-mapped: each flow has one slot (one cache line for IPv4), which
/// a later flow of the same slot takes over; a hash table would touch a bucket and an
/// element of two or three lines for every packet.
struct Flow<H: IpHeader> {
    key: H::FlowKey,
    slot: u32,
    generation: u32,
    recheck: u32,
    tcp_flags: u8,
    /// The cache holds an entry for the flow that this packet does not use (stale, or
    /// the packet has flags): forget it unless renewed.
    found: bool,
}

const TCP_STATE_FLAGS: u8 = TCP_SYN | TCP_FIN | TCP_RST;

impl<H: IpHeader> Flow<H> {
    #[inline(always)]
    fn of(
        l4: &Result<Transport, Counter>,
        ip: *const H,
        side: u8,
        timeouts: &CtTimeouts,
    ) -> Option<Self> {
        let l4 = l4.as_ref().ok()?;
        if timeouts.recheck == 0 {
            return None;
        }
        // Read before any lookup: a map written after this makes what the lookups find
        // stale by the generation's change, never the other way round.
        let generation = HGW_GENERATION
            .get_ptr(0)
            // SAFETY: a map value, read once.
            .map_or(0, |g| unsafe { core::ptr::read_volatile(g) });
        // SAFETY: the caller got ip from parse.
        let key = unsafe { H::flow_key(ip, l4.ports, l4.proto, side) };
        Some(Flow {
            slot: H::slot_of(&key),
            key,
            generation,
            recheck: timeouts.recheck,
            tcp_flags: l4.tcp_flags,
            found: false,
        })
    }

    /// The next hop, if the flow's cached verdict stands for this packet. Packets with
    /// flags look too, to learn whether there is an entry to forget.
    #[inline(always)]
    fn cached(&mut self) -> Option<NextHop> {
        let slot = H::flows().get_ptr(self.slot)?;
        // SAFETY: a map value; read_slot copies it before it checks anything.
        let entry = unsafe { H::read_slot(slot, &self.key) }?;
        self.found = true;
        if self.tcp_flags & TCP_STATE_FLAGS != 0 {
            return None;
        }
        // SAFETY: plain helper call.
        let now = unsafe { bpf_jiffies64() };
        (entry.generation == self.generation && now < entry.recheck_at).then_some(entry.hop)
    }

    /// After the full path: remember a forwarded flow (not once it closes), forget one
    /// that is no longer (or now closing).
    #[inline(always)]
    fn remember(self, verdict: Option<&(NextHop, Cache)>) {
        // Only a flow to keep, or one found to forget, looks its slot up again.
        let slot = || H::flows().get_ptr_mut(self.slot);
        match verdict {
            Some((hop, Cache::Keep)) if self.tcp_flags & TCP_STATE_FLAGS == 0 => {
                let entry = CachedFlow {
                    hop: *hop,
                    generation: self.generation,
                    _pad: 0,
                    // SAFETY: plain helper call.
                    recheck_at: unsafe { bpf_jiffies64() } + u64::from(self.recheck),
                };
                // Whatever flow held the slot goes; its next packet takes the full path.
                if let Some(slot) = slot() {
                    // SAFETY: a map value of this family's slot type.
                    unsafe { H::write_slot(slot, self.key, entry) };
                }
            }
            _ if self.found => {
                if let Some(slot) = slot() {
                    // SAFETY: as above.
                    unsafe { H::clear_slot(slot) };
                }
            }
            _ => {}
        }
    }
}

/// Words of a [`CachedFlow`].
const FLOW_WORDS: usize = size_of::<CachedFlow>() / 8;

/// `established` mode: whether conntrack already accepted this packet's flow, as
/// netfilter's flowtable requires before it takes a flow: a confirmed entry that has
/// seen a reply, without NAT, and for TCP assured (the handshake done) and not a SYN.
///
/// Conntrack judges TCP segments against the window it saw; fast-path segments never
/// reach it, so once a flow is carried here its closing segments must be carried too
/// (a FIN or RST handed to the kernel would lie outside that window: INVALID, which
/// kube-proxy drops). Conntrack would have shortened the entry on seeing them, so the
/// program does, and it keeps a carried flow's entry alive, which fast-path packets
/// do not refresh.
///
/// Accepted: whether the flow cache may remember the flow.
#[inline(always)]
fn accepted_by_conntrack<H: IpHeader>(
    ctx: &TcContext,
    ip: *const H,
    l4: Result<Transport, Counter>,
    timeouts: &CtTimeouts,
) -> Result<Cache, Counter> {
    // SAFETY: a read-only global, constant after load.
    if unsafe { core::ptr::read_volatile(&HGW_CONNTRACK) } == 0 {
        return Ok(Cache::Keep);
    }
    let Transport {
        proto,
        ports,
        tcp_flags,
    } = l4?;
    // A SYN always goes to the kernel; it is looked up only for the reopen below. A
    // SYN-ACK never reopens (the SYN it answers already did, on both nodes): no lookup.
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        return Err(Counter::PassTcpSyn);
    }
    let syn = tcp_flags & TCP_SYN != 0;
    let mut opts = CtOpts {
        netns_id: BPF_F_CURRENT_NETNS,
        error: 0,
        l4proto: proto,
        dir: 0,
        reserved: [0; 2],
    };
    // SAFETY: ip points into the packet (checked by parse).
    let mut tuple = unsafe { H::tuple(ip, ports) };
    // SAFETY: the tuple and opts live on the stack for the call; the lengths are
    // theirs; the skb is the program's context.
    let ct = unsafe {
        bpf_skb_ct_lookup(
            ctx.skb.skb,
            (&raw mut tuple).cast(),
            size_of::<H::Tuple>() as u32,
            &raw mut opts,
            size_of::<CtOpts>() as u32,
        )
    };
    if ct.is_null() {
        return Err(if syn {
            Counter::PassTcpSyn
        } else if opts.error != -ENOENT {
            Counter::PassCtError
        } else {
            Counter::PassCtNew
        });
    }
    // SAFETY: ct is a referenced nf_conn; the offsets are the running kernel's (from
    // its BTF) and constant to the verifier.
    let (status, expires) = unsafe {
        let base = ct.cast::<u8>();
        (
            core::ptr::read(
                base.add(core::ptr::read_volatile(&HGW_CT_STATUS_OFF) as usize)
                    .cast::<u64>(),
            ),
            core::ptr::read(
                base.add(core::ptr::read_volatile(&HGW_CT_TIMEOUT_OFF) as usize)
                    .cast::<u32>(),
            ),
        )
    };
    // Jiffies left, wrap-safe as nf_ct_is_expired computes it.
    // SAFETY: plain helper call.
    let left = expires.wrapping_sub(unsafe { bpf_jiffies64() } as u32) as i32;
    let verdict = if syn {
        // A SYN on the 4-tuple of a connection whose FIN or RST the fast path
        // carried: conntrack never saw the close, its entry still says ESTABLISHED,
        // where a SYN is ignored instead of starting over (and FORWARD would take the
        // new connection as established). The kernel path would have the entry in
        // TIME_WAIT or CLOSE and start a new one; expiring it now lets it do so.
        if status & IPS_ASSURED != 0 && (left.max(0) as u32) <= timeouts.closing {
            // SAFETY: ct is a referenced nf_conn.
            if unsafe { bpf_ct_change_timeout(ct, 0) } == 0 {
                count(H::FAMILY, Counter::CtReopen);
            }
        }
        Err(Counter::PassTcpSyn)
    } else {
        judge(status, proto)
    };
    if verdict.is_ok() {
        if let Some((timeout_ms, why)) = new_timeout(timeouts, proto, tcp_flags, left) {
            // SAFETY: ct is a referenced nf_conn. A failure (a fixed-timeout or dying
            // entry) leaves it to expire as conntrack decides, and is not counted.
            if unsafe { bpf_ct_change_timeout(ct, timeout_ms) } == 0 {
                count(H::FAMILY, why);
            }
        }
        // Conntrack marks a UDP entry assured when it sees the flow go on after the
        // reply; it sees no more of a carried flow, so the program does, once. Assured
        // entries are the last conntrack evicts when its table is full, as the
        // kernel path would keep them.
        if proto == IPPROTO_UDP && status & IPS_ASSURED == 0 {
            // SAFETY: ct is a referenced nf_conn; only the ASSURED bit changes (the
            // kernel keeps the bits a program may not change).
            unsafe { bpf_ct_change_status(ct, (status | IPS_ASSURED) as u32) };
        }
    }
    // SAFETY: the reference the lookup took, released once.
    unsafe { bpf_ct_release(ct) };
    verdict?;
    // A bare segment of a closing connection (the last ACK after both FINs, which
    // forgot the flow in each direction) is not remembered: every connection would
    // leave an entry behind, and a full cache evicts live flows to take new ones, as
    // netfilter's flowtable drops its entry on a FIN. The data of a half-closed
    // connection still is.
    let closing = proto == IPPROTO_TCP && (left.max(0) as u32) <= timeouts.closing;
    Ok(if closing && bare_segment(ctx, ip) {
        Cache::Skip
    } else {
        Cache::Keep
    })
}

/// Whether a TCP segment carries no payload (a bare ACK, or flags only).
#[inline(always)]
fn bare_segment<H: IpHeader>(ctx: &TcContext, ip: *const H) -> bool {
    let Ok(tcp) = ptr_at::<TcpHead>(ctx, L3 + H::LEN) else {
        return false;
    };
    // SAFETY: ptr_at checked the bounds; the caller got ip from parse.
    let (data_offset, len) = unsafe { ((*tcp).data_offset, (*ip).packet_len()) };
    len <= H::LEN as u32 + u32::from(data_offset >> 4) * 4
}

/// Whether the flow cache may remember a flow the full path forwards.
#[derive(Clone, Copy)]
enum Cache {
    Keep,
    Skip,
}

/// Whether an entry's status lets its packets take the fast path.
#[inline(always)]
fn judge(status: u64, proto: u8) -> Result<(), Counter> {
    let accepted = IPS_CONFIRMED | IPS_SEEN_REPLY;
    if status & accepted != accepted || (proto == IPPROTO_TCP && status & IPS_ASSURED == 0) {
        return Err(Counter::PassCtNew);
    }
    // (*_NAT_DONE is set on plain flows too whenever a nat table exists.) Sequence
    // adjustment and helpers rewrite packets too, as the flowtable also refuses them.
    if status & (IPS_SRC_NAT | IPS_DST_NAT | IPS_SEQ_ADJUST | IPS_HELPER) != 0 {
        return Err(Counter::PassCtNat);
    }
    Ok(())
}

/// The timeout to set on an accepted entry with `left` jiffies to go, and the counter
/// that says why, if any, as conntrack would have set it on seeing the packet: short
/// when a TCP flow closes (RST: CLOSE's timeout, as conntrack sets on every RST; FIN:
/// TIME_WAIT's, once), full when a live flow's entry runs low (at most once per
/// quarter of the timeout, not per packet). A closing TCP entry (a FIN or RST passed)
/// is never set back to the established timeout, but a half-closed connection that
/// goes on keeps it at TIME_WAIT's, so it expires only after that long of silence.
#[inline(always)]
fn new_timeout(t: &CtTimeouts, proto: u8, tcp_flags: u8, left: i32) -> Option<(u32, Counter)> {
    let left = left.max(0) as u32;
    if proto != IPPROTO_TCP {
        return (left < t.udp_refresh_below).then_some((t.udp_ms, Counter::CtRefresh));
    }
    if tcp_flags & TCP_RST != 0 {
        Some((t.rst_ms, Counter::CtClose))
    } else if left <= t.closing {
        (left > t.rst_closing && left < t.fin_refresh_below)
            .then_some((t.fin_ms, Counter::CtRefresh))
    } else if tcp_flags & TCP_FIN != 0 {
        Some((t.fin_ms, Counter::CtClose))
    } else if left < t.tcp_refresh_below {
        Some((t.tcp_ms, Counter::CtRefresh))
    } else {
        None
    }
}

/// What forwarding needs from an IP header, per family.
trait IpHeader: Sized {
    type Addr: Copy;
    /// `struct bpf_sock_tuple` for this family.
    type Tuple;
    /// The flow cache's key for this family.
    type FlowKey: Copy + 'static;
    /// A slot of the flow cache of this family: the key, a [`CachedFlow`], the check
    /// word.
    type Slot: 'static;
    /// The key's size in 8-byte words.
    const KEY_WORDS: usize;
    const FAMILY: Family;
    /// Whether the kernel checks this family's sources against its routes (IPv4's
    /// `rp_filter`; IPv6 routing has none).
    const REVERSE_PATH_FILTER: bool;
    /// The fixed header, all the fast path ever forwards (no options, no extension
    /// headers).
    const LEN: usize;

    /// The family's own header checks, after the frame was found to hold `Self::LEN`
    /// bytes of it: anything the kernel would drop or must see is an error.
    fn check(&self, ctx: &TcContext) -> Result<(), Counter>;
    fn src(&self) -> Self::Addr;
    fn dst(&self) -> Self::Addr;
    fn ttl(&self) -> u8;
    /// The whole packet: header + payload.
    fn packet_len(&self) -> u32;
    /// The transport protocol right after the fixed header, if any.
    fn transport(&self) -> u8;
    /// Whether this node has a pod CIDR of this family.
    fn enabled(config: &NodeConfig) -> bool;
    /// Whether `addr` is in this node's pod CIDR.
    fn owns(config: &NodeConfig, addr: Self::Addr) -> bool;
    /// Whether `addr` is this node's gateway address (the bridge's).
    fn is_gateway(config: &NodeConfig, addr: Self::Addr) -> bool;
    /// Whether `addr` is in the cluster CIDR.
    fn in_cluster(config: &NodeConfig, addr: Self::Addr) -> bool;
    fn route(addr: Self::Addr) -> Option<&'static NextHop>;
    fn endpoint(addr: Self::Addr) -> Option<Endpoint>;
    /// The conntrack lookup key of this packet, from its addresses and the first four
    /// bytes of its TCP or UDP header (the ports, in network order).
    ///
    /// # Safety
    /// `ip` must point to a whole header inside the packet.
    unsafe fn tuple(ip: *const Self, ports: [u8; 4]) -> Self::Tuple;
    /// The flow cache's key of this packet on `side` (`FLOW_TO_*`).
    ///
    /// # Safety
    /// `ip` must point to a whole header inside the packet.
    unsafe fn flow_key(ip: *const Self, ports: [u8; 4], proto: u8, side: u8) -> Self::FlowKey;
    /// The flow cache of this family.
    fn flows() -> &'static Array<Self::Slot>;
    /// The slot of `key` in [`IpHeader::flows`].
    #[inline(always)]
    fn slot_of(key: &Self::FlowKey) -> u32 {
        let words = (&raw const *key).cast::<u64>();
        // SAFETY: a flow key is KEY_WORDS 8-byte-aligned words.
        flow_slot((0..Self::KEY_WORDS).map(|i| unsafe { *words.add(i) }))
    }
    /// The flow in `slot` if the slot holds `key` and was written whole. Each word is
    /// read once (volatile), and checked and used as read: other CPUs write slots
    /// without a lock, 8 bytes at a time.
    ///
    /// # Safety
    /// `slot` must point to a slot of [`IpHeader::flows`].
    #[inline(always)]
    unsafe fn read_slot(slot: *const Self::Slot, key: &Self::FlowKey) -> Option<CachedFlow> {
        let (slot, key) = (slot.cast::<u64>(), (&raw const *key).cast::<u64>());
        let mut sum = 0u64;
        for i in 0..Self::KEY_WORDS {
            // SAFETY: guaranteed by the caller; the key is KEY_WORDS aligned words.
            let (word, want) = unsafe { (core::ptr::read_volatile(slot.add(i)), *key.add(i)) };
            if word != want {
                return None;
            }
            sum = sum.wrapping_add(flow_check_term(i, word));
        }
        let mut flow = [0u64; FLOW_WORDS];
        for (i, word) in flow.iter_mut().enumerate() {
            let i = Self::KEY_WORDS + i;
            // SAFETY: guaranteed by the caller: the flow follows the key.
            *word = unsafe { core::ptr::read_volatile(slot.add(i)) };
            sum = sum.wrapping_add(flow_check_term(i, *word));
        }
        // SAFETY: guaranteed by the caller: the check word follows the flow.
        let check = unsafe { core::ptr::read_volatile(slot.add(Self::KEY_WORDS + FLOW_WORDS)) };
        // SAFETY: a CachedFlow is FLOW_WORDS words, any bit pattern valid (Pod).
        let flow = unsafe { core::mem::transmute::<[u64; FLOW_WORDS], CachedFlow>(flow) };
        (flow_check_finish(sum) == check).then_some(flow)
    }
    /// Puts `key`'s `flow` into `slot`, with its check word.
    ///
    /// # Safety
    /// As for [`IpHeader::read_slot`].
    #[inline(always)]
    unsafe fn write_slot(slot: *mut Self::Slot, key: Self::FlowKey, flow: CachedFlow) {
        let (slot, key) = (slot.cast::<u64>(), (&raw const key).cast::<u64>());
        // SAFETY: a CachedFlow is FLOW_WORDS words (Pod, no padding).
        let flow = unsafe { core::mem::transmute::<CachedFlow, [u64; FLOW_WORDS]>(flow) };
        let mut sum = 0u64;
        for i in 0..Self::KEY_WORDS + FLOW_WORDS {
            let word = match i.checked_sub(Self::KEY_WORDS) {
                Some(f) => flow[f],
                // SAFETY: the key is KEY_WORDS aligned words.
                None => unsafe { *key.add(i) },
            };
            sum = sum.wrapping_add(flow_check_term(i, word));
            // SAFETY: guaranteed by the caller.
            unsafe { core::ptr::write_volatile(slot.add(i), word) };
        }
        let check = slot.wrapping_add(Self::KEY_WORDS + FLOW_WORDS);
        // SAFETY: guaranteed by the caller: the check word follows the flow.
        unsafe { core::ptr::write_volatile(check, flow_check_finish(sum)) };
    }
    /// Empties `slot` with one store: a check word of 0 never passes.
    ///
    /// # Safety
    /// As for [`IpHeader::read_slot`].
    #[inline(always)]
    unsafe fn clear_slot(slot: *mut Self::Slot) {
        let check = slot
            .cast::<u64>()
            .wrapping_add(Self::KEY_WORDS + FLOW_WORDS);
        // SAFETY: guaranteed by the caller.
        unsafe { core::ptr::write_volatile(check, 0) };
    }
    /// The FIB lookup's inputs from this header, written into a zeroed request: family,
    /// protocol, TOS or flow info, addresses (the ports and ingress interface are the
    /// caller's).
    ///
    /// # Safety
    /// `ip` must point to a whole header inside the packet.
    unsafe fn fib_params(ip: *const Self, params: &mut FibParams);
    /// The priority `ip_forward` gives a packet of this header, if the family's
    /// forwarding sets one (IPv4 only).
    fn forward_priority(&self) -> Option<u32>;
    /// TTL (hop limit) - 1, and whatever the header and skb need to stay valid.
    ///
    /// # Safety
    /// `ip` must point to a whole, writable header inside the packet.
    unsafe fn decrement_ttl(ctx: &TcContext, ip: *mut Self);
}

/// `struct bpf_sock_tuple`, IPv4: addresses and ports in network order (its fields are
/// `__be32` and `__be16`: aligned for words).
#[repr(C, align(4))]
struct TupleV4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    ports: [u8; 4],
}

/// `struct bpf_sock_tuple`, IPv6.
#[repr(C, align(4))]
struct TupleV6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    ports: [u8; 4],
}

impl IpHeader for Ip4 {
    type Addr = [u8; 4];
    type Tuple = TupleV4;
    type FlowKey = FlowKeyV4;
    type Slot = FlowSlotV4;
    const KEY_WORDS: usize = size_of::<FlowKeyV4>() / 8;
    const FAMILY: Family = Family::Ipv4;
    const REVERSE_PATH_FILTER: bool = true;
    const LEN: usize = Ip4::LEN;

    #[inline(always)]
    fn check(&self, ctx: &TcContext) -> Result<(), Counter> {
        if self.version() != 4 || self.ihl() < Ip4::LEN as u8 {
            return Err(Counter::PassMalformed);
        }
        if self.ihl() != Ip4::LEN as u8 {
            return Err(Counter::PassIpOptions);
        }
        let tot_len = usize::from(self.tot_len());
        if tot_len < Ip4::LEN || L3 + tot_len > ctx.len() as usize {
            return Err(Counter::PassMalformed);
        }
        // The kernel drops a header with a bad checksum (ip_rcv); so must we, by leaving
        // it to the kernel rather than forwarding it.
        if !self.checksum_ok() {
            return Err(Counter::PassMalformed);
        }
        // MF set or a non-zero offset: reassembly and fragment tracking are the kernel's.
        if u16::from_be_bytes(self.frags) & 0x3fff != 0 {
            return Err(Counter::PassFragment);
        }
        let dst = self.dst_addr;
        if dst[0] & 0xf0 == 0xe0 || dst == [255; 4] {
            return Err(Counter::PassNotUnicast);
        }
        // Martian sources the kernel drops rather than routes (ip_route_input_slow).
        let src = self.src_addr;
        if src[0] == 0 || src[0] == 127 || src[0] & 0xf0 >= 0xe0 {
            return Err(Counter::PassMartian);
        }
        Ok(())
    }

    fn src(&self) -> [u8; 4] {
        self.src_addr
    }

    fn dst(&self) -> [u8; 4] {
        self.dst_addr
    }

    fn ttl(&self) -> u8 {
        self.ttl
    }

    fn packet_len(&self) -> u32 {
        u32::from(self.tot_len())
    }

    fn transport(&self) -> u8 {
        self.proto
    }

    fn enabled(_config: &NodeConfig) -> bool {
        // Every node has an IPv4 pod CIDR (the config requires one).
        true
    }

    fn owns(config: &NodeConfig, addr: [u8; 4]) -> bool {
        config.owns_v4(addr)
    }

    fn is_gateway(config: &NodeConfig, addr: [u8; 4]) -> bool {
        addr == config.gateway_v4
    }

    fn in_cluster(config: &NodeConfig, addr: [u8; 4]) -> bool {
        config.in_cluster_v4(addr)
    }

    unsafe fn tuple(ip: *const Self, ports: [u8; 4]) -> TupleV4 {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        TupleV4 {
            saddr: hdr.src_addr,
            daddr: hdr.dst_addr,
            ports,
        }
    }

    unsafe fn flow_key(ip: *const Self, ports: [u8; 4], proto: u8, side: u8) -> Self::FlowKey {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        FlowKeyV4 {
            src: hdr.src_addr,
            dst: hdr.dst_addr,
            ports,
            proto,
            side,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn flows() -> &'static Array<FlowSlotV4> {
        &HGW_FLOWS_V4
    }

    unsafe fn fib_params(ip: *const Self, params: &mut FibParams) {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        params.family = AF_INET;
        params.l4_protocol = hdr.proto;
        params.tos_or_flowinfo[0] = hdr.tos;
        params.src[..4].copy_from_slice(&hdr.src_addr);
        params.dst[..4].copy_from_slice(&hdr.dst_addr);
    }

    #[inline(always)]
    fn forward_priority(&self) -> Option<u32> {
        // rt_tos2priority: ip_tos2prio[(tos & 0x1e) >> 1], which depends on TOS bits 3
        // and 4 alone: 0 -> 0 (best effort), 1 -> 2 (bulk), 2 -> 6 (interactive), 3 -> 4
        // (interactive bulk); i.e. 2t ^ (t & 2), without a table.
        let t = u32::from(self.tos >> 3) & 3;
        Some((t << 1) ^ (t & 2))
    }

    fn route(addr: [u8; 4]) -> Option<&'static NextHop> {
        HGW_ROUTES_V4.get(Key::new(32, addr))
    }

    fn endpoint(addr: [u8; 4]) -> Option<Endpoint> {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { HGW_ENDPOINTS.get(addr) }.copied()
    }

    unsafe fn decrement_ttl(_ctx: &TcContext, ip: *mut Self) {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &mut *ip };
        // ip_decrease_ttl(): the TTL is the high byte of its 16-bit checksum word, so
        // TTL - 1 adds 0x0100 to the one's complement sum, with the end-around carry.
        // The header's sum stays the same, so a CHECKSUM_COMPLETE skb->csum stays valid.
        let check = u32::from(u16::from_ne_bytes(hdr.check)) + u32::from(0x0100u16.to_be());
        let check = check + u32::from(check >= 0xffff);
        hdr.check = (check as u16).to_ne_bytes();
        hdr.ttl -= 1;
    }
}

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
const NEXTHDR_EXPERIMENT1: u8 = 253;
const NEXTHDR_EXPERIMENT2: u8 = 254;

impl IpHeader for Ip6 {
    type Addr = [u8; 16];
    type Tuple = TupleV6;
    type FlowKey = FlowKeyV6;
    type Slot = FlowSlotV6;
    const KEY_WORDS: usize = size_of::<FlowKeyV6>() / 8;
    const FAMILY: Family = Family::Ipv6;
    const REVERSE_PATH_FILTER: bool = false;
    const LEN: usize = Ip6::LEN;

    #[inline(always)]
    fn check(&self, ctx: &TcContext) -> Result<(), Counter> {
        if self.version() != 6 {
            return Err(Counter::PassMalformed);
        }
        // (A jumbogram has payload length 0 and a hop-by-hop header: the kernel's, below.)
        let payload_len = usize::from(u16::from_be_bytes(self.payload_len));
        if L3 + Ip6::LEN + payload_len > ctx.len() as usize {
            return Err(Counter::PassMalformed);
        }
        // Extension headers (RFC 8200 and IANA's list): hop-by-hop must be processed
        // by every router, and none is worth parsing here. ESP is opaque payload to a
        // router, like any upper-layer protocol, so it is forwarded.
        match self.next_hdr {
            NEXTHDR_FRAGMENT => return Err(Counter::PassFragment),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_AUTH | NEXTHDR_DEST | NEXTHDR_MOBILITY
            | NEXTHDR_HIP | NEXTHDR_SHIM6 | NEXTHDR_EXPERIMENT1 | NEXTHDR_EXPERIMENT2 => {
                return Err(Counter::PassIpOptions);
            }
            _ => {}
        }
        let [dst_high, _] = halves(self.dst_addr);
        if u64::from_be(dst_high) >> 56 == 0xff {
            return Err(Counter::PassNotUnicast);
        }
        // Sources the kernel drops (multicast, loopback: ip6_rcv_core) or will not
        // forward off their link (link-local, unspecified: ip6_forward).
        let [high, low] = halves(self.src_addr);
        let (high, low) = (u64::from_be(high), u64::from_be(low));
        let unspecified_or_loopback = high == 0 && low <= 1;
        let link_local = high >> 54 == 0xfe80 >> 6;
        if high >> 56 == 0xff || unspecified_or_loopback || link_local {
            return Err(Counter::PassMartian);
        }
        Ok(())
    }

    fn src(&self) -> [u8; 16] {
        self.src_addr
    }

    fn dst(&self) -> [u8; 16] {
        self.dst_addr
    }

    fn ttl(&self) -> u8 {
        self.hop_limit
    }

    fn packet_len(&self) -> u32 {
        Ip6::LEN as u32 + u32::from(u16::from_be_bytes(self.payload_len))
    }

    fn transport(&self) -> u8 {
        self.next_hdr
    }

    fn enabled(config: &NodeConfig) -> bool {
        config.has_v6()
    }

    fn owns(config: &NodeConfig, addr: [u8; 16]) -> bool {
        config.owns_v6(addr)
    }

    fn is_gateway(config: &NodeConfig, addr: [u8; 16]) -> bool {
        addr == config.gateway_v6
    }

    fn in_cluster(config: &NodeConfig, addr: [u8; 16]) -> bool {
        config.in_cluster_v6(addr)
    }

    unsafe fn tuple(ip: *const Self, ports: [u8; 4]) -> TupleV6 {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        TupleV6 {
            saddr: hdr.src_addr,
            daddr: hdr.dst_addr,
            ports,
        }
    }

    unsafe fn flow_key(ip: *const Self, ports: [u8; 4], proto: u8, side: u8) -> Self::FlowKey {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        FlowKeyV6 {
            src: hdr.src_addr,
            dst: hdr.dst_addr,
            ports,
            proto,
            side,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn flows() -> &'static Array<FlowSlotV6> {
        &HGW_FLOWS_V6
    }

    unsafe fn fib_params(ip: *const Self, params: &mut FibParams) {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &*ip };
        params.family = AF_INET6;
        params.l4_protocol = hdr.next_hdr;
        // ip6_flowinfo(): traffic class and flow label, without the version.
        params.tos_or_flowinfo = [hdr.vcf[0] & 0x0f, hdr.vcf[1], hdr.vcf[2], hdr.vcf[3]];
        params.src = hdr.src_addr;
        params.dst = hdr.dst_addr;
    }

    fn forward_priority(&self) -> Option<u32> {
        // ip6_forward leaves it.
        None
    }

    fn route(addr: [u8; 16]) -> Option<&'static NextHop> {
        HGW_ROUTES_V6.get(Key::new(128, addr))
    }

    fn endpoint(addr: [u8; 16]) -> Option<Endpoint> {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { HGW_ENDPOINTS6.get(addr) }.copied()
    }

    unsafe fn decrement_ttl(ctx: &TcContext, ip: *mut Self) {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &mut *ip };
        // IPv6 has no header checksum, but a CHECKSUM_COMPLETE skb->csum covers the
        // header: add the change of the 16-bit word (next header, hop limit), in the
        // byte order the sum is taken in, as one's complement (new + !old).
        let old = u16::from_ne_bytes([hdr.next_hdr, hdr.hop_limit]);
        hdr.hop_limit -= 1;
        let new = u16::from_ne_bytes([hdr.next_hdr, hdr.hop_limit]);
        // SAFETY: plain helper call; it only touches skb->csum, and only for
        // CHECKSUM_COMPLETE.
        unsafe { bpf_csum_update(ctx.skb.skb, u32::from(new) + u32::from(!old)) };
    }
}

/// The node config, if this node forwards the family at all: checked before any
/// header is parsed, so an IPv6 frame on an IPv4-only node costs one lookup.
#[inline(always)]
fn enabled<H: IpHeader>() -> Result<&'static NodeConfig, Counter> {
    match HGW_CONFIG.get(0) {
        Some(config) if H::enabled(config) => Ok(config),
        _ => Err(Counter::PassFamilyOff),
    }
}

/// A unicast IP packet sent to `our_mac` with a plain header that lies wholly inside
/// the frame. Comparing the MAC (rather than skb->pkt_type) also holds where the program
/// runs on a device that does not own the MAC, like a bridge port.
#[inline(always)]
fn parse<H: IpHeader>(
    ctx: &TcContext,
    eth: *const EthHdr,
    our_mac: [u8; 6],
) -> Result<*mut H, Counter> {
    // SAFETY: the caller got eth from ethernet(), which checked the bounds.
    if unsafe { (*eth).dst_addr } != our_mac {
        return Err(Counter::PassNotUnicast);
    }
    let ip: *mut H = ptr_at(ctx, L3)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe { &*ip }.check(ctx)?;
    Ok(ip)
}

/// Whether the frame's source MAC is one the bridge takes a frame from
/// (`is_valid_ether_addr`): neither multicast (broadcast included) nor all zeros.
#[inline(always)]
fn unicast_source(eth: *const EthHdr) -> bool {
    // SAFETY: the caller got eth from ethernet(), which checked the bounds.
    let mac = unsafe { (*eth).src_addr };
    mac[0] & 1 == 0 && mac != [0; 6]
}

/// TTL <= 1 and packets too large for the egress go to the kernel, which answers with
/// ICMP time exceeded / fragmentation needed (ICMPv6 packet too big) as a router must.
/// The packet's length on the wire, for the FIB's own MTU check: a packet that fits as
/// a whole fits as segments too, so [`wire_len`] (which reads `gso_size`, in
/// skb_shared_info, a cache line of its own) runs only for packets larger than `mtu`.
/// (A GSO packet that fits whole is then checked whole against a locked route MTU
/// too: where only its segments would fit, the kernel forwards it.)
#[inline(always)]
fn check_ttl_and_mtu<H: IpHeader>(ctx: &TcContext, ip: *const H, mtu: u32) -> Result<u32, Counter> {
    // SAFETY: the caller got ip from parse.
    let hdr = unsafe { &*ip };
    if hdr.ttl() <= 1 {
        return Err(Counter::PassTtl);
    }
    let whole = hdr.packet_len();
    let len = if whole <= mtu {
        whole
    } else {
        wire_len(ctx, hdr, whole)
    };
    if len > mtu {
        return Err(Counter::PassMtu);
    }
    Ok(len)
}

/// The largest IP packet this one (`whole` bytes long) puts on the wire: itself, or,
/// for a GSO packet (TCP/UDP from a pod's veth), which is larger than the MTU as a whole
/// but leaves as segments, headers + gso_size.
#[inline(always)]
fn wire_len<H: IpHeader>(ctx: &TcContext, hdr: &H, whole: u32) -> u32 {
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return whole;
    }
    let l4_header = match hdr.transport() {
        IPPROTO_TCP => match ptr_at::<TcpHead>(ctx, L3 + H::LEN) {
            // Data offset: the high nibble, in 32-bit words.
            // SAFETY: ptr_at checked the bounds.
            Ok(tcp) => u32::from(unsafe { (*tcp).data_offset } >> 4) * 4,
            Err(_) => return whole,
        },
        IPPROTO_UDP => 8,
        _ => return whole,
    };
    whole.min(H::LEN as u32 + l4_header + gso_size)
}

#[inline(always)]
fn count(family: Family, counter: Counter) {
    count_slot(counter_index(family, counter));
}

#[inline(always)]
fn count_slot(slot: u32) {
    if let Some(value) = HGW_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, written only by this CPU while this program runs.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, Counter> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Counter::PassMalformed);
    }
    Ok((start + offset) as *mut T)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
