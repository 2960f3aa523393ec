//! A peer's neighbour entry is deleted while traffic flows: packets go to the kernel
//! while the MAC is unknown, nothing is blackholed, the TCP connection survives, and
//! the MAC comes back into the map.

use std::time::{Duration, Instant};

use hgw_tests::{Lab, paced_tcp_stream, run_in_ok};

#[test]
fn deleting_the_next_hops_neighbour_entry_loses_no_connection() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let agent = lab.agent(0).expect("agent");
    let mac = agent.status()?["peers"][0]["mac"].clone();
    assert!(mac.is_string(), "n2 unresolved before the test");

    paced_tcp_stream(&from.ns, &to.ns, to.ip, 7071, 400, || {
        for round in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            run_in_ok(
                &n1.ns,
                "ip",
                &["neigh", "del", &n2.uplink_ip.to_string(), "dev", "eth0"],
            )?;
            let deleted = Instant::now();
            agent.wait_for(Duration::from_secs(2), |s| s["peers"][0]["mac"] == mac)?;
            eprintln!(
                "round {round}: MAC back in the map after {:?}",
                deleted.elapsed()
            );
        }
        Ok(())
    })?;
    // The MAC being in the map again proves nothing if the agent never took it out:
    // each deletion must have been followed there and back.
    let log = agent.log();
    let mac = mac.as_str().unwrap_or_default();
    let (out, back) = (
        log.matches(&format!("{mac} -> unresolved")).count(),
        log.matches(&format!("unresolved -> {mac}")).count(),
    );
    assert!(
        out >= 3 && back >= 3,
        "the agent did not follow the deletions ({out} out, {back} back):\n{log}"
    );
    Ok(())
}
