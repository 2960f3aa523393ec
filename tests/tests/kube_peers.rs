//! Peers from the Kubernetes API (`[kube]`), against the lab's API server in a namespace
//! of its own on the lab's L2 segment: the nodes reach it over the lab network as they
//! would reach a cluster's API server. Each agent reads its pod CIDRs from its Node,
//! announces itself with flannel's annotations through `nodes/status`, and takes every
//! other flannel node (hgw or flanneld) as a peer.

use std::time::{Duration, Instant};

use hgw_tests::{
    CLUSTER_CIDR, CLUSTER_CIDR_V6, FLANNEL_GRANTS, KubeApi, Lab, counter_sum, hgw_routes,
    log_lines, udp_replied_exchange,
};
use serde_json::{Value, json};

/// Where the API server listens on the lab segment (the nodes are .1 to .N, etcd .250).
const API_IP: &str = "172.31.0.251";
const TOKEN: &str = "hgw-node-token";
const TIMEOUT: Duration = Duration::from_secs(15);
const PREFIX: &str = "flannel.alpha.coreos.com/";

struct KubeLab {
    // The agents go with the lab, before the server they talk to.
    lab: Lab,
    api: KubeApi,
    kubeconfig: String,
    net_conf: String,
}

impl KubeLab {
    /// A dual-stack lab of `nodes` x `pods`, a Node object per lab node (its lab pod
    /// CIDRs in spec.podCIDRs) and kube-mode agents on `0..agents`, each ready.
    fn up(nodes: usize, pods: usize, agents: usize) -> anyhow::Result<KubeLab> {
        let mut lab = Lab::up(nodes, pods)?;
        let ns = lab.add_extra_namespace("kube")?;
        let sw = format!("{}-sw", lab.id);
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "kube", "netns", &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", "kube", "master", "br0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{API_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        let api = KubeApi::start_in(&ns, format!("{API_IP}:6443").parse()?)?;
        api.add_token(
            TOKEN,
            "system:serviceaccount:kube-flannel:hgw",
            FLANNEL_GRANTS,
        );
        let kubeconfig = api.write_kubeconfig(TOKEN)?.display().to_string();
        let net_conf = lab.dir().join("net-conf.json");
        std::fs::write(
            &net_conf,
            json!({
                "Network": CLUSTER_CIDR,
                "EnableIPv6": true,
                "IPv6Network": CLUSTER_CIDR_V6,
                "Backend": {"Type": "host-gw"},
            })
            .to_string(),
        )?;
        for node in &lab.nodes {
            api.add_node(json!({
                "metadata": {"name": node.name},
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
            }))?;
        }
        let mut kube = KubeLab {
            lab,
            api,
            kubeconfig,
            net_conf: net_conf.display().to_string(),
        };
        for node in 0..agents {
            kube.start_agent(node)?;
        }
        for agent in kube.lab.agents() {
            agent.wait_ready(TIMEOUT)?;
        }
        Ok(kube)
    }

    fn config(&self, node: usize) -> String {
        format!(
            "node_name = \"{}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\n\n[kube]\nkubeconfig = \"{}\"\nnet_conf = \"{}\"\n",
            self.lab.nodes[node].name, self.kubeconfig, self.net_conf
        )
    }

    fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let config = self.config(node);
        self.lab.start_agent_with_config(node, &config, &[])?;
        Ok(())
    }

    /// (Re)starts `node`'s agent and waits until its status, not ready, says it waits
    /// for something that contains `what`; what it says.
    fn restart_waiting_for(&mut self, node: usize, what: &str) -> anyhow::Result<String> {
        self.start_agent(node)?;
        let agent = self.lab.agent(node).expect("agent");
        let status = agent.wait_for(TIMEOUT, |s| {
            s.waiting.as_deref().is_some_and(|w| w.contains(what))
        })?;
        anyhow::ensure!(!status.ready, "ready while waiting: {status}");
        Ok(status.waiting.unwrap_or_default())
    }

    /// Waits until every agent's status satisfies `pred`; how long that took.
    fn everywhere(
        &self,
        within: Duration,
        pred: impl Fn(&hgw_tests::Status) -> bool + Copy,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for agent in self.lab.agents() {
            agent.wait_for(within.saturating_sub(start.elapsed()), pred)?;
        }
        Ok(start.elapsed())
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The annotations flanneld writes for a host-gw node (pkg/subnet/kube `AcquireLease`).
fn flannel_annotations(ip4: &str, ip6: Option<&str>) -> Value {
    let mut a = json!({
        format!("{PREFIX}backend-type"): "host-gw",
        format!("{PREFIX}backend-data"): "null",
        format!("{PREFIX}kube-subnet-manager"): "true",
        format!("{PREFIX}public-ip"): ip4,
    });
    if let Some(ip6) = ip6 {
        a[format!("{PREFIX}backend-v6-data")] = json!("null");
        a[format!("{PREFIX}public-ipv6")] = json!(ip6);
    }
    a
}

fn has_peer(status: &hgw_tests::Status, pod_cidr: &str) -> bool {
    status
        .peers
        .iter()
        .any(|p| p.pod_cidr == pod_cidr && p.route && p.mac.is_some())
}

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
            "overlaps",
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

/// Whether `agent`'s log removed a route of peer `name` at any point.
fn removed(log: &str, name: &str) -> bool {
    log_lines(log)
        .any(|l| l.message.starts_with(&format!("peer {name} (")) && l.message.contains("is gone"))
}

#[test]
fn api_server_down_at_start_and_mid_run_and_a_410_keep_the_routes() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 2)?;
    let (n1, n2) = (kube.lab.nodes[0].clone(), kube.lab.nodes[1].clone());
    let route_to_n1 = format!("{} via {}", n1.pod_cidr, n1.uplink_ip);
    let route_kept = |ns: &str| -> anyhow::Result<bool> {
        Ok(hgw_routes(ns)?.iter().any(|r| r.starts_with(&route_to_n1)))
    };

    // Down at start: n2's agent restarts while the API server is away.
    kube.api.stop();
    kube.start_agent(1)?;
    let agent = kube.lab.agent(1).expect("agent");
    let status = agent.wait_for(TIMEOUT, |s| {
        s.waiting
            .as_deref()
            .is_some_and(|w| w.contains("waiting for the Kubernetes API") && w.contains("kube API"))
    })?;
    assert!(!status.ready, "{status}");
    assert!(
        route_kept(&n2.ns)?,
        "n2's route to n1 went while the API server was down"
    );
    kube.api.resume()?;
    let status = agent.wait_ready(Duration::from_secs(20))?;
    assert!(has_peer(&status, &n1.pod_cidr), "{status}");

    // Down mid-run: forwarding goes on with the last peers; a Node added meanwhile
    // comes in once the server is back (the watcher's backoff, then a list).
    kube.api.stop();
    // Status says why, while the routes stay.
    for agent in kube.lab.agents() {
        agent.wait_for(TIMEOUT, |s| {
            s.waiting.as_deref().is_some_and(|w| {
                w.contains("the Kubernetes API") && w.contains("routes and maps kept")
            })
        })?;
    }
    let (a, b) = (&kube.lab.nodes[1].pods[0], &kube.lab.nodes[0].pods[0]);
    assert_eq!(
        udp_replied_exchange(&a.ns, &b.ns, b.ip, 50)?,
        50,
        "traffic while the API server is down"
    );
    assert!(route_kept(&n2.ns)?);
    kube.api.add_node(json!({
        "metadata": {"name": "while-down", "annotations": flannel_annotations("172.31.0.70", None)},
        "spec": {"podCIDRs": ["10.244.70.0/24"]},
    }))?;
    kube.api.resume()?;
    let took = Instant::now();
    kube.everywhere(Duration::from_secs(40), |s| {
        s.peers.iter().any(|p| p.name == "while-down" && p.route)
    })?;
    eprintln!(
        "the Node added while the API server was down applied {:?} after it came back",
        took.elapsed()
    );
    // No longer saying so (not ready, though: while-down's address answers nobody).
    kube.everywhere(TIMEOUT, |s| s.waiting.is_none())?;
    for agent in kube.lab.agents() {
        assert!(
            log_lines(&agent.log())
                .any(|l| l.level == "WARN" && l.message.contains("kube: watching nodes")),
            "no WARN about the broken watch:\n{}",
            agent.log()
        );
    }

    // 410 Gone: the history is expired and the watches broken; the agents list again.
    let seen = kube.api.requests().len();
    kube.api.expire_history();
    kube.api.add_node(json!({
        "metadata": {"name": "after-410", "annotations": flannel_annotations("172.31.0.71", None)},
        "spec": {"podCIDRs": ["10.244.71.0/24"]},
    }))?;
    kube.everywhere(TIMEOUT, |s| {
        s.peers.iter().any(|p| p.name == "after-410" && p.route)
    })?;
    let lists = kube.api.requests()[seen..]
        .iter()
        .filter(|r| {
            r.method == "GET"
                && (r.uri == "/api/v1/nodes" || r.uri.starts_with("/api/v1/nodes?"))
                && !r.uri.contains("watch=")
        })
        .count();
    assert!(
        lists >= 2,
        "{lists} relists after the 410 for two agents: {:#?}",
        kube.api.requests()
    );
    for agent in kube.lab.agents() {
        let log = agent.log();
        for name in [&n1.name, &n2.name, &"while-down".to_owned()] {
            assert!(
                !removed(&log, name),
                "peer {name} removed along the way:\n{log}"
            );
        }
    }
    assert!(route_kept(&n2.ns)?);
    Ok(())
}

#[test]
fn a_forbidden_or_expired_token_is_named_as_the_permission() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 1)?;
    // n2's agent with a token that may list and watch but not get or patch.
    const NARROW: &str = "narrow-token";
    const USER: &str = "system:serviceaccount:kube-flannel:narrow";
    kube.api
        .add_token(NARROW, USER, &[("list", "nodes"), ("watch", "nodes")]);
    kube.kubeconfig = kube.api.write_kubeconfig(NARROW)?.display().to_string();
    let waiting = kube.restart_waiting_for(1, "403")?;
    assert!(
        waiting.contains("403 Forbidden")
            && waiting.contains("nodes get, list, watch and nodes/status patch"),
        "{waiting}"
    );
    // Granted: it starts (the retry picks it up).
    kube.api.add_token(NARROW, USER, FLANNEL_GRANTS);
    kube.lab
        .agent(1)
        .expect("agent")
        .wait_ready(Duration::from_secs(40))?;

    // A revoked token on a restart: 401, named as the token.
    kube.api.revoke_token(NARROW);
    let waiting = kube.restart_waiting_for(1, "401")?;
    assert!(
        waiting.contains("401 Unauthorized") && waiting.contains("token"),
        "{waiting}"
    );
    Ok(())
}

#[test]
fn this_nodes_late_pod_cidr_is_waited_for_and_public_ip_overwrite_honoured() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 1)?;
    let n2 = kube.lab.nodes[1].clone();
    // n2 is reached on a second address, named by flannel's overwrite annotation.
    const OVERWRITE: &str = "172.31.0.202";
    ip(&[
        "-n",
        &n2.ns,
        "addr",
        "add",
        &format!("{OVERWRITE}/24"),
        "dev",
        "eth0",
    ])?;
    kube.api.modify_node(&n2.name, |node| {
        node["spec"] = json!({});
        node["metadata"]["annotations"] =
            json!({format!("{PREFIX}public-ip-overwrite"): OVERWRITE});
    })?;
    let waiting = kube.restart_waiting_for(1, "pod cidr not assigned")?;
    assert!(waiting.contains(&n2.name), "{waiting}");
    let assigned = Instant::now();
    kube.api.modify_node(&n2.name, |node| {
        node["spec"] = json!({"podCIDRs": [n2.pod_cidr, n2.pod_cidr6]});
    })?;
    kube.lab.agent(1).expect("agent").wait_ready(TIMEOUT)?;
    let took = assigned.elapsed();
    eprintln!("n2 ready {took:?} after its pod CIDRs were assigned");
    assert!(
        took < Duration::from_secs(3),
        "ready {took:?} after the assignment"
    );
    let annotations = &kube.api.node(&n2.name).expect("n2")["metadata"]["annotations"];
    assert_eq!(
        annotations[format!("{PREFIX}public-ip")],
        json!(OVERWRITE),
        "{annotations}"
    );
    let status = kube
        .lab
        .agent(0)
        .expect("agent")
        .wait_for(TIMEOUT, |s| has_peer(s, &n2.pod_cidr))?;
    let peer = status
        .peers
        .iter()
        .find(|p| p.pod_cidr == n2.pod_cidr)
        .expect("peer");
    assert_eq!(peer.node_ip, OVERWRITE, "{status}");
    Ok(())
}
