//! What `established` mode needs from the node's conntrack: that it tracks forwarded
//! traffic at all, and its timeouts, which the programs apply to the entries of the
//! flows they carry (fast-path packets do not refresh them).

use std::process::Command;

use hgw_common::CtTimeouts;

use super::sysctl::{self, SysctlError};

const SYSCTLS: &str = "/proc/sys/net/netfilter";
/// IPVS's table of virtual services, when the module is loaded.
pub const IPVS: &str = "/proc/net/ip_vs";
/// hgw's own nftables table (both families).
pub const NFT_TABLE: &str = "hgw";

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("{0} (is conntrack built into this kernel or loaded?)")]
    Sysctl(#[source] SysctlError),
    #[error("reading the kernel's tick length (clock_getres): {0}")]
    Tick(std::io::Error),
    #[error("installing nftables table inet {NFT_TABLE} (nft -f -): {reason}")]
    Nft { reason: String },
}

/// The timeouts, from this network namespace's `net.netfilter` sysctls, and how long a
/// carried flow's verdict is trusted (`recheck_ms`, 0: never).
pub fn timeouts(recheck_ms: u32) -> Result<CtTimeouts, ConntrackError> {
    let hz = u64::from(hz()?);
    let established = seconds("nf_conntrack_tcp_timeout_established")?;
    let udp = seconds("nf_conntrack_udp_timeout_stream")?;
    let time_wait = seconds("nf_conntrack_tcp_timeout_time_wait")?;
    let close = seconds("nf_conntrack_tcp_timeout_close")?;
    Ok(timeouts_from(
        hz,
        established,
        udp,
        time_wait,
        close,
        recheck_ms,
    ))
}

/// `all` mode's: no conntrack timeouts, only how long a flow's cached verdict (the
/// kernel's route and tc hooks, asked on a cache miss) is trusted.
pub fn recheck_only(recheck_ms: u32) -> Result<CtTimeouts, ConntrackError> {
    Ok(CtTimeouts {
        recheck: recheck_jiffies(u64::from(hz()?), recheck_ms),
        ..CtTimeouts::default()
    })
}

/// `ms` in jiffies, rounded up: a recheck is never sooner than asked, and a non-zero
/// time never becomes 0 (which would turn the flow cache off).
fn recheck_jiffies(hz: u64, ms: u32) -> u32 {
    u32::try_from((u64::from(ms) * hz).div_ceil(1000)).unwrap_or(u32::MAX)
}

/// The programs' view of the timeouts (in seconds), with `hz` jiffies a second.
fn timeouts_from(
    hz: u64,
    established: u64,
    udp: u64,
    time_wait: u64,
    close: u64,
    recheck_ms: u32,
) -> CtTimeouts {
    let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let ms = |s: u64| sat(s.saturating_mul(1000));
    // Refreshed once three quarters are left: one kfunc call per flow and quarter, and
    // a flow idle for less than that never falls back.
    let refresh_below = |s: u64| sat(s.saturating_mul(hz).saturating_mul(3) / 4);
    let tcp_refresh_below = refresh_below(established);
    CtTimeouts {
        tcp_ms: ms(established),
        tcp_refresh_below,
        udp_ms: ms(udp),
        udp_refresh_below: refresh_below(udp),
        fin_ms: ms(time_wait),
        rst_ms: ms(close),
        // Below the refresh threshold, or with a short established timeout (below
        // TIME_WAIT's) every live entry would count as closing and never be refreshed.
        closing: sat(time_wait.max(close).saturating_mul(hz)).min(tcp_refresh_below / 2),
        fin_refresh_below: sat(time_wait.saturating_mul(hz) / 2),
        rst_closing: sat(close.saturating_mul(hz)),
        recheck: recheck_jiffies(hz, recheck_ms),
    }
}

fn seconds(name: &str) -> Result<u64, ConntrackError> {
    sysctl::read(&format!("{SYSCTLS}/{name}")).map_err(ConntrackError::Sysctl)
}

/// CONFIG_HZ: `nf_conn.timeout` counts jiffies. CLOCK_MONOTONIC_COARSE advances once a
/// tick, so its resolution is the tick's length.
pub fn hz() -> Result<u32, ConntrackError> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec into `res`, which outlives the call.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(ConntrackError::Tick(std::io::Error::last_os_error()));
    }
    let tick_ns = u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(res.tv_nsec).unwrap_or(0);
    if tick_ns == 0 {
        return Err(ConntrackError::Tick(std::io::Error::other("resolution 0")));
    }
    Ok(u32::try_from(1_000_000_000u64.div_ceil(tick_ns).max(1)).unwrap_or(1000))
}

/// Whether IPVS has virtual services in this network namespace (the module merely
/// loaded lists none). Asked every second: reads up to the first service, whose line
/// follows the table's three header lines, not the whole table.
pub fn ipvs_in_use() -> bool {
    use std::io::BufRead as _;
    let Ok(table) = std::fs::File::open(IPVS) else {
        return false;
    };
    std::io::BufReader::new(table)
        .lines()
        .take(8)
        .map_while(Result::ok)
        .any(|line| {
            ["TCP ", "UDP ", "SCTP ", "FWM "]
                .iter()
                .any(|proto| line.starts_with(proto))
        })
}

/// Makes conntrack track forwarded traffic in this namespace: it only runs once some
/// rule needs it, and a node with no other rules would give the fast path no entries
/// to find. A table of hgw's own with one rule that matches on `ct state` and only
/// counts: it decides nothing. Replaced as a whole, atomically, so it is idempotent.
pub fn ensure_tracking() -> Result<(), ConntrackError> {
    let script = format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain conntrack {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct state established,related counter comment \"hgw: conntrack tracks forwarded flows for the fast path; decides nothing\"\n\
         \t}}\n\
         }}\n"
    );
    super::nft::apply(&script).map_err(|e| ConntrackError::Nft {
        reason: e.to_string(),
    })
}

/// Removes hgw's tracking table (`hgw-agent uninstall`); absent is fine.
pub fn remove_tracking() -> Result<(), ConntrackError> {
    let output = Command::new("nft")
        .args(["delete", "table", "inet", NFT_TABLE])
        .output()
        .map_err(|e| ConntrackError::Nft {
            reason: format!("running nft: {e}"),
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || stderr.contains("No such file or directory") {
        Ok(())
    } else {
        Err(ConntrackError::Nft {
            reason: stderr.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_defaults_at_250_hz() {
        // Linux's defaults: established 5 days, UDP stream 120 s, TIME_WAIT 120 s,
        // CLOSE 10 s.
        let t = timeouts_from(250, 432_000, 120, 120, 10, 100);
        assert_eq!(t.tcp_ms, 432_000_000);
        assert_eq!(t.tcp_refresh_below, 432_000 * 250 * 3 / 4);
        assert_eq!(t.udp_ms, 120_000);
        assert_eq!(t.udp_refresh_below, 120 * 250 * 3 / 4);
        assert_eq!((t.fin_ms, t.rst_ms), (120_000, 10_000));
        assert_eq!(t.closing, 120 * 250);
        assert_eq!((t.fin_refresh_below, t.rst_closing), (60 * 250, 10 * 250));
        assert_eq!(t.recheck, 25);
    }

    #[test]
    fn a_short_established_timeout_still_leaves_room_to_refresh() {
        // Established 8 s, TIME_WAIT 120 s: live entries (up to 8 s left) must not all
        // look closing.
        let t = timeouts_from(250, 8, 8, 120, 10, 0);
        assert_eq!(t.tcp_refresh_below, 8 * 250 * 3 / 4);
        assert!(t.closing < t.tcp_refresh_below, "{t:?}");
    }

    #[test]
    fn the_recheck_time_rounds_up_to_whole_jiffies() {
        assert_eq!(recheck_jiffies(250, 100), 25);
        assert_eq!(recheck_jiffies(250, 1), 1);
        assert_eq!(recheck_jiffies(1000, 0), 0);
        assert_eq!(recheck_jiffies(100, 1000), 100);
    }

    #[test]
    fn huge_timeouts_saturate() {
        let t = timeouts_from(1000, u64::MAX / 2, 1, 1, 1, 0);
        assert_eq!(t.tcp_ms, u32::MAX);
        assert_eq!(t.tcp_refresh_below, u32::MAX);
    }

    #[test]
    fn the_tick_is_found() {
        let hz = hz().expect("clock_getres");
        assert!((100..=1000).contains(&hz), "HZ {hz}");
    }
}
