//! The static source: this node's network and the peers from the config, and the
//! checks that make a static peer the desired state would leave out a config error.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use super::{
    ConfigError, Network, NetworkV6, Origin, Peer, PeerV6, RawPeer, Source,
    fields::{Family, cidr, required, v4_net, v6_net},
};
use crate::agent::desired::{DesiredState, NodeFacts, Refusal};

/// The static network and peers: `v4` and `v6` are [pod CIDR, cluster CIDR].
pub(super) fn static_source(
    node_name: &str,
    [pod_cidr, cluster_cidr]: [Option<String>; 2],
    [pod_cidr_v6, cluster_cidr_v6]: [Option<String>; 2],
    raw_peers: Vec<RawPeer>,
) -> Result<Source, ConfigError> {
    let (pod_cidr, cluster_cidr) = pod_and_cluster_cidr(
        Some(required(pod_cidr, "pod_cidr", "pod-cidr")?),
        Some(required(cluster_cidr, "cluster_cidr", "cluster-cidr")?),
        Family::V4,
    )?
    .expect("both given");
    let v6 = pod_and_cluster_cidr(pod_cidr_v6, cluster_cidr_v6, Family::V6)?;
    let network = Network {
        pod_cidr: v4_net(pod_cidr),
        cluster_cidr: v4_net(cluster_cidr),
        v6: v6.map(|(pod_cidr, cluster_cidr)| NetworkV6 {
            pod_cidr: v6_net(pod_cidr),
            cluster_cidr: v6_net(cluster_cidr),
        }),
    };

    let mut peers: Vec<Peer> = Vec::with_capacity(raw_peers.len());
    let mut names = HashSet::new();
    for (i, raw_peer) in raw_peers.into_iter().enumerate() {
        let field = |name: &str| format!("peers[{i}].{name}");
        if raw_peer.name.is_empty() {
            return Err(ConfigError::invalid(field("name"), "", "must not be empty"));
        }
        if raw_peer.name == node_name || !names.insert(raw_peer.name.clone()) {
            return Err(ConfigError::invalid(
                field("name"),
                &raw_peer.name,
                "names another node already",
            ));
        }
        let node_ip: Ipv4Addr = raw_peer.node_ip.parse().map_err(|_| {
            ConfigError::invalid(field("node_ip"), &raw_peer.node_ip, "not an IPv4 address")
        })?;
        let peer_cidr = cidr(&raw_peer.pod_cidr, &field("pod_cidr"), Family::V4)?;
        let v6 = match (raw_peer.node_ip_v6, raw_peer.pod_cidr_v6) {
            (None, None) => None,
            (Some(ip), Some(cidr_v6)) => {
                if network.v6.is_none() {
                    return Err(ConfigError::invalid(
                        field("pod_cidr_v6"),
                        cidr_v6,
                        "this node has no pod_cidr_v6 (IPv6 is off); set it, or drop the peer's IPv6 fields",
                    ));
                }
                let node_ip: Ipv6Addr = ip.parse().map_err(|_| {
                    ConfigError::invalid(field("node_ip_v6"), &ip, "not an IPv6 address")
                })?;
                let pod_cidr = v6_net(cidr(&cidr_v6, &field("pod_cidr_v6"), Family::V6)?);
                Some(PeerV6 { node_ip, pod_cidr })
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    field("pod_cidr_v6"),
                    "",
                    "missing: node_ip_v6 and pod_cidr_v6 go together",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    field("node_ip_v6"),
                    "",
                    "missing: node_ip_v6 and pod_cidr_v6 go together",
                ));
            }
        };
        let peer = Peer {
            name: raw_peer.name,
            node_ip,
            pod_cidr: v4_net(peer_cidr),
            v6,
            source: "static".into(),
            lease: None,
            origin: Origin::Static { index: i },
            backend: None,
        };
        peers.push(peer);
    }
    // What the peers must be beside each other and this node is the desired state's
    // to check (`check_peers`), at the agent's start and on each reload.
    Ok(Source::Static { network, peers })
}

/// Static peers are the admin's word: one the desired state would leave out is a config
/// error, naming its field. Without `node` (the config alone), the checks that need the
/// node's interfaces are left out. The state is kept by the file source, which checks
/// each reload's changes against it.
pub fn check_peers(
    network: &Network,
    peers: Vec<Peer>,
    node: Option<&NodeFacts>,
) -> Result<DesiredState, ConfigError> {
    let mut state = DesiredState::new(*network, node.cloned());
    state.replace_all(peers);
    match refused(&state) {
        Some(e) => Err(e),
        None => Ok(state),
    }
}

/// The config error of the first static peer `state` leaves out, if any.
pub fn refused(state: &DesiredState) -> Option<ConfigError> {
    let skipped = state.skipped().into_iter().next()?;
    // Named by their place in the file, which `peers` (maybe a part of it) carry.
    let index = |key: &str| match state.peer(key).map(|p| p.origin) {
        Some(Origin::Static { index }) => index,
        _ => 0,
    };
    let refusal = &skipped.refusal;
    let suffix = if refusal.is_ipv6() { "_v6" } else { "" };
    let i = index(&skipped.key);
    let peer = state.peer(&skipped.key).expect("a skipped peer is held");
    let (field, value) = if refusal.is_about_node_ip() {
        let ip = peer
            .hops()
            .map(|(_, ip)| ip)
            .find(|ip| ip.is_ipv6() == refusal.is_ipv6())
            .expect("a hop of the refused family");
        (format!("peers[{i}].node_ip{suffix}"), ip.to_string())
    } else {
        let cidr = peer
            .hops()
            .map(|(cidr, _)| cidr)
            .find(|cidr| cidr.addr().is_ipv6() == refusal.is_ipv6())
            .expect("a hop of the refused family");
        (format!("peers[{i}].pod_cidr{suffix}"), cidr.to_string())
    };
    let other = |key: &str| (index(key), state.peer(key).map_or("", |p| &p.name));
    let reason = match refusal {
        Refusal::Outside {
            network: Some(cluster),
            ..
        } => format!("not inside cluster_cidr{suffix} {cluster}"),
        Refusal::OverlapsOwn { own, .. } => format!("overlaps this node's pod_cidr{suffix} {own}"),
        Refusal::Overlaps {
            other_cidr,
            other: key,
            ..
        } => {
            let (j, name) = other(key);
            format!("overlaps peers[{j}].pod_cidr{suffix} {other_cidr} ({name})")
        }
        Refusal::RepeatedIp { other: key, .. } => {
            let (j, name) = other(key);
            format!("is also the node_ip{suffix} of peers[{j}] ({name})")
        }
        Refusal::OffLink { reason, .. } => reason.clone(),
        _ => skipped.reason.clone(),
    };
    Some(ConfigError::invalid(field, value, reason))
}

/// A node's pod CIDR and the cluster CIDR it must lie in: both or neither.
fn pod_and_cluster_cidr(
    pod_cidr: Option<String>,
    cluster_cidr: Option<String>,
    family: Family,
) -> Result<Option<(IpNet, IpNet)>, ConfigError> {
    let pod_field = &format!("pod_cidr{}", family.suffix());
    let cluster_field = &format!("cluster_cidr{}", family.suffix());
    let (pod_cidr, cluster_cidr) = match (pod_cidr, cluster_cidr) {
        (None, None) => return Ok(None),
        (Some(pod), Some(cluster)) => (
            cidr(&pod, pod_field, family)?,
            cidr(&cluster, cluster_field, family)?,
        ),
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                cluster_field,
                "",
                format!("missing: {pod_field} needs it"),
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                pod_field,
                "",
                format!("missing: {cluster_field} needs it"),
            ));
        }
    };
    if !cluster_cidr.contains(&pod_cidr) {
        return Err(ConfigError::invalid(
            pod_field,
            pod_cidr,
            format!("not inside {cluster_field} {cluster_cidr}"),
        ));
    }
    if pod_cidr.max_prefix_len() - pod_cidr.prefix_len() < 2 {
        return Err(ConfigError::invalid(
            pod_field,
            pod_cidr,
            "too small to hold a gateway and pods",
        ));
    }
    Ok(Some((pod_cidr, cluster_cidr)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{error, error_of, raw, raw_v6};
    use crate::config::{Config, FastPath};

    #[test]
    fn accepts_a_valid_config() {
        let config =
            Config::from_raw(raw(&[("n2", "172.31.0.2", "10.244.2.0/24")])).expect("valid");
        let Source::Static { network, .. } = &config.source else {
            panic!("static config expected")
        };
        assert_eq!(network.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(config.bridge, "cni0");
        assert!(!config.setup_node);
        assert_eq!(config.fast_path, FastPath::Established);
    }

    #[test]
    fn rejects_bad_peers_naming_the_entry() {
        let e = error(&[("n2", "172.31.0.2", "10.244.1.0/24")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("overlaps this node's"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.244.0.0/20")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("overlaps this node's"),
            "{e}"
        );
        let e = error(&[
            ("n2", "172.31.0.2", "10.244.2.0/24"),
            ("n3", "172.31.0.3", "10.244.2.128/25"),
        ]);
        assert!(
            e.contains("peers[1].pod_cidr") && e.contains("overlaps peers[0]"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.245.2.0/24")]);
        assert!(
            e.contains("peers[0].pod_cidr") && e.contains("not inside cluster_cidr"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.300", "10.244.2.0/24")]);
        assert!(
            e.contains("peers[0].node_ip") && e.contains("172.31.0.300"),
            "{e}"
        );
        let e = error(&[("n2", "172.31.0.2", "10.244.2.1/24")]);
        assert!(e.contains("host bits set"), "{e}");
        let e = error(&[("n1", "172.31.0.2", "10.244.2.0/24")]);
        assert!(e.contains("peers[0].name"), "{e}");
    }

    #[test]
    fn accepts_a_dual_stack_config() {
        let config = Config::from_raw(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:2::/64",
        )]))
        .expect("valid");
        let Source::Static { network, peers } = &config.source else {
            panic!("static config expected")
        };
        assert_eq!(
            network.gateway_v6(),
            Some("fd00:244:1::1".parse().expect("address"))
        );
        let hops: Vec<String> = peers[0]
            .hops()
            .map(|(cidr, ip)| format!("{cidr} via {ip}"))
            .collect();
        assert_eq!(
            hops,
            [
                "10.244.2.0/24 via 172.31.0.2",
                "fd00:244:2::/64 via fd00:172:31::2"
            ]
        );
    }

    #[test]
    fn rejects_bad_ipv6_fields_naming_them() {
        let peer = (
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:2::/64",
        );
        let mut r = raw_v6(&[peer]);
        r.pod_cidr_v6 = None;
        r.cluster_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("IPv6 is off"),
            "{e}"
        );
        let mut r = raw_v6(&[]);
        r.cluster_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("cluster_cidr_v6") && e.contains("missing"),
            "{e}"
        );
        let mut r = raw_v6(&[]);
        r.pod_cidr_v6 = Some("10.244.1.0/24".into());
        let e = error_of(r);
        assert!(
            e.contains("pod_cidr_v6") && e.contains("not an IPv6 CIDR"),
            "{e}"
        );
        let e = error_of(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "fd00:172:31::2",
            "fd00:244:1::/64",
        )]));
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("overlaps this node's pod_cidr_v6"),
            "{e}"
        );
        let e = error_of(raw_v6(&[
            peer,
            (
                "n3",
                "172.31.0.3",
                "10.244.3.0/24",
                "fd00:172:31::2",
                "fd00:244:3::/64",
            ),
        ]));
        assert!(
            e.contains("peers[1].node_ip_v6") && e.contains("peers[0]"),
            "{e}"
        );
        let e = error_of(raw_v6(&[(
            "n2",
            "172.31.0.2",
            "10.244.2.0/24",
            "172.31.0.9",
            "fd00:244:2::/64",
        )]));
        assert!(e.contains("peers[0].node_ip_v6"), "{e}");
        let mut r = raw_v6(&[peer]);
        r.peers[0].pod_cidr_v6 = None;
        let e = error_of(r);
        assert!(
            e.contains("peers[0].pod_cidr_v6") && e.contains("go together"),
            "{e}"
        );
    }
}
