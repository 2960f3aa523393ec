//! etcd goes away: forwarding is unaffected. etcd comes back: the agents' watches
//! resume, and a change made right after is applied. (Default `established` mode: the
//! fast path is shown carrying a UDP flow conntrack has seen answered; pings go to the
//! kernel.)

use std::time::Duration;

use hgw_tests::{Etcd, counter, ping, udp_replied_exchange};

#[test]
fn forwarding_survives_etcd_and_the_watch_resumes() -> anyhow::Result<()> {
    let (lab, mut etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());

    etcd.pause()?;
    let before = counter(&lab.agent(0).expect("agent").status()?, "ipv4.fwd_to_peer");
    let out = ping(&from.ns, to.ip, 5, &[])?;
    assert!(
        out.status.success(),
        "ping failed with etcd down:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    const PACKETS: usize = 20;
    assert_eq!(
        udp_replied_exchange(&from.ns, &to.ns, to.ip, PACKETS)?,
        PACKETS,
        "UDP lost with etcd down"
    );
    let after = counter(&lab.agent(0).expect("agent").status()?, "ipv4.fwd_to_peer");
    assert!(
        after >= before + PACKETS as u64,
        "fast path idle with etcd down: {before} -> {after}"
    );

    etcd.resume()?;
    // A new node's subnet, written as flannel would: both agents must pick it up.
    etcd.put(
        "/coreos.com/network/subnets/10.244.9.0-24",
        r#"{"PublicIP":"172.31.0.9","BackendType":"host-gw"}"#,
    )?;
    for agent in lab.agents() {
        agent.wait_for(Duration::from_secs(10), |s| {
            s.peers
                .iter()
                .any(|p| p.pod_cidr == "10.244.9.0/24" && p.route)
        })?;
    }
    // And the agents' own leases survived: each still sees the other.
    for agent in lab.agents() {
        let status = agent.status()?;
        assert_eq!(status.peers.len(), 2, "{status}");
    }
    Ok(())
}
