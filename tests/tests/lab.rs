//! The lab itself, without any agent: its L2/L3 shape is right, and with the kernel
//! routes flannel's host-gw would install (added by hand here), pods on different nodes
//! talk. Dropping the lab leaves no namespace behind.

use hgw_tests::{Lab, list_namespaces, ping, run_in_ok, tcp_transfer, udp_exchange};

fn assert_ping(from_ns: &str, to: std::net::Ipv4Addr, what: &str) -> anyhow::Result<()> {
    let out = ping(from_ns, to, 2, &[])?;
    assert!(
        out.status.success(),
        "{what}: ping {from_ns} -> {to} failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// What flannel host-gw does on each node: a route per peer, and forwarding on.
fn add_host_gw_routes(lab: &Lab) -> anyhow::Result<()> {
    for node in &lab.nodes {
        run_in_ok(&node.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        for peer in lab.nodes.iter().filter(|p| p.name != node.name) {
            let via = peer.uplink_ip.to_string();
            run_in_ok(
                &node.ns,
                "ip",
                &[
                    "route",
                    "add",
                    &peer.pod_cidr,
                    "via",
                    &via,
                    "dev",
                    "eth0",
                    "onlink",
                ],
            )?;
        }
    }
    Ok(())
}

#[test]
fn lab_wires_nodes_and_pods_like_host_gw() -> anyhow::Result<()> {
    let lab = Lab::up(2, 2)?;
    let id = lab.id.clone();
    assert_eq!(lab.nodes.len(), 2);
    assert_eq!(lab.namespaces().len(), 1 + 2 + 4, "switch + nodes + pods");
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    assert_eq!(n1.pods[1].ip, std::net::Ipv4Addr::new(10, 244, 1, 12));

    assert_ping(&n1.pods[0].ns, n1.gateway, "pod to its gateway")?;
    assert_ping(
        &n1.pods[0].ns,
        n1.pods[1].ip,
        "pod to a pod on the same node",
    )?;
    assert_ping(&n1.ns, n2.uplink_ip, "node to node over the switch")?;
    let out = ping(&n1.pods[0].ns, n2.pods[0].ip, 1, &[])?;
    assert!(
        !out.status.success(),
        "pods on different nodes talk before any route exists"
    );

    add_host_gw_routes(&lab)?;
    for (from, to) in lab.cross_node_pod_pairs() {
        assert_ping(
            &from.ns,
            to.ip,
            "pod to pod across nodes over kernel routes",
        )?;
    }
    let (a, b) = (&n1.pods[0], &n2.pods[1]);
    tcp_transfer(&a.ns, &b.ns, b.ip, 1 << 20)?;
    tcp_transfer(&b.ns, &a.ns, a.ip, 100_000)?;
    assert_eq!(udp_exchange(&a.ns, &b.ns, b.ip, 100)?, 100);
    assert_eq!(udp_exchange(&b.ns, &a.ns, a.ip, 100)?, 100);

    drop(lab);
    let prefix = format!("{id}-");
    let left: Vec<String> = list_namespaces()?
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left after drop: {left:?}");
    assert!(
        !std::env::temp_dir().join(&id).exists(),
        "temp dir left after drop"
    );
    Ok(())
}

#[test]
fn traffic_helpers_report_failure_instead_of_hanging() -> anyhow::Result<()> {
    // No routes between the nodes: every cross-node attempt must fail within its timeouts.
    let lab = Lab::up(2, 1)?;
    let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let started = std::time::Instant::now();
    assert!(
        tcp_transfer(&a.ns, &b.ns, b.ip, 1000).is_err(),
        "TCP got through without a route"
    );
    assert_eq!(
        udp_exchange(&a.ns, &b.ns, b.ip, 10)?,
        0,
        "UDP got through without a route"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "failing took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn ids_are_unique_and_keep_then_down_removes_a_lab() -> anyhow::Result<()> {
    assert!(Lab::up(0, 1).is_err());
    let (a, b) = (Lab::up(1, 0)?, Lab::up(1, 0)?);
    assert_ne!(a.id, b.id);
    assert!(hgw_tests::is_lab_id(&a.id), "{} is not a lab id", a.id);
    assert!(!hgw_tests::is_lab_id("hgw"), "bare prefix accepted");
    assert!(!hgw_tests::is_lab_id("hgwxyz1"), "non-hex accepted");
    // `keep` + `down`: the xtask lab up / lab down path.
    let id = a.keep();
    assert!(list_namespaces()?.contains(&format!("{id}-n1")));
    Lab::down(&id)?;
    assert!(
        !list_namespaces()?
            .iter()
            .any(|ns| ns.starts_with(&format!("{id}-")))
    );
    assert!(Lab::down("").is_err(), "an empty id would match everything");
    Ok(())
}
