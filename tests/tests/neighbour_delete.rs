//! A peer's neighbour entry (ARP, then NDP) is deleted while traffic of that family
//! flows: packets go to the kernel while the MAC is unknown, nothing is blackholed, the
//! TCP connection survives, and the MAC comes back into the map.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hgw_tests::{Lab, paced_tcp_stream, run_in_ok};

#[test]
fn deleting_the_next_hops_neighbour_entry_loses_no_connection() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let agent = lab.agent(0).expect("agent");
    // The status lists one entry per peer route, IPv4 first.
    let cases: [(usize, IpAddr, IpAddr, u16); 2] = [
        (0, n2.uplink_ip.into(), to.ip.into(), 7071),
        (1, n2.uplink_ip6.into(), to.ip6.into(), 7072),
    ];
    for (entry, next_hop, to_ip, port) in cases {
        let status = agent.status()?;
        let peer = &status.peers[entry];
        assert_eq!(peer.node_ip, next_hop.to_string());
        let mac = peer.mac.clone();
        assert!(mac.is_some(), "{next_hop} unresolved before the test");

        // Only what the agent logs from here on counts: its first resolution of this
        // next hop ("unresolved -> MAC") must not stand in for a return.
        let logged_before = agent.log().len();
        paced_tcp_stream(&from.ns, &to.ns, to_ip, port, 400, || {
            for round in 0..3 {
                std::thread::sleep(Duration::from_millis(700));
                run_in_ok(
                    &n1.ns,
                    "ip",
                    &["neigh", "del", &next_hop.to_string(), "dev", "eth0"],
                )?;
                let deleted = Instant::now();
                agent.wait_for(Duration::from_secs(2), |s| {
                    s.peers.get(entry).is_some_and(|p| p.mac == mac)
                })?;
                eprintln!(
                    "{next_hop} round {round}: MAC back in the map after {:?}",
                    deleted.elapsed()
                );
            }
            Ok(())
        })?;
        // The MAC being in the map again proves nothing if the agent never took it out:
        // each deletion must have been followed there and back (log lines name the IP).
        let full_log = agent.log();
        let log = full_log.get(logged_before..).unwrap_or_default();
        let mac = mac.as_deref().unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("({next_hop})")))
            .collect();
        let count = |needle: String| lines.iter().filter(|l| l.contains(&needle)).count();
        let (out, back) = (
            count(format!("{mac} -> unresolved")),
            count(format!("unresolved -> {mac}")),
        );
        assert!(
            out >= 3 && back >= 3,
            "the agent did not follow the deletions of {next_hop} ({out} out, {back} back):\n{log}"
        );
    }
    Ok(())
}
