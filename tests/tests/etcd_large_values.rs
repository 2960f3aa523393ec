//! Large values under `subnets/` neither keep an agent from its peers nor stay in its
//! memory: four 1.4 MB values (etcd accepts each; together more than gRPC's default
//! 4 MiB message) are each left out with a warning naming the key and the size, and an
//! agent that starts afterwards still lists the subnets, gets its peers and routes. With
//! 20 more (small, off-link) entries sorting before n2's, the listing takes pages: n2's
//! entry is past the first one.

use std::time::Duration;

use hgw_tests::{Etcd, check_key_rejected, hgw_routes};

const LARGE: usize = 1_400_000;

#[test]
fn a_starting_agent_lists_past_large_values() -> anyhow::Result<()> {
    let (mut lab, etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    let keys: Vec<String> = (0..4)
        .map(|n| format!("/coreos.com/network/subnets/10.244.{}.0-24", 40 + n))
        .collect();
    for (n, key) in keys.iter().enumerate() {
        let value = format!(
            r#"{{"PublicIP":"172.31.0.{}","Junk":"{}"}}"#,
            40 + n,
            "x".repeat(LARGE)
        );
        etcd.put_large(key, &value)?;
    }
    let small: Vec<(String, String)> = (100..120)
        .map(|n| {
            (
                format!("/coreos.com/network/subnets/10.244.{n}.0-24"),
                format!(r#"{{"PublicIP":"192.168.200.{n}"}}"#),
            )
        })
        .collect();
    etcd.put_many(&small)?;

    // n1 again, from scratch: its first listing holds all four.
    let agent = lab.agent_mut(0).expect("n1's agent");
    agent.stop()?;
    let config = etcd.agent_config(&lab, 0, "");
    let agent = lab.start_agent_with_config(0, &config, &[])?;
    let status = agent.wait_for(Duration::from_secs(20), |s| {
        s.ready
            && s.peers
                .iter()
                .any(|p| p.pod_cidr == "10.244.2.0/24" && p.route)
    });
    let log = agent.log();
    let status = status.map_err(|e| anyhow::anyhow!("{e:#}\n{log}"))?;
    let cidrs: Vec<&str> = status.peers.iter().map(|p| p.pod_cidr.as_str()).collect();
    assert_eq!(cidrs, ["10.244.2.0/24"], "only n2 is a peer");
    for key in &keys {
        if let Err(e) = check_key_rejected(&log, key, "bytes") {
            panic!("{e:#}\n{log}");
        }
    }
    let (last_small, _) = &small[small.len() - 1];
    if let Err(e) = check_key_rejected(&log, last_small, "192.168.200.119") {
        panic!("{e:#}\n{log}");
    }
    let routes = hgw_routes(&lab.nodes[0].ns)?;
    assert!(
        routes.iter().any(|r| r.starts_with("10.244.2.0/24")),
        "no route to n2's pods: {routes:?}"
    );
    Ok(())
}
