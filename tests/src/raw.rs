//! Frames a pod writes itself, on a packet socket: for what its own stack would never
//! send (an 802.1Q tag on a kernel without VLAN devices, a source MAC the bridge
//! refuses), to see that hgw hands such frames to the kernel as kernel routes alone
//! would treat them.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::{Pod, in_netns, run_in_ok};

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_IP: u16 = 0x0800;
/// The source port of every frame.
const SOURCE_PORT: u16 = 40000;

/// The MAC address and ifindex of `dev` in `ns`.
pub fn link_mac(ns: &str, dev: &str) -> anyhow::Result<([u8; 6], i32)> {
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

/// What a pod writes: its frames' Ethernet header.
#[derive(Clone, Copy, Debug)]
pub struct RawFrames {
    pub dst_mac: [u8; 6],
    /// `None`: the pod's eth0's own.
    pub src_mac: Option<[u8; 6]>,
    /// An 802.1Q tag of this VLAN.
    pub vlan: Option<u16>,
}

impl RawFrames {
    /// Pod `a` writes `frames` IPv4/UDP datagrams to pod `b`'s `port` on its eth0, 2 ms
    /// apart, each numbered; returns how many distinct ones `b` received (within 2 s).
    pub fn send_and_count(&self, a: &Pod, b: &Pod, port: u16, frames: u64) -> anyhow::Result<u64> {
        let (from, to) = (a.ip, b.ip);
        let server = in_netns(&b.ns, || UdpSocket::bind(SocketAddr::from((to, port))))?
            .context("binding the receiver")?;
        server.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (own_mac, ifindex) = link_mac(&a.ns, "eth0")?;
        let sock = in_netns(&a.ns, packet_socket)??;
        for seq in 0..frames {
            let frame = self.udp_frame(self.src_mac.unwrap_or(own_mac), from, to, port, seq);
            send_frame(&sock, ifindex, self.dst_mac, &frame)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 64];
        while Instant::now() < deadline && (seen.len() as u64) < frames {
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

    /// Ethernet (optionally 802.1Q-tagged) + IPv4 + UDP to `port`, the payload `seq` as
    /// 8 bytes. UDP checksum 0 (none, allowed over IPv4).
    fn udp_frame(
        &self,
        src_mac: [u8; 6],
        from: Ipv4Addr,
        to: Ipv4Addr,
        port: u16,
        seq: u64,
    ) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let udp_len: u16 = 8 + 8;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64; // TTL
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&from.octets());
        ip[16..20].copy_from_slice(&to.octets());
        let check = !crate::frames::ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&SOURCE_PORT.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&seq.to_be_bytes());
        f
    }
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
