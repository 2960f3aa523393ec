//! The kernel matrix's smoke test (`cargo xtask matrix` runs it on each kernel, once per
//! mode): pods on two nodes talk over both families in the mode `HGW_MATRIX_MODE` names
//! (default `established`), the fast-path counters move, and both agents still run after
//! the traffic (on a kernel that refuses an attach, the status socket can exist before
//! the agent dies). Under plain `cargo test` it is one more default-mode check.

use std::time::Duration;

use hgw_tests::{Lab, counter_sum, ping, tcp_transfer, udp_replied_exchange};

/// Generous: under QEMU's emulation (TCG) an agent starts several times slower.
const READY: Duration = Duration::from_secs(60);
const UDP_PACKETS: usize = 100;
const TCP_BYTES: usize = 256 << 10;

#[test]
fn pods_on_two_nodes_talk_through_the_fast_path() -> anyhow::Result<()> {
    let mode = std::env::var("HGW_MATRIX_MODE").unwrap_or_else(|_| "established".to_owned());
    let mut lab = Lab::up(2, 1)?;
    for node in 0..lab.nodes.len() {
        lab.start_agent(node, &["--fast-path", &mode])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(READY)?;
    }
    for status in lab.statuses()? {
        assert_eq!(status.fast_path, mode, "the agent runs another mode");
    }
    let before = lab.statuses()?;

    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    for dst in [to.ip.into(), std::net::IpAddr::from(to.ip6)] {
        let out = ping(&from.ns, dst, 2, &[])?;
        assert!(
            out.status.success(),
            "ping {dst} failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    tcp_transfer(&from.ns, &to.ns, to.ip, TCP_BYTES)?;
    // The server answers first, so conntrack holds the flow as replied (what
    // `established` needs) before the counted datagrams go.
    let v4 = udp_replied_exchange(&from.ns, &to.ns, to.ip, UDP_PACKETS)?;
    let v6 = udp_replied_exchange(&from.ns, &to.ns, to.ip6, UDP_PACKETS)?;
    assert_eq!((v4, v6), (UDP_PACKETS, UDP_PACKETS), "datagrams lost");

    for agent in lab.agents() {
        assert!(
            agent.is_running(),
            "agent on node {} died after the traffic:\n{}",
            agent.node,
            agent.log()
        );
    }
    let after = lab.statuses()?;
    let grew = |name: &str| counter_sum(&after, name) - counter_sum(&before, name);
    // Each counted datagram crosses one bridge-side and one uplink-side program.
    for family in ["ipv4", "ipv6"] {
        for dir in ["fwd_to_peer", "fwd_to_pod"] {
            let name = format!("{family}.{dir}");
            assert!(
                grew(&name) >= UDP_PACKETS as u64,
                "{name} grew by {}, expected at least {UDP_PACKETS} (mode {mode})",
                grew(&name)
            );
        }
    }
    Ok(())
}
