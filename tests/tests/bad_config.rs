//! Each bad configuration: a non-zero exit, a message naming the problem, and nothing
//! left behind (no hgw route, no program, no status socket).

use hgw_tests::{Lab, hgw_programs, hgw_routes, run_in};

/// (what is wrong, how to break node n1's config, text the error must contain)
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "overlapping peer CIDRs",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.244.2.128/25\"\n",
        &["peers[1].pod_cidr", "overlaps peers[0]"],
    ),
    (
        "a peer CIDR containing this node's",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.244.0.0/20\"\n",
        &["peers[1].pod_cidr", "overlaps this node's pod_cidr"],
    ),
    (
        "a peer CIDR equal to this node's",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.244.1.0/24\"\n",
        &["peers[1].pod_cidr", "overlaps this node's pod_cidr"],
    ),
    (
        "a CIDR outside the cluster CIDR",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.99.0.0/24\"\n",
        &["peers[1].pod_cidr", "not inside cluster_cidr"],
    ),
    (
        "a peer node IP off the uplink's subnet",
        "[[peers]]\nname = \"x\"\nnode_ip = \"192.168.77.9\"\npod_cidr = \"10.244.9.0/24\"\n",
        &[
            "peers[1].node_ip",
            "192.168.77.9",
            "not on the subnet of uplink",
        ],
    ),
    (
        "an IPv6 peer node IP off the uplink's IPv6 subnet",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.244.9.0/24\"\nnode_ip_v6 = \"fd00:99::9\"\npod_cidr_v6 = \"fd00:244:9::/64\"\n",
        &[
            "peers[1].node_ip_v6",
            "fd00:99::9",
            "not on the subnet of uplink",
        ],
    ),
    (
        "overlapping IPv6 peer CIDRs",
        "[[peers]]\nname = \"x\"\nnode_ip = \"172.31.0.9\"\npod_cidr = \"10.244.9.0/24\"\nnode_ip_v6 = \"fd00:172:31::9\"\npod_cidr_v6 = \"fd00:244:2::/80\"\n",
        &["peers[1].pod_cidr_v6", "overlaps peers[0].pod_cidr_v6"],
    ),
];

#[test]
fn bad_configs_are_rejected_before_anything_changes() -> anyhow::Result<()> {
    let lab = Lab::up(2, 1)?;
    let ns = lab.nodes[0].ns.clone();
    let mut cases: Vec<(String, String, Vec<&str>)> = CASES
        .iter()
        .map(|(what, extra, expect)| {
            (
                what.to_string(),
                format!("{}{extra}", lab.agent_config(0)),
                expect.to_vec(),
            )
        })
        .collect();
    cases.push((
        "an unknown interface".into(),
        lab.agent_config(0)
            .replace("uplink = \"eth0\"", "uplink = \"nosuch0\""),
        vec!["uplink", "nosuch0", "no such interface"],
    ));

    // This node's own CIDRs taking the node's traffic: a default route, the uplink's
    // own network (both would hand SSH to the node to the uplink program as "a pod").
    let n1 = &lab.nodes[0];
    let bare = |pod: &str, cluster: &str, v6: &str| {
        format!(
            "node_name = \"{}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\npod_cidr = \"{pod}\"\ncluster_cidr = \"{cluster}\"\n{v6}",
            n1.name
        )
    };
    cases.push((
        "a default route as the pod and cluster CIDR".into(),
        bare("0.0.0.0/0", "0.0.0.0/0", ""),
        vec!["pod_cidr", "0.0.0.0/0", "default route"],
    ));
    cases.push((
        "the uplink's network as the pod CIDR".into(),
        bare("172.31.0.0/24", "172.31.0.0/16", ""),
        vec!["pod_cidr", "overlaps the uplink's network 172.31.0.0/24"],
    ));
    cases.push((
        "a cluster CIDR holding the uplink's network".into(),
        bare("172.16.1.0/24", "172.16.0.0/12", ""),
        vec![
            "cluster_cidr",
            "overlaps the uplink's network 172.31.0.0/24",
        ],
    ));
    cases.push((
        "the uplink's IPv6 network as the IPv6 pod CIDR".into(),
        bare(
            "10.244.1.0/24",
            "10.244.0.0/16",
            "pod_cidr_v6 = \"fd00:172:31::/64\"\ncluster_cidr_v6 = \"fd00:172::/32\"\n",
        ),
        vec![
            "pod_cidr_v6",
            "overlaps the uplink's network fd00:172:31::/64",
        ],
    ));

    for (what, config, expect) in cases {
        let (status, stderr, socket) = lab.run_agent_to_exit(0, &config)?;
        assert!(!status.success(), "{what}: the agent accepted it");
        for text in expect {
            assert!(
                stderr.contains(text),
                "{what}: the error does not say {text:?}:\n{stderr}"
            );
        }
        assert!(
            hgw_routes(&ns)?.is_empty(),
            "{what}: an hgw route was left behind"
        );
        assert!(
            hgw_programs(&ns)?.is_empty(),
            "{what}: a program was left attached"
        );
        assert!(!socket.exists(), "{what}: the status socket was created");
        for tool in ["iptables", "ip6tables"] {
            let forward = run_in(&ns, tool, &["-w", "-S", "FORWARD"])?;
            let forward = String::from_utf8_lossy(&forward.stdout);
            assert!(
                !forward.contains("hgw"),
                "{what}: a {tool} FORWARD rule was added:\n{forward}"
            );
        }
    }
    Ok(())
}
