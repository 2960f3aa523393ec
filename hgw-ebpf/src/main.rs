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
    COUNTER_NOT_IP, COUNTERS_LEN, Counter, ENDPOINTS_MAX_ENTRIES, Endpoint, Family,
    NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, ROUTES_V4_MAX_ENTRIES, ROUTES_V6_MAX_ENTRIES,
    counter_index,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

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

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the IP header: no VLAN tags (a tagged frame is not IP to us).
const L3: usize = EthHdr::LEN;

#[classifier]
fn hgw_to_peer(ctx: TcContext) -> i32 {
    match ethernet(&ctx) {
        Some((eth, ETH_P_IPV4)) => to_peer::<Ipv4Hdr>(&ctx, eth),
        Some((eth, ETH_P_IPV6)) => to_peer::<Ipv6Hdr>(&ctx, eth),
        _ => not_ip(),
    }
}

#[classifier]
fn hgw_to_pod(ctx: TcContext) -> i32 {
    match ethernet(&ctx) {
        Some((eth, ETH_P_IPV4)) => to_pod::<Ipv4Hdr>(&ctx, eth),
        Some((eth, ETH_P_IPV6)) => to_pod::<Ipv6Hdr>(&ctx, eth),
        _ => not_ip(),
    }
}

#[inline(always)]
fn to_peer<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> i32 {
    verdict::<H>(ctx, try_to_peer::<H>(ctx, eth), Counter::FwdToPeer)
}

#[inline(always)]
fn to_pod<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> i32 {
    verdict::<H>(ctx, try_to_pod::<H>(ctx, eth), Counter::FwdToPod)
}

/// The Ethernet header (bounds checked once, here) and its ethertype; `None` for a
/// runt.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Option<(*mut EthHdr, u16)> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok()?;
    // SAFETY: ptr_at checked the bounds.
    Some((eth, u16::from_be(unsafe { (*eth).ether_type })))
}

/// ARP, VLAN-tagged frames, runts: the kernel's.
#[inline(always)]
fn not_ip() -> i32 {
    count_slot(COUNTER_NOT_IP);
    TC_ACT_OK
}

/// Counts the outcome; anything but a successful redirect goes to the kernel.
#[inline(always)]
fn verdict<H: IpHeader>(ctx: &TcContext, result: Result<(), Counter>, forwarded: Counter) -> i32 {
    match result {
        Ok(()) => {
            count(H::FAMILY, forwarded);
            TC_ACT_REDIRECT
        }
        Err(Counter::PassRedirectFailed) => {
            warn!(ctx, "hgw: redirect failed, packet left to the kernel");
            count(H::FAMILY, Counter::PassRedirectFailed);
            TC_ACT_OK
        }
        Err(reason) => {
            count(H::FAMILY, reason);
            TC_ACT_OK
        }
    }
}

fn try_to_peer<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> Result<(), Counter> {
    let config = enabled::<H>()?;
    let ip = parse::<H>(ctx, eth, config.bridge_mac)?;
    // SAFETY: parse checked that the whole IP header is inside the packet.
    let dst = unsafe { (*ip).dst() };
    if H::owns(config, dst) {
        return Err(Counter::PassLocal);
    }
    let next_hop = H::route(dst).ok_or(Counter::PassNoRoute)?;
    // An unknown (or just deleted) MAC goes to the kernel rather than to
    // bpf_redirect_neigh with the node IP: the agent's route resolves it and queues the
    // packet just the same, and the kernel path stays the one place where all of a
    // router's duties (ICMP errors, netfilter) apply while the fast path cannot act.
    if next_hop.flags & NEXT_HOP_MAC_KNOWN == 0 {
        return Err(Counter::PassNoMac);
    }
    check_ttl_and_mtu(ctx, ip, next_hop.mtu)?;

    // SAFETY: eth and ip point into the packet (bounds checked by ethernet() and parse).
    unsafe {
        (*eth).dst_addr = next_hop.dst_mac;
        (*eth).src_addr = next_hop.src_mac;
        H::decrement_ttl(ip);
    }
    // SAFETY: plain helper call; flags 0 = egress of `ifindex`.
    let action = unsafe { bpf_redirect(next_hop.ifindex, 0) };
    redirected(action)
}

fn try_to_pod<H: IpHeader>(ctx: &TcContext, eth: *mut EthHdr) -> Result<(), Counter> {
    let config = enabled::<H>()?;
    let ip = parse::<H>(ctx, eth, config.uplink_mac)?;
    // SAFETY: parse checked that the whole IP header is inside the packet.
    let dst = unsafe { (*ip).dst() };
    if !H::owns(config, dst) {
        return Err(Counter::PassNotPod);
    }
    check_ttl_and_mtu(ctx, ip, config.bridge_mtu)?;

    let endpoint = H::endpoint(dst);
    // SAFETY: ip points into the packet (bounds checked by ethernet() and parse).
    unsafe { H::decrement_ttl(ip) };
    if let Some(endpoint) = endpoint {
        // A known pod: straight into its namespace, past the bridge, as the gateway
        // would have sent it.
        // SAFETY: eth points into the packet (bounds checked by ethernet() and parse).
        unsafe {
            (*eth).dst_addr = endpoint.mac;
            (*eth).src_addr = config.bridge_mac;
        }
        // SAFETY: plain helper call; flags must be 0.
        let action = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
        redirected(action)?;
        count(H::FAMILY, Counter::FwdToPodDirect);
        return Ok(());
    }
    // Otherwise the bridge's neighbour table (ARP or NDP) knows the pod's MAC, or
    // resolves it while the packet waits: the kernel fills in both MACs.
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

/// What forwarding needs from an IP header, per family.
trait IpHeader: Sized {
    type Addr: Copy;
    const FAMILY: Family;
    /// The fixed header, all the fast path ever forwards (no options, no extension
    /// headers).
    const LEN: usize;

    /// The family's own header checks, after the frame was found to hold `Self::LEN`
    /// bytes of it: anything the kernel would drop or must see is an error.
    fn check(&self, ctx: &TcContext) -> Result<(), Counter>;
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
    fn route(addr: Self::Addr) -> Option<&'static NextHop>;
    fn endpoint(addr: Self::Addr) -> Option<Endpoint>;
    /// TTL (hop limit) - 1, and whatever the header needs to stay valid.
    ///
    /// # Safety
    /// `ip` must point to a whole, writable header inside the packet.
    unsafe fn decrement_ttl(ip: *mut Self);
}

impl IpHeader for Ipv4Hdr {
    type Addr = [u8; 4];
    const FAMILY: Family = Family::Ipv4;
    const LEN: usize = Ipv4Hdr::LEN;

    fn check(&self, ctx: &TcContext) -> Result<(), Counter> {
        if self.version() != 4 || self.ihl() < Ipv4Hdr::LEN as u8 {
            return Err(Counter::PassMalformed);
        }
        if self.ihl() != Ipv4Hdr::LEN as u8 {
            return Err(Counter::PassIpOptions);
        }
        let tot_len = usize::from(self.tot_len());
        if tot_len < Ipv4Hdr::LEN || L3 + tot_len > ctx.len() as usize {
            return Err(Counter::PassMalformed);
        }
        // The kernel drops a header with a bad checksum (ip_rcv); so must we, by leaving
        // it to the kernel rather than forwarding it.
        if !header_checksum_ok(self) {
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

    fn route(addr: [u8; 4]) -> Option<&'static NextHop> {
        HGW_ROUTES_V4.get(Key::new(32, addr))
    }

    fn endpoint(addr: [u8; 4]) -> Option<Endpoint> {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { HGW_ENDPOINTS.get(addr) }.copied()
    }

    unsafe fn decrement_ttl(ip: *mut Self) {
        // SAFETY: guaranteed by the caller.
        let hdr = unsafe { &mut *ip };
        // ip_decrease_ttl(): the TTL is the high byte of its 16-bit checksum word, so
        // TTL - 1 adds 0x0100 to the one's complement sum, with the end-around carry.
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

impl IpHeader for Ipv6Hdr {
    type Addr = [u8; 16];
    const FAMILY: Family = Family::Ipv6;
    const LEN: usize = Ipv6Hdr::LEN;

    fn check(&self, ctx: &TcContext) -> Result<(), Counter> {
        if self.version() != 6 {
            return Err(Counter::PassMalformed);
        }
        // (A jumbogram has payload length 0 and a hop-by-hop header: the kernel's, below.)
        let payload_len = usize::from(u16::from_be_bytes(self.payload_len));
        if L3 + Ipv6Hdr::LEN + payload_len > ctx.len() as usize {
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
        if self.dst_addr[0] == 0xff {
            return Err(Counter::PassNotUnicast);
        }
        // Sources the kernel drops (multicast, loopback: ip6_rcv_core) or will not
        // forward off their link (link-local, unspecified: ip6_forward).
        let src = self.src_addr;
        let unspecified_or_loopback = src[..15] == [0; 15] && src[15] <= 1;
        let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
        if src[0] == 0xff || unspecified_or_loopback || link_local {
            return Err(Counter::PassMartian);
        }
        Ok(())
    }

    fn dst(&self) -> [u8; 16] {
        self.dst_addr
    }

    fn ttl(&self) -> u8 {
        self.hop_limit
    }

    fn packet_len(&self) -> u32 {
        Ipv6Hdr::LEN as u32 + u32::from(u16::from_be_bytes(self.payload_len))
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

    fn route(addr: [u8; 16]) -> Option<&'static NextHop> {
        HGW_ROUTES_V6.get(Key::new(128, addr))
    }

    fn endpoint(addr: [u8; 16]) -> Option<Endpoint> {
        // SAFETY: a plain lookup; the value is copied out at once.
        unsafe { HGW_ENDPOINTS6.get(addr) }.copied()
    }

    unsafe fn decrement_ttl(ip: *mut Self) {
        // SAFETY: guaranteed by the caller. IPv6 has no header checksum.
        unsafe { (*ip).hop_limit -= 1 };
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
/// ICMP time exceeded / fragmentation needed (ICMPv6 packet too big) as a router must.
#[inline(always)]
fn check_ttl_and_mtu<H: IpHeader>(ctx: &TcContext, ip: *const H, mtu: u32) -> Result<(), Counter> {
    // SAFETY: the caller got ip from parse.
    let hdr = unsafe { &*ip };
    if hdr.ttl() <= 1 {
        return Err(Counter::PassTtl);
    }
    if hdr.packet_len() > mtu && !gso_segments_fit::<H>(ctx, hdr.transport(), mtu) {
        return Err(Counter::PassMtu);
    }
    Ok(())
}

/// A GSO packet (TCP/UDP from a pod's veth) is larger than the MTU as a whole but
/// leaves as segments: they fit when headers + gso_size do.
#[inline(always)]
fn gso_segments_fit<H: IpHeader>(ctx: &TcContext, proto: u8, mtu: u32) -> bool {
    // SAFETY: the context is a valid __sk_buff for the program's lifetime.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return false;
    }
    let l4_header = match proto {
        IPPROTO_TCP => match ptr_at::<[u8; 13]>(ctx, L3 + H::LEN) {
            // Data offset: high nibble of byte 12, in 32-bit words.
            // SAFETY: ptr_at checked the bounds.
            Ok(tcp) => u32::from(unsafe { (*tcp)[12] } >> 4) * 4,
            Err(_) => return false,
        },
        IPPROTO_UDP => 8,
        _ => return false,
    };
    H::LEN as u32 + l4_header + gso_size <= mtu
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
