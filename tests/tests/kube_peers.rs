//! Peers from the Kubernetes API (`[kube]`), against the lab's API server in a namespace
//! of its own on the lab's L2 segment: the nodes reach it over the lab network as they
//! would reach a cluster's API server. Each agent reads its pod CIDRs from its Node,
//! announces itself with flannel's annotations through `nodes/status`, and takes every
//! other flannel node (hgw or flanneld) as a peer.

mod kube_lab;

use std::time::{Duration, Instant};

use hgw_tests::{counter_sum, hgw_routes, log_lines, udp_replied_exchange};
use kube_lab::{KubeLab, PREFIX, TIMEOUT, flannel_annotations, has_peer};
use serde_json::{Value, json};

#[test]
fn three_nodes_from_node_objects_talk_over_the_fast_path_in_both_families() -> anyhow::Result<()> {
    let kube = KubeLab::up(3, 1, 3)?;
    let lab = &kube.lab;
    for (i, node) in lab.nodes.iter().enumerate() {
        // hgw's own annotations are exactly flanneld's for a dual-stack host-gw node.
        let object = kube.api.node(&node.name).expect("node");
        let annotations = &object["metadata"]["annotations"];
        assert_eq!(
            annotations,
            &flannel_annotations(
                &node.uplink_ip.to_string(),
                Some(&node.uplink_ip6.to_string())
            ),
            "{}'s annotations",
            node.name
        );
        let conditions = object["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            conditions.iter().any(|c| c["type"] == "NetworkUnavailable"
                && c["status"] == "False"
                && c["reason"] == "FlannelIsUp"),
            "{}: no NetworkUnavailable=False in {conditions:?}",
            node.name
        );
        let status = lab.agent(i).expect("agent").status()?;
        assert_eq!(status.pod_cidr.as_deref(), Some(node.pod_cidr.as_str()));
        assert_eq!(status.pod_cidr_v6.as_deref(), Some(node.pod_cidr6.as_str()));
        assert_eq!(status.peers.len(), 4, "two peers, two families:\n{status}");
        for (j, other) in lab.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(
                has_peer(&status, &other.pod_cidr),
                "n{}: no n{}:\n{status}",
                i + 1,
                j + 1
            );
            assert!(
                has_peer(&status, &other.pod_cidr6),
                "n{}: no n{} v6:\n{status}",
                i + 1,
                j + 1
            );
            assert!(
                status
                    .peers
                    .iter()
                    .any(|p| p.source == format!("node/{}", other.name)),
                "peers name their Node:\n{status}"
            );
        }
    }
    // Followed with a watch that asks for bookmarks.
    assert!(
        kube.api
            .requests()
            .iter()
            .any(|r| r.uri.contains("watch=") && r.uri.contains("allowWatchBookmarks=true")),
        "no watch with bookmarks: {:#?}",
        kube.api.requests()
    );
    // Announced through nodes/status with strategic merge patches, as flanneld does.
    let patches = kube.api.patches();
    assert!(!patches.is_empty());
    for patch in &patches {
        assert_eq!(patch.subresource.as_deref(), Some("status"), "{patch:?}");
        assert_eq!(
            patch.user, "system:serviceaccount:kube-flannel:hgw",
            "{patch:?}"
        );
        assert!(
            patch
                .content_type
                .starts_with("application/strategic-merge-patch+json"),
            "{patch:?}"
        );
    }

    const PACKETS: usize = 200;
    let before = lab.statuses()?;
    let mut sent = 0;
    for (a, b) in lab.cross_node_pod_pairs() {
        let got = udp_replied_exchange(&a.ns, &b.ns, b.ip, PACKETS)?;
        assert_eq!(got, PACKETS, "{} -> {} over IPv4", a.ip, b.ip);
        let got = udp_replied_exchange(&a.ns, &b.ns, b.ip6, PACKETS)?;
        assert_eq!(got, PACKETS, "{} -> {} over IPv6", a.ip6, b.ip6);
        sent += PACKETS;
    }
    let after = lab.statuses()?;
    for family in ["ipv4", "ipv6"] {
        let name = format!("{family}.fwd_to_peer");
        let grew = counter_sum(&after, &name) - counter_sum(&before, &name);
        assert!(
            grew >= sent as u64,
            "{name} grew by {grew}, {sent} datagrams sent"
        );
    }
    Ok(())
}

#[test]
fn flanneld_nodes_join_get_a_late_pod_cidr_and_leave_within_a_second() -> anyhow::Result<()> {
    // n3 plays a flanneld node: its Node is announced the way flanneld announces it.
    let kube = KubeLab::up(3, 1, 2)?;
    let n3 = kube.lab.nodes[2].clone();
    let start = Instant::now();
    kube.api.modify_node(&n3.name, |node| {
        node["metadata"]["annotations"] =
            flannel_annotations(&n3.uplink_ip.to_string(), Some(&n3.uplink_ip6.to_string()));
    })?;
    let joined = kube.everywhere(Duration::from_secs(1), |s| {
        has_peer(s, &n3.pod_cidr) && has_peer(s, &n3.pod_cidr6)
    })?;
    for node in &kube.lab.nodes[..2] {
        let routes = hgw_routes(&node.ns)?;
        let want = format!("{} via {}", n3.pod_cidr, n3.uplink_ip);
        assert!(
            routes.iter().any(|r| r.starts_with(&want)),
            "{}: {routes:?}",
            node.name
        );
    }
    eprintln!(
        "flanneld node n3 applied everywhere {joined:?} after its annotations ({:?} in all)",
        start.elapsed()
    );

    // A fourth node whose pod CIDR comes late: no peer until then, then one within 1 s.
    let late = "10.244.40.0/24";
    kube.api.add_node(json!({
        "metadata": {"name": "n4-late", "annotations": flannel_annotations("172.31.0.40", None)},
        "spec": {},
    }))?;
    std::thread::sleep(Duration::from_millis(500));
    for agent in kube.lab.agents() {
        let status = agent.status()?;
        assert!(
            !status.peers.iter().any(|p| p.name == "n4-late"),
            "{status}"
        );
    }
    kube.api.modify_node("n4-late", |node| {
        node["spec"] = json!({"podCIDR": late, "podCIDRs": [late]});
    })?;
    let took = kube.everywhere(Duration::from_secs(1), |s| {
        s.peers.iter().any(|p| p.pod_cidr == late && p.route)
    })?;
    eprintln!("late pod CIDR applied everywhere in {took:?}");

    kube.api.delete_node(&n3.name)?;
    let left = kube.everywhere(Duration::from_secs(1), |s| {
        !s.peers
            .iter()
            .any(|p| p.pod_cidr == n3.pod_cidr || p.pod_cidr == n3.pod_cidr6)
    })?;
    for node in &kube.lab.nodes[..2] {
        let routes = hgw_routes(&node.ns)?;
        assert!(
            !routes.iter().any(|r| r.starts_with(&n3.pod_cidr)),
            "{}: {routes:?}",
            node.name
        );
    }
    eprintln!("deleted Node gone everywhere in {left:?}");
    Ok(())
}

#[test]
fn bad_nodes_are_skipped_with_a_warning_naming_them() -> anyhow::Result<()> {
    let kube = KubeLab::up(3, 1, 2)?;
    let n3 = kube.lab.nodes[2].clone();
    let ip3 = n3.uplink_ip.to_string();
    let bad: &[(&str, &str, Value, &str)] = &[
        (
            "bad-vxlan",
            "10.244.50.0/24",
            json!({format!("{PREFIX}backend-type"): "vxlan"}),
            "not \"host-gw\"",
        ),
        (
            "bad-outside",
            "10.245.0.0/24",
            json!({}),
            "outside the Network",
        ),
        (
            "bad-overlap",
            "10.244.1.0/25",
            json!({format!("{PREFIX}public-ip"): "172.31.0.51"}),
            // n1's own pod CIDR on n1, peer n1's on the others.
            "10.244.1.0/25 overlaps",
        ),
        (
            "bad-offlink",
            "10.244.52.0/24",
            json!({format!("{PREFIX}public-ip"): "192.0.2.7"}),
            "not on the subnet of uplink",
        ),
        (
            "bad-ip",
            "10.244.54.0/24",
            json!({format!("{PREFIX}public-ip"): "not-an-ip"}),
            "not an IPv4 address",
        ),
        (
            "bad-repeat",
            "10.244.55.0/24",
            json!({format!("{PREFIX}public-ip"): ip3}),
            "already the public IP of the older Node",
        ),
    ];
    // n3 (a flanneld node) is the older one with its public IP: creationTimestamp has
    // whole seconds, and a tie would go by name (bad-repeat first).
    std::thread::sleep(Duration::from_millis(1100));
    kube.api.modify_node(&n3.name, |node| {
        node["metadata"]["annotations"] =
            flannel_annotations(&ip3, Some(&n3.uplink_ip6.to_string()));
    })?;
    kube.everywhere(TIMEOUT, |s| has_peer(s, &n3.pod_cidr))?;
    for (i, (name, cidr, overrides, _)) in bad.iter().enumerate() {
        let mut annotations = flannel_annotations(&format!("172.31.0.{}", 60 + i), None);
        for (k, v) in overrides.as_object().expect("object") {
            annotations[k] = v.clone();
        }
        kube.api.add_node(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDRs": [cidr]},
        }))?;
    }
    // A good one after them: once it is in, the bad ones have been seen.
    kube.api.add_node(json!({
        "metadata": {"name": "good", "annotations": flannel_annotations("172.31.0.99", None)},
        "spec": {"podCIDRs": ["10.244.99.0/24"]},
    }))?;
    kube.everywhere(TIMEOUT, |s| {
        has_peer(s, &n3.pod_cidr) && s.peers.iter().any(|p| p.name == "good")
    })?;
    std::thread::sleep(Duration::from_millis(300));
    for agent in kube.lab.agents() {
        let status = agent.status()?;
        let log = agent.log();
        for (name, _, _, reason) in bad {
            assert!(
                !status.peers.iter().any(|p| p.name == *name && p.route),
                "{name} got a route:\n{status}"
            );
            let named = log_lines(&log).any(|l| {
                l.level == "WARN"
                    && l.message.contains(&format!("node/{name}"))
                    && l.message.contains(reason)
            });
            assert!(
                named,
                "no WARN naming node/{name} and saying {reason:?}:\n{log}"
            );
        }
        // The rest still applies, traffic included.
        assert!(has_peer(&status, &n3.pod_cidr), "{status}");
    }
    let (a, b) = (&kube.lab.nodes[0].pods[0], &kube.lab.nodes[1].pods[0]);
    assert_eq!(udp_replied_exchange(&a.ns, &b.ns, b.ip, 50)?, 50);
    Ok(())
}
