//! The packet headers as the programs read them: network-types' layouts, but aligned as
//! the kernel keeps them in an skb, so that the compiler reads addresses, the IPv4
//! checksum and the ports as 32- and 64-bit words. network-types declares its fields
//! as byte arrays (alignment 1), and the BPF backend turns every read of one into
//! single-byte loads: 16 loads and as many shifts for one IPv6 address.
//!
//! The alignment is the kernel's own assumption: an IP header sits NET_IP_ALIGN bytes
//! past an aligned boundary less the 14-byte Ethernet header, so at a 16-byte boundary
//! where NET_IP_ALIGN is 2, and the verifier checks packet loads against exactly that
//! where alignment matters to the CPU. Where it does not (x86, arm64: NET_IP_ALIGN 0,
//! the header 2 bytes off), the verifier allows unaligned packet loads and the CPU
//! takes them at full speed.

/// An IPv4 header without options (network-types' `Ipv4Hdr`).
#[repr(C, align(4))]
pub struct Ip4 {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frags: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
}
const _: () = assert!(size_of::<Ip4>() == 20);

impl Ip4 {
    pub const LEN: usize = size_of::<Ip4>();

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vihl >> 4
    }

    /// The header's length in bytes.
    #[inline(always)]
    pub fn ihl(&self) -> u8 {
        (self.vihl & 0x0f) << 2
    }

    #[inline(always)]
    pub fn tot_len(&self) -> u16 {
        u16::from_be_bytes(self.tot_len)
    }

    /// Whether the one's complement sum over the 20-byte header is 0xffff: summed as
    /// five 32-bit words, then folded, which gives the same 16-bit sum.
    #[inline(always)]
    pub fn checksum_ok(&self) -> bool {
        // SAFETY: the header is 20 bytes, aligned for u32 (see the module's note).
        let words = unsafe { &*(self as *const Ip4).cast::<[u32; 5]>() };
        let mut sum = 0u64;
        for word in words {
            sum += u64::from(*word);
        }
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum == 0xffff
    }
}

/// A fixed IPv6 header (network-types' `Ipv6Hdr`): the addresses at 8-byte boundaries.
#[repr(C, align(8))]
pub struct Ip6 {
    pub vcf: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}
const _: () = assert!(size_of::<Ip6>() == 40);

impl Ip6 {
    pub const LEN: usize = size_of::<Ip6>();

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vcf[0] >> 4
    }
}

/// An IPv6 address as two 64-bit words, each in network byte order read as a native
/// integer (so `u64::from_be` gives its numeric value).
#[inline(always)]
pub fn halves(addr: [u8; 16]) -> [u64; 2] {
    // SAFETY: 16 plain bytes as two u64s, every bit pattern valid.
    unsafe { core::mem::transmute(addr) }
}

/// The first 16 bytes of a TCP header: ports, sequence numbers, data offset, flags.
#[repr(C, align(4))]
pub struct TcpHead {
    pub ports: [u8; 4],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    pub data_offset: u8,
    pub flags: u8,
    pub window: [u8; 2],
}
const _: () = assert!(size_of::<TcpHead>() == 16);

/// The ports of a UDP (or TCP) header, as one word.
#[repr(C, align(4))]
pub struct Ports(pub [u8; 4]);
