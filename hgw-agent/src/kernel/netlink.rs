//! Plain netlink requests for the families netlink-packet-route does not speak
//! (NETLINK_XFRM, NETLINK_NETFILTER): one blocking socket per question, whose reads give
//! up after a second, and the answer's messages as (type, payload) pairs.

use rtnetlink::sys::{Socket, SocketAddr};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
/// A dump's flags.
pub const NLM_F_DUMP: u16 = 0x300;
/// The kernel's state changed while it dumped: the answer may miss or repeat entries.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_HDRLEN: usize = 16;

/// A socket of `protocol` whose reads give up after a second: the loop that asks must
/// not hang on a kernel that does not answer.
pub fn open(protocol: isize) -> std::io::Result<Socket> {
    use std::os::fd::AsRawFd as _;
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid socket and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// Sends a request of `kind` with `payload` (`dump`: all of them) and returns the
/// answer's messages (type, payload) until it is done; an error the kernel answers
/// with, a truncated message or an interrupted dump is an error.
pub fn request(
    socket: &Socket,
    kind: u16,
    dump: bool,
    payload: &[u8],
) -> std::io::Result<Vec<(u16, Vec<u8>)>> {
    let flags = if dump {
        NLM_F_REQUEST | NLM_F_DUMP
    } else {
        NLM_F_REQUEST
    };
    let len = NLMSG_HDRLEN + payload.len();
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(payload);
    socket.send(&message, 0)?;
    let mut payloads = Vec::new();
    loop {
        let datagram = match socket.recv_from_full() {
            Ok((datagram, _)) => datagram,
            // A signal (a child of the agent's exiting): with a receive timeout set, the
            // kernel does not restart the call.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = datagram.as_slice();
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            if len < NLMSG_HDRLEN || len > rest.len() {
                // Part of an answer is not an answer: nothing can be ruled out.
                return Err(invalid("a truncated netlink message"));
            }
            if flags & NLM_F_DUMP_INTR != 0 {
                return Err(invalid("the dump was interrupted by a change"));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            match kind {
                // Both carry an error number first (0: none); a dump's end too.
                NLMSG_DONE | NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code != 0 {
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                    return Ok(payloads);
                }
                _ => payloads.push((kind, payload.to_vec())),
            }
            if !dump {
                return Ok(payloads);
            }
            // Messages are 4-byte aligned.
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Whether the kernel's own socket of netlink `protocol` is listed in this namespace's
/// /proc/net/netlink: the module behind it is loaded (or built in), so a socket of it
/// loads nothing. Unreadable: `true`.
pub fn kernel_socket_listed(protocol: isize) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/netlink") else {
        return true;
    };
    let protocol = protocol.to_string();
    table
        .lines()
        .skip(1)
        .any(|line| line.split_whitespace().nth(1) == Some(protocol.as_str()))
}
