//! Flannel's network config (`<prefix>/config`): its subnet pools, checked as flannel
//! checks them, and nothing over the uplink's networks.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use log::warn;
use serde::Deserialize;

use super::{EtcdError, entries::SubnetKey};
use crate::cidr::overlaps;
use crate::config::{Network, NetworkV6};

/// Flannel's network config (`<prefix>/config`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelConfig {
    #[serde(rename = "EnableIPv4", default)]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6", default)]
    enable_ipv6: bool,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    subnet_len: u8,
    #[serde(default)]
    subnet_min: Option<String>,
    #[serde(default)]
    subnet_max: Option<String>,
    #[serde(rename = "IPv6Network", default)]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen", default)]
    ipv6_subnet_len: u8,
    #[serde(rename = "IPv6SubnetMin", default)]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax", default)]
    ipv6_subnet_max: Option<String>,
    #[serde(default)]
    backend: Option<Backend>,
}

#[derive(Debug, Deserialize)]
struct Backend {
    #[serde(rename = "Type")]
    kind: String,
}

/// The config's field names of one family, for messages.
pub(super) struct Fields {
    pub(super) family: &'static str,
    pub(super) network: &'static str,
    pub(super) len: &'static str,
    pub(super) min: &'static str,
    pub(super) max: &'static str,
}

const FIELDS_V4: Fields = Fields {
    family: "IPv4",
    network: "Network",
    len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
};

const FIELDS_V6: Fields = Fields {
    family: "IPv6",
    network: "IPv6Network",
    len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
};

/// One family's subnets: the network cut into `subnet_len` subnets, handed out from
/// `min` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNet,
    pub subnet_len: u8,
    pub min: IpAddr,
    pub max: IpAddr,
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

fn from_u128(value: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(value.into())
    } else {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    }
}

/// The first of `uplink`'s networks that `net` overlaps: a subnet there would take the
/// node's own traffic (its uplink addresses, SSH included) for pods.
pub(super) fn uplink_overlap(net: &IpNet, uplink: &[IpNet]) -> Option<IpNet> {
    uplink.iter().map(IpNet::trunc).find(|u| overlaps(*net, *u))
}

impl Pool {
    /// Flannel's rules (pkg/subnet/config.go `CheckNetworkConfig`): at least four
    /// subnets in the network, none shorter than /30 (/126), bounds inside the network
    /// and on a subnet boundary; by default /24 (/64) subnets, or a quarter of a small
    /// network, and the first subnet skipped. hgw also refuses a default route.
    fn parse(
        f: &Fields,
        network: Option<&str>,
        subnet_len: u8,
        min: Option<&str>,
        max: Option<&str>,
    ) -> Result<Self, String> {
        let v6 = f.family == "IPv6";
        let Some(text) = network else {
            return Err(format!("{} is missing", f.network));
        };
        let network = text
            .parse::<IpNet>()
            .ok()
            .filter(|n| n.addr().is_ipv6() == v6)
            .ok_or_else(|| format!("{} {text:?} is not an {} CIDR", f.network, f.family))?
            .trunc();
        let prefix = network.prefix_len();
        let bits = bits(network.addr());
        if prefix == 0 {
            return Err(format!(
                "{} {network} is a default route: it would take all of the node's traffic for pods",
                f.network
            ));
        }
        let (default_len, longest) = if v6 { (64, 126) } else { (24, 30) };
        let subnet_len = match subnet_len {
            0 if prefix + 4 > bits => {
                return Err(format!(
                    "{} {network} is too small for four subnets of four addresses (at most /{})",
                    f.network,
                    bits - 4
                ));
            }
            0 if prefix + 2 <= default_len => default_len,
            0 => prefix + 2,
            len if len > longest => {
                return Err(format!(
                    "{} {len} leaves no room for pods (at most {longest})",
                    f.len
                ));
            }
            len if len < prefix + 2 => {
                return Err(format!(
                    "{} {len} is too short for {} {network}: it must hold at least four subnets (at least {})",
                    f.len,
                    f.network,
                    prefix + 2
                ));
            }
            len => len,
        };
        let size = 1u128 << (bits - subnet_len);
        let (first, last) = (to_u128(network.network()), to_u128(network.broadcast()));
        let bound = |value: Option<&str>, name: &str, default: u128| -> Result<u128, String> {
            let Some(text) = value else {
                return Ok(default);
            };
            let addr = text
                .parse::<IpAddr>()
                .ok()
                .filter(|a| a.is_ipv6() == v6)
                .ok_or_else(|| format!("{name} {text:?} is not an {} address", f.family))?;
            if !network.contains(&addr) {
                return Err(format!("{name} {addr} is outside {} {network}", f.network));
            }
            let value = to_u128(addr);
            if !value.is_multiple_of(size) {
                return Err(format!("{name} {addr} is not on a /{subnet_len} boundary"));
            }
            Ok(value)
        };
        let min = bound(min, f.min, first + size)?;
        let max = bound(max, f.max, last - (size - 1))?;
        if min > max {
            return Err(format!(
                "{} {} is above {} {}",
                f.min,
                from_u128(min, v6),
                f.max,
                from_u128(max, v6)
            ));
        }
        Ok(Self {
            network,
            subnet_len,
            min: from_u128(min, v6),
            max: from_u128(max, v6),
        })
    }

    /// Whether `net` is one this pool hands out (flannel's `isSubnetConfigCompat`).
    pub(super) fn fits(&self, net: &IpNet) -> bool {
        let addr = net.network();
        net.prefix_len() == self.subnet_len
            && addr.is_ipv6() == self.network.addr().is_ipv6()
            && to_u128(self.min) <= to_u128(addr)
            && to_u128(addr) <= to_u128(self.max)
    }

    /// Every subnet from min to max, in order.
    pub(super) fn subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v6 = self.network.addr().is_ipv6();
        let size = 1u128 << (bits(self.min) - self.subnet_len);
        let max = to_u128(self.max);
        std::iter::successors(Some(to_u128(self.min)), move |a| {
            a.checked_add(size).filter(|next| *next <= max)
        })
        .filter_map(move |a| IpNet::new(from_u128(a, v6), self.subnet_len).ok())
    }

    pub(super) fn no_free_subnet(&self) -> EtcdError {
        EtcdError::NoFreeSubnet {
            network: self.network,
            subnet_len: self.subnet_len,
            min: self.min,
            max: self.max,
        }
    }
}

/// The subnet space of a flannel network: IPv4, and IPv6 with `EnableIPv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetSpace {
    pub v4: Pool,
    pub v6: Option<Pool>,
}

impl SubnetSpace {
    pub fn parse(key: &str, text: &str) -> Result<Self, EtcdError> {
        let bad = |reason: String| EtcdError::BadConfig {
            key: key.to_owned(),
            reason,
        };
        let config: FlannelConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if let Some(backend) = &config.backend
            && backend.kind != "host-gw"
        {
            warn!(
                "{key}: Backend.Type is {:?}; hgw does host-gw routing whatever it says",
                backend.kind
            );
        }
        if config.enable_ipv4 == Some(false) {
            return Err(bad(
                "EnableIPv4 is false: hgw needs an IPv4 network (IPv6 only is not supported)"
                    .into(),
            ));
        }
        let v4 = Pool::parse(
            &FIELDS_V4,
            config.network.as_deref(),
            config.subnet_len,
            config.subnet_min.as_deref(),
            config.subnet_max.as_deref(),
        )
        .map_err(bad)?;
        let v6 = if config.enable_ipv6 {
            Some(
                Pool::parse(
                    &FIELDS_V6,
                    config.ipv6_network.as_deref(),
                    config.ipv6_subnet_len,
                    config.ipv6_subnet_min.as_deref(),
                    config.ipv6_subnet_max.as_deref(),
                )
                .map_err(bad)?,
            )
        } else {
            None
        };
        Ok(Self { v4, v6 })
    }

    pub(super) fn pools(&self) -> impl Iterator<Item = (&'static Fields, &Pool)> {
        std::iter::once((&FIELDS_V4, &self.v4)).chain(self.v6.as_ref().map(|p| (&FIELDS_V6, p)))
    }

    /// A network over the uplink's networks would hand the node's own traffic to pods.
    pub(crate) fn check_uplink(&self, key: &str, uplink: &[IpNet]) -> Result<(), EtcdError> {
        for (fields, pool) in self.pools() {
            if let Some(net) = uplink_overlap(&pool.network, uplink) {
                return Err(EtcdError::BadConfig {
                    key: key.to_owned(),
                    reason: format!(
                        "{} {} overlaps the uplink's network {net}",
                        fields.network, pool.network
                    ),
                });
            }
        }
        Ok(())
    }

    /// The network of a node holding `own`.
    pub(super) fn network(&self, own: SubnetKey) -> Network {
        Network {
            pod_cidr: own.v4,
            cluster_cidr: self.v4_network(),
            v6: own
                .v6
                .zip(self.v6_network())
                .map(|(pod_cidr, cluster_cidr)| NetworkV6 {
                    pod_cidr,
                    cluster_cidr,
                }),
        }
    }

    fn v4_network(&self) -> Ipv4Net {
        match self.v4.network {
            IpNet::V4(net) => net,
            IpNet::V6(_) => unreachable!("parsed as IPv4"),
        }
    }

    fn v6_network(&self) -> Option<Ipv6Net> {
        match self.v6?.network {
            IpNet::V6(net) => Some(net),
            IpNet::V4(_) => unreachable!("parsed as IPv6"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::etcd::test_support::{KEY, dual, space};

    /// The refusal of `text`, which must name the config key and say `why`.
    fn refused(text: &str, why: &str) {
        match SubnetSpace::parse(KEY, text) {
            Err(EtcdError::BadConfig { key, reason }) => {
                assert_eq!(key, KEY);
                assert!(
                    reason.contains(why),
                    "{text}: {reason:?} does not say {why:?}"
                );
            }
            other => panic!("{text}: accepted or not named: {other:?}"),
        }
    }

    #[test]
    fn flannel_defaults() {
        let s = space();
        assert_eq!(s.v4.subnet_len, 24);
        assert_eq!(s.v4.min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(s.v4.max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(s.v4.subnets().count(), 255);
        assert_eq!(s.v6, None);
        // A small network is cut in four, the first skipped (flannel's CheckNetworkConfig).
        let s = SubnetSpace::parse(KEY, r#"{"Network":"10.0.0.0/26"}"#).expect("valid");
        assert_eq!(s.v4.subnet_len, 28);
        assert_eq!(s.v4.subnets().count(), 3);
        let s = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:244::/32"}"#,
        )
        .expect("valid");
        let v6 = s.v6.expect("IPv6 enabled");
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.min, "fd00:244:0:1::".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            v6.max,
            "fd00:244:ffff:ffff::".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            v6.subnets()
                .take(2)
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["fd00:244:0:1::/64", "fd00:244:0:2::/64"]
        );
    }

    #[test]
    fn network_configs_without_room_for_pods_are_refused_naming_the_key() {
        refused(r#"{"Network":"banana"}"#, "not an IPv4 CIDR");
        refused(r#"{"SubnetLen":24}"#, "Network is missing");
        refused(r#"{"Network":"0.0.0.0/0"}"#, "default route");
        refused(r#"{"Network":"10.0.0.0/29"}"#, "too small");
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#,
            "SubnetLen 8 is too short",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
            "SubnetLen 16 is too short",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#,
            "at least four subnets",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
            "no room for pods",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.99.0.0"}"#,
            "SubnetMin 10.99.0.0 is outside Network 10.244.0.0/16",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.245.0.0"}"#,
            "SubnetMax 10.245.0.0 is outside",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.128"}"#,
            "not on a /24 boundary",
        );
        refused(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.8.0"}"#,
            "above SubnetMax",
        );
        refused(
            r#"{"EnableIPv4":false,"Network":"10.244.0.0/16"}"#,
            "EnableIPv4",
        );
        // The same for IPv6.
        let v6 = |rest: &str| format!(r#"{{"Network":"10.244.0.0/16","EnableIPv6":true{rest}}}"#);
        refused(&v6(""), "IPv6Network is missing");
        refused(&v6(r#","IPv6Network":"10.0.0.0/8""#), "not an IPv6 CIDR");
        refused(&v6(r#","IPv6Network":"::/0""#), "default route");
        refused(&v6(r#","IPv6Network":"fd00::/125""#), "too small");
        refused(
            &v6(r#","IPv6Network":"fd00::/64","IPv6SubnetLen":64"#),
            "IPv6SubnetLen 64 is too short",
        );
        refused(
            &v6(r#","IPv6Network":"fd00::/64","IPv6SubnetLen":127"#),
            "no room for pods",
        );
        refused(
            &v6(r#","IPv6Network":"fd00:244::/32","IPv6SubnetMin":"fd00:99::""#),
            "IPv6SubnetMin fd00:99:: is outside IPv6Network fd00:244::/32",
        );
        refused(
            &v6(r#","IPv6Network":"fd00:244::/32","IPv6SubnetMax":"fd00:244:0:1:1::""#),
            "not on a /64 boundary",
        );
        // Without EnableIPv6 the IPv6 fields are not read, as in flannel.
        let s = SubnetSpace::parse(KEY, r#"{"Network":"10.244.0.0/16","IPv6Network":"::/0"}"#)
            .expect("IPv6 off");
        assert_eq!(s.v6, None);
    }

    #[test]
    fn a_network_over_the_uplink_is_refused_naming_the_key() {
        let uplink: Vec<IpNet> = vec![
            "172.31.0.1/24".parse().expect("net"),
            "fd00:172:31::1/64".parse().expect("net"),
        ];
        assert!(dual().check_uplink(KEY, &uplink).is_ok());
        let s = SubnetSpace::parse(KEY, r#"{"Network":"172.16.0.0/12"}"#).expect("valid");
        match s.check_uplink(KEY, &uplink) {
            Err(EtcdError::BadConfig { key, reason }) => {
                assert_eq!(key, KEY);
                assert!(
                    reason.contains("overlaps the uplink's network 172.31.0.0/24"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let s = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00::/16"}"#,
        )
        .expect("valid");
        assert!(s.check_uplink(KEY, &uplink).is_err());
    }
}
