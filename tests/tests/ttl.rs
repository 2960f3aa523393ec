//! A packet with TTL 1 is left to the kernel, which answers ICMP time exceeded from the
//! sender's own node, as a router must.

use hgw_tests::{Lab, counter, ping};

#[test]
fn ttl_1_gets_time_exceeded_from_the_senders_node() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let before = counter(&lab.agents()[0].status()?, "ipv4.pass_ttl");
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let out = ping(&from.ns, to.ip, 1, &["-t", "1"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let gateway = lab.nodes[0].gateway;
    assert!(
        stdout.contains(&format!("From {gateway}")) && stdout.contains("Time to live exceeded"),
        "expected time exceeded from {gateway}:\n{stdout}"
    );
    let after = counter(&lab.agents()[0].status()?, "ipv4.pass_ttl");
    assert!(
        after > before,
        "pass_ttl did not move ({before} -> {after})"
    );
    Ok(())
}
