//! Three nodes, two pods each: every pod reaches every pod on the other nodes (ICMP,
//! TCP, UDP) in the default `established` mode. The counters prove that the TCP and UDP
//! flows conntrack accepted took the fast path, mostly from the flow cache, and that
//! pings went to the kernel (ICMP is never fast-path traffic in this mode).

use hgw_tests::{Lab, counter_sum, ping, tcp_transfer, udp_replied_exchange};

#[test]
fn pods_on_different_nodes_talk_through_the_fast_path() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(3, 2)?;
    for status in lab.statuses()? {
        assert_eq!(status.fast_path, "established", "not the default mode");
    }
    let before = lab.statuses()?;

    let pairs = lab.cross_node_pod_pairs();
    const PINGS: u32 = 3;
    for (from, to) in &pairs {
        let out = ping(&from.ns, to.ip, PINGS, &[])?;
        assert!(
            out.status.success(),
            "ping {} -> {} failed:\n{}",
            from.ip,
            to.ip,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    const TCP_BYTES: usize = 1 << 20;
    const UDP_PACKETS: usize = 100;
    let (mut tcp_sent, mut udp_sent) = (0, 0);
    for (from, to) in pairs.iter().step_by(4) {
        tcp_transfer(&from.ns, &to.ns, to.ip, TCP_BYTES)?;
        tcp_sent += TCP_BYTES as u64;
        // The server answers first: conntrack has seen the flow replied before the
        // counted datagrams go.
        let arrived = udp_replied_exchange(&from.ns, &to.ns, to.ip, UDP_PACKETS)?;
        assert_eq!(arrived, UDP_PACKETS, "UDP {} -> {}", from.ip, to.ip);
        udp_sent += UDP_PACKETS as u64;
    }

    let after = lab.statuses()?;
    let grew = |name: &str| counter_sum(&after, name) - counter_sum(&before, name);
    // Each datagram after the answer, and each TCP data segment after the handshake,
    // crosses one bridge-side and one uplink-side program on the fast path. Segments
    // coalesce (GSO, at most 64 KiB each), so the data gives at least one per 64 KiB.
    let crossing = udp_sent + tcp_sent / 65536;
    for name in ["ipv4.fwd_to_peer", "ipv4.fwd_to_pod"] {
        assert!(
            grew(name) >= crossing,
            "{name} grew by {}, expected at least {crossing}",
            grew(name)
        );
    }
    // The flow cache carried most of them: all but the first packet of each flow at
    // each program, and one per recheck time (100 ms) after it, so at least half the
    // crossings (with `ct_recheck_ms = 0` this is 0).
    assert!(
        grew("ipv4.ct_cached") >= crossing,
        "ct_cached grew by {}, expected at least {crossing} of the {} crossings",
        grew("ipv4.ct_cached"),
        2 * crossing
    );
    // Each echo request and reply meets one bridge-side and one uplink-side program,
    // and both hand it to the kernel.
    let icmp = pairs.len() as u64 * u64::from(PINGS) * 2 * 2;
    assert!(
        grew("ipv4.pass_ct_proto") >= icmp,
        "pass_ct_proto grew by {}, expected at least {icmp}",
        grew("ipv4.pass_ct_proto")
    );
    Ok(())
}
