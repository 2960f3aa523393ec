//! `ip_masq = true`: the agent installs flannel's masquerade rules (nftables table
//! `inet hgw-masq`), for both families. A host on the lab's switch outside the cluster
//! (172.31.0.200 and fd00:172:31::200, no route to any pod CIDR) sees n1's address
//! when n1's pod talks to it; a pod on n2 sees n1's pod's own address.
//!
//! - Without `ip_masq` the outside host cannot answer the pod (no masquerade, no route
//!   back): asserted first, so the answers afterwards are the table's doing.
//! - subnet.env's FLANNEL_IPMASQ follows the setting.
//! - A restart with the table in place replaces it (one copy of each rule); a restart
//!   without `ip_masq` removes it, and the outside host is out of reach again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hgw_tests::{Lab, OutsideHost, is_ok_reply, run_in, run_in_ok, tcp_request};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 0x200);
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(5);
const READY: Duration = Duration::from_secs(15);
/// Rules in the table of a dual-stack node: kube-proxy's mark, then five per family.
const RULES: usize = 11;

#[test]
fn ip_masq_masquerades_pods_leaving_the_cluster_only() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in 0..lab.nodes.len() {
        lab.start_agent(node, &[])?.wait_ready(READY)?;
    }
    // Declared after the lab, so it is dropped (deleted) first.
    let outside = OutsideHost::add(&lab, OUTSIDE_IP)?;
    run_in_ok(
        &outside.ns,
        "ip",
        &[
            "addr",
            "add",
            &format!("{OUTSIDE_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (pod, remote) = (n1.pods[0].clone(), n2.pods[0].clone());
    let servers = [
        SocketAddr::from((OUTSIDE_IP, PORT)),
        SocketAddr::from((OUTSIDE_IP6, PORT)),
    ];
    let outside_unreachable = |when: &str| {
        for server in servers {
            let result = tcp_request(&pod.ns, &outside.ns, server, server, Duration::from_secs(2));
            assert!(
                result.is_err(),
                "{when}: the outside host answered a pod address at {server} ({result:?})"
            );
        }
    };
    outside_unreachable("without ip_masq");
    let env = std::fs::read_to_string(lab.subnet_env_path(0))?;
    assert!(env.contains("FLANNEL_IPMASQ=false\n"), "{env}");

    for round in ["ip_masq", "ip_masq again (restart over the table)"] {
        for node in 0..lab.nodes.len() {
            lab.start_agent(node, &["--ip-masq"])?.wait_ready(READY)?;
        }
        let table = nft_table(&n1.ns)?.expect("table inet hgw-masq");
        let rules = table
            .lines()
            .filter(|l| l.contains(" return") || l.contains(" masquerade"))
            .count();
        assert_eq!(rules, RULES, "{round}: the table holds\n{table}");
        let env = std::fs::read_to_string(lab.subnet_env_path(0))?;
        assert!(env.contains("FLANNEL_IPMASQ=true\n"), "{round}: {env}");

        for (server, node_ip) in servers
            .into_iter()
            .zip([IpAddr::V4(n1.uplink_ip), IpAddr::V6(n1.uplink_ip6)])
        {
            let answer = tcp_request(&pod.ns, &outside.ns, server, server, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{round}: pod -> outside {server}: {e:#}"))?;
            assert!(is_ok_reply(&answer.reply), "reply {:?}", answer.reply);
            assert_eq!(
                answer.server_saw.ip(),
                node_ip,
                "{round}: the outside host must see n1's address"
            );
        }
        for (server, own) in [
            (SocketAddr::from((remote.ip, PORT)), IpAddr::V4(pod.ip)),
            (SocketAddr::from((remote.ip6, PORT)), IpAddr::V6(pod.ip6)),
        ] {
            let answer = tcp_request(&pod.ns, &remote.ns, server, server, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{round}: pod -> pod {server}: {e:#}"))?;
            assert!(is_ok_reply(&answer.reply), "reply {:?}", answer.reply);
            assert_eq!(
                answer.server_saw.ip(),
                own,
                "{round}: pod-to-pod traffic must keep the pod's address"
            );
        }
    }

    // Off again: the table goes with the setting.
    lab.start_agent(0, &[])?.wait_ready(READY)?;
    assert_eq!(nft_table(&n1.ns)?, None, "the table outlived ip_masq");
    outside_unreachable("after ip_masq was turned off");
    drop(outside);
    Ok(())
}

/// `nft list table inet hgw-masq` in `ns`, if the table is there.
fn nft_table(ns: &str) -> anyhow::Result<Option<String>> {
    let out = run_in(ns, "nft", &["list", "table", "inet", "hgw-masq"])?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}
