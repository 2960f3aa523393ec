//! A fourth node joins while traffic flows: within a second every other node has its
//! route and fast-path entry, and traffic between the old nodes loses nothing. That
//! traffic is one UDP flow conntrack has seen answered, so in the default `established`
//! mode the fast path carries it while the maps change.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use hgw_tests::{Etcd, UdpFlow, counter, hgw_routes};

#[test]
fn a_joining_node_is_everywhere_within_a_second() -> anyhow::Result<()> {
    let (mut lab, etcd) = Etcd::lab_with_agents(4, 1, 3)?;
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    const BATCH: usize = 100;
    let done = AtomicBool::new(false);
    let fwd_before = counter(&lab.agent(0).expect("agent").status()?, "ipv4.fwd_to_peer");
    let mut flow = UdpFlow::open(&from.ns, &to.ns, to.ip)?;

    let (sent, arrived, joined) =
        std::thread::scope(|scope| -> anyhow::Result<(usize, usize, Duration)> {
            // Batches of datagrams from n1 to n2 for as long as n4 is joining.
            let traffic = scope.spawn(|| -> anyhow::Result<(usize, usize)> {
                let (mut sent, mut arrived) = (0, 0);
                while !done.load(Ordering::Relaxed) || sent == 0 {
                    arrived += flow.send(BATCH)?;
                    sent += BATCH;
                }
                Ok((sent, arrived))
            });
            let start = Instant::now();
            etcd.start_agents(&mut lab, [3])?;
            let new_cidr = lab.nodes[3].pod_cidr.clone();
            let new_ip = lab.nodes[3].uplink_ip.to_string();
            // One second for all three together, from the moment n4 holds its subnet.
            let deadline = Instant::now() + Duration::from_secs(1);
            for node in 0..3 {
                let agent = lab.agent(node).expect("agent started");
                agent.wait_for(deadline.saturating_duration_since(Instant::now()), |s| {
                    s.peers
                        .iter()
                        .any(|p| p.pod_cidr == new_cidr && p.route && p.mac.is_some())
                })?;
                // Status tells the last change apart: n4's one pod CIDR, in well under
                // the second it took to see it.
                let change = agent.status()?.last_change;
                assert!(
                    change.is_some_and(|c| c.routes == 1 && c.took_us < 1_000_000),
                    "n{}: status names {change:?} as the last peer change, not n4's one route",
                    node + 1
                );
                let routes = hgw_routes(&lab.nodes[node].ns)?;
                assert!(
                    routes
                        .iter()
                        .any(|r| r.starts_with(&format!("{new_cidr} via {new_ip}"))),
                    "n{}: no route to the new node: {routes:?}",
                    node + 1
                );
            }
            let joined = start.elapsed();
            done.store(true, Ordering::Relaxed);
            let (sent, arrived) = traffic
                .join()
                .map_err(|_| anyhow::anyhow!("traffic thread panicked"))??;
            Ok((sent, arrived, joined))
        })?;
    assert_eq!(
        arrived, sent,
        "traffic between the old nodes lost packets while n4 joined"
    );
    let fwd = counter(&lab.agent(0).expect("agent").status()?, "ipv4.fwd_to_peer") - fwd_before;
    assert!(
        fwd >= sent as u64,
        "n1's fast path carried {fwd} of the {sent} datagrams"
    );
    eprintln!(
        "n4 known everywhere {joined:?} after its agent started (including its own start-up)"
    );
    Ok(())
}
