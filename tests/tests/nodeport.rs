//! NodePort beside kube-proxy: a pod on n2 connects to n1's 172.31.0.1:30080; n1's
//! kube-proxy rules (iptables mode, on every node) send it through KUBE-NODEPORTS ->
//! KUBE-EXT-* (mark 0x4000) -> KUBE-SVC-* -> KUBE-SEP-* (DNAT to the pod on n3), and
//! KUBE-POSTROUTING masquerades it on the mark, so the endpoint sees n1's address.
//! KUBE-FORWARD's `--ctstate INVALID -j DROP` is on every node.
//!
//! - `established` (the default): the answer comes back; every leg of the flow carries
//!   a node address on one end, so the programs leave it all to the kernel: n1's uplink
//!   sees packets for its own address (`pass_not_pod`), n3's uplink sees n1's address as
//!   the source (`pass_source`).
//! - `all`: the same answer. The source rule applies in every mode; before it (commit
//!   ca65a94) n3's uplink program redirected the masqueraded SYN past n3's conntrack,
//!   which then judged the endpoint's SYN-ACK INVALID and kube-proxy's rule dropped it:
//!   the timeout of issue 9's table (checked by hand with c0e6b27's agent: the request
//!   timed out and n3's INVALID rule had dropped 6 SYN-ACKs). So the test asserts that
//!   rule dropped nothing on any node.
//! - `off` (kernel routes alone): the same answer.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hgw_tests::{
    CLUSTER_CIDR, Lab, Proto, ServicePort, counter, invalid_drops, iptables_restore, is_ok_reply,
    kube_proxy_iptables, restart_agents, tcp_request,
};

const NODE_PORT: u16 = 30080;
const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTS: u64 = 3;

#[test]
fn nodeport_with_masquerade_from_another_node() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(3, 1)?;
    let (n1, client, server) = (
        lab.nodes[0].clone(),
        lab.nodes[1].pods[0].clone(),
        lab.nodes[2].pods[0].clone(),
    );
    let service = ServicePort {
        name: "default/web:http".to_owned(),
        proto: Proto::Tcp,
        cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
        port: PORT,
        node_port: Some(NODE_PORT),
        endpoint: server.ip,
        target_port: PORT,
    };
    for node in &lab.nodes {
        iptables_restore(
            &node.ns,
            &kube_proxy_iptables(std::slice::from_ref(&service), CLUSTER_CIDR),
        )?;
    }
    let listen = SocketAddr::from((server.ip, PORT));
    let node_port = SocketAddr::from((n1.uplink_ip, NODE_PORT));
    let request = |mode: &str, count: u64| -> anyhow::Result<()> {
        for i in 0..count {
            let answer = tcp_request(&client.ns, &server.ns, listen, node_port, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{mode}: request {i} to {node_port}: {e:#}"))?;
            assert!(
                is_ok_reply(&answer.reply),
                "{mode}: reply {:?}",
                answer.reply
            );
            // Masqueraded on n1: the endpoint sees n1's address, not the client pod.
            assert_eq!(
                answer.server_saw.ip(),
                n1.uplink_ip,
                "{mode}: peer at the endpoint"
            );
        }
        Ok(())
    };

    let before = lab.statuses()?;
    request("established", REQUESTS)?;
    let after = lab.statuses()?;
    let delta =
        |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
    eprintln!(
        "established: n1 pass_not_pod +{} fwd_to_pod +{}; n3 pass_source +{} fwd_to_pod +{} pass_no_route +{}",
        delta(0, "ipv4.pass_not_pod"),
        delta(0, "ipv4.fwd_to_pod"),
        delta(2, "ipv4.pass_source"),
        delta(2, "ipv4.fwd_to_pod"),
        delta(2, "ipv4.pass_no_route"),
    );
    // Each exchange sends at least a SYN and the request from the client, and they
    // arrive at n1 addressed to n1, then at n3 from n1's address.
    let min = 2 * REQUESTS;
    assert!(
        delta(0, "ipv4.pass_not_pod") >= min,
        "n1 pass_not_pod grew by {}, expected at least {min}",
        delta(0, "ipv4.pass_not_pod")
    );
    assert!(
        delta(2, "ipv4.pass_source") >= min,
        "n3 pass_source grew by {}, expected at least {min}",
        delta(2, "ipv4.pass_source")
    );
    assert_eq!(
        delta(2, "ipv4.fwd_to_pod"),
        0,
        "n3 forwarded masqueraded packets past its conntrack"
    );

    restart_agents(&mut lab, "all")?;
    request("all", 1)?;
    // What broke the old programs: a half-seen handshake, INVALID to conntrack.
    for node in &lab.nodes {
        assert_eq!(
            invalid_drops(&node.ns)?,
            0,
            "{}: kube-proxy's INVALID rule dropped packets",
            node.name
        );
    }
    restart_agents(&mut lab, "off")?;
    request("off", 1)?;
    Ok(())
}
