//! What the kernel's IPv4 forwarding does by its sysctls that the programs must do as
//! it would: the reverse-path filter, `net.ipv4.conf.{all,DEV}.rp_filter`, the larger
//! of the two (`IN_DEV_RPFILTER`), for the uplink and the bridge; and
//! `net.ipv4.ip_forward_update_priority`, with which `ip_forward` sets a packet's
//! priority from its TOS. No event tells of a sysctl change the agent can read, so the
//! event loop reads them again every second.

use hgw_common::{RP_FILTER_LOOSE, RP_FILTER_OFF, RP_FILTER_STRICT};
use log::warn;

use super::sysctl::{self, SysctlError};

const CONF: &str = "/proc/sys/net/ipv4/conf";
const UPDATE_PRIORITY: &str = "/proc/sys/net/ipv4/ip_forward_update_priority";

/// The sysctls, as the programs take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// The reverse-path filter for packets entering the stack on the uplink and on the
    /// bridge (`RP_FILTER_*`), in that order.
    pub rp_filter: [u32; 2],
    /// Forwarded IPv4 packets get their TOS's priority.
    pub update_priority: bool,
}

impl Forwarding {
    /// What the kernel does where nothing could be read: checks sources strictly
    /// (checking more than the kernel does only sends more packets its way), and the
    /// priority update is its default.
    const SAFE: Self = Self {
        rp_filter: [RP_FILTER_STRICT; 2],
        update_priority: true,
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
    })
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
                    "{reason}; the fast path checks sources as with rp_filter 1 and sets priorities from the TOS"
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
    fn a_device_that_is_not_there_is_named() {
        let err = read("hgw-no-such-dev0", "lo").expect_err("no such device");
        assert!(
            err.to_string().contains("hgw-no-such-dev0/rp_filter"),
            "{err}"
        );
    }
}
