//! The kernel's IPv4 reverse-path filter, which the programs apply as the kernel would
//! to the packets they forward: `net.ipv4.conf.{all,DEV}.rp_filter`, the larger of the
//! two (`IN_DEV_RPFILTER`), for the uplink and the bridge. No event tells of a sysctl
//! change the agent can read, so the event loop reads them again every second.

use hgw_common::{RP_FILTER_LOOSE, RP_FILTER_OFF, RP_FILTER_STRICT};
use log::warn;

const CONF: &str = "/proc/sys/net/ipv4/conf";

#[derive(Debug, thiserror::Error)]
pub enum RpFilterError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {value:?} is not a number")]
    NotNumber { path: String, value: String },
}

/// The reverse-path filter for packets entering the stack on `uplink` and on `bridge`
/// (`RP_FILTER_*`), in that order.
pub fn modes(uplink: &str, bridge: &str) -> Result<[u32; 2], RpFilterError> {
    let all = value("all")?;
    Ok([mode(all.max(value(uplink)?)), mode(all.max(value(bridge)?))])
}

/// [`modes`], or strict for both where they cannot be read (checking more than the
/// kernel does only sends more packets its way), with a warning when the reason is
/// not `last_error`'s, which it becomes.
pub fn modes_or_strict(uplink: &str, bridge: &str, last_error: &mut Option<String>) -> [u32; 2] {
    match modes(uplink, bridge) {
        Ok(modes) => {
            *last_error = None;
            modes
        }
        Err(e) => {
            let reason = e.to_string();
            if last_error.as_ref() != Some(&reason) {
                warn!("{reason}; the fast path checks sources as with rp_filter 1");
            }
            *last_error = Some(reason);
            [RP_FILTER_STRICT; 2]
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

fn value(device: &str) -> Result<i64, RpFilterError> {
    let path = format!("{CONF}/{device}/rp_filter");
    let text = std::fs::read_to_string(&path).map_err(|source| RpFilterError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|_| RpFilterError::NotNumber {
        value: text.trim().to_owned(),
        path,
    })
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
        let err = modes("hgw-no-such-dev0", "lo").expect_err("no such device");
        assert!(
            err.to_string().contains("hgw-no-such-dev0/rp_filter"),
            "{err}"
        );
    }
}
