//! The static peer file changes while the agent runs: a peer added or removed in the
//! file is applied without a restart, and a broken edit is refused while the last good
//! peers keep working.

use std::time::Duration;

use hgw_tests::{Lab, Status, hgw_routes, ping};

fn has_peer(status: &Status, cidr: &str) -> bool {
    status.peers.iter().any(|p| p.pod_cidr == cidr && p.route)
}

#[test]
fn peer_file_changes_apply_without_a_restart() -> anyhow::Result<()> {
    let mut lab = Lab::up(3, 1)?;
    for node in 1..3 {
        lab.start_agent(node, &[])?;
    }
    // n1 starts knowing only n2.
    let full = lab.agent_config(0);
    let n3_entry = lab.peer_entry(2);
    let without_n3 = full.replace(&n3_entry, "");
    assert_ne!(
        without_n3, full,
        "could not cut n3 out of the config:\n{full}"
    );
    lab.start_agent_with_config(0, &without_n3, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let pid = lab.agent(0).expect("agent").pid();
    let path = lab.dir().join("n1.toml");
    let n3 = lab.nodes[2].pod_cidr.clone();

    std::fs::write(&path, &full)?;
    let agent = lab.agent(0).expect("agent");
    agent.wait_for(Duration::from_secs(5), |s| has_peer(s, &n3))?;
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[2].pods[0]);
    let out = ping(&from.ns, to.ip, 2, &[])?;
    assert!(
        out.status.success(),
        "n1 -> n3 after adding n3 to the file:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A broken edit changes nothing.
    std::fs::write(&path, format!("{full}\n[[peers]]\nname = \"bad\"\n"))?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        has_peer(&agent.status()?, &n3),
        "a broken file dropped a peer"
    );
    assert!(
        agent.log().contains("changed but not applied"),
        "no warning for the broken file:\n{}",
        agent.log()
    );

    // An edit whose peers the desired state refuses (one off the uplink's subnet, one
    // over n3's pod CIDR) changes nothing either, and says which field and why.
    let n3_ip = lab.nodes[2].uplink_ip.to_string();
    for (bad, field, why) in [
        (
            n3_entry.replace(&n3_ip, "192.0.2.33"),
            "node_ip",
            "not on the subnet of uplink",
        ),
        (
            format!(
                "{full}\n[[peers]]\nname = \"over\"\nnode_ip = \"{}\"\npod_cidr = \"{n3}\"\n",
                {
                    let [a, b, c, _] = lab.nodes[0].uplink_ip.octets();
                    format!("{a}.{b}.{c}.77")
                }
            ),
            "pod_cidr",
            "overlaps peers[",
        ),
    ] {
        let text = if bad.starts_with(&full) {
            bad.clone()
        } else {
            full.replace(&n3_entry, &bad)
        };
        std::fs::write(&path, &text)?;
        std::thread::sleep(Duration::from_secs(2));
        let status = agent.status()?;
        assert!(
            has_peer(&status, &n3) && !status.peers.iter().any(|p| p.name == "over"),
            "a refused file changed the peers:\n{status}"
        );
        let log = agent.log();
        assert!(
            log.lines().any(|l| l.contains("changed but not applied")
                && l.contains(field)
                && l.contains(why)),
            "no warning naming {field} and saying {why:?}:\n{log}"
        );
    }

    std::fs::write(&path, &without_n3)?;
    agent.wait_for(Duration::from_secs(5), |s| !has_peer(s, &n3))?;
    let routes = hgw_routes(&lab.nodes[0].ns)?;
    assert!(
        !routes.iter().any(|r| r.starts_with(&n3)),
        "route to removed peer left: {routes:?}"
    );
    assert_eq!(agent.pid(), pid, "the agent restarted");
    Ok(())
}
