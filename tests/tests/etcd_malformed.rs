//! Malformed etcd values are ignored with a warning naming the key; no route or map
//! entry results from them, and everything valid keeps working.

use std::time::Duration;

use hgw_tests::{Etcd, hgw_routes, ping};

const BAD: &[(&str, &str, &str)] = &[
    (
        "/coreos.com/network/subnets/10.244.20.0-24",
        "{not json",
        "bad JSON",
    ),
    (
        "/coreos.com/network/subnets/10.244.300.0-24",
        r#"{"PublicIP":"172.31.0.21"}"#,
        "bad CIDR in the key",
    ),
    (
        "/coreos.com/network/subnets/10.244.2.128-25",
        r#"{"PublicIP":"172.31.0.22"}"#,
        "overlaps n2's subnet",
    ),
    (
        "/coreos.com/network/subnets/10.99.0.0-24",
        r#"{"PublicIP":"172.31.0.23"}"#,
        "outside the network",
    ),
    (
        "/coreos.com/network/subnets/10.244.24.0-24",
        r#"{"PublicIP":"192.168.200.24"}"#,
        "PublicIP off the L2 subnet",
    ),
    (
        "/coreos.com/network/subnets/10.244.25.0-24",
        r#"{"PublicIP":"not-an-ip"}"#,
        "PublicIP not an address",
    ),
];

#[test]
fn malformed_subnet_entries_are_ignored_and_named() -> anyhow::Result<()> {
    let (lab, etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    for (key, value, _) in BAD {
        etcd.put(key, value)?;
    }
    // A valid entry written after the bad ones proves the agent has seen them all.
    etcd.put(
        "/coreos.com/network/subnets/10.244.30.0-24",
        r#"{"PublicIP":"172.31.0.30","BackendType":"host-gw"}"#,
    )?;
    let agent = lab.agent(0).expect("agent");
    let status = agent.wait_for(Duration::from_secs(5), |s| {
        s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["pod_cidr"] == "10.244.30.0/24" && p["route"] == true)
    })?;
    let peers: Vec<&str> = status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pod_cidr"].as_str())
        .collect();
    assert_eq!(
        peers.len(),
        2,
        "only n2 and the valid new entry are peers: {peers:?}"
    );

    let log = agent.log();
    for (key, _, what) in BAD {
        assert!(log.contains(key), "{what}: no warning naming {key}:\n{log}");
    }
    let routes = hgw_routes(&lab.nodes[0].ns)?;
    for bad in [
        "10.244.20.0",
        "10.244.2.128",
        "10.99.0.0",
        "10.244.24.0",
        "10.244.25.0",
    ] {
        assert!(
            !routes.iter().any(|r| r.starts_with(bad)),
            "route from a malformed entry {bad}: {routes:?}"
        );
    }
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let out = ping(&from.ns, to.ip, 3, &[])?;
    assert!(
        out.status.success(),
        "valid peers stopped working:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
