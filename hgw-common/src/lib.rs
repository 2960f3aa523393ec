//! Types, map names and counter indices shared by the hgw eBPF programs and the agent.
//!
//! Everything that crosses the user/kernel boundary is `#[repr(C)]` and
//! `bytemuck::Pod`, so hidden padding is a compile error; addresses are in network
//! byte order (stored as byte arrays, so no side has to think about endianness).
#![no_std]

use bytemuck::{Pod, Zeroable};

/// LPM trie: peer pod CIDR (IPv4, key data = address octets) -> [`NextHop`].
pub const MAP_ROUTES_V4: &str = "HGW_ROUTES_V4";
/// Array with one [`NodeConfig`] at index 0.
pub const MAP_CONFIG: &str = "HGW_CONFIG";
/// Hash: local pod IPv4 (octets) -> [`Endpoint`], for delivery straight into the pod.
pub const MAP_ENDPOINTS_V4: &str = "HGW_ENDPOINTS";
/// Per-CPU `u64` packet counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "HGW_COUNTERS";

/// Most local pods one node can deliver to directly.
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4_096;

/// Most peer pod CIDRs one node can hold in its fast-path table.
pub const ROUTES_V4_MAX_ENTRIES: u32 = 16_384;

/// Program that runs on the bridge (cni0) ingress: local pod -> peer node.
pub const PROG_TO_PEER: &str = "hgw_to_peer";
/// Program that runs on the uplink ingress: peer node -> local pod.
pub const PROG_TO_POD: &str = "hgw_to_pod";

/// Route protocol number hgw tags its kernel routes with (`ip route ... proto 104`).
/// hgw only ever deletes routes that carry it.
pub const ROUTE_PROTOCOL: u8 = 104;

/// [`NextHop::flags`]: the peer's MAC is known and `dst_mac` holds it.
pub const NEXT_HOP_MAC_KNOWN: u32 = 1;

/// Where a packet to a peer's pod CIDR goes: out of `ifindex`, from `src_mac` to `dst_mac`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    /// The uplink's interface index.
    pub ifindex: u32,
    /// The uplink's MTU: larger packets go to the kernel, which sends frag-needed.
    pub mtu: u32,
    /// The peer node's MAC on the shared L2 segment.
    pub dst_mac: [u8; 6],
    /// The uplink's own MAC.
    pub src_mac: [u8; 6],
    /// `NEXT_HOP_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<NextHop>() == 24);

/// A local pod, for delivery with bpf_redirect_peer: the host-side veth whose peer is
/// the pod's interface, and the pod's MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// The pod's host-side veth (a port of the bridge).
    pub ifindex: u32,
    /// The pod's MAC (on its side of the veth).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Endpoint>() == 12);

/// This node, as the fast path needs to know it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeConfig {
    /// This node's pod CIDR: network address, network byte order.
    pub pod_net_v4: [u8; 4],
    /// This node's pod CIDR: netmask, network byte order.
    pub pod_mask_v4: [u8; 4],
    /// The bridge the local pods hang off (cni0): where packets to local pods go.
    pub bridge_ifindex: u32,
    /// The bridge's MTU.
    pub bridge_mtu: u32,
    /// The bridge's MAC (the pods' gateway): only frames sent to it are routed.
    pub bridge_mac: [u8; 6],
    /// The uplink's MAC: only frames sent to it are for this node.
    pub uplink_mac: [u8; 6],
}
const _: () = assert!(size_of::<NodeConfig>() == 28);

impl NodeConfig {
    /// Whether `addr` (network byte order) lies in this node's pod CIDR. An unset
    /// config (all zero) contains nothing.
    #[inline(always)]
    pub fn owns_v4(&self, addr: [u8; 4]) -> bool {
        let addr = u32::from_ne_bytes(addr);
        let net = u32::from_ne_bytes(self.pod_net_v4);
        let mask = u32::from_ne_bytes(self.pod_mask_v4);
        mask != 0 && addr & mask == net
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Index into [`MAP_COUNTERS`]. `fwd_*` count packets the fast path took,
        /// `pass_*` packets it handed to the kernel unchanged, by reason.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$doc])* $variant,)* }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &[Counter] = &[$(Counter::$variant,)*];

            /// The name the agent shows (`hgw-agent status`).
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    /// Local pod -> peer pod: MACs rewritten, TTL - 1, redirected to the uplink.
    FwdToPeer = "fwd_to_peer",
    /// Peer -> local pod: TTL - 1, delivered (into the pod, or into the bridge).
    FwdToPod = "fwd_to_pod",
    /// Of `fwd_to_pod`: delivered straight into the pod's veth (bpf_redirect_peer),
    /// skipping the bridge.
    FwdToPodDirect = "fwd_to_pod_direct",
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    PassNotIpv4 = "pass_not_ipv4",
    /// Not unicast to this node: broadcast or multicast, or not sent to the
    /// gateway's (bridge side) or the uplink's (uplink side) MAC.
    PassNotUnicast = "pass_not_unicast",
    /// Truncated frame or an IPv4 header the fast path will not trust.
    PassMalformed = "pass_malformed",
    /// IPv4 options present.
    PassIpOptions = "pass_ip_options",
    /// A fragment (MF set or offset != 0).
    PassFragment = "pass_fragment",
    /// Destination in no peer's pod CIDR (bridge side).
    PassNoRoute = "pass_no_route",
    /// The next hop's MAC is not known yet.
    PassNoMac = "pass_no_mac",
    /// TTL <= 1: the kernel sends ICMP time exceeded.
    PassTtl = "pass_ttl",
    /// Larger than the egress MTU: the kernel sends frag-needed.
    PassMtu = "pass_mtu",
    /// Bridge side: destination in this node's own pod CIDR (the bridge's job).
    PassLocal = "pass_local",
    /// Uplink side: destination not in this node's pod CIDR.
    PassNotPod = "pass_not_pod",
    /// The redirect helper refused the packet.
    PassRedirectFailed = "pass_redirect_failed",
}

/// Number of entries in [`MAP_COUNTERS`].
pub const COUNTERS_LEN: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], bytemuck::Pod (no padding, every bit pattern valid).
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
}
