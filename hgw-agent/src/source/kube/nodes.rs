//! Nodes as flannel's kube subnet manager reads them: the pod CIDRs from
//! `spec.podCIDRs` (`spec.podCIDR` on old API servers) and flannel's annotations. A
//! Node is parsed here (one that does not parse is named in a warning); the desired
//! state checks it as it checks every peer (its backend, inside the network, overlaps,
//! the uplink's networks, a repeated or off-subnet public IP).

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use log::warn;

use crate::{
    config::{Origin, Peer, PeerV6},
    source::etcd::SubnetSpace,
};

/// flannel's annotation prefix (flanneld's default `--kube-annotation-prefix`).
pub const PREFIX: &str = "flannel.alpha.coreos.com/";
pub const SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub const PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";

/// A Node's pod CIDRs, one per family (flannel takes the last of each family).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

/// `spec.podCIDRs`, else `spec.podCIDR`; an error names the field and the value.
pub fn pod_cidrs(node: &Node) -> Result<PodCidrs, String> {
    let spec = node.spec.as_ref();
    let (field, list): (&str, Vec<&String>) = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => ("spec.podCIDRs", list.iter().collect()),
        _ => (
            "spec.podCIDR",
            spec.and_then(|s| s.pod_cidr.as_ref())
                .filter(|c| !c.is_empty())
                .into_iter()
                .collect(),
        ),
    };
    if list.len() > 2 {
        return Err(format!(
            "{field} has {} CIDRs: at most one per family",
            list.len()
        ));
    }
    let mut cidrs = PodCidrs::default();
    for text in list {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{field} {text:?} is not a CIDR"))?;
        if net.trunc() != net {
            return Err(format!("{field} {text:?} has host bits set"));
        }
        match net {
            IpNet::V4(v4) => cidrs.v4 = Some(v4),
            IpNet::V6(v6) => cidrs.v6 = Some(v6),
        }
    }
    Ok(cidrs)
}

/// Each pod CIDR must lie in the network of its family (flannel's `containsCIDR`).
pub fn check_in_network(cidrs: &PodCidrs, space: &SubnetSpace) -> Result<(), String> {
    let pairs = [
        (cidrs.v4.map(IpNet::V4), Some(space.v4.network), "Network"),
        (
            cidrs.v6.map(IpNet::V6),
            space.v6.map(|p| p.network),
            "IPv6Network",
        ),
    ];
    for (cidr, network, field) in pairs {
        if let (Some(cidr), Some(network)) = (cidr, network)
            && !network.contains(&cidr)
        {
            return Err(format!("pod CIDR {cidr} is outside the {field} {network}"));
        }
    }
    Ok(())
}

pub fn name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("")
}

pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What a flannel node announces, parsed: its backend, a public IP of each family the
/// network has, its pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// When the Node was created, in seconds: the older of two conflicting Nodes wins,
    /// whatever their names.
    pub created: i64,
    pub backend: String,
    pub pod_cidr: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub v6: Option<PeerV6>,
}

/// `None` for a Node flannel would not read (no `kube-subnet-manager: "true"`);
/// `Err` says why a flannel node does not parse as a peer.
pub fn announced(node: &Node, space: &SubnetSpace) -> Option<Result<Announced, String>> {
    if annotation(node, SUBNET_MANAGER) != Some("true") {
        return None;
    }
    Some(check(node, space))
}

fn check(node: &Node, space: &SubnetSpace) -> Result<Announced, String> {
    let backend = annotation(node, BACKEND_TYPE)
        .unwrap_or_default()
        .to_owned();
    let cidrs = pod_cidrs(node)?;
    let pod_cidr = cidrs
        .v4
        .ok_or("no IPv4 pod CIDR in spec.podCIDRs (not assigned yet)")?;
    let public_ip = annotation(node, PUBLIC_IP)
        .ok_or_else(|| format!("no {PUBLIC_IP} annotation"))
        .and_then(|text| {
            text.parse::<Ipv4Addr>()
                .map_err(|_| format!("{PUBLIC_IP} {text:?} is not an IPv4 address"))
        })?;
    // An IPv6 pod CIDR in an IPv4 network is used for IPv4 only.
    let cidrs = PodCidrs {
        v4: cidrs.v4,
        v6: cidrs.v6.filter(|_| space.v6.is_some()),
    };
    let v6 = match cidrs.v6 {
        None => None,
        Some(pod_cidr) => {
            let text = annotation(node, PUBLIC_IPV6)
                .ok_or_else(|| format!("an IPv6 pod CIDR {pod_cidr} without {PUBLIC_IPV6}"))?;
            let node_ip = text
                .parse::<Ipv6Addr>()
                .map_err(|_| format!("{PUBLIC_IPV6} {text:?} is not an IPv6 address"))?;
            Some(PeerV6 { node_ip, pod_cidr })
        }
    };
    let created = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    Ok(Announced {
        created,
        backend,
        pod_cidr,
        public_ip,
        v6,
    })
}

/// The Nodes as the agent knows them: every Node flannel would read, checked alone.
#[derive(Default)]
pub struct Nodes {
    pub nodes: BTreeMap<String, Result<Announced, String>>,
    /// The reason last warned about, per Node: each is said once, until it changes.
    warned: HashMap<String, String>,
}

impl Nodes {
    /// Takes a Node as it is now; whether that changed what the peers are made of
    /// (kubelet's status updates, most of a Node's changes, do not).
    pub fn apply(&mut self, node: &Node, space: &SubnetSpace) -> bool {
        let name = name(node).to_owned();
        match announced(node, space) {
            Some(result) => self.nodes.insert(name, result.clone()) != Some(result),
            None => self.nodes.remove(&name).is_some(),
        }
    }

    /// Whether the Node was one flannel would read.
    pub fn delete(&mut self, node: &Node) -> bool {
        self.nodes.remove(name(node)).is_some()
    }

    /// The peers: every Node but `own` that parses. Each Node left out is named in a
    /// warning, once per reason.
    pub fn peers(&mut self, own: &str) -> Vec<Peer> {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        self.warned.retain(|name, _| self.nodes.contains_key(name));
        names
            .iter()
            .filter_map(|name| self.peer(name, own))
            .collect()
    }

    /// Node `name` as a peer, if it is one (a warning says why a flannel node is not).
    pub fn peer(&mut self, name: &str, own: &str) -> Option<Peer> {
        if name == own {
            return None;
        }
        match self.nodes.get(name)? {
            Ok(node) => {
                self.warned.remove(name);
                Some(Peer {
                    name: name.to_owned(),
                    node_ip: node.public_ip,
                    pod_cidr: node.pod_cidr,
                    v6: node.v6,
                    source: key(name),
                    lease: None,
                    origin: Origin::Kube {
                        created: node.created,
                    },
                    backend: Some(node.backend.clone()),
                })
            }
            Err(reason) => {
                if self.warned.get(name) != Some(reason) {
                    warn!("kube node/{name}: ignored: {reason}");
                    self.warned.insert(name.to_owned(), reason.clone());
                }
                None
            }
        }
    }
}

/// A Node's peer key (and source).
pub fn key(name: &str) -> String {
    format!("node/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> SubnetSpace {
        SubnetSpace::parse(
            "t",
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/32"}"#,
        )
        .expect("valid")
    }

    fn node(name: &str, created: &str, cidrs: &[&str], annotations: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "creationTimestamp": created,
                "annotations": annotations.iter().copied().collect::<BTreeMap<_, _>>(),
            },
            "spec": {"podCIDRs": cidrs},
        }))
        .expect("a Node")
    }

    fn flannel(ip: &str) -> Vec<(&str, &str)> {
        vec![
            (SUBNET_MANAGER, "true"),
            (BACKEND_TYPE, "host-gw"),
            (BACKEND_DATA, "null"),
            (PUBLIC_IP, ip),
        ]
    }

    fn reason(node: &Node) -> String {
        match announced(node, &space()) {
            Some(Err(reason)) => reason,
            other => panic!("{node:?} not refused: {other:?}"),
        }
    }

    #[test]
    fn flannel_nodes_are_read_and_others_left_alone() {
        let n2 = node(
            "n2",
            "2026-01-01T00:00:00Z",
            &["10.244.2.0/24"],
            &flannel("172.31.0.2"),
        );
        let got = announced(&n2, &space()).expect("flannel's").expect("valid");
        assert_eq!(got.pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(got.public_ip.to_string(), "172.31.0.2");
        assert_eq!(got.v6, None);
        let plain = node("n3", "2026-01-01T00:00:00Z", &["10.244.3.0/24"], &[]);
        assert!(announced(&plain, &space()).is_none());
    }

    #[test]
    fn bad_nodes_are_refused_saying_why() {
        let t = "2026-01-01T00:00:00Z";
        assert!(reason(&node("a", t, &[], &flannel("172.31.0.2"))).contains("not assigned"));
        assert!(reason(&node("a", t, &["10.244.2.0/24"], &flannel("x"))).contains("public-ip"));
        assert!(
            reason(&node(
                "a",
                t,
                &["10.244.2.0/24", "fd00:244:2::/64"],
                &flannel("172.31.0.2")
            ))
            .contains("without flannel.alpha.coreos.com/public-ipv6")
        );
        assert!(
            reason(&node("a", t, &["10.244.2.1/24"], &flannel("172.31.0.2"))).contains("host bits")
        );
    }

    /// The peers an agent on `me` routes to: parsed here, checked by the desired
    /// state, as the agent does.
    fn routed(nodes: &mut Nodes) -> (Vec<String>, Vec<String>) {
        use crate::agent::desired::{NodeFacts, desired};
        let network = crate::config::Network {
            pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            v6: None,
        };
        let node = NodeFacts {
            uplink_name: "eth0".into(),
            uplink_networks: vec!["172.31.0.1/24".parse().expect("net")],
            addresses: Vec::new(),
            public_ips: vec!["172.31.0.1".parse().expect("ip")],
        };
        let state = desired(&network, &nodes.peers("me"), Some(&node));
        let names = state.routes.values().map(|h| h.peer.clone()).collect();
        let reasons = state
            .skipped()
            .into_iter()
            .map(|s| format!("{}: {}", s.peer, s.reason))
            .collect();
        (names, reasons)
    }

    #[test]
    fn the_older_node_keeps_a_repeated_public_ip() {
        let mut nodes = Nodes::default();
        let sp = space();
        for (name, created, cidr, ip) in [
            ("b", "2026-01-01T00:00:00Z", "10.244.2.0/24", "172.31.0.2"),
            ("a", "2026-01-02T00:00:00Z", "10.244.3.0/24", "172.31.0.2"),
            ("me", "2026-01-01T00:00:00Z", "10.244.1.0/24", "172.31.0.1"),
            ("c", "2026-01-03T00:00:00Z", "10.244.4.0/24", "172.31.0.1"),
        ] {
            nodes.apply(&node(name, created, &[cidr], &flannel(ip)), &sp);
        }
        let mut vxlan = flannel("172.31.0.5");
        vxlan[1] = (BACKEND_TYPE, "vxlan");
        nodes.apply(
            &node("v", "2026-01-01T00:00:00Z", &["10.244.5.0/24"], &vxlan),
            &sp,
        );
        let outside = flannel("172.31.0.6");
        nodes.apply(
            &node("o", "2026-01-01T00:00:00Z", &["10.245.2.0/24"], &outside),
            &sp,
        );
        let (names, reasons) = routed(&mut nodes);
        assert_eq!(names, ["b"]);
        for want in [
            "a: 172.31.0.2 is already the public IP of the older Node b",
            "c: public IP 172.31.0.1 is this node's address",
            "v: backend type \"vxlan\", not \"host-gw\"",
            "o: 10.245.2.0/24 is outside the Network 10.244.0.0/16",
        ] {
            assert!(
                reasons.iter().any(|r| r.starts_with(want)),
                "{want:?} in {reasons:?}"
            );
        }
        nodes.delete(&node("b", "2026-01-01T00:00:00Z", &[], &[]));
        assert_eq!(routed(&mut nodes).0, ["a"]);
    }

    #[test]
    fn only_changes_that_matter_to_peers_are_changes() {
        let mut nodes = Nodes::default();
        let sp = space();
        let t = "2026-01-01T00:00:00Z";
        let n2 = node("n2", t, &["10.244.2.0/24"], &flannel("172.31.0.2"));
        assert!(nodes.apply(&n2, &sp), "a new flannel node");
        let mut heartbeat = n2.clone();
        heartbeat.metadata.resource_version = Some("99".into());
        heartbeat.metadata.labels = Some([("k".to_owned(), "v".to_owned())].into());
        assert!(!nodes.apply(&heartbeat, &sp), "a status or label update");
        let moved = node("n2", t, &["10.244.2.0/24"], &flannel("172.31.0.22"));
        assert!(nodes.apply(&moved, &sp), "a new public IP");
        let plain = node("n3", t, &["10.244.3.0/24"], &[]);
        assert!(!nodes.apply(&plain, &sp), "not a flannel node");
        assert!(!nodes.delete(&plain), "not a flannel node");
        assert!(nodes.delete(&n2));
    }
}
