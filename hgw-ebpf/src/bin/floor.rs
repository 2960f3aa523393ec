//! The benchmark's floor: the cheapest forwarding a TC program can do on the bench's
//! wiring, the limit hgw's fast path is measured against (`cargo xtask bench`, mode
//! `floor`). Not part of the agent: xtask builds this binary itself.
//!
//! - `floor_to_uplink` (ingress of the pod's host veth): every IP frame gets fixed MACs
//!   (the peer node's uplink as destination, this node's uplink as source) and is
//!   redirected out of the uplink.
//! - `floor_to_pod` (ingress of the uplink): every IP frame gets fixed MACs (the pod's
//!   as destination, its host veth's as source) and is redirected into the pod
//!   (`bpf_redirect_peer`).
//!
//! - `floor_empty`: returns TC_ACT_OK, nothing else; the cost bench's reference for
//!   what running any program costs (never attached).
//!
//! No parsing past the ethertype, no lookup, no checks (not even the TTL): whatever
//! a forwarder must do on top of this is its own cost. Anything not IP (ARP) goes to
//! the kernel. The interface and MACs are read-only globals set at load time.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::generated::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};

/// Where a program sends frames and the MACs it writes, as four words: the ifindex,
/// then the 12 bytes of destination and source MAC in frame order, read as native u32s
/// (xtask builds them so). Words, so reading them is four loads.
#[unsafe(no_mangle)]
static FLOOR_TO_UPLINK: [u32; 4] = [0; 4];
#[unsafe(no_mangle)]
static FLOOR_TO_POD: [u32; 4] = [0; 4];

/// The ethertypes as they sit in the frame (big-endian), read as a native u16.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const ETH_HLEN: usize = 14;

#[classifier]
fn floor_to_uplink(ctx: TcContext) -> i32 {
    // SAFETY: a read-only global of the object, set by the loader.
    let hop = unsafe { read(&FLOOR_TO_UPLINK) };
    if !rewrite(&ctx, &hop) {
        return TC_ACT_OK;
    }
    // SAFETY: a helper call with plain integer arguments.
    unsafe { bpf_redirect(hop[0], 0) as i32 }
}

#[classifier]
fn floor_to_pod(ctx: TcContext) -> i32 {
    // SAFETY: a read-only global of the object, set by the loader.
    let hop = unsafe { read(&FLOOR_TO_POD) };
    if !rewrite(&ctx, &hop) {
        return TC_ACT_OK;
    }
    // SAFETY: a helper call with plain integer arguments.
    unsafe { bpf_redirect_peer(hop[0], 0) as i32 }
}

#[classifier]
fn floor_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// A hop global's words. Volatile: the compiler would otherwise fold in the zeroes it
/// was compiled with; the loader sets the real values.
///
/// # Safety
/// `hop` must be one of the globals above.
#[inline(always)]
unsafe fn read(hop: &[u32; 4]) -> [u32; 4] {
    // SAFETY: a valid, aligned reference, per the caller.
    unsafe { core::array::from_fn(|i| core::ptr::read_volatile(&hop[i])) }
}

/// Writes the hop's MACs into an IP frame; false (frame untouched) when not IP.
#[inline(always)]
fn rewrite(ctx: &TcContext, hop: &[u32; 4]) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    // The bound the verifier needs before any access to the frame.
    if data + ETH_HLEN > end {
        return false;
    }
    let eth = data as *mut u8;
    // SAFETY: the 14-byte Ethernet header lies within [data, end), checked above.
    unsafe {
        let proto = core::ptr::read_unaligned(eth.add(12).cast::<u16>());
        if proto != ETH_P_IPV4_BE && proto != ETH_P_IPV6_BE {
            return false;
        }
        for (i, word) in hop[1..].iter().enumerate() {
            core::ptr::write_unaligned(eth.add(4 * i).cast::<[u8; 4]>(), word.to_ne_bytes());
        }
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
