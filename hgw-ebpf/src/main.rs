//! hgw's fast path: two TC ingress programs that forward pod traffic between nodes
//! without the kernel's routing and netfilter FORWARD path.
//!
//! - `hgw_to_peer` (bridge ingress): a local pod's packet to a peer's pod CIDR gets the
//!   next hop's MACs, TTL - 1, and is redirected out of the uplink.
//! - `hgw_to_pod` (uplink ingress): a packet to this node's pod CIDR gets TTL - 1 and is
//!   redirected into the bridge, whose neighbour entry supplies the pod's MAC.
//!
//! Every packet the fast path is not sure of goes to the kernel unchanged (`TC_ACT_OK`),
//! where the routes the agent installed do the same job more slowly. All checks come
//! before the first write, so a packet handed to the kernel is always untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use hgw_common::{
    COUNTERS_LEN, Counter, ENDPOINTS_MAX_ENTRIES, Endpoint, NEXT_HOP_MAC_KNOWN, NextHop,
    NodeConfig, ROUTES_V4_MAX_ENTRIES,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

#[map]
static HGW_ROUTES_V4: LpmTrie<[u8; 4], NextHop> =
    LpmTrie::with_max_entries(ROUTES_V4_MAX_ENTRIES, 0);

#[map]
static HGW_ENDPOINTS: HashMap<[u8; 4], Endpoint> =
    HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

#[map]
static HGW_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

#[map]
static HGW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the IPv4 header: no VLAN tags (a tagged frame is not IPv4 to us).
const L3: usize = EthHdr::LEN;
const L4: usize = L3 + Ipv4Hdr::LEN;

#[classifier]
fn hgw_to_peer(ctx: TcContext) -> i32 {
    verdict(&ctx, try_to_peer(&ctx), Counter::FwdToPeer)
}

#[classifier]
fn hgw_to_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, try_to_pod(&ctx), Counter::FwdToPod)
}

/// Counts the outcome; anything but a successful redirect goes to the kernel.
#[inline(always)]
fn verdict(ctx: &TcContext, result: Result<(), Counter>, forwarded: Counter) -> i32 {
    match result {
        Ok(()) => {
            count(forwarded);
            TC_ACT_REDIRECT
        }
        Err(Counter::PassRedirectFailed) => {
            warn!(ctx, "hgw: redirect failed, packet left to the kernel");
            count(Counter::PassRedirectFailed);
            TC_ACT_OK
        }
        Err(reason) => {
            count(reason);
            TC_ACT_OK
        }
    }
}

fn try_to_peer(ctx: &TcContext) -> Result<(), Counter> {
    let config = HGW_CONFIG.get(0).ok_or(Counter::PassNoRoute)?;
    let (eth, ip) = parse_ipv4(ctx, config.bridge_mac)?;
    // SAFETY: parse_ipv4 checked that the whole IPv4 header is inside the packet.
    let dst = unsafe { (*ip).dst_addr };
    if config.owns_v4(dst) {
        return Err(Counter::PassLocal);
    }
    let next_hop = HGW_ROUTES_V4
        .get(Key::new(32, dst))
        .ok_or(Counter::PassNoRoute)?;
    if next_hop.flags & NEXT_HOP_MAC_KNOWN == 0 {
        return Err(Counter::PassNoMac);
    }
    check_ttl_and_mtu(ctx, ip, next_hop.mtu)?;

    // SAFETY: eth and ip point into the packet (bounds checked by parse_ipv4).
    unsafe {
        (*eth).dst_addr = next_hop.dst_mac;
        (*eth).src_addr = next_hop.src_mac;
        decrement_ttl(ip);
    }
    // SAFETY: plain helper call; flags 0 = egress of `ifindex`.
    let action = unsafe { bpf_redirect(next_hop.ifindex, 0) };
    redirected(action)
}

fn try_to_pod(ctx: &TcContext) -> Result<(), Counter> {
    let config = HGW_CONFIG.get(0).ok_or(Counter::PassNotPod)?;
    let (eth, ip) = parse_ipv4(ctx, config.uplink_mac)?;
    // SAFETY: parse_ipv4 checked that the whole IPv4 header is inside the packet.
    let dst = unsafe { (*ip).dst_addr };
    if !config.owns_v4(dst) {
        return Err(Counter::PassNotPod);
    }
    check_ttl_and_mtu(ctx, ip, config.bridge_mtu)?;

    // SAFETY: a plain lookup; the value is copied out at once.
    let endpoint = unsafe { HGW_ENDPOINTS.get(dst) }.copied();
    // SAFETY: ip points into the packet (bounds checked by parse_ipv4).
    unsafe { decrement_ttl(ip) };
    if let Some(endpoint) = endpoint {
        // A known pod: straight into its namespace, past the bridge, as the gateway
        // would have sent it.
        // SAFETY: eth points into the packet (bounds checked by parse_ipv4).
        unsafe {
            (*eth).dst_addr = endpoint.mac;
            (*eth).src_addr = config.bridge_mac;
        }
        // SAFETY: plain helper call; flags must be 0.
        let action = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
        redirected(action)?;
        count(Counter::FwdToPodDirect);
        return Ok(());
    }
    // Otherwise the bridge's neighbour table knows the pod's MAC (or resolves it,
    // queueing the packet): the kernel fills in both MACs.
    // SAFETY: a null params pointer asks the kernel to use the packet's destination.
    let action = unsafe { bpf_redirect_neigh(config.bridge_ifindex, core::ptr::null_mut(), 0, 0) };
    redirected(action)
}

#[inline(always)]
fn redirected(action: i64) -> Result<(), Counter> {
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(())
    } else {
        Err(Counter::PassRedirectFailed)
    }
}

/// A unicast IPv4 packet sent to `our_mac` with a plain header (no options, not a
/// fragment) that lies wholly inside the frame. Comparing the MAC (rather than
/// skb->pkt_type) also holds where the program runs on a device that does not own the
/// MAC, like a bridge port.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, our_mac: [u8; 6]) -> Result<(*mut EthHdr, *mut Ipv4Hdr), Counter> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    let (ether_type, dst_mac) = unsafe { ((*eth).ether_type, (*eth).dst_addr) };
    if u16::from_be(ether_type) != ETH_P_IPV4 {
        return Err(Counter::PassNotIpv4);
    }
    if dst_mac != our_mac {
        return Err(Counter::PassNotUnicast);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, L3)?;
    // SAFETY: ptr_at checked the bounds.
    let hdr = unsafe { &*ip };
    if hdr.version() != 4 || hdr.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(Counter::PassMalformed);
    }
    if hdr.ihl() != Ipv4Hdr::LEN as u8 {
        return Err(Counter::PassIpOptions);
    }
    let tot_len = usize::from(hdr.tot_len());
    if tot_len < Ipv4Hdr::LEN || L3 + tot_len > ctx.len() as usize {
        return Err(Counter::PassMalformed);
    }
    // The kernel drops a header with a bad checksum (ip_rcv); so must we, by leaving it
    // to the kernel rather than forwarding it.
    if !header_checksum_ok(ip) {
        return Err(Counter::PassMalformed);
    }
    // MF set or a non-zero offset: reassembly and fragment tracking are the kernel's.
    if u16::from_be_bytes(hdr.frags) & 0x3fff != 0 {
        return Err(Counter::PassFragment);
    }
    let dst = hdr.dst_addr;
    if dst[0] & 0xf0 == 0xe0 || dst == [255; 4] {
        return Err(Counter::PassNotUnicast);
    }
    Ok((eth, ip))
}

/// One's complement sum over the 20-byte header (IHL is 5 here) must be 0xffff.
#[inline(always)]
fn header_checksum_ok(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: the caller checked that the 20-byte header is inside the packet.
    let bytes = unsafe { &*ip.cast::<[u8; 20]>() };
    let mut sum = 0u32;
    for word in bytes.chunks_exact(2) {
        sum += u32::from(u16::from_ne_bytes([word[0], word[1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// TTL <= 1 and packets too large for the egress go to the kernel, which answers with
/// ICMP time exceeded / fragmentation needed as a router must.
#[inline(always)]
fn check_ttl_and_mtu(ctx: &TcContext, ip: *const Ipv4Hdr, mtu: u32) -> Result<(), Counter> {
    // SAFETY: the caller got ip from parse_ipv4.
    let hdr = unsafe { &*ip };
    if hdr.ttl <= 1 {
        return Err(Counter::PassTtl);
    }
    if u32::from(hdr.tot_len()) > mtu && !gso_segments_fit(ctx, hdr.proto, mtu) {
        return Err(Counter::PassMtu);
    }
    Ok(())
}

/// A GSO packet (TCP/UDP from a pod's veth) is larger than the MTU as a whole but
/// leaves as segments: they fit when headers + gso_size do.
#[inline(always)]
fn gso_segments_fit(ctx: &TcContext, proto: u8, mtu: u32) -> bool {
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return false;
    }
    let l4_header = match proto {
        IPPROTO_TCP => match ptr_at::<[u8; 13]>(ctx, L4) {
            // Data offset: high nibble of byte 12, in 32-bit words.
            // SAFETY: ptr_at checked the bounds.
            Ok(tcp) => u32::from(unsafe { (*tcp)[12] } >> 4) * 4,
            Err(_) => return false,
        },
        IPPROTO_UDP => 8,
        _ => return false,
    };
    Ipv4Hdr::LEN as u32 + l4_header + gso_size <= mtu
}

/// TTL - 1 with the incremental checksum update the kernel's ip_decrease_ttl() does.
///
/// # Safety
/// `ip` must point to a whole, writable IPv4 header inside the packet.
#[inline(always)]
unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: guaranteed by the caller.
    let hdr = unsafe { &mut *ip };
    // The TTL is the high byte of its 16-bit checksum word: TTL - 1 adds 0x0100 to the
    // one's complement sum, with the end-around carry.
    let check = u32::from(u16::from_ne_bytes(hdr.check)) + u32::from(0x0100u16.to_be());
    let check = check + u32::from(check >= 0xffff);
    hdr.check = (check as u16).to_ne_bytes();
    hdr.ttl -= 1;
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = HGW_COUNTERS.get_ptr_mut(counter as u32) {
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
