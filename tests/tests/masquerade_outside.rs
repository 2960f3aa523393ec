//! A pod reaches a host outside the cluster through masquerade: an extra namespace on
//! the lab's switch (172.31.0.200, no node, no route to any pod CIDR) runs a server; n1
//! masquerades pod traffic that leaves the cluster CIDR
//! (`-t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE`, as
//! flannel does), so the outside host sees n1's address and answers it.
//!
//! - `established` (the default), `all` and `off` all give the same answer: the flow
//!   never has a pod address on both ends, so the programs leave every packet of it to
//!   the kernel (`pass_no_route` on n1's bridge side: no peer owns the destination;
//!   `pass_not_pod` on its uplink side: the replies are for n1's own address).
//! - Before the rule is added the request times out (the outside host has no route back
//!   to the pod): asserted, so the answers afterwards are the masquerade's doing; the
//!   server's view of the peer (172.31.0.1) says where it happened.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hgw_tests::{
    CLUSTER_CIDR, Lab, OutsideHost, counter, is_ok_reply, restart_agents, run_in_ok, tcp_request,
    udp_requests,
};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTS: u64 = 3;
const UDP_ROUNDS: usize = 5;

#[test]
fn pod_reaches_an_outside_host_through_masquerade() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    // Declared after the lab, so it is dropped (deleted) first.
    let outside = OutsideHost::add(&lab, OUTSIDE_IP)?;
    let n1 = lab.nodes[0].clone();
    let client = n1.pods[0].clone();
    let server = SocketAddr::from((OUTSIDE_IP, PORT));
    // Without the rule the outside host has no way back to the pod.
    let unmasked = tcp_request(
        &client.ns,
        &outside.ns,
        server,
        server,
        Duration::from_secs(2),
    );
    assert!(
        unmasked.is_err(),
        "the outside host answered a pod address ({unmasked:?}): the test proves nothing"
    );
    run_in_ok(
        &n1.ns,
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            CLUSTER_CIDR,
            "!",
            "-d",
            CLUSTER_CIDR,
            "-j",
            "MASQUERADE",
        ],
    )?;
    let exchange = |mode: &str, tcp: u64, udp: usize| -> anyhow::Result<()> {
        for i in 0..tcp {
            let answer = tcp_request(&client.ns, &outside.ns, server, server, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{mode}: TCP request {i} to {server}: {e:#}"))?;
            assert!(
                is_ok_reply(&answer.reply),
                "{mode}: reply {:?}",
                answer.reply
            );
            assert_eq!(
                answer.server_saw.ip(),
                n1.uplink_ip,
                "{mode}: the outside host must see n1's address"
            );
        }
        let answer = udp_requests(&client.ns, &outside.ns, server, server, udp)?;
        assert_eq!(answer.answered, udp, "{mode}: UDP {answer:?}");
        assert!(
            answer.server_saw.iter().all(|a| a.ip() == n1.uplink_ip),
            "{mode}: UDP peers at the outside host: {answer:?}"
        );
        Ok(())
    };

    let before = lab.agents()[0].status()?;
    exchange("established", REQUESTS, UDP_ROUNDS)?;
    let after = lab.agents()[0].status()?;
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    eprintln!(
        "established: n1 pass_no_route +{} pass_not_pod +{} fwd_to_peer +{} fwd_to_pod +{}",
        delta("ipv4.pass_no_route"),
        delta("ipv4.pass_not_pod"),
        delta("ipv4.fwd_to_peer"),
        delta("ipv4.fwd_to_pod"),
    );
    // At least a SYN and the request per TCP exchange, and every UDP round, each way.
    let min = 2 * REQUESTS + UDP_ROUNDS as u64;
    assert!(
        delta("ipv4.pass_no_route") >= min,
        "n1 pass_no_route grew by {}, expected at least {min}",
        delta("ipv4.pass_no_route")
    );
    assert!(
        delta("ipv4.pass_not_pod") >= min,
        "n1 pass_not_pod grew by {}, expected at least {min}",
        delta("ipv4.pass_not_pod")
    );

    restart_agents(&mut lab, "all")?;
    exchange("all", 1, 2)?;
    restart_agents(&mut lab, "off")?;
    exchange("off", 1, 2)?;
    drop(outside);
    Ok(())
}
