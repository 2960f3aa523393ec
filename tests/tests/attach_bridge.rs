//! With `--attach bridge` the bridge-side program runs on cni0 only (pod traffic is
//! bridged first) and still carries pod traffic across nodes (in the default
//! `established` mode: a UDP flow conntrack has seen answered; pings go to the kernel).

use std::time::Duration;

use hgw_tests::{Lab, counter_sum, hgw_programs, ping, udp_replied_exchange};

#[test]
fn the_program_on_the_bridge_carries_pod_traffic() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in 0..2 {
        lab.start_agent(node, &["--attach", "bridge"])?
            .wait_ready(Duration::from_secs(15))?;
    }
    let attached = hgw_programs(&lab.nodes[0].ns)?;
    assert!(
        attached
            .iter()
            .any(|p| p.starts_with("cni0 ingress hgw_to_peer")),
        "not on cni0: {attached:?}"
    );
    assert!(
        !attached.iter().any(|p| p.starts_with("veth")),
        "on a port too: {attached:?}"
    );

    let before = lab.statuses()?;
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let out = ping(&from.ns, to.ip, 5, &[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    const PACKETS: usize = 20;
    assert_eq!(
        udp_replied_exchange(&from.ns, &to.ns, to.ip, PACKETS)?,
        PACKETS
    );
    let after = lab.statuses()?;
    let grew = counter_sum(&after, "ipv4.fwd_to_peer") - counter_sum(&before, "ipv4.fwd_to_peer");
    assert!(
        grew >= PACKETS as u64,
        "fwd_to_peer grew by {grew}, expected at least {PACKETS}"
    );
    Ok(())
}
