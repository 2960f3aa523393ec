//! Agents without pinning (`--pin-dir none`) stop: their programs are detached, the
//! kernel routes they installed (both families) stay, and pods on different nodes still
//! talk over the kernel path. (With pinning, the default, the programs stay: see
//! agent_restart.rs.)

use hgw_tests::{Lab, hgw_programs, hgw_routes, ping};

#[test]
fn kernel_routes_carry_traffic_after_the_agents_stop() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in 0..lab.nodes.len() {
        lab.start_agent(node, &["--pin-dir", "none"])?
            .wait_ready(std::time::Duration::from_secs(15))?;
    }
    for node in &lab.nodes {
        assert!(
            !hgw_programs(&node.ns)?.is_empty(),
            "{}: no hgw program attached while the agent runs",
            node.ns
        );
    }
    for agent in lab.agents_mut() {
        assert!(agent.stop()?.success(), "agent did not exit 0 on SIGTERM");
    }

    for (i, node) in lab.nodes.iter().enumerate() {
        let peer = &lab.nodes[1 - i];
        let routes = hgw_routes(&node.ns)?;
        for route in [
            format!("{} via {} dev eth0", peer.pod_cidr, peer.uplink_ip),
            format!("{} via {} dev eth0", peer.pod_cidr6, peer.uplink_ip6),
        ] {
            assert!(
                routes.iter().any(|r| r.starts_with(&route)),
                "{}: `{route}` is gone after the agent stopped: {routes:?}",
                node.ns
            );
        }
        let programs = hgw_programs(&node.ns)?;
        assert!(
            programs.is_empty(),
            "{}: programs still attached after the agent stopped: {programs:?}",
            node.ns
        );
    }
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    for to_ip in [std::net::IpAddr::from(to.ip), to.ip6.into()] {
        let out = ping(&from.ns, to_ip, 3, &[])?;
        assert!(
            out.status.success(),
            "kernel path: ping {to_ip} failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}
