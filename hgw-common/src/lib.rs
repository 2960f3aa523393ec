//! Types, map names and counter indices shared by the hgw eBPF programs and the agent;
//! with `user`, also the agent's status document, which the lab reads.
//!
//! Everything that crosses the user/kernel boundary is `#[repr(C)]` and
//! `bytemuck::Pod`, so hidden padding is a compile error; addresses are in network
//! byte order (stored as byte arrays, so no side has to think about endianness).
// The eBPF side is no_std; the `user` feature adds the loader, which needs std.
#![cfg_attr(not(feature = "user"), no_std)]

#[cfg(feature = "user")]
pub mod btf;
#[cfg(feature = "user")]
pub mod loader;
#[cfg(feature = "user")]
pub mod status;
#[cfg(feature = "user")]
pub mod sys;

use bytemuck::{Pod, Zeroable};

/// LPM trie: peer pod CIDR (IPv4, key data = address octets) -> [`NextHop`].
pub const MAP_ROUTES_V4: &str = "HGW_ROUTES_V4";
/// Array with one [`NodeConfig`] at index 0.
pub const MAP_CONFIG: &str = "HGW_CONFIG";
/// LPM trie: peer pod CIDR (IPv6, key data = address octets) -> [`NextHop`].
pub const MAP_ROUTES_V6: &str = "HGW_ROUTES_V6";
/// Hash: local pod IPv4 (octets) -> [`Endpoint`], for delivery straight into the pod.
pub const MAP_ENDPOINTS_V4: &str = "HGW_ENDPOINTS";
/// Hash: local pod IPv6 (octets) -> [`Endpoint`].
pub const MAP_ENDPOINTS_V6: &str = "HGW_ENDPOINTS6";
/// Per-CPU `u64` packet counters, indexed by [`counter_index`] and [`COUNTER_NOT_IP`].
pub const MAP_COUNTERS: &str = "HGW_COUNTERS";
/// The flow cache of IPv4 flows: an array of [`FLOW_SLOTS`] [`FlowSlotV4`]s, each flow in
/// the one slot its key hashes to ([`flow_slot`]), with where its packets went and until
/// when conntrack's verdict on it stands. Mmapable, so that the slots start on a page
/// and each lies on one cache line (IPv6: two).
pub const MAP_FLOWS_V4: &str = "HGW_FLOWS_V4";
/// The same for IPv6 flows ([`FlowSlotV6`]).
pub const MAP_FLOWS_V6: &str = "HGW_FLOWS_V6";
/// Array with one `u32` at index 0, which the agent changes after every write to the
/// config, routes or endpoints maps: a [`CachedFlow`] of another generation is stale.
pub const MAP_GENERATION: &str = "HGW_GENERATION";

/// Hash: interface index (`u32`) -> `DEVICE_*` bits, for the interfaces a redirect
/// starts from or skips (the uplink, the bridge, its ports) that carry something of
/// the kernel's own that the redirect would skip: a tc filter, another program, a
/// qdisc. An interface without an entry has nothing of the kind.
pub const MAP_DEVICES: &str = "HGW_DEVICES";
/// Most interfaces [`MAP_DEVICES`] can describe: every port, the bridge, the uplink.
pub const DEVICES_MAX_ENTRIES: u32 = ENDPOINTS_MAX_ENTRIES + 64;
/// [`MAP_DEVICES`]: something runs on the interface's ingress after hgw's program (a
/// tcx program attached after it, a filter of an `ingress` or `clsact` qdisc), or, for
/// the bridge when hgw sits on its ports, anything at all on its ingress: a packet
/// redirected from there would skip it.
pub const DEVICE_INGRESS: u32 = 1;
/// [`MAP_DEVICES`]: the interface's egress has a qdisc other than `noqueue`, `clsact`
/// egress filters or tcx egress programs: delivery that skips the interface's egress
/// (`bpf_redirect_peer` past a pod's host veth, or past the bridge) would skip them.
pub const DEVICE_EGRESS: u32 = 2;
/// [`MAP_DEVICES`]: a netfilter egress hook on the interface (an nftables `netdev`
/// chain on `hook egress`), which a redirect from tc ingress into the interface skips
/// as well (the kernel marks such packets `nf_skip_egress`): the fast path sends
/// nothing into the uplink, or into or past the bridge, while it is there. On a pod's
/// host veth it counts as [`DEVICE_EGRESS`]: delivered through the bridge, the packet
/// leaves the bridge's egress unmarked and the veth's hook runs.
pub const DEVICE_NF_EGRESS: u32 = 4;

/// Slots per family in the flow cache (a power of two): a flow whose slot another flow
/// took looks conntrack up again with its next packet, and takes the slot back.
pub const FLOW_SLOTS: u32 = 1 << FLOW_SLOT_BITS;
/// log2 of [`FLOW_SLOTS`].
pub const FLOW_SLOT_BITS: u32 = 16;
/// `BPF_F_MMAPABLE`: an array map whose values start on a page boundary.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Most local pods one node can deliver to directly.
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4_096;

/// Most peer pod CIDRs one node can hold in its fast-path table.
pub const ROUTES_V4_MAX_ENTRIES: u32 = 16_384;
/// The same for IPv6 pod CIDRs.
pub const ROUTES_V6_MAX_ENTRIES: u32 = 16_384;

/// Program that runs on the bridge (cni0) ingress: local pod -> peer node.
pub const PROG_TO_PEER: &str = "hgw_to_peer";
/// Program that runs on the uplink ingress: peer node -> local pod.
pub const PROG_TO_POD: &str = "hgw_to_pod";

/// Read-only globals (`.rodata`, frozen at load, so the verifier sees constants) the
/// agent sets before loading the programs.
///
/// `u32`: 1 = `established` mode (only flows conntrack accepted take the fast path),
/// 0 = `all` mode (no conntrack lookup; the lookup code is dead and pruned).
pub const GLOBAL_CONNTRACK: &str = "HGW_CONNTRACK";
/// `u32`: offset of `status` in the running kernel's `struct nf_conn` (from vmlinux BTF).
pub const GLOBAL_CT_STATUS_OFFSET: &str = "HGW_CT_STATUS_OFF";
/// `u32`: offset of `timeout` (jiffies, `u32`) in `struct nf_conn`.
pub const GLOBAL_CT_TIMEOUT_OFFSET: &str = "HGW_CT_TIMEOUT_OFF";

/// The conntrack kfuncs the programs call, with their parameter counts (checked against
/// the running kernel's BTF at load time): in vmlinux BTF when conntrack is built in, in
/// the `nf_conntrack` module's BTF when it is a module.
pub const KFUNCS: &[(&str, u16)] = &[
    ("bpf_skb_ct_lookup", 5),
    ("bpf_ct_release", 1),
    ("bpf_ct_change_timeout", 2),
    ("bpf_ct_change_status", 2),
];
/// The module holding the conntrack kfuncs when conntrack is not built in.
pub const CONNTRACK_MODULE: &str = "nf_conntrack";
/// The `struct bpf_ct_opts` size the programs pass (its first layout, which every kernel
/// with the kfuncs accepts).
pub const CT_OPTS_SIZE: u32 = 12;

/// `nf_conn.status` bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub const IPS_SEEN_REPLY: u64 = 1 << 1;
pub const IPS_ASSURED: u64 = 1 << 2;
pub const IPS_CONFIRMED: u64 = 1 << 3;
pub const IPS_SRC_NAT: u64 = 1 << 4;
pub const IPS_DST_NAT: u64 = 1 << 5;
pub const IPS_SEQ_ADJUST: u64 = 1 << 6;
pub const IPS_HELPER: u64 = 1 << 13;

/// Route protocol number hgw tags its kernel routes with (`ip route ... proto 104`).
/// hgw only ever deletes routes that carry it.
pub const ROUTE_PROTOCOL: u8 = 104;

/// [`NextHop::flags`]: the peer's MAC is known and `dst_mac` holds it.
pub const NEXT_HOP_MAC_KNOWN: u32 = 1;
/// [`NextHop::flags`], in a [`CachedFlow`] only: into a local pod with
/// `bpf_redirect_peer` (`ifindex` is its host-side veth).
pub const NEXT_HOP_POD: u32 = 2;
/// [`NextHop::flags`], in a [`CachedFlow`] only: into the bridge with
/// `bpf_redirect_neigh`, whose neighbour table supplies the pod's MAC.
pub const NEXT_HOP_BRIDGE: u32 = 4;

/// [`FlowKeyV4::side`]: seen by `hgw_to_peer` (from a local pod).
pub const FLOW_TO_PEER: u8 = 1;
/// [`FlowKeyV4::side`]: seen by `hgw_to_pod` (from the uplink).
pub const FLOW_TO_POD: u8 = 2;

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

/// A flow as one program sees it: addresses and ports in network order. 8-byte
/// aligned (no padding at that size), so the programs build and hash it in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowKeyV4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Source and destination port, as in the TCP or UDP header.
    pub ports: [u8; 4],
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `FLOW_TO_*`: which program.
    pub side: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKeyV4>() == 16);

/// [`FlowKeyV4`] for IPv6.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowKeyV6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ports: [u8; 4],
    pub proto: u8,
    pub side: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKeyV6>() == 40);

/// A flow conntrack accepted, as the program found it: its next hop, valid while the
/// maps are at `generation`, and conntrack's verdict, trusted until `recheck_at`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CachedFlow {
    /// Where its packets go; `flags` also says how (`NEXT_HOP_POD`, `NEXT_HOP_BRIDGE`,
    /// neither: out of the uplink).
    pub hop: NextHop,
    /// [`MAP_GENERATION`]'s value before the lookups that found `hop`.
    pub generation: u32,
    pub _pad: u32,
    /// Jiffies: from then on its next packet looks conntrack up again.
    pub recheck_at: u64,
}
const _: () = assert!(size_of::<CachedFlow>() == 40);

/// A slot of [`MAP_FLOWS_V4`]: one cache line. Written and read by several CPUs without
/// a lock, 8 bytes at a time, so a reader may find two writers' words mixed, or a write
/// half done: `check` ([`flow_check`] of the words before it) tells a whole slot from
/// such a mix, which counts as empty.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowSlotV4 {
    pub key: FlowKeyV4,
    pub flow: CachedFlow,
    pub check: u64,
}
const _: () = assert!(size_of::<FlowSlotV4>() == 64);

/// A slot of [`MAP_FLOWS_V6`]: two cache lines (its 88 bytes padded to 96, so a slot
/// starts at a line or in the middle of one and never reaches a third).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowSlotV6 {
    pub key: FlowKeyV6,
    pub flow: CachedFlow,
    pub check: u64,
    pub _pad: u64,
}
const _: () = assert!(size_of::<FlowSlotV6>() == 96);

/// Odd 64-bit constants (from splitmix64) for the flow cache's hashes.
const MIX_A: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX_B: u64 = 0xbf58_476d_1ce4_e5b9;
const MIX_C: u64 = 0x94d0_49bb_1331_11eb;

/// The slot of a flow key, given as its 64-bit words: a multiplicative hash whose top
/// bits take every bit of every word into account, so flows that differ in one port
/// spread over the slots.
#[inline(always)]
pub fn flow_slot(key: impl IntoIterator<Item = u64>) -> u32 {
    let h = key
        .into_iter()
        .fold(MIX_A, |h, word| (h ^ word).wrapping_mul(MIX_B));
    ((h ^ (h >> 31)).wrapping_mul(MIX_C) >> (64 - FLOW_SLOT_BITS)) as u32
}

/// The check word of a slot's key and flow, given as their 64-bit words: a sum of a
/// bijection of each word ([`flow_check_term`]), so a mix of two slots' words, or a
/// slot half written over another or over zeros, gives another value up to a chance of
/// about 2^-63; odd, so an all-zero slot never passes. The words' terms are
/// independent, so the CPU computes them side by side.
#[inline(always)]
pub fn flow_check(words: impl IntoIterator<Item = u64>) -> u64 {
    let sum = words.into_iter().enumerate().fold(0u64, |sum, (i, word)| {
        sum.wrapping_add(flow_check_term(i, word))
    });
    flow_check_finish(sum)
}

/// Word `index`'s term of [`flow_check`]: its product with an odd constant of its own,
/// folded (each step a bijection).
#[inline(always)]
pub fn flow_check_term(index: usize, word: u64) -> u64 {
    let m = word.wrapping_mul(MIX_A.wrapping_add(MIX_C.wrapping_mul(index as u64)) | 1);
    m ^ (m >> 29)
}

/// [`flow_check`] from the sum of its terms.
#[inline(always)]
pub fn flow_check_finish(sum: u64) -> u64 {
    sum | 1
}

/// This node, as the fast path needs to know it. 8-byte aligned (as the kernel keeps
/// an array map's values; the layout is the same, with no padding), so the programs
/// read its IPv6 addresses and masks as two 64-bit words rather than four 32-bit ones.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeConfig {
    /// This node's pod CIDR: network address, network byte order.
    pub pod_net_v4: [u8; 4],
    /// This node's pod CIDR: netmask, network byte order.
    pub pod_mask_v4: [u8; 4],
    /// This node's IPv6 pod CIDR: network address. All zero with the mask when the
    /// node has no IPv6 pod CIDR (IPv6 off).
    pub pod_net_v6: [u8; 16],
    /// This node's IPv6 pod CIDR: netmask.
    pub pod_mask_v6: [u8; 16],
    /// The bridge the local pods hang off (cni0): where packets to local pods go.
    pub bridge_ifindex: u32,
    /// The bridge's MTU.
    pub bridge_mtu: u32,
    /// The bridge's MAC (the pods' gateway): only frames sent to it are routed.
    pub bridge_mac: [u8; 6],
    /// The uplink's MAC: only frames sent to it are for this node.
    pub uplink_mac: [u8; 6],
    /// The pods' gateway (the bridge's address in the pod CIDR): the node's own, never
    /// a pod's.
    pub gateway_v4: [u8; 4],
    /// The IPv6 gateway; zero without IPv6.
    pub gateway_v6: [u8; 16],
    /// The cluster CIDR: only sources inside it are forwarded from the uplink.
    pub cluster_net_v4: [u8; 4],
    pub cluster_mask_v4: [u8; 4],
    /// The IPv6 cluster CIDR; zero without IPv6.
    pub cluster_net_v6: [u8; 16],
    pub cluster_mask_v6: [u8; 16],
    /// How the fast path keeps the conntrack entries of the flows it carries.
    pub ct: CtTimeouts,
    /// The kernel's IPv4 reverse-path filter for packets from the uplink: the larger
    /// of `net.ipv4.conf.{all,UPLINK}.rp_filter`, as the kernel takes it (`RP_FILTER_*`).
    pub rp_filter_uplink: u32,
    /// The same for packets from the pods, which enter the stack on the bridge.
    pub rp_filter_bridge: u32,
    /// Non-zero: a forwarded IPv4 packet's priority becomes its TOS's, as `ip_forward`
    /// sets it (`net.ipv4.ip_forward_update_priority`, on by default).
    pub update_priority: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 176);

/// `rp_filter` 0: no source check.
pub const RP_FILTER_OFF: u32 = 0;
/// `rp_filter` 1 (strict): the route back to the source must leave by the interface
/// the packet came in on.
pub const RP_FILTER_STRICT: u32 = 1;
/// `rp_filter` 2 (loose; the kernel takes any other value as this too): some route
/// back to the source must exist.
pub const RP_FILTER_LOOSE: u32 = 2;
const _: () = assert!(
    core::mem::offset_of!(NodeConfig, pod_net_v6) % 8 == 0
        && core::mem::offset_of!(NodeConfig, pod_mask_v6) % 8 == 0
        && core::mem::offset_of!(NodeConfig, gateway_v6) % 8 == 0
        && core::mem::offset_of!(NodeConfig, cluster_net_v6) % 8 == 0
        && core::mem::offset_of!(NodeConfig, cluster_mask_v6) % 8 == 0
);

/// Conntrack timeouts for `established` mode, from the node's `net.netfilter`
/// sysctls. Fast-path packets do not pass conntrack, so they do not refresh their
/// entry: the program does, from these. `*_ms` are what it sets
/// (`bpf_ct_change_timeout` takes milliseconds), the others are compared with the
/// entry's remaining time, in jiffies (what `nf_conn.timeout` holds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtTimeouts {
    /// An established TCP entry's timeout (`nf_conntrack_tcp_timeout_established`).
    pub tcp_ms: u32,
    /// Refresh a TCP entry when less than this is left (3/4 of `tcp_ms`).
    pub tcp_refresh_below: u32,
    /// A UDP entry's timeout (`nf_conntrack_udp_timeout_stream`).
    pub udp_ms: u32,
    /// Refresh a UDP entry when less than this is left.
    pub udp_refresh_below: u32,
    /// Set when a FIN passes (`nf_conntrack_tcp_timeout_time_wait`, where conntrack
    /// would end after the closing handshake).
    pub fin_ms: u32,
    /// Set when an RST passes (`nf_conntrack_tcp_timeout_close`).
    pub rst_ms: u32,
    /// A TCP entry with at most this long left is closing (a FIN or RST passed): it is
    /// never set back to the established timeout, and a SYN on its 4-tuple expires it
    /// (a reopen).
    pub closing: u32,
    /// A closing entry that a packet still uses is set back to `fin_ms` when less than
    /// this is left (half of it): a half-closed connection lives on.
    pub fin_refresh_below: u32,
    /// ... unless at most this is left (`rst_ms`): an entry an RST closed stays short.
    pub rst_closing: u32,
    /// Jiffies a carried flow's verdict is trusted without a conntrack lookup (as
    /// netfilter's flowtable trusts its entries until its next garbage collection);
    /// 0: every packet looks conntrack up.
    pub recheck: u32,
}
const _: () = assert!(size_of::<CtTimeouts>() == 40);

impl NodeConfig {
    /// Whether `addr` (network byte order) lies in this node's pod CIDR. An unset
    /// config (all zero) contains nothing.
    #[inline(always)]
    pub fn owns_v4(&self, addr: [u8; 4]) -> bool {
        in_net_v4(addr, self.pod_net_v4, self.pod_mask_v4)
    }

    /// Whether this node forwards IPv6 at all (it has an IPv6 pod CIDR).
    #[inline(always)]
    pub fn has_v6(&self) -> bool {
        self.pod_mask_v6[0] != 0
    }

    /// Whether `addr` lies in this node's IPv6 pod CIDR.
    #[inline(always)]
    pub fn owns_v6(&self, addr: [u8; 16]) -> bool {
        self.has_v6() && in_net_v6(addr, self.pod_net_v6, self.pod_mask_v6)
    }

    /// Whether `addr` lies in the IPv4 cluster CIDR.
    #[inline(always)]
    pub fn in_cluster_v4(&self, addr: [u8; 4]) -> bool {
        in_net_v4(addr, self.cluster_net_v4, self.cluster_mask_v4)
    }

    /// Whether `addr` lies in the IPv6 cluster CIDR.
    #[inline(always)]
    pub fn in_cluster_v6(&self, addr: [u8; 16]) -> bool {
        self.has_v6() && in_net_v6(addr, self.cluster_net_v6, self.cluster_mask_v6)
    }
}

/// `addr & mask == net`, with an all-zero mask containing nothing (an unset config).
#[inline(always)]
fn in_net_v4(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    let mask = u32::from_ne_bytes(mask);
    mask != 0 && u32::from_ne_bytes(addr) & mask == u32::from_ne_bytes(net)
}

/// The same for IPv6, compared as two 64-bit halves.
#[inline(always)]
fn in_net_v6(addr: [u8; 16], net: [u8; 16], mask: [u8; 16]) -> bool {
    let half = |bytes: &[u8; 16], i: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(word)
    };
    half(&addr, 0) & half(&mask, 0) == half(&net, 0)
        && half(&addr, 1) & half(&mask, 1) == half(&net, 1)
}

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// A packet counter, kept once per [`Family`]. `fwd_*` count packets the fast
        /// path took, `pass_*` packets it handed to the kernel unchanged, by reason.
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
    /// This node has no pod CIDR of the packet's family (IPv6 while IPv6 is off).
    PassFamilyOff = "pass_family_off",
    /// Not unicast to this node: broadcast or multicast, or not sent to the
    /// gateway's (bridge side) or the uplink's (uplink side) MAC.
    PassNotUnicast = "pass_not_unicast",
    /// A source the kernel would drop or not forward: IPv4 0/8, 127/8, multicast,
    /// class E; IPv6 multicast, loopback, unspecified, link-local.
    PassMartian = "pass_martian",
    /// Truncated frame or an IP header the fast path will not trust.
    PassMalformed = "pass_malformed",
    /// IPv4 options, or IPv6 extension headers other than a fragment header.
    PassIpOptions = "pass_ip_options",
    /// A fragment (IPv4: MF set or offset != 0; IPv6: a fragment header).
    PassFragment = "pass_fragment",
    /// Destination in no peer's pod CIDR (bridge side).
    PassNoRoute = "pass_no_route",
    /// The next hop's MAC is not known yet.
    PassNoMac = "pass_no_mac",
    /// TTL (hop limit) <= 1: the kernel sends ICMP time exceeded.
    PassTtl = "pass_ttl",
    /// Larger than the egress MTU: the kernel sends frag-needed / packet too big.
    PassMtu = "pass_mtu",
    /// Bridge side: destination in this node's own pod CIDR (the bridge's job).
    /// Uplink side: destination is this node's own gateway address (for the node).
    PassLocal = "pass_local",
    /// Uplink side: destination not in this node's pod CIDR.
    PassNotPod = "pass_not_pod",
    /// A source this side does not forward: uplink side, outside the cluster CIDR
    /// (e.g. a node address after masquerade); bridge side, outside this node's pod
    /// CIDR, or the gateway's own address; uplink side, also a source in this node's
    /// own pod CIDR.
    PassSource = "pass_source",
    /// `established` mode: neither TCP nor UDP (ICMP, SCTP, ...), which the conntrack
    /// lookup does not cover.
    PassCtProto = "pass_ct_proto",
    /// `established` mode: a TCP SYN, always the kernel's (a new connection or a
    /// reopen).
    PassTcpSyn = "pass_tcp_syn",
    /// `established` mode: conntrack holds no entry for the flow, or one not yet
    /// confirmed, without a reply, or (TCP) not assured: the kernel has not accepted
    /// the flow yet.
    PassCtNew = "pass_ct_new",
    /// `established` mode: the flow is NAT'd (DNAT of a Service or hostPort, SNAT or
    /// masquerade), or its packets are rewritten by a helper or sequence adjustment:
    /// the kernel translates it.
    PassCtNat = "pass_ct_nat",
    /// Of the forwarded: the packet's conntrack entry was running low and the program
    /// set it back to the full timeout (one per flow and refresh, not per packet).
    CtRefresh = "ct_refresh",
    /// Of the forwarded: a FIN or RST passed and the program shortened the entry's
    /// timeout, as conntrack would have on seeing it.
    CtClose = "ct_close",
    /// Of `pass_tcp_syn`: a SYN on the 4-tuple of a connection whose FIN or RST the
    /// fast path carried; its entry was expired so the kernel starts a new one.
    CtReopen = "ct_reopen",
    /// Of the forwarded: the flow's conntrack verdict and next hop came from the flow
    /// cache (checked less than `ct_recheck_ms` ago, the maps unchanged since): no
    /// conntrack or route lookup.
    CtCached = "ct_cached",
    /// A tc filter, another program or a qdisc on the way that a redirect would skip
    /// (`DEVICE_INGRESS` on the ingress interface, the bridge too when hgw sits on its
    /// ports; `DEVICE_NF_EGRESS` on the uplink or the bridge the packet would be sent
    /// into): the kernel runs them. (A pod whose host veth or bridge has
    /// `DEVICE_EGRESS` is not passed but delivered through the bridge, whose egress
    /// keeps them.)
    PassTcHook = "pass_tc_hook",
    /// The kernel's routing (its tables and rules, from the packet's ingress
    /// interface) sends the packet elsewhere than the fast path's next hop, drops it
    /// (blackhole, unreachable, prohibit) or would not forward it.
    PassRoute = "pass_route",
    /// `established` mode: the conntrack lookup failed with an error other than "no
    /// entry" (say, options the kernel refuses): the kernel decides. Counted, never
    /// logged per packet.
    PassCtError = "pass_ct_error",
    /// IPv4: the kernel's reverse-path filter (`rp_filter` of the uplink, or of the
    /// bridge for packets from the pods) would drop the packet: no route back to its
    /// source, or (strict) one through another interface.
    PassRpFilter = "pass_rp_filter",
    /// Bridge side: the frame's source MAC is all zeros or multicast, which a bridge
    /// drops from its ports (hgw on the ports sees such frames first).
    PassSourceMac = "pass_source_mac",
}

/// The address family a counter block belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// Both families, in counter-block order.
    pub const ALL: &[Family] = &[Family::Ipv4, Family::Ipv6];

    /// The name the agent shows (`hgw-agent status`).
    pub const fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// Counters per family.
pub const COUNTERS_PER_FAMILY: u32 = Counter::ALL.len() as u32;

/// Where `counter` of `family` lives in [`MAP_COUNTERS`].
#[inline(always)]
pub const fn counter_index(family: Family, counter: Counter) -> u32 {
    family as u32 * COUNTERS_PER_FAMILY + counter as u32
}

/// Slot in [`MAP_COUNTERS`] for frames that are neither IPv4 nor IPv6 (ARP, VLAN-tagged,
/// runts): they have no family. Shown as `pass_not_ip`.
pub const COUNTER_NOT_IP: u32 = Family::ALL.len() as u32 * COUNTERS_PER_FAMILY;
/// The name of [`COUNTER_NOT_IP`].
pub const COUNTER_NOT_IP_NAME: &str = "pass_not_ip";

/// Number of entries in [`MAP_COUNTERS`].
pub const COUNTERS_LEN: u32 = COUNTER_NOT_IP + 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)], bytemuck::Pod (no padding, every bit pattern valid).
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CachedFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowSlotV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowSlotV6 {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    fn key_v4(port: u16) -> FlowKeyV4 {
        let mut ports = [0; 4];
        ports[..2].copy_from_slice(&port.to_be_bytes());
        ports[2..].copy_from_slice(&5201u16.to_be_bytes());
        FlowKeyV4 {
            src: [10, 244, 0, 5],
            dst: [10, 244, 1, 7],
            ports,
            proto: 17,
            side: FLOW_TO_PEER,
            _pad: [0; 2],
        }
    }

    /// The first seven words of a slot, which its check covers.
    fn body(slot: &FlowSlotV4) -> [u64; 7] {
        let words: [u64; 8] = bytemuck::cast(*slot);
        std::array::from_fn(|i| words[i])
    }

    fn sealed(mut slot: FlowSlotV4) -> FlowSlotV4 {
        slot.check = flow_check(body(&slot));
        slot
    }

    fn slot_v4(port: u16, ifindex: u32) -> FlowSlotV4 {
        sealed(FlowSlotV4 {
            key: key_v4(port),
            flow: CachedFlow {
                hop: NextHop {
                    ifindex,
                    mtu: 1500,
                    dst_mac: [2, 0, 0, 0, 1, ifindex as u8],
                    src_mac: [2, 0, 0, 0, 0, 1],
                    flags: NEXT_HOP_MAC_KNOWN,
                },
                generation: 7,
                _pad: 0,
                recheck_at: 4_294_000_000 + u64::from(port),
            },
            check: 0,
        })
    }

    fn whole(slot: &FlowSlotV4) -> bool {
        flow_check(body(slot)) == slot.check
    }

    #[test]
    fn flows_that_differ_in_one_port_spread_over_the_slots() {
        let slots: std::collections::HashSet<u32> = (0..1000u16)
            .map(|p| flow_slot(bytemuck::cast::<_, [u64; 2]>(key_v4(32768 + p))))
            .collect();
        // 1,000 keys thrown at random into 65,536 slots share about 8.
        assert!(slots.len() >= 980, "{} distinct slots", slots.len());
        assert!(slots.iter().all(|&s| s < FLOW_SLOTS));
    }

    #[test]
    fn a_mix_of_two_slots_or_of_a_slot_and_zeros_is_not_whole() {
        assert!(!whole(&FlowSlotV4::zeroed()));
        for port in 1..200u16 {
            let a = slot_v4(port, 3);
            let mut refreshed = a;
            refreshed.flow.recheck_at += 100;
            // Another flow with another next hop, the same flow with another next hop,
            // the same flow refreshed.
            for b in [slot_v4(port + 1, 4), slot_v4(port, 4), sealed(refreshed)] {
                assert!(whole(&a) && whole(&b));
                let (wa, wb): ([u64; 8], [u64; 8]) = (bytemuck::cast(a), bytemuck::cast(b));
                for mask in 0..256u32 {
                    let mix: [u64; 8] =
                        std::array::from_fn(|i| if mask >> i & 1 == 1 { wb[i] } else { wa[i] });
                    let zeros: [u64; 8] =
                        std::array::from_fn(|i| if mask >> i & 1 == 1 { 0 } else { wa[i] });
                    for m in [mix, zeros] {
                        if m != wa && m != wb {
                            assert!(!whole(&bytemuck::cast(m)), "port {port} mask {mask:#x}");
                        }
                    }
                }
            }
        }
    }
}
