//! What the kernel's IPv4 forwarding does by its sysctls that the programs must do as
//! it would: the reverse-path filter, `net.ipv4.conf.{all,DEV}.rp_filter`, the larger
//! of the two (`IN_DEV_RPFILTER`), for the uplink and the bridge; and
//! `net.ipv4.ip_forward_update_priority`, with which `ip_forward` sets a packet's
//! priority from its TOS; and `net.ipv6.conf.DEV.disable_ipv6`, with which the kernel
//! drops every IPv6 packet coming in on DEV (`ipv6_rcv`) or going out of it
//! (`ip6_output`). No event tells of a sysctl change the agent can read, so the
//! event loop reads them again every second.

use hgw_common::{RP_FILTER_LOOSE, RP_FILTER_OFF, RP_FILTER_STRICT};
use log::warn;

use super::sysctl::{self, SysctlError};

const CONF: &str = "/proc/sys/net/ipv4/conf";
const CONF_V6: &str = "/proc/sys/net/ipv6/conf";
const UPDATE_PRIORITY: &str = "/proc/sys/net/ipv4/ip_forward_update_priority";

/// The sysctls, as the programs take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// The reverse-path filter for packets entering the stack on the uplink and on the
    /// bridge (`RP_FILTER_*`), in that order.
    pub rp_filter: [u32; 2],
    /// Forwarded IPv4 packets get their TOS's priority.
    pub update_priority: bool,
    /// IPv6 is disabled on the uplink, on the bridge (or the kernel has none): the
    /// kernel forwards no IPv6 through them.
    pub ipv6_disabled: [bool; 2],
}

impl Forwarding {
    /// Whether the kernel forwards IPv6 between the uplink and the bridge.
    pub fn ipv6_forwarded(&self) -> bool {
        self.ipv6_disabled == [false; 2]
    }
}

impl Forwarding {
    /// What the kernel does where nothing could be read: checks sources strictly
    /// (checking more than the kernel does only sends more packets its way), and the
    /// priority update is its default, and IPv6 is left to it.
    const SAFE: Self = Self {
        rp_filter: [RP_FILTER_STRICT; 2],
        update_priority: true,
        ipv6_disabled: [true; 2],
    };
}

/// The sysctls for packets entering the stack on `uplink` and on `bridge`.
pub fn read(uplink: &str, bridge: &str) -> Result<Forwarding, SysctlError> {
    let all = sysctl::read::<i64>(&format!("{CONF}/all/rp_filter"))?;
    let rp_filter = [
        mode(all.max(sysctl::read::<i64>(&format!("{CONF}/{uplink}/rp_filter"))?)),
        mode(all.max(sysctl::read::<i64>(&format!("{CONF}/{bridge}/rp_filter"))?)),
    ];
    // Before Linux 4.19 there is no such sysctl, and `ip_forward` always did it.
    let update_priority = match sysctl::read::<i64>(UPDATE_PRIORITY) {
        Err(e) if e.is_missing() => true,
        other => other? != 0,
    };
    Ok(Forwarding {
        rp_filter,
        update_priority,
        ipv6_disabled: [ipv6_disabled(uplink)?, ipv6_disabled(bridge)?],
    })
}

/// `disable_ipv6` of `dev`; where the kernel has no IPv6 (`ipv6.disable=1`) there is
/// no such file, and no IPv6 either.
fn ipv6_disabled(dev: &str) -> Result<bool, SysctlError> {
    match sysctl::read::<i64>(&format!("{CONF_V6}/{dev}/disable_ipv6")) {
        Err(e) if e.is_missing() => Ok(true),
        other => Ok(other? != 0),
    }
}

/// [`read`], or [`Forwarding::SAFE`] where they cannot be read, with a warning when the
/// reason is not `last_error`'s, which it becomes.
pub fn read_or_safe(uplink: &str, bridge: &str, last_error: &mut Option<String>) -> Forwarding {
    match read(uplink, bridge) {
        Ok(forwarding) => {
            *last_error = None;
            forwarding
        }
        Err(e) => {
            let reason = e.to_string();
            if last_error.as_ref() != Some(&reason) {
                warn!(
                    "{reason}; the fast path checks sources as with rp_filter 1, sets priorities from the TOS and leaves IPv6 to the kernel"
                );
            }
            *last_error = Some(reason);
            Forwarding::SAFE
        }
    }
}

/// What the kernel makes of a value: 0 none, 1 strict, any other loose
/// (`__fib_validate_source` tests only for 1).
fn mode(value: i64) -> u32 {
    match value {
        0 => RP_FILTER_OFF,
        1 => RP_FILTER_STRICT,
        _ => RP_FILTER_LOOSE,
    }
}

/// The name the programs' status and logs give a mode.
pub fn name(mode: u32) -> &'static str {
    match mode {
        RP_FILTER_OFF => "off",
        RP_FILTER_STRICT => "strict",
        _ => "loose",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_takes_any_value_but_0_and_1_as_loose() {
        assert_eq!(mode(0), RP_FILTER_OFF);
        assert_eq!(mode(1), RP_FILTER_STRICT);
        assert_eq!(mode(2), RP_FILTER_LOOSE);
        assert_eq!(mode(7), RP_FILTER_LOOSE);
        assert_eq!(mode(-1), RP_FILTER_LOOSE);
    }

    #[test]
    fn no_ipv6_sysctls_means_no_ipv6() {
        assert!(ipv6_disabled("hgw-no-such-dev0").expect("a missing file is an answer"));
    }

    #[test]
    fn a_device_that_is_not_there_is_named() {
        let err = read("hgw-no-such-dev0", "lo").expect_err("no such device");
        assert!(
            err.to_string().contains("hgw-no-such-dev0/rp_filter"),
            "{err}"
        );
    }
}
