//! Three nodes, two pods each: every pod reaches every pod on the other nodes (ICMP,
//! TCP, UDP), and the fast-path counters prove the traffic took the fast path.

use hgw_tests::{Lab, counter_sum, ping, tcp_transfer, udp_exchange};

#[test]
fn pods_on_different_nodes_talk_through_the_fast_path() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(3, 2)?;
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
    const UDP_PACKETS: usize = 100;
    let mut udp_sent = 0;
    for (from, to) in pairs.iter().step_by(4) {
        tcp_transfer(&from.ns, &to.ns, to.ip, 1 << 20)?;
        let arrived = udp_exchange(&from.ns, &to.ns, to.ip, UDP_PACKETS)?;
        assert_eq!(arrived, UDP_PACKETS, "UDP {} -> {}", from.ip, to.ip);
        udp_sent += UDP_PACKETS as u64;
    }

    let after = lab.statuses()?;
    // Each echo request and each reply crosses one bridge-side and one uplink-side program.
    let crossing = pairs.len() as u64 * u64::from(PINGS) * 2 + udp_sent;
    let to_peer =
        counter_sum(&after, "ipv4.fwd_to_peer") - counter_sum(&before, "ipv4.fwd_to_peer");
    let to_pod = counter_sum(&after, "ipv4.fwd_to_pod") - counter_sum(&before, "ipv4.fwd_to_pod");
    assert!(
        to_peer >= crossing,
        "fwd_to_peer grew by {to_peer}, expected at least {crossing}"
    );
    assert!(
        to_pod >= crossing,
        "fwd_to_pod grew by {to_pod}, expected at least {crossing}"
    );
    Ok(())
}
