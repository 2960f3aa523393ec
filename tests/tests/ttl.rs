//! A packet with TTL (hop limit) 1 is left to the kernel, which answers ICMP / ICMPv6
//! time exceeded from the sender's own node, as a router must.

use std::net::IpAddr;

use hgw_tests::{Lab, counter, ping};

#[test]
fn ttl_1_gets_time_exceeded_from_the_senders_node() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let (n1, agent) = (&lab.nodes[0], &lab.agents()[0]);
    let cases: [(&str, IpAddr, IpAddr, &str); 2] = [
        (
            "ipv4",
            to.ip.into(),
            n1.gateway.into(),
            "Time to live exceeded",
        ),
        (
            "ipv6",
            to.ip6.into(),
            n1.gateway6.into(),
            "Time exceeded: Hop limit",
        ),
    ];
    for (family, to_ip, gateway, message) in cases {
        let name = format!("{family}.pass_ttl");
        let before = counter(&agent.status()?, &name);
        let out = ping(&from.ns, to_ip, 1, &["-t", "1"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("From {gateway}")) && stdout.contains(message),
            "{family}: expected `{message}` from {gateway}:\n{stdout}"
        );
        let after = counter(&agent.status()?, &name);
        assert!(after > before, "{name} did not move ({before} -> {after})");
    }
    Ok(())
}
