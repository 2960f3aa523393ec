//! An etcd-mode agent restarts while a stream flows: until etcd has given it the whole
//! peer set, the restarted agent sweeps nothing, so the routes (and, in the meantime,
//! the kernel path) keep carrying the traffic it finds, and nothing is lost. (The
//! sweep used to run on the empty set the agent starts with and delete every hgw route
//! until etcd answered.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hgw_tests::{Etcd, hgw_routes, paced_tcp_stream};

#[test]
fn a_restart_sweeps_nothing_before_etcd_answers() -> anyhow::Result<()> {
    let (mut lab, etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let peer_route = format!("{} via {}", n2.pod_cidr, n2.uplink_ip);
    let config = etcd.agent_config(&lab, 0, "");

    // Watch n1's route to n2's pods the whole time, every few milliseconds.
    let done = AtomicBool::new(false);
    let gone = std::thread::scope(|scope| -> anyhow::Result<usize> {
        let watcher = scope.spawn(|| -> anyhow::Result<usize> {
            let mut gone = 0;
            while !done.load(Ordering::Relaxed) {
                if !hgw_routes(&n1.ns)?
                    .iter()
                    .any(|r| r.starts_with(&peer_route))
                {
                    gone += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(gone)
        });
        let restarted = paced_tcp_stream(&from.ns, &to.ns, to.ip, 7073, 300, || {
            std::thread::sleep(Duration::from_millis(500));
            let agent = lab.start_agent_with_config(0, &config, &[])?;
            agent.wait_ready(Duration::from_secs(15))?;
            Ok(agent.log())
        });
        done.store(true, Ordering::Relaxed);
        let log = restarted?;
        assert!(
            !log.contains("removed stale hgw route"),
            "the restarted agent swept routes before etcd's peer set:\n{log}"
        );
        watcher
            .join()
            .map_err(|_| anyhow::anyhow!("route watcher panicked"))?
    })?;
    assert_eq!(
        gone, 0,
        "n1's route to {} was missing {gone} times",
        n2.pod_cidr
    );
    Ok(())
}
