//! Traffic from a peer to a local pod the agent knows (IP -> MAC -> port learned from
//! the bridge) goes straight into the pod's veth with bpf_redirect_peer, skipping the
//! bridge; when the pod's entry goes, delivery falls back to the bridge, losing nothing.
//! The default `established` mode: the counted traffic is a UDP flow conntrack has seen
//! answered (pings only teach the bridge where the pods are; they go to the kernel).

use std::time::Duration;

use hgw_tests::{Lab, UdpFlow, counter, ping, run_in_ok};

const PACKETS: usize = 20;

#[test]
fn known_pods_get_their_packets_straight_into_their_veth() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 2)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let agent = lab.agent(1).expect("agent");
    // The first exchange goes through the bridge, which teaches the kernel (and so the
    // agent) where the pods are.
    for from in &n1.pods {
        for to in &n2.pods {
            assert!(ping(&from.ns, to.ip, 1, &[])?.status.success());
        }
    }
    let status = agent.wait_for(Duration::from_secs(2), |s| s.endpoints >= 2)?;
    let mut flow = UdpFlow::open(&n1.pods[0].ns, &n2.pods[1].ns, n2.pods[1].ip)?;
    let before = counter(&status, "ipv4.fwd_to_pod_direct");
    assert_eq!(flow.send(PACKETS)?, PACKETS);
    let after = counter(&agent.status()?, "ipv4.fwd_to_pod_direct");
    assert!(
        after >= before + PACKETS as u64,
        "fwd_to_pod_direct {before} -> {after}"
    );

    // The pod's neighbour entry goes: its endpoint goes, delivery goes via the bridge.
    run_in_ok(
        &n2.ns,
        "ip",
        &["neigh", "del", &n2.pods[1].ip.to_string(), "dev", "cni0"],
    )?;
    let status = agent.wait_for(Duration::from_secs(2), |s| s.endpoints == 1)?;
    let (direct, total) = (
        counter(&status, "ipv4.fwd_to_pod_direct"),
        counter(&status, "ipv4.fwd_to_pod"),
    );
    // The same accepted flow: its datagrams stay on the fast path.
    assert_eq!(
        flow.send(PACKETS)?,
        PACKETS,
        "delivery through the bridge lost datagrams"
    );
    let status = agent.status()?;
    assert!(
        counter(&status, "ipv4.fwd_to_pod") >= total + PACKETS as u64,
        "not delivered by the fast path: fwd_to_pod {total} -> {}",
        counter(&status, "ipv4.fwd_to_pod")
    );
    // Those datagrams re-resolved the pod, so it may be direct again right away; the
    // first one, though, went through the bridge.
    assert!(
        counter(&status, "ipv4.fwd_to_pod_direct") - direct
            < counter(&status, "ipv4.fwd_to_pod") - total,
        "every packet went direct without an endpoint"
    );
    Ok(())
}
