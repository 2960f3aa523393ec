//! etcd is down when an etcd-mode agent (re)starts: the agent keeps running and
//! retries with backoff, as flanneld does, instead of exiting; its status says it waits
//! for etcd; the node's routes stay and a TCP stream across the restart loses nothing;
//! once etcd is back the agent takes its subnet and peers and becomes ready.

use std::time::{Duration, Instant};

use hgw_tests::{Etcd, hgw_routes, paced_tcp_stream};

#[test]
fn an_agent_started_without_etcd_waits_and_keeps_the_routes() -> anyhow::Result<()> {
    let (mut lab, mut etcd) = Etcd::lab_with_agents(2, 1, 2)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let peer_route = format!("{} via {}", n2.pod_cidr, n2.uplink_ip);
    let config = etcd.agent_config(&lab, 0, "");

    // 1,500 chunks at 10 ms: the stream outlasts the outage.
    paced_tcp_stream(&from.ns, &to.ns, to.ip, 7074, 1500, || {
        etcd.pause()?;
        let agent = lab.start_agent_with_config(0, &config, &[])?;
        // Waiting, not gone, for several retries.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            anyhow::ensure!(
                agent.is_running(),
                "the agent exited without etcd:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let status = agent.status()?;
        anyhow::ensure!(
            !status.ready
                && status
                    .waiting
                    .as_deref()
                    .is_some_and(|w| w.contains("waiting for etcd")),
            "status does not say the agent waits for etcd:\n{status}"
        );
        anyhow::ensure!(
            hgw_routes(&n1.ns)?
                .iter()
                .any(|r| r.starts_with(&peer_route)),
            "the route to {} went while etcd was down",
            n2.pod_cidr
        );
        etcd.resume()?;
        let status = agent.wait_ready(Duration::from_secs(40))?;
        anyhow::ensure!(
            status.pod_cidr.as_deref() == Some(n1.pod_cidr.as_str()) && status.waiting.is_none(),
            "after etcd came back:\n{status}"
        );
        eprintln!("ready {:?} after the restart", start.elapsed());
        Ok(())
    })?;
    assert!(
        hgw_routes(&n1.ns)?
            .iter()
            .any(|r| r.starts_with(&peer_route)),
        "no route to the peer at the end"
    );
    Ok(())
}
