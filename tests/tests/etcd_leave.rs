//! A node leaves (its agent is gone and its lease revoked): within a second its route
//! and fast-path entry are gone on every other node.

use std::time::Duration;

use hgw_tests::{Etcd, hgw_routes};

#[test]
fn a_leaving_node_is_removed_everywhere_within_a_second() -> anyhow::Result<()> {
    let (mut lab, etcd) = Etcd::lab_with_agents(3, 1, 3)?;
    let gone = lab.nodes[2].pod_cidr.clone();
    let status = lab.agent(0).expect("agent").status()?;
    let lease = status
        .peer(&gone)
        .and_then(|p| p.lease.clone())
        .ok_or_else(|| anyhow::anyhow!("n1 does not show n3's lease:\n{status}"))?;

    lab.agent_mut(2).expect("agent").kill()?;
    etcd.ctl(&["lease", "revoke", &lease])?;
    for node in 0..2 {
        lab.agent(node)
            .expect("agent")
            .wait_for(Duration::from_secs(1), |s| s.peer(&gone).is_none())?;
        let routes = hgw_routes(&lab.nodes[node].ns)?;
        assert!(
            !routes.iter().any(|r| r.starts_with(&gone)),
            "n{}: route to {gone} left: {routes:?}",
            node + 1
        );
    }
    Ok(())
}
