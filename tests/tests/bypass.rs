//! In `fast_path = "all"` mode the fast path really bypasses the kernel's FORWARD path:
//! with every forwarded packet dropped by netfilter in each node, pods on different
//! nodes still talk while the agents run, and stop as soon as the agents (and so their
//! programs) are gone. Only `all` mode: in `established` mode (the default) a flow takes
//! the fast path only once the kernel accepted it, so a FORWARD drop stops it there
//! (network_policy.rs), and ping (ICMP) always goes to the kernel.

use std::time::Duration;

use hgw_tests::{Lab, drop_all_forwarding, ping};

#[test]
fn forward_drop_does_not_stop_the_fast_path() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in 0..lab.nodes.len() {
        // Unpinned: the programs go with the agents.
        lab.start_agent(node, &["--fast-path", "all", "--pin-dir", "none"])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(Duration::from_secs(15))?;
    }
    // An nftables base chain with policy drop on the forward hook: it drops even what
    // the agent's iptables FORWARD accept rules let through.
    for node in &lab.nodes {
        drop_all_forwarding(&node.ns)?;
    }
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());

    let out = ping(&from.ns, to.ip, 3, &[])?;
    assert!(
        out.status.success(),
        "fast path: ping failed with FORWARD dropping:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    for agent in lab.agents_mut() {
        assert!(agent.stop()?.success(), "agent did not exit cleanly");
    }
    let out = ping(&from.ns, to.ip, 3, &[])?;
    assert!(
        !out.status.success(),
        "traffic flowed without the agents: the kernel path is not dropping, so the test proves nothing"
    );
    Ok(())
}
