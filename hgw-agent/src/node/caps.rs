//! The capabilities the agent needs, checked before it touches anything: without them
//! it would fail halfway, with a bare EPERM from bpf() or netlink.
//!
//! CAP_NET_ADMIN: routes, neighbours, links, tcx attachment, nftables (and iptables-nft
//! with `setup_node`; also the `net.*` sysctls, which the kernel opens to it). The fast
//! path adds CAP_BPF (maps, programs, BTF) and CAP_PERFMON (the verifier refuses the
//! programs' packet and map accesses to a loader without it). CAP_SYS_ADMIN covers
//! CAP_BPF and CAP_PERFMON, as in the kernel.

use crate::config::FastPath;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const PROC_STATUS: &str = "/proc/self/status";

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading the agent's capabilities from {PROC_STATUS}: {reason}")]
    Read { reason: String },
    #[error(
        "missing capabilities: {missing} (fast_path = \"{mode}\" needs {needed}; effective set {effective:#x}); run as root, or grant them: systemd AmbientCapabilities=/CapabilityBoundingSet=, Kubernetes securityContext.capabilities.add, setpriv --ambient-caps"
    )]
    Missing {
        missing: String,
        needed: String,
        mode: &'static str,
        effective: u64,
    },
}

/// What `fast_path` needs, by name and number.
fn needed(fast_path: FastPath) -> &'static [(&'static str, u32)] {
    match fast_path {
        FastPath::Off => &[("CAP_NET_ADMIN", CAP_NET_ADMIN)],
        FastPath::Established | FastPath::All => &[
            ("CAP_BPF", CAP_BPF),
            ("CAP_NET_ADMIN", CAP_NET_ADMIN),
            ("CAP_PERFMON", CAP_PERFMON),
        ],
    }
}

fn has(effective: u64, cap: u32) -> bool {
    effective & (1 << cap) != 0
}

/// The names of the capabilities `effective` lacks for `fast_path`.
fn missing(effective: u64, fast_path: FastPath) -> Vec<&'static str> {
    needed(fast_path)
        .iter()
        .filter(|(_, cap)| {
            let covered = matches!(*cap, CAP_BPF | CAP_PERFMON) && has(effective, CAP_SYS_ADMIN);
            !has(effective, *cap) && !covered
        })
        .map(|(name, _)| *name)
        .collect()
}

/// This process's effective capability set (`CapEff` of /proc/self/status).
fn effective() -> Result<u64, CapsError> {
    let status = std::fs::read_to_string(PROC_STATUS).map_err(|e| CapsError::Read {
        reason: e.to_string(),
    })?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .ok_or_else(|| CapsError::Read {
            reason: "no CapEff line".into(),
        })?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| CapsError::Read {
        reason: format!("CapEff {:?}: {e}", hex.trim()),
    })
}

/// Fails, naming what is missing, unless the agent holds what `fast_path` needs.
pub fn check(fast_path: FastPath) -> Result<(), CapsError> {
    let effective = effective()?;
    let missing = missing(effective, fast_path);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = needed(fast_path).iter().map(|(name, _)| *name).collect();
    Err(CapsError::Missing {
        missing: missing.join(", "),
        needed: names.join(", "),
        mode: fast_path.name(),
        effective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn set(caps: &[u32]) -> u64 {
        let mut bits = 0;
        let mut i = 0;
        while i < caps.len() {
            bits |= 1 << caps[i];
            i += 1;
        }
        bits
    }

    #[test]
    fn the_three_are_enough_and_each_is_needed() {
        let three = set(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
        assert!(missing(three, FastPath::Established).is_empty());
        assert!(missing(three, FastPath::All).is_empty());
        assert_eq!(
            missing(set(&[CAP_NET_ADMIN]), FastPath::Established),
            ["CAP_BPF", "CAP_PERFMON"]
        );
        assert_eq!(
            missing(set(&[CAP_BPF, CAP_PERFMON]), FastPath::All),
            ["CAP_NET_ADMIN"]
        );
        assert_eq!(
            missing(0, FastPath::Established),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }

    #[test]
    fn kernel_routes_only_need_net_admin() {
        assert!(missing(set(&[CAP_NET_ADMIN]), FastPath::Off).is_empty());
        assert_eq!(missing(set(&[CAP_BPF]), FastPath::Off), ["CAP_NET_ADMIN"]);
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon_but_not_net_admin() {
        assert!(missing(set(&[CAP_SYS_ADMIN, CAP_NET_ADMIN]), FastPath::Established).is_empty());
        assert_eq!(
            missing(set(&[CAP_SYS_ADMIN]), FastPath::Established),
            ["CAP_NET_ADMIN"]
        );
    }

    #[test]
    fn this_process_has_a_readable_set() {
        effective().expect("CapEff");
    }
}
