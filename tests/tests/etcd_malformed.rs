//! Bad etcd subnet entries are left out with a warning that names the key and says why
//! (a WARN line, not any line that mentions the key, and no `peer` line accepting it);
//! no route or map entry results from them, and everything valid keeps working. Of two
//! entries with the same PublicIP the older one stays.

use std::time::Duration;

use hgw_tests::{Etcd, check_key_rejected, hgw_routes, ping};

/// (key, value, what it is, what the warning must say). n1 is 172.31.0.1 with
/// 10.244.1.0/24, n2 172.31.0.2 with 10.244.2.0/24, both on the uplink 172.31.0.0/24.
const BAD: &[(&str, &str, &str, &str)] = &[
    (
        "/coreos.com/network/subnets/10.244.20.0-24",
        "{not json",
        "bad JSON",
        "not a flannel lease",
    ),
    (
        "/coreos.com/network/subnets/10.244.300.0-24",
        r#"{"PublicIP":"172.31.0.21"}"#,
        "bad CIDR in the key",
        "not a subnet key",
    ),
    (
        "/coreos.com/network/subnets/10.244.2.128-25",
        r#"{"PublicIP":"172.31.0.22"}"#,
        "overlaps n2's subnet",
        "overlaps the older entry /coreos.com/network/subnets/10.244.2.0-24",
    ),
    (
        "/coreos.com/network/subnets/10.99.0.0-24",
        r#"{"PublicIP":"172.31.0.23"}"#,
        "outside the network",
        "outside the Network 10.244.0.0/16",
    ),
    (
        "/coreos.com/network/subnets/10.244.24.0-24",
        r#"{"PublicIP":"192.168.200.24"}"#,
        "PublicIP off the L2 subnet",
        "192.168.200.24",
    ),
    (
        "/coreos.com/network/subnets/10.244.25.0-24",
        r#"{"PublicIP":"not-an-ip"}"#,
        "PublicIP not an address",
        "PublicIP \"not-an-ip\" is not an IPv4 address",
    ),
    (
        "/coreos.com/network/subnets/172.31.0.0-24",
        r#"{"PublicIP":"172.31.0.26"}"#,
        "a reservation over the uplink's network",
        "overlaps the uplink's network 172.31.0.0/24",
    ),
    (
        "/coreos.com/network/subnets/10.244.27.0-24",
        r#"{"PublicIP":"172.31.0.2","BackendType":"host-gw"}"#,
        "n2's PublicIP again",
        "PublicIP 172.31.0.2 is already the address of the older entry /coreos.com/network/subnets/10.244.2.0-24",
    ),
    (
        "/coreos.com/network/subnets/10.244.28.0-24",
        r#"{"PublicIP":"172.31.0.1","BackendType":"host-gw"}"#,
        "this node's PublicIP",
        "PublicIP 172.31.0.1 is this node's address",
    ),
];

#[test]
fn malformed_subnet_entries_are_ignored_and_named() -> anyhow::Result<()> {
    let (lab, etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    for (key, value, _, _) in BAD {
        etcd.put(key, value)?;
    }
    // A valid entry written after the bad ones proves the agent has seen them all.
    etcd.put(
        "/coreos.com/network/subnets/10.244.30.0-24",
        r#"{"PublicIP":"172.31.0.30","BackendType":"host-gw"}"#,
    )?;
    let agent = lab.agent(0).expect("agent");
    let status = agent.wait_for(Duration::from_secs(5), |s| {
        s.peers
            .iter()
            .any(|p| p.pod_cidr == "10.244.30.0/24" && p.route)
    })?;
    let peers: Vec<(&str, &str)> = status
        .peers
        .iter()
        .map(|p| (p.pod_cidr.as_str(), p.node_ip.as_str()))
        .collect();
    assert_eq!(
        peers,
        [
            ("10.244.2.0/24", "172.31.0.2"),
            ("10.244.30.0/24", "172.31.0.30")
        ],
        "only n2 (its older entry) and the valid new entry are peers"
    );

    let log = agent.log();
    for (key, _, what, reason) in BAD {
        if let Err(e) = check_key_rejected(&log, key, reason) {
            panic!("{what}: {e:#}\n{log}");
        }
    }
    let routes = hgw_routes(&lab.nodes[0].ns)?;
    for bad in [
        "10.244.20.0",
        "10.244.2.128",
        "10.99.0.0",
        "10.244.24.0",
        "10.244.25.0",
        "172.31.0.0",
        "10.244.27.0",
        "10.244.28.0",
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
