//! IPsec (xfrm) policies over forwarded pod traffic. After routing, the kernel looks a
//! forwarded packet up in the node's xfrm policies: a `dir out` policy encrypts it (or,
//! with no state to do it with yet, holds or drops it), a `dir fwd` policy drops what
//! should have come in protected, and a default of `block` drops what no policy
//! allows. A redirect skips all of it, so the fast path must not run while a policy
//! covers pod traffic. netlink-packet-route does not speak NETLINK_XFRM; its messages
//! here are fixed structs, read at their offsets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::sys::Socket;

use super::netlink;

const NETLINK_XFRM: isize = 6;
const XFRM_MSG_NEWPOLICY: u16 = 0x13;
const XFRM_MSG_GETPOLICY: u16 = 0x15;
const XFRM_MSG_GETDEFAULT: u16 = 0x28;
/// `struct xfrm_userpolicy_info` up to `share`: the selector (56 bytes: daddr, saddr,
/// ports and masks, family at 40, prefixlen_d at 42, prefixlen_s at 43), the lifetimes
/// (96), priority, index, then dir at 160 and action at 161.
const POLICY_INFO_LEN: usize = 164;
const SEL_DADDR: usize = 0;
const SEL_SADDR: usize = 16;
const SEL_FAMILY: usize = 40;
const SEL_PREFIXLEN_D: usize = 42;
const SEL_PREFIXLEN_S: usize = 43;
const POLICY_DIR: usize = 160;
const POLICY_ACTION: usize = 161;
const XFRM_POLICY_OUT: u8 = 1;
const XFRM_POLICY_FWD: u8 = 2;
const XFRM_POLICY_BLOCK: u8 = 1;
/// `struct xfrm_userpolicy_default`: in, fwd, out; `XFRM_USERPOLICY_BLOCK` is 1.
const DEFAULT_FWD: usize = 1;
const DEFAULT_OUT: usize = 2;
const XFRM_USERPOLICY_BLOCK: u8 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    #[error("opening a NETLINK_XFRM socket to read the IPsec policies: {0}")]
    Socket(#[source] std::io::Error),
    #[error("asking the kernel for its IPsec {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Which way an xfrm policy applies.
fn dir_name(dir: u8) -> &'static str {
    match dir {
        0 => "in",
        XFRM_POLICY_OUT => "out",
        XFRM_POLICY_FWD => "fwd",
        _ => "?",
    }
}

/// The first of the node's xfrm policies that could take part in forwarding a packet
/// from one address of `cluster` to another (a `dir out` or `dir fwd` policy whose
/// selector's source and destination prefixes both meet the cluster CIDRs, whatever its
/// protocol, ports or device), or a default of `block` for either direction, described
/// as `ip xfrm` would show it. `None` where no policy can exist (see
/// [`xfrm_reachable`]).
pub fn pod_traffic_policy(cluster: &[IpNet]) -> Result<Option<String>, XfrmError> {
    if !xfrm_reachable() {
        return Ok(None);
    }
    // Once more on a failure, on a socket of its own: a failure takes the fast path off.
    check(cluster).or_else(|_| check(cluster))
}

fn check(cluster: &[IpNet]) -> Result<Option<String>, XfrmError> {
    let socket = match netlink::open(NETLINK_XFRM).map_err(XfrmError::Socket) {
        Ok(socket) => socket,
        // A kernel without xfrm_user: no policy was set through netlink, and none
        // can be read.
        Err(XfrmError::Socket(e)) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    for (kind, payload) in request(&socket, XFRM_MSG_GETPOLICY, true, "policies")? {
        if kind != XFRM_MSG_NEWPOLICY {
            continue;
        }
        if let Some(found) = covering(&payload, cluster) {
            return Ok(Some(found));
        }
    }
    let defaults = match request(&socket, XFRM_MSG_GETDEFAULT, false, "default policies") {
        Ok(defaults) => defaults,
        // Before Linux 5.16 there are none (all accept): the message is unknown there.
        Err(XfrmError::Request { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    for (_, payload) in defaults
        .iter()
        .filter(|(kind, _)| *kind == XFRM_MSG_GETDEFAULT)
    {
        for (at, dir) in [(DEFAULT_FWD, "fwd"), (DEFAULT_OUT, "out")] {
            if payload.get(at) == Some(&XFRM_USERPOLICY_BLOCK) {
                return Ok(Some(format!("policy default {dir} block")));
            }
        }
    }
    Ok(None)
}

/// Whether asking could find a policy without loading a module: opening a NETLINK_XFRM
/// socket where xfrm_user is neither loaded nor built in makes the kernel load it, which
/// the agent must not do to a node that never used IPsec (and then no policy was set
/// through netlink). Once it is there, the kernel's own NETLINK_XFRM socket is listed in
/// this namespace's /proc/net/netlink. With af_key loaded (PF_KEY, whose policies
/// netlink lists too), or the table unreadable: ask.
fn xfrm_reachable() -> bool {
    std::path::Path::new("/sys/module/af_key").exists()
        || netlink::kernel_socket_listed(NETLINK_XFRM)
}

/// A request with a zeroed payload of four bytes (a dump reads none, and
/// `struct xfrm_userpolicy_default` is three).
fn request(
    socket: &Socket,
    kind: u16,
    dump: bool,
    what: &'static str,
) -> Result<Vec<(u16, Vec<u8>)>, XfrmError> {
    netlink::request(socket, kind, dump, &[0; 4])
        .map_err(|source| XfrmError::Request { what, source })
}

/// `payload`, a `struct xfrm_userpolicy_info`, described if it is an `out` or `fwd`
/// policy whose selector meets `cluster` on both ends.
fn covering(payload: &[u8], cluster: &[IpNet]) -> Option<String> {
    if payload.len() < POLICY_INFO_LEN {
        return None;
    }
    let dir = payload[POLICY_DIR];
    if dir != XFRM_POLICY_OUT && dir != XFRM_POLICY_FWD {
        return None;
    }
    let family = u16::from_ne_bytes([payload[SEL_FAMILY], payload[SEL_FAMILY + 1]]);
    let prefix = |at: usize, len: u8| -> Option<IpNet> {
        let addr = match family {
            AF_INET => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&payload[at..at + 4]).ok()?,
            )),
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&payload[at..at + 16]).ok()?,
            )),
            // Another family's selector, or none (AF_UNSPEC): taken as any address.
            _ => return None,
        };
        IpNet::new(addr, len).ok().map(|net| net.trunc())
    };
    let src = prefix(SEL_SADDR, payload[SEL_PREFIXLEN_S]);
    let dst = prefix(SEL_DADDR, payload[SEL_PREFIXLEN_D]);
    let meets = |side: Option<IpNet>| match side {
        None => true,
        Some(net) => cluster.iter().any(|c| c.contains(&net) || net.contains(c)),
    };
    if !(meets(src) && meets(dst)) {
        return None;
    }
    let any = || "any".to_owned();
    let mut found = format!(
        "policy src {} dst {} dir {}",
        src.map_or_else(any, |n| n.to_string()),
        dst.map_or_else(any, |n| n.to_string()),
        dir_name(dir)
    );
    if payload[POLICY_ACTION] == XFRM_POLICY_BLOCK {
        found.push_str(" action block");
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `struct xfrm_userpolicy_info` for IPv4 `src` -> `dst` in `dir`.
    fn policy(src: ([u8; 4], u8), dst: ([u8; 4], u8), dir: u8) -> Vec<u8> {
        let mut p = vec![0u8; 168];
        p[SEL_DADDR..SEL_DADDR + 4].copy_from_slice(&dst.0);
        p[SEL_SADDR..SEL_SADDR + 4].copy_from_slice(&src.0);
        p[SEL_FAMILY..SEL_FAMILY + 2].copy_from_slice(&AF_INET.to_ne_bytes());
        p[SEL_PREFIXLEN_D] = dst.1;
        p[SEL_PREFIXLEN_S] = src.1;
        p[POLICY_DIR] = dir;
        p
    }

    fn cluster() -> Vec<IpNet> {
        vec!["10.244.0.0/16".parse().expect("a CIDR")]
    }

    #[test]
    fn a_policy_between_pod_cidrs_covers_pod_traffic() {
        let p = policy(
            ([10, 244, 1, 0], 24),
            ([10, 244, 2, 0], 24),
            XFRM_POLICY_OUT,
        );
        assert_eq!(
            covering(&p, &cluster()).as_deref(),
            Some("policy src 10.244.1.0/24 dst 10.244.2.0/24 dir out")
        );
        // Wider than the cluster on one side, and a fwd block policy.
        let mut p = policy(([0, 0, 0, 0], 0), ([10, 244, 2, 7], 32), XFRM_POLICY_FWD);
        p[POLICY_ACTION] = XFRM_POLICY_BLOCK;
        assert_eq!(
            covering(&p, &cluster()).as_deref(),
            Some("policy src 0.0.0.0/0 dst 10.244.2.7/32 dir fwd action block")
        );
    }

    #[test]
    fn policies_elsewhere_or_inbound_do_not() {
        // The node's own traffic to another site.
        let p = policy(
            ([192, 168, 1, 0], 24),
            ([10, 244, 2, 0], 24),
            XFRM_POLICY_OUT,
        );
        assert_eq!(covering(&p, &cluster()), None);
        // `dir in` applies to what is delivered locally, not forwarded.
        let p = policy(([10, 244, 1, 0], 24), ([10, 244, 2, 0], 24), 0);
        assert_eq!(covering(&p, &cluster()), None);
        // IPv6 cluster, IPv4 policy.
        let v6: Vec<IpNet> = vec!["fd00:244::/48".parse().expect("a CIDR")];
        let p = policy(
            ([10, 244, 1, 0], 24),
            ([10, 244, 2, 0], 24),
            XFRM_POLICY_OUT,
        );
        assert_eq!(covering(&p, &v6), None);
        // Too short to be a policy.
        assert_eq!(covering(&[0; 100], &cluster()), None);
    }
}
