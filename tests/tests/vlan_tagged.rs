//! A VLAN-tagged frame is the kernel's, not the fast path's (issue 9, "other kernel
//! duties"). The kernel lifts an 802.1Q tag out of the frame into the skb before TC
//! ingress (`vlan_present`), so the bytes the program sees look like plain IPv4;
//! forwarding them would carry a frame of VLAN 100 as if it were untagged. The kernel
//! drops it: cni0 has no VLAN 100 device, so the frame is not for the node
//! (PACKET_OTHERHOST).
//!
//! This kernel is built without 802.1Q devices (CONFIG_VLAN_8021Q unset: `ip link add
//! ... type vlan` fails), so pod n1p1 writes the frames itself on a packet socket:
//! Ethernet to n1's cni0 MAC, an 802.1Q tag for VLAN 100, then IPv4/UDP from its own
//! address to pod n2p1 (so no other rule, such as the source check, applies). The same
//! frame without the tag is the control.
//!
//! `all` mode (no conntrack lookup, so nothing else hides the difference): untagged
//! frames arrive over the fast path (`fwd_to_peer` on n1), tagged ones do not arrive and
//! n1 counts them as `pass_not_ip`, none as `fwd_to_peer`. With kernel routes alone
//! (`--fast-path off`) the answers are the same: tagged nothing, untagged all.
//!
//! With the program before the VLAN rule, the tagged frames would have counted as
//! `fwd_to_peer` on n1 (behind the lifted tag is a valid IPv4 packet from a pod to a
//! peer's pod, sent to the gateway's MAC), failing the counter assertions.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, Pod, counter, in_netns, run_in_ok};

/// Frames per round.
const FRAMES: u64 = 50;
const VLAN: u16 = 100;
const PORT: u16 = 5501;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_IP: u16 = 0x0800;

#[test]
fn vlan_tagged_frames_go_to_the_kernel() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let cni0_mac = link(&lab.nodes[0].ns, "cni0")?.0;
    for mode in ["all", "off"] {
        for node in 0..2 {
            lab.start_agent(node, &["--fast-path", mode])?;
        }
        for agent in lab.agents() {
            agent.wait_ready(Duration::from_secs(15))?;
        }
        for vlan in [None, Some(VLAN)] {
            let before = lab.statuses()?;
            let arrived = send_and_count(&a, &b, cni0_mac, vlan)?;
            let after = lab.statuses()?;
            let delta = |node: usize, name: &str| {
                counter(&after[node], name) - counter(&before[node], name)
            };
            let (not_ip, fwd) = (delta(0, "other.pass_not_ip"), delta(0, "ipv4.fwd_to_peer"));
            eprintln!(
                "{mode}, vlan {vlan:?}: {arrived} of {FRAMES} arrived; n1 pass_not_ip +{not_ip} fwd_to_peer +{fwd}"
            );
            match vlan {
                None => ensure!(
                    arrived == FRAMES,
                    "{mode}: untagged control, {arrived} of {FRAMES} arrived"
                ),
                Some(_) => ensure!(
                    arrived == 0,
                    "{mode}: {arrived} of {FRAMES} tagged frames arrived; the kernel drops them"
                ),
            }
            if mode == "all" {
                match vlan {
                    None => ensure!(
                        fwd >= FRAMES,
                        "untagged: n1 fwd_to_peer grew by {fwd} for {FRAMES} frames"
                    ),
                    Some(_) => ensure!(
                        not_ip >= FRAMES && fwd == 0,
                        "tagged: n1 pass_not_ip +{not_ip} (expected >= {FRAMES}), fwd_to_peer +{fwd} (expected 0)"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// The MAC address and ifindex of `dev` in `ns`.
fn link(ns: &str, dev: &str) -> anyhow::Result<([u8; 6], i32)> {
    let out = run_in_ok(ns, "ip", &["-j", "link", "show", "dev", dev])?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = json[0]["address"]
        .as_str()
        .with_context(|| format!("{ns}: {dev} has no MAC"))?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    let ifindex = json[0]["ifindex"]
        .as_i64()
        .with_context(|| format!("{ns}: {dev} has no ifindex"))?;
    Ok((mac, i32::try_from(ifindex)?))
}

/// Pod `a` writes [`FRAMES`] UDP frames to pod `b` on its eth0, addressed to `gw_mac`
/// (tagged with `vlan` if given); returns how many distinct ones `b` received.
fn send_and_count(a: &Pod, b: &Pod, gw_mac: [u8; 6], vlan: Option<u16>) -> anyhow::Result<u64> {
    let server = in_netns(&b.ns, || UdpSocket::bind(SocketAddr::from((b.ip, PORT))))?
        .context("binding the receiver")?;
    server.set_read_timeout(Some(Duration::from_millis(100)))?;
    let (src_mac, ifindex) = link(&a.ns, "eth0")?;
    let sock = in_netns(&a.ns, packet_socket)??;
    for seq in 0..FRAMES {
        let frame = udp_frame(gw_mac, src_mac, vlan, a.ip, b.ip, seq);
        send_frame(&sock, ifindex, gw_mac, &frame)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && (seen.len() as u64) < FRAMES {
        match server.recv(&mut buf) {
            Ok(8) => {
                seen.insert(u64::from_be_bytes(buf[..8].try_into()?));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    Ok(seen.len() as u64)
}

/// An AF_PACKET raw socket (created in the calling thread's namespace).
fn packet_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "socket(AF_PACKET): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_frame(sock: &OwnedFd, ifindex: i32, dst: [u8; 6], frame: &[u8]) -> anyhow::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_ll; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = u16::from_be_bytes(frame[12..14].try_into()?).to_be();
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    // SAFETY: the buffer and address are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    ensure!(
        usize::try_from(n).ok() == Some(frame.len()),
        "sendto(AF_PACKET): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Ethernet (optionally 802.1Q-tagged) + IPv4 + UDP to [`PORT`], the payload `seq` as 8
/// bytes. UDP checksum 0 (none, allowed over IPv4).
fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    from: Ipv4Addr,
    to: Ipv4Addr,
    seq: u64,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let udp_len: u16 = 8 + 8;
    let total: u16 = 20 + udp_len;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&to.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    // Folded twice: fits 16 bits.
    ip[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&seq.to_be_bytes());
    f
}
