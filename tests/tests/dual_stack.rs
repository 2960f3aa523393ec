//! Dual stack: pods on different nodes talk over IPv6 (ICMPv6, TCP, UDP) in the default
//! `established` mode, with the kernel's forward path dropping every packet the fast
//! path must carry (TCP data of assured connections, UDP datagrams after the answer):
//! those got through on the fast path. The agents install IPv6 kernel routes and
//! resolve next hops over NDP, and the counters move in the IPv6 block only.

use hgw_tests::{
    Lab, counter_sum, hgw_routes, ping, run_in_ok, tcp_transfer, udp_replied_exchange,
};

/// The lab's table for [`drop_established_forwarding`].
const TABLE: &str = "hgw_test_fast_path_only";

/// Makes node `ns` drop, on netfilter's forward hook, what `established` mode must take
/// on the fast path: datagrams of a UDP flow going the way it was opened once it has
/// been answered, and TCP segments carrying data (longer than any header: 128 bytes)
/// of an assured connection. New flows, their answers, the TCP handshake and ICMP
/// still go through the kernel, as they must for conntrack to accept a flow.
fn drop_established_forwarding(ns: &str) -> anyhow::Result<()> {
    let chain = format!("inet {TABLE} forward");
    let rules = [
        format!("add table inet {TABLE}"),
        format!("add chain {chain} {{ type filter hook forward priority -300; policy accept; }}"),
        format!(
            "add rule {chain} meta l4proto udp ct direction original ct state established drop"
        ),
        format!("add rule {chain} meta l4proto tcp ct status assured meta length > 128 drop"),
    ]
    .join("; ");
    run_in_ok(ns, "nft", &[&rules])?;
    Ok(())
}

#[test]
fn ipv6_pods_talk_through_the_fast_path_with_routes_and_ndp() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);

    // The kernel route (the fallback) and a resolved IPv6 next hop on each node.
    let routes = hgw_routes(&n1.ns)?.join("\n");
    let want = format!("{} via {} dev eth0", n2.pod_cidr6, n2.uplink_ip6);
    assert!(routes.contains(&want), "no `{want}` in:\n{routes}");
    let status = lab.agents()[0].status()?;
    let v6 = status
        .peer(&n2.pod_cidr6)
        .unwrap_or_else(|| panic!("no IPv6 peer route for {} in:\n{status}", n2.pod_cidr6));
    assert_eq!(v6.node_ip, n2.uplink_ip6.to_string());
    assert!(v6.route && v6.mac.is_some(), "{v6:?}");
    assert_eq!(status.peers.len(), 2, "one entry per family:\n{status}");

    // What the fast path must carry is dropped on the kernel path.
    for node in &lab.nodes {
        drop_established_forwarding(&node.ns)?;
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
    let arrived = udp_replied_exchange(&from.ns, &to.ns, to.ip6, UDP_PACKETS)?;
    assert_eq!(arrived, UDP_PACKETS, "UDP {} -> {}", from.ip6, to.ip6);
    let after = lab.statuses()?;

    let grew = |name: &str| counter_sum(&after, name) - counter_sum(&before, name);
    // Each datagram after the answer, and each TCP data segment (at most 64 KiB each
    // when coalesced), crosses one bridge-side and one uplink-side program.
    let crossing = UDP_PACKETS as u64 + (1 << 20) / 65536;
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
    // ICMPv6 is never the fast path's in this mode: each echo request and reply meets
    // one bridge-side and one uplink-side program, and both hand it to the kernel.
    let icmp = 2 * u64::from(PINGS) * 2 * 2;
    assert!(
        grew("ipv6.pass_ct_proto") >= icmp,
        "ipv6.pass_ct_proto grew by {}, expected at least {icmp}",
        grew("ipv6.pass_ct_proto")
    );
    assert_eq!(grew("ipv4.fwd_to_peer"), 0, "IPv6 traffic counted as IPv4");
    Ok(())
}
