//! The entries under `<prefix>/subnets/`: their keys, flannel's values, and each one
//! as a peer (or a warning naming its key).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use log::warn;
use serde::{Deserialize, Serialize};

use super::{
    listing::{self, Warned},
    network::{SubnetSpace, uplink_overlap},
};
use crate::config::{Origin, Peer, PeerV6};

/// A subnet lease's value, as flannel writes it (`PublicIPv6` is null without IPv6).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub(super) public_ip: String,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub(super) public_ipv6: Option<String>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub(super) backend_type: String,
}

/// A subnet key's subnets: `10.244.3.0-24`, dual stack `10.244.3.0-24&fd00:244:3::-64`
/// (flannel's `MakeSubnetKey` / `ParseSubnetKey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SubnetKey {
    pub(super) v4: Ipv4Net,
    pub(super) v6: Option<Ipv6Net>,
}

impl SubnetKey {
    pub(super) fn key(&self, prefix: &str) -> String {
        let mut key = format!(
            "{prefix}/subnets/{}-{}",
            self.v4.network(),
            self.v4.prefix_len()
        );
        if let Some(v6) = self.v6 {
            key.push_str(&format!("&{}-{}", v6.network(), v6.prefix_len()));
        }
        key
    }

    pub(super) fn parse(prefix: &str, key: &str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?.strip_prefix("/subnets/")?;
        let (v4, v6) = match rest.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (rest, None),
        };
        let (addr, len) = v4.split_once('-')?;
        let v4 = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        let v6 = match v6 {
            Some(text) => {
                let (addr, len) = text.rsplit_once('-')?;
                let net = Ipv6Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
                (net.trunc() == net).then_some(net)?;
                Some(net)
            }
            None => None,
        };
        (v4.trunc() == v4).then_some(Self { v4, v6 })
    }

    pub(super) fn nets(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.v4)).chain(self.v6.map(IpNet::V6))
    }
}

/// One entry under `<prefix>/subnets/`, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) value: String,
    /// The size of a value too large to be a lease ([`listing::MAX_VALUE`]), not kept.
    pub(super) oversize: Option<usize>,
    pub(super) lease: i64,
    pub(super) create_revision: i64,
    pub(super) mod_revision: i64,
}

/// One entry as a peer: a subnet key, flannel's value, addresses of the right family
/// (IPv6 only with `EnableIPv6`). What it must be beside the network and the other
/// peers is the desired state's to check.
fn peer_of(prefix: &str, key: &str, entry: &Entry, space: &SubnetSpace) -> Result<Peer, String> {
    let Some(mut subnet_key) = SubnetKey::parse(prefix, key) else {
        return Err(
            "not a subnet key (want <prefix>/subnets/A.B.C.D-LEN, or A.B.C.D-LEN&IPV6-LEN)".into(),
        );
    };
    // A dual-stack entry in an IPv4 network is used for IPv4 only.
    if space.v6.is_none() {
        subnet_key.v6 = None;
    }
    if let Some(size) = entry.oversize {
        return Err(format!(
            "value of {size} bytes, more than a flannel lease's {} bytes",
            listing::MAX_VALUE
        ));
    }
    let attrs: LeaseAttrs = serde_json::from_str(&entry.value)
        .map_err(|e| format!("value is not a flannel lease: {e}"))?;
    let public_ip = attrs
        .public_ip
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("PublicIP {:?} is not an IPv4 address", attrs.public_ip))?;
    let v6 = match (subnet_key.v6, &attrs.public_ipv6) {
        (None, _) => None,
        (Some(_), None) => {
            return Err("an IPv6 subnet without PublicIPv6".into());
        }
        (Some(pod_cidr), Some(text)) => Some(PeerV6 {
            node_ip: text
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("PublicIPv6 {text:?} is not an IPv6 address"))?,
            pod_cidr,
        }),
    };
    Ok(Peer {
        name: format!("{}-{}", subnet_key.v4.network(), subnet_key.v4.prefix_len()),
        node_ip: public_ip,
        pod_cidr: subnet_key.v4,
        v6,
        source: key.to_owned(),
        lease: (entry.lease != 0).then_some(entry.lease),
        origin: Origin::Etcd {
            revision: entry.create_revision,
        },
        // Older flannel entries say none: taken as host-gw.
        backend: (!attrs.backend_type.is_empty()).then_some(attrs.backend_type),
    })
}

/// The peers of a listing, but this node's own entry; a malformed entry is named in a
/// warning (once while it stands).
pub(super) fn peers_of(
    prefix: &str,
    own_key: &str,
    entries: &BTreeMap<String, Entry>,
    space: &SubnetSpace,
    warned: &mut Warned,
) -> Vec<Peer> {
    warned.retain(|key| entries.contains_key(key));
    entries
        .iter()
        .filter(|(key, _)| *key != own_key)
        .filter_map(|(key, entry)| checked(prefix, key, entry, space, warned))
        .collect()
}

/// `entry` as a peer, or `None` with a warning.
pub(super) fn checked(
    prefix: &str,
    key: &str,
    entry: &Entry,
    space: &SubnetSpace,
    warned: &mut Warned,
) -> Option<Peer> {
    match peer_of(prefix, key, entry, space) {
        Ok(peer) => {
            warned.forget(key);
            Some(peer)
        }
        Err(reason) => {
            if warned.first(key, entry) {
                warn!("etcd key {key}: ignored: {reason}");
            }
            None
        }
    }
}

/// The subnets of a key must lie inside the network and off the uplink's networks.
pub(super) fn check_subnets(
    subnet_key: &SubnetKey,
    space: &SubnetSpace,
    uplink: &[IpNet],
) -> Result<(), String> {
    for net in subnet_key.nets() {
        if let Some(up) = uplink_overlap(&net, uplink) {
            return Err(format!("{net} overlaps the uplink's network {up}"));
        }
    }
    for (net, (fields, pool)) in subnet_key.nets().zip(space.pools()) {
        if !pool.network.contains(&net) {
            return Err(format!(
                "{net} is outside the {} {}",
                fields.network, pool.network
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::agent::desired::{NodeFacts, desired};
    use crate::source::etcd::test_support::{KEY, dual, space, uplink};

    #[test]
    fn keys_round_trip_as_flannel_writes_them() {
        let v4: Ipv4Net = "10.244.3.0/24".parse().expect("cidr");
        let key = SubnetKey { v4, v6: None };
        assert_eq!(
            key.key("/coreos.com/network"),
            "/coreos.com/network/subnets/10.244.3.0-24"
        );
        assert_eq!(
            SubnetKey::parse("/coreos.com/network", &key.key("/coreos.com/network")),
            Some(key)
        );
        let key = SubnetKey {
            v4,
            v6: Some("fd00:10:244:1::/64".parse().expect("cidr")),
        };
        // flannel's MakeSubnetKey: IPv4 and IPv6 joined by `&`.
        assert_eq!(key.key("/p"), "/p/subnets/10.244.3.0-24&fd00:10:244:1::-64");
        assert_eq!(SubnetKey::parse("/p", &key.key("/p")), Some(key));
        for bad in [
            "/p/subnets/10.244.3.1-24",
            "/p/subnets/10.244.3.0-24&fd00:10:244:1::1-64",
            "/p/subnets/10.244.3.0-24&",
            "/p/subnets/10.244.3.0-24&10.0.0.0-8",
            "/p/subnets/garbage",
            "/q/subnets/10.244.3.0-24",
        ] {
            assert_eq!(SubnetKey::parse("/p", bad), None, "{bad}");
        }
    }

    fn entry(value: &str, create_revision: i64) -> Entry {
        Entry {
            value: value.into(),
            oversize: None,
            lease: 7,
            create_revision,
            mod_revision: create_revision,
        }
    }

    /// The peers an agent with `own` would route to: parsed here, checked by the
    /// desired state (as the agent does), oldest first.
    fn peers(space: &SubnetSpace, own: &str, entries: &[(&str, Entry)]) -> Vec<Peer> {
        let entries: BTreeMap<String, Entry> = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let own_key = SubnetKey::parse("/p", own).expect("own key");
        let listed = peers_of("/p", own, &entries, space, &mut Warned::default());
        let network = space.network(own_key);
        let mut public_ips = vec![IpAddr::V4(Ipv4Addr::new(172, 31, 0, 1))];
        if space.v6.is_some() {
            public_ips.push("fd00:172:31::1".parse().expect("ip"));
        }
        let node = NodeFacts {
            uplink_name: "eth0".into(),
            uplink_networks: uplink(),
            addresses: Vec::new(),
            public_ips,
        };
        let state = desired(&network, &listed, Some(&node));
        let mut kept: Vec<Peer> = listed
            .into_iter()
            .filter(|p| {
                state
                    .routes
                    .get(&IpNet::V4(p.pod_cidr))
                    .is_some_and(|hop| hop.key == p.source)
            })
            .collect();
        kept.sort_by_key(|p| p.origin.order());
        kept
    }

    fn sources(peers: &[Peer]) -> Vec<&str> {
        peers.iter().map(|p| p.source.as_str()).collect()
    }

    #[test]
    fn bad_entries_are_skipped_and_good_ones_kept() {
        let own = "/p/subnets/10.244.1.0-24";
        let peers = peers(
            &space(),
            own,
            &[
                (
                    own,
                    entry(r#"{"PublicIP":"172.31.0.1","BackendType":"host-gw"}"#, 1),
                ),
                (
                    "/p/subnets/10.244.2.0-24",
                    entry(r#"{"PublicIP":"172.31.0.2","BackendType":"host-gw"}"#, 2),
                ),
                ("/p/subnets/10.244.3.0-24", entry("not json", 3)),
                (
                    "/p/subnets/10.244.4.0-24",
                    entry(r#"{"PublicIP":"nope"}"#, 4),
                ),
                (
                    "/p/subnets/10.99.0.0-24",
                    entry(r#"{"PublicIP":"172.31.0.5"}"#, 5),
                ),
                (
                    "/p/subnets/10.244.2.0-25",
                    entry(r#"{"PublicIP":"172.31.0.6"}"#, 6),
                ),
                (
                    "/p/subnets/garbage",
                    entry(r#"{"PublicIP":"172.31.0.7"}"#, 7),
                ),
                (
                    "/p/subnets/10.244.1.128-25",
                    entry(r#"{"PublicIP":"172.31.0.8"}"#, 8),
                ),
                // Over the uplink's network (and outside the network: the uplink is said).
                (
                    "/p/subnets/172.31.0.0-24",
                    entry(r#"{"PublicIP":"172.31.0.9"}"#, 9),
                ),
                // A second entry for n2's address, and one for this node's.
                (
                    "/p/subnets/10.244.10.0-24",
                    entry(r#"{"PublicIP":"172.31.0.2"}"#, 10),
                ),
                (
                    "/p/subnets/10.244.11.0-24",
                    entry(r#"{"PublicIP":"172.31.0.1"}"#, 11),
                ),
            ],
        );
        assert_eq!(sources(&peers), ["/p/subnets/10.244.2.0-24"]);
        assert_eq!(peers[0].node_ip, Ipv4Addr::new(172, 31, 0, 2));
        assert_eq!(peers[0].lease, Some(7));
        assert_eq!(peers[0].v6, None);
    }

    /// 300 distinct junk writes to one key: what is remembered to warn once per entry
    /// stays at what etcd holds now, never at everything ever written.
    #[test]
    fn rejected_writes_are_remembered_only_while_they_stand() {
        let own = "/p/subnets/10.244.1.0-24";
        let mut warned = Warned::default();
        for n in 0..300 {
            let junk = format!("junk {n} {}", "x".repeat(10_000));
            let entries = BTreeMap::from([
                ("/p/subnets/10.244.2.0-24".to_owned(), entry(&junk, 2)),
                ("/p/subnets/10.244.3.0-24".to_owned(), entry("not json", 3)),
            ]);
            let peers = peers_of("/p", own, &entries, &space(), &mut warned);
            assert!(peers.is_empty());
        }
        assert!(
            warned.len() <= 2,
            "{} rejected entries remembered, 2 stand",
            warned.len()
        );
    }

    #[test]
    fn the_older_entry_wins_whatever_the_key_order() {
        let own = "/p/subnets/10.244.1.0-24";
        let later = "/p/subnets/10.244.2.0-24";
        let older = "/p/subnets/10.244.9.0-24";
        let peers = peers(
            &space(),
            own,
            &[
                (later, entry(r#"{"PublicIP":"172.31.0.2"}"#, 20)),
                (older, entry(r#"{"PublicIP":"172.31.0.2"}"#, 10)),
            ],
        );
        assert_eq!(sources(&peers), [older]);
    }

    #[test]
    fn a_subnet_over_the_uplink_is_skipped_in_either_family() {
        let space = SubnetSpace::parse(
            KEY,
            r#"{"EnableIPv6":true,"Network":"172.16.0.0/12","SubnetLen":24,"IPv6Network":"fd00::/16","IPv6SubnetLen":64}"#,
        )
        .expect("valid");
        let own = "/p/subnets/172.16.1.0-24&fd00:1::-64";
        let peers = peers(
            &space,
            own,
            &[
                (
                    "/p/subnets/172.31.0.0-24&fd00:2::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2"}"#,
                        2,
                    ),
                ),
                (
                    "/p/subnets/172.16.3.0-24&fd00:172:31::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.3","PublicIPv6":"fd00:172:31::3"}"#,
                        3,
                    ),
                ),
                (
                    "/p/subnets/172.16.4.0-24&fd00:4::-64",
                    entry(
                        r#"{"PublicIP":"172.31.0.4","PublicIPv6":"fd00:172:31::4"}"#,
                        4,
                    ),
                ),
            ],
        );
        assert_eq!(sources(&peers), ["/p/subnets/172.16.4.0-24&fd00:4::-64"]);
    }

    #[test]
    fn dual_stack_entries_get_the_same_checks_on_their_ipv6_side() {
        let own = "/p/subnets/10.244.1.0-24&fd00:244:1::-48";
        let good = "/p/subnets/10.244.2.0-24&fd00:244:2::-48";
        let v4_only = "/p/subnets/10.244.3.0-24";
        let peers = peers(
            &dual(),
            own,
            &[
                (
                    good,
                    entry(
                        r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2","BackendType":"host-gw"}"#,
                        2,
                    ),
                ),
                (
                    v4_only,
                    entry(r#"{"PublicIP":"172.31.0.3","PublicIPv6":null}"#, 3),
                ),
                (
                    "/p/subnets/10.244.4.0-24&fd00:99::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.4","PublicIPv6":"fd00:172:31::4"}"#,
                        4,
                    ),
                ),
                (
                    "/p/subnets/10.244.5.0-24&fd00:244:2::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.5","PublicIPv6":"fd00:172:31::5"}"#,
                        5,
                    ),
                ),
                (
                    "/p/subnets/10.244.6.0-24&fd00:244:6::-48",
                    entry(r#"{"PublicIP":"172.31.0.6"}"#, 6),
                ),
                (
                    "/p/subnets/10.244.7.0-24&fd00:244:7::-48",
                    entry(r#"{"PublicIP":"172.31.0.7","PublicIPv6":"10.0.0.7"}"#, 7),
                ),
                (
                    "/p/subnets/10.244.8.0-24&fd00:244:8::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.8","PublicIPv6":"fd00:172:31::2"}"#,
                        8,
                    ),
                ),
                (
                    "/p/subnets/10.244.9.0-24&fd00:244:9::-48",
                    entry(
                        r#"{"PublicIP":"172.31.0.9","PublicIPv6":"fd00:172:31::1"}"#,
                        9,
                    ),
                ),
                (
                    "/p/subnets/10.244.10.0-24&fd00:244:1:8000::-49",
                    entry(
                        r#"{"PublicIP":"172.31.0.10","PublicIPv6":"fd00:172:31::10"}"#,
                        10,
                    ),
                ),
            ],
        );
        assert_eq!(sources(&peers), [good, v4_only]);
        assert_eq!(
            peers[0].v6,
            Some(PeerV6 {
                node_ip: "fd00:172:31::2".parse().expect("ip"),
                pod_cidr: "fd00:244:2::/48".parse().expect("cidr"),
            })
        );
        assert_eq!(peers[1].v6, None);
        // In an IPv4 network the same entry is an IPv4 peer.
        let peers = self::peers(
            &space(),
            "/p/subnets/10.244.1.0-24",
            &[(
                good,
                entry(
                    r#"{"PublicIP":"172.31.0.2","PublicIPv6":"fd00:172:31::2"}"#,
                    2,
                ),
            )],
        );
        assert_eq!(sources(&peers), [good]);
        assert_eq!(peers[0].v6, None);
    }
}
