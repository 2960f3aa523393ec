//! Dual stack: pods on different nodes talk over IPv6 (ICMPv6, TCP, UDP) through the
//! fast path, with the kernel's forward path dropping everything. The agents install
//! IPv6 kernel routes and resolve next hops over NDP, and the counters move in the
//! IPv6 block only.

use hgw_tests::{
    HGW_ROUTE_PROTOCOL, Lab, counter_sum, drop_all_forwarding, ping, run_in_ok, tcp_transfer,
    udp_exchange,
};

#[test]
fn ipv6_pods_talk_through_the_fast_path_with_routes_and_ndp() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);

    // The kernel route (the fallback) and a resolved IPv6 next hop on each node.
    let routes = run_in_ok(
        &n1.ns,
        "ip",
        &[
            "-6",
            "route",
            "show",
            "proto",
            &HGW_ROUTE_PROTOCOL.to_string(),
        ],
    )?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    let want = format!("{} via {} dev eth0", n2.pod_cidr6, n2.uplink_ip6);
    assert!(routes.contains(&want), "no `{want}` in:\n{routes}");
    let status = lab.agents()[0].status()?;
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let v6 = peers
        .iter()
        .find(|p| p["pod_cidr"] == n2.pod_cidr6.as_str())
        .unwrap_or_else(|| panic!("no IPv6 peer route for {} in {status}", n2.pod_cidr6));
    assert_eq!(v6["node_ip"], n2.uplink_ip6.to_string().as_str());
    assert!(v6["route"] == true && v6["mac"].is_string(), "{v6}");
    assert_eq!(peers.len(), 2, "one entry per family: {status}");

    // Everything the kernel would forward is dropped: only the fast path gets through.
    for node in &lab.nodes {
        drop_all_forwarding(&node.ns)?;
    }
    let before = lab.statuses()?;
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    const PINGS: u32 = 5;
    for (a, b) in [(from, to), (to, from)] {
        let out = ping(&a.ns, b.ip6, PINGS, &[])?;
        assert!(
            out.status.success(),
            "ping {} -> {} failed:\n{}",
            a.ip6,
            b.ip6,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    tcp_transfer(&from.ns, &to.ns, to.ip6, 1 << 20)?;
    const UDP_PACKETS: usize = 100;
    let arrived = udp_exchange(&from.ns, &to.ns, to.ip6, UDP_PACKETS)?;
    assert_eq!(arrived, UDP_PACKETS, "UDP {} -> {}", from.ip6, to.ip6);
    let after = lab.statuses()?;

    let grew = |name: &str| counter_sum(&after, name) - counter_sum(&before, name);
    // Each echo request and reply crosses one bridge-side and one uplink-side program.
    let crossing = 2 * u64::from(PINGS) * 2 + UDP_PACKETS as u64;
    for name in ["ipv6.fwd_to_peer", "ipv6.fwd_to_pod"] {
        assert!(
            grew(name) >= crossing,
            "{name} grew by {}, expected at least {crossing}",
            grew(name)
        );
    }
    assert!(
        grew("ipv6.fwd_to_pod_direct") >= crossing,
        "IPv6 pods are delivered straight into their namespace: fwd_to_pod_direct +{}",
        grew("ipv6.fwd_to_pod_direct")
    );
    assert_eq!(grew("ipv4.fwd_to_peer"), 0, "IPv6 traffic counted as IPv4");
    Ok(())
}
