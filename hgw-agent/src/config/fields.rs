//! Checks of single values: required fields, file paths, interface names, CIDRs.

use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::ConfigError;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

pub(super) fn required(
    value: Option<String>,
    field: &'static str,
    flag: &'static str,
) -> Result<String, ConfigError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::Missing { field, flag })
}

/// A file the agent writes: a path with a file name (and the extension its readers
/// look for, if any).
pub(super) fn file_path(
    path: PathBuf,
    field: &str,
    extension: Option<&str>,
) -> Result<PathBuf, ConfigError> {
    let shown = path.display().to_string();
    if path.file_name().is_none() || shown.ends_with('/') {
        return Err(ConfigError::invalid(field, shown, "not a file path"));
    }
    if let Some(extension) = extension
        && !shown.ends_with(extension)
    {
        return Err(ConfigError::invalid(
            field,
            shown,
            format!("must end with {extension} (CNI runtimes read only such names as lists)"),
        ));
    }
    Ok(path)
}

pub(super) fn interface_name(name: String, field: &str) -> Result<String, ConfigError> {
    if name.len() > IFNAME_MAX || name.contains(['/', ' ']) {
        return Err(ConfigError::invalid(
            field,
            &name,
            "not a valid interface name",
        ));
    }
    Ok(name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    /// How the family's config fields end: `pod_cidr`, `pod_cidr_v6`.
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "_v6",
        }
    }
}

pub(super) fn cidr(value: &str, field: &str, family: Family) -> Result<IpNet, ConfigError> {
    let example = match family {
        Family::V4 => "not an IPv4 CIDR (like 10.244.1.0/24)",
        Family::V6 => "not an IPv6 CIDR (like fd00:244:1::/64)",
    };
    let net: IpNet = value
        .parse()
        .map_err(|_| ConfigError::invalid(field, value, example))?;
    if net.addr().is_ipv4() != (family == Family::V4) {
        return Err(ConfigError::invalid(field, value, example));
    }
    if net.trunc() != net {
        return Err(ConfigError::invalid(
            field,
            value,
            format!("host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

pub(super) fn v4_net(net: IpNet) -> Ipv4Net {
    match net {
        IpNet::V4(net) => net,
        IpNet::V6(_) => unreachable!("checked by cidr()"),
    }
}

pub(super) fn v6_net(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V6(net) => net,
        IpNet::V4(_) => unreachable!("checked by cidr()"),
    }
}
