//! Network configs and an uplink for the tests of the etcd source's modules.

use ipnet::IpNet;

use super::network::SubnetSpace;

pub(super) const KEY: &str = "/p/config";

pub(super) fn space() -> SubnetSpace {
    SubnetSpace::parse(
        KEY,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
    )
    .expect("valid")
}

pub(super) fn dual() -> SubnetSpace {
    SubnetSpace::parse(
        KEY,
        r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:244::/32","IPv6SubnetLen":48}"#,
    )
    .expect("valid")
}

pub(super) fn uplink() -> Vec<IpNet> {
    vec![
        "172.31.0.1/24".parse().expect("net"),
        "fd00:172:31::1/64".parse().expect("net"),
        "fe80::1/64".parse().expect("net"),
    ]
}
