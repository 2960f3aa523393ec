//! hostPort beside the CNI `portmap` plugin: Debian's /usr/lib/cni/portmap, called as a
//! container runtime calls it (ADD with the pod's netns and the bridge plugin's result
//! as `prevResult`, DEL at the end), maps n1's 172.31.0.1:8081 to port 80 of n1's pod
//! (its CNI-HOSTPORT-DNAT / CNI-DN-* chains). A pod on n2 connects to 172.31.0.1:8081.
//! kube-proxy's base rules (KUBE-FORWARD with `--ctstate INVALID -j DROP`) are on both
//! nodes.
//!
//! - `established` (the default): the pod answers; its replies leave through n1's
//!   bridge-side program, which hands them to the kernel (`pass_ct_nat`) to be
//!   translated back to 172.31.0.1:8081; n2 then takes them as from outside the cluster
//!   (`pass_source`). Plain pod-to-pod traffic in the same lab takes the fast path.
//! - `all` (no conntrack lookup): the replies are redirected to n2 untranslated (from
//!   10.244.1.11:80), so the client never sees its SYN-ACK: timeout. Asserted.
//! - `off` (kernel routes alone): the same answer as `established`.
//! - After portmap DEL the port is closed again: the mapping was the plugin's.
//!
//! Checked by hand with the agent of c0e6b27 (before `established` mode existed): the
//! first request timed out.

use std::net::SocketAddr;
use std::time::Duration;

use hgw_tests::{
    CLUSTER_CIDR, HostPort, Lab, counter, invalid_drops, iptables_restore, is_ok_reply,
    kube_proxy_iptables, restart_agents, run_in_ok, tcp_request, udp_requests,
};

const HOST_PORT: u16 = 8081;
const CONTAINER_PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTS: u64 = 3;
const DIRECT_ROUNDS: usize = 20;

#[test]
fn hostport_from_another_node_with_cni_portmap() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (server, client) = (n1.pods[0].clone(), n2.pods[0].clone());
    for node in &lab.nodes {
        iptables_restore(&node.ns, &kube_proxy_iptables(&[], CLUSTER_CIDR))?;
    }
    let mut mapping = HostPort::add(
        &n1.ns,
        &server.ns,
        server.ip,
        n1.gateway,
        HOST_PORT,
        CONTAINER_PORT,
    )?;
    let nat = String::from_utf8_lossy(&run_in_ok(&n1.ns, "iptables", &["-t", "nat", "-S"])?.stdout)
        .into_owned();
    let dnat = format!("--to-destination {}:{CONTAINER_PORT}", server.ip);
    assert!(
        nat.contains("CNI-HOSTPORT-DNAT") && nat.contains(&dnat),
        "portmap wrote no DNAT to {}:{CONTAINER_PORT}:\n{nat}",
        server.ip
    );

    let listen = SocketAddr::from((server.ip, CONTAINER_PORT));
    let host_port = SocketAddr::from((n1.uplink_ip, HOST_PORT));
    let request = |mode: &str, count: u64| -> anyhow::Result<()> {
        for i in 0..count {
            let answer = tcp_request(&client.ns, &server.ns, listen, host_port, TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{mode}: request {i} to {host_port}: {e:#}"))?;
            assert!(
                is_ok_reply(&answer.reply),
                "{mode}: reply {:?}",
                answer.reply
            );
            // portmap masquerades only hairpin and localhost traffic.
            assert_eq!(answer.server_saw.ip(), client.ip, "{mode}: peer at the pod");
        }
        Ok(())
    };

    // established (the default mode).
    let before = lab.statuses()?;
    request("established", REQUESTS)?;
    let direct = udp_requests(
        &client.ns,
        &server.ns,
        SocketAddr::from((server.ip, 5353)),
        SocketAddr::from((server.ip, 5353)),
        DIRECT_ROUNDS,
    )?;
    assert_eq!(direct.answered, DIRECT_ROUNDS, "pod-to-pod UDP: {direct:?}");
    let after = lab.statuses()?;
    let delta =
        |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
    eprintln!(
        "established: n1 pass_ct_nat +{} pass_tcp_syn +{} pass_not_pod +{} fwd_to_peer +{}; n2 pass_source +{} pass_no_route +{} fwd_to_peer +{}",
        delta(0, "ipv4.pass_ct_nat"),
        delta(0, "ipv4.pass_tcp_syn"),
        delta(0, "ipv4.pass_not_pod"),
        delta(0, "ipv4.fwd_to_peer"),
        delta(1, "ipv4.pass_source"),
        delta(1, "ipv4.pass_no_route"),
        delta(1, "ipv4.fwd_to_peer"),
    );
    // Each exchange's reply data (after the SYN-ACK) leaves n1's pod for n2's pod
    // untranslated: n1's bridge side must leave it to the kernel's un-DNAT.
    assert!(
        delta(0, "ipv4.pass_ct_nat") >= REQUESTS,
        "n1 pass_ct_nat grew by {}, expected at least {REQUESTS}",
        delta(0, "ipv4.pass_ct_nat")
    );
    // Translated, they come from 172.31.0.1: no pod source for n2's uplink side.
    assert!(
        delta(1, "ipv4.pass_source") >= REQUESTS,
        "n2 pass_source grew by {}, expected at least {REQUESTS}",
        delta(1, "ipv4.pass_source")
    );
    let fast_min = DIRECT_ROUNDS as u64 - 1;
    assert!(
        delta(1, "ipv4.fwd_to_peer") >= fast_min,
        "n2 fwd_to_peer grew by {}, expected at least {fast_min}: plain pod traffic left the fast path",
        delta(1, "ipv4.fwd_to_peer")
    );

    for node in &lab.nodes {
        assert_eq!(
            invalid_drops(&node.ns)?,
            0,
            "{}: kube-proxy's INVALID rule dropped packets",
            node.name
        );
    }

    // all: no conntrack lookup, the replies skip n1's un-DNAT.
    restart_agents(&mut lab, "all")?;
    let result = tcp_request(&client.ns, &server.ns, listen, host_port, TIMEOUT);
    assert!(
        result.is_err(),
        "all mode: the request got through ({result:?}): the test cannot tell the modes apart"
    );

    // off: kernel routes alone give the same answer as established.
    restart_agents(&mut lab, "off")?;
    request("off", 1)?;

    mapping.del()?;
    let nat = String::from_utf8_lossy(&run_in_ok(&n1.ns, "iptables", &["-t", "nat", "-S"])?.stdout)
        .into_owned();
    assert!(!nat.contains(&dnat), "portmap DEL left the DNAT:\n{nat}");
    let result = tcp_request(&client.ns, &server.ns, listen, host_port, TIMEOUT);
    assert!(
        result.is_err(),
        "the host port still answered after portmap DEL: {result:?}"
    );
    Ok(())
}
