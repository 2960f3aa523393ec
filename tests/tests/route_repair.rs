//! An admin deletes a route hgw installed (IPv4, then IPv6): the agent puts it back
//! within 200 ms, from the netlink event rather than a poll.

use std::time::{Duration, Instant};

use hgw_tests::{Lab, hgw_routes, run_in_ok};

#[test]
fn a_deleted_hgw_route_is_back_within_200ms() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (node, peer) = (&lab.nodes[0], &lab.nodes[1]);
    for (cidr, via) in [
        (&peer.pod_cidr, peer.uplink_ip.to_string()),
        (&peer.pod_cidr6, peer.uplink_ip6.to_string()),
    ] {
        let route = format!("{cidr} via {via} dev eth0");
        for attempt in 0..3 {
            run_in_ok(&node.ns, "ip", &["route", "del", cidr])?;
            let deleted = Instant::now();
            loop {
                if hgw_routes(&node.ns)?.iter().any(|r| r.starts_with(&route)) {
                    break;
                }
                let waited = deleted.elapsed();
                assert!(
                    waited < Duration::from_millis(200),
                    "{cidr} attempt {attempt}: route not back after {waited:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!(
                "{cidr} attempt {attempt}: route back after {:?}",
                deleted.elapsed()
            );
        }
    }
    Ok(())
}
