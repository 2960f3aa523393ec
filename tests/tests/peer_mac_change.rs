//! A peer's uplink MAC changes (`ip link set address`, announced by gratuitous ARP as
//! with arp_notify): its next hop follows within a second, and a TCP stream between
//! pods on the two nodes survives the change.

use std::time::{Duration, Instant};

use hgw_tests::{Lab, counter, paced_tcp_stream, run_in_ok};

const NEW_MAC: &str = "02:68:67:77:00:02";

#[test]
fn next_hop_follows_a_peer_mac_change_and_tcp_survives() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n2, from, to) = (
        lab.nodes[1].clone(),
        lab.nodes[0].pods[0].clone(),
        lab.nodes[1].pods[0].clone(),
    );
    run_in_ok(
        &n2.ns,
        "sysctl",
        &["-qw", "net.ipv4.conf.eth0.arp_notify=1"],
    )?;
    let agent = lab.agent(0).expect("agent");

    let fwd = paced_tcp_stream(&from.ns, &to.ns, to.ip, 7070, 600, || {
        std::thread::sleep(Duration::from_secs(1));
        run_in_ok(
            &n2.ns,
            "ip",
            &["link", "set", "dev", "eth0", "address", NEW_MAC],
        )?;
        let changed = Instant::now();
        let status = agent.wait_for(Duration::from_secs(1), |s| {
            s.peers
                .first()
                .is_some_and(|p| p.mac.as_deref() == Some(NEW_MAC))
        })?;
        eprintln!(
            "n1's next hop for n2 follows the new MAC after {:?}",
            changed.elapsed()
        );
        Ok(counter(&status, "ipv4.fwd_to_peer"))
    })?;
    let after = counter(&agent.status()?, "ipv4.fwd_to_peer");
    assert!(
        after > fwd + 100,
        "the fast path did not carry the stream after the change: {fwd} -> {after}"
    );
    Ok(())
}
