//! A peer whose MAC the agent does not know yet: its traffic is left to the kernel
//! (which resolves the MAC and delivers), the counters say why, and once the kernel
//! has resolved it the agent picks the MAC up and the fast path takes over.

use std::time::Duration;

use hgw_tests::{Lab, block_arp, counter, udp_exchange, unblock_arp};

#[test]
fn traffic_to_an_unresolved_next_hop_still_arrives() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    // n2 answers no ARP: n1's agent cannot learn n2's MAC.
    block_arp(&lab.nodes[1].ns)?;
    lab.start_agent(0, &[])?;
    lab.start_agent(1, &[])?;
    let status = lab.agents()[0].wait_for(Duration::from_secs(15), |s| {
        s["peers"][0]["route"] == true && s["peers"][0]["mac"].is_null()
    })?;
    assert_eq!(
        status["ready"], false,
        "ready although a next hop is unresolved: {status}"
    );

    unblock_arp(&lab.nodes[1].ns)?;
    let no_mac_before = counter(&status, "ipv4.pass_no_mac");
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    const PACKETS: usize = 20;
    let arrived = udp_exchange(&from.ns, &to.ns, to.ip, PACKETS)?;
    assert_eq!(
        arrived, PACKETS,
        "packets to an unresolved next hop were lost"
    );
    let no_mac_after = counter(&lab.agents()[0].status()?, "ipv4.pass_no_mac");
    assert!(
        no_mac_after > no_mac_before,
        "pass_no_mac did not move ({no_mac_before} -> {no_mac_after})"
    );

    // The kernel resolved n2 for those packets; the agent follows the neighbour event.
    let status =
        lab.agents()[0].wait_for(Duration::from_secs(5), |s| !s["peers"][0]["mac"].is_null())?;
    let fwd_before = counter(&status, "ipv4.fwd_to_peer");
    assert_eq!(udp_exchange(&from.ns, &to.ns, to.ip, PACKETS)?, PACKETS);
    let fwd_after = counter(&lab.agents()[0].status()?, "ipv4.fwd_to_peer");
    assert!(
        fwd_after >= fwd_before + PACKETS as u64,
        "fast path did not take over: fwd_to_peer {fwd_before} -> {fwd_after}"
    );
    Ok(())
}
