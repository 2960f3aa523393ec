//! ClusterIP beside kube-proxy: a pod on n1 reaches Service 10.96.0.10:80 (TCP and UDP),
//! whose one endpoint is a pod on n2. kube-proxy's rules sit on both nodes, written once
//! as iptables-mode rules (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* with DNAT, and
//! KUBE-FORWARD's `--ctstate INVALID -j DROP`) and once as its nftables-mode table
//! (`table ip kube-proxy`, `dnat to`, `ct state invalid drop`); the DNAT happens on n1,
//! the client's node, in PREROUTING.
//!
//! - `established` (the default): the answer comes back from the Service address; the
//!   DNAT'd flow's replies reach n1's uplink program, which hands them to the kernel
//!   (`pass_ct_nat`) to be translated back, while plain pod-to-pod traffic in the same lab
//!   still takes the fast path (`fwd_to_peer`).
//! - `all` (no conntrack lookup): the endpoint's replies are redirected past n1's
//!   conntrack, so they reach the client untranslated: TCP times out, UDP replies come
//!   from 10.244.2.11:80 instead of the Service. Asserted, so the test shows it can fail.
//! - `off` (kernel routes alone): the same answers as `established`.
//!
//! Checked by hand with the agent of c0e6b27 (before `established` mode existed): the
//! first TCP request timed out, in both rule variants.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hgw_tests::{
    CLUSTER_CIDR, Lab, Proto, ServicePort, counter, iptables_restore, is_ok_reply,
    kube_proxy_iptables, kube_proxy_nftables, nft_apply, restart_agents, tcp_request, udp_requests,
};

const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(5);
const TCP_REQUESTS: u64 = 3;
const UDP_ROUNDS: usize = 10;
/// A port for the plain pod-to-pod exchange, apart from the Service's.
const DIRECT_PORT: u16 = 5353;

fn service_ports(endpoint: Ipv4Addr) -> Vec<ServicePort> {
    [
        (Proto::Tcp, "default/web:http"),
        (Proto::Udp, "default/web:http-udp"),
    ]
    .into_iter()
    .map(|(proto, name)| ServicePort {
        name: name.to_owned(),
        proto,
        cluster_ip: SERVICE_IP,
        port: PORT,
        node_port: None,
        endpoint,
        target_port: PORT,
    })
    .collect()
}

#[test]
fn clusterip_with_kube_proxy_iptables_rules() -> anyhow::Result<()> {
    run_case(|ns, ports| iptables_restore(ns, &kube_proxy_iptables(ports, CLUSTER_CIDR)))
}

#[test]
fn clusterip_with_kube_proxy_nftables_rules() -> anyhow::Result<()> {
    run_case(|ns, ports| nft_apply(ns, &kube_proxy_nftables(ports, CLUSTER_CIDR)))
}

/// The Service's answers from the client pod: `tcp` requests and `udp` rounds, each
/// checked to come from the Service address with the client pod as the server's peer.
fn assert_service_answers(lab: &Lab, tcp: u64, udp: usize, mode: &str) -> anyhow::Result<()> {
    let (client, server) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let listen = SocketAddr::from((server.ip, PORT));
    let service = SocketAddr::from((SERVICE_IP, PORT));
    for i in 0..tcp {
        let answer = tcp_request(&client.ns, &server.ns, listen, service, TIMEOUT)
            .map_err(|e| anyhow::anyhow!("{mode}: TCP request {i} to {service}: {e:#}"))?;
        assert!(
            is_ok_reply(&answer.reply),
            "{mode}: TCP reply {:?}",
            answer.reply
        );
        // kube-proxy does not masquerade pod sources: the endpoint sees the client pod.
        assert_eq!(
            answer.server_saw.ip(),
            client.ip,
            "{mode}: TCP peer at the endpoint"
        );
    }
    let answer = udp_requests(&client.ns, &server.ns, listen, service, udp)?;
    assert_eq!(
        answer.answered, udp,
        "{mode}: UDP answers to {service}: {answer:?}"
    );
    assert_eq!(
        answer.reply_from.iter().copied().collect::<Vec<_>>(),
        [service],
        "{mode}: UDP replies must come from the Service address"
    );
    assert!(
        answer.server_saw.iter().all(|a| a.ip() == client.ip),
        "{mode}: UDP peers at the endpoint: {answer:?}"
    );
    Ok(())
}

fn run_case(install: impl Fn(&str, &[ServicePort]) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    let (client, server) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    // kube-proxy writes every Service on every node.
    let ports = service_ports(server.ip);
    for node in &lab.nodes {
        install(&node.ns, &ports)?;
    }

    // established (the default mode).
    let before = lab.agents()[0].status()?;
    assert_service_answers(&lab, TCP_REQUESTS, UDP_ROUNDS, "established")?;
    // Plain pod-to-pod traffic in the same lab: from the second round on, both ways
    // are established flows without NAT.
    const DIRECT_ROUNDS: usize = 20;
    let direct = udp_requests(
        &client.ns,
        &server.ns,
        SocketAddr::from((server.ip, DIRECT_PORT)),
        SocketAddr::from((server.ip, DIRECT_PORT)),
        DIRECT_ROUNDS,
    )?;
    assert_eq!(direct.answered, DIRECT_ROUNDS, "pod-to-pod UDP: {direct:?}");
    let after = lab.agents()[0].status()?;
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    // n1's uplink program sees the endpoint's replies (untranslated, pod2 -> pod1) and
    // must leave them to the kernel: every TCP exchange has at least one non-SYN reply
    // segment after the handshake, every UDP reply after the first (which finds the
    // entry without a reply yet: pass_ct_new) is one.
    eprintln!(
        "n1 established: pass_ct_nat +{}, pass_ct_new +{}, pass_tcp_syn +{}, pass_no_route +{}, fwd_to_peer +{}, fwd_to_pod +{}",
        delta("ipv4.pass_ct_nat"),
        delta("ipv4.pass_ct_new"),
        delta("ipv4.pass_tcp_syn"),
        delta("ipv4.pass_no_route"),
        delta("ipv4.fwd_to_peer"),
        delta("ipv4.fwd_to_pod")
    );
    let nat_min = TCP_REQUESTS + (UDP_ROUNDS as u64 - 1);
    assert!(
        delta("ipv4.pass_ct_nat") >= nat_min,
        "n1 pass_ct_nat grew by {}, expected at least {nat_min}",
        delta("ipv4.pass_ct_nat")
    );
    let fast_min = DIRECT_ROUNDS as u64 - 1;
    assert!(
        delta("ipv4.fwd_to_peer") >= fast_min,
        "n1 fwd_to_peer grew by {}, expected at least {fast_min}: plain pod traffic left the fast path",
        delta("ipv4.fwd_to_peer")
    );

    // all: no conntrack lookup, the replies skip n1's un-DNAT.
    restart_agents(&mut lab, "all")?;
    let listen = SocketAddr::from((server.ip, PORT));
    let service = SocketAddr::from((SERVICE_IP, PORT));
    let tcp = tcp_request(&client.ns, &server.ns, listen, service, TIMEOUT);
    assert!(
        tcp.is_err(),
        "all mode: the TCP request got through ({tcp:?}): the test cannot tell the modes apart"
    );
    let udp = udp_requests(&client.ns, &server.ns, listen, service, 3)?;
    assert_eq!(udp.answered, 0, "all mode: {udp:?}");
    assert!(
        udp.reply_from.contains(&listen),
        "all mode: expected untranslated replies from {listen}: {udp:?}"
    );

    // off: kernel routes alone give the same answers as established.
    restart_agents(&mut lab, "off")?;
    assert_service_answers(&lab, 1, 5, "off")?;
    Ok(())
}
