//! The uplink's MTU is smaller than the pods': a DF packet too large for it is left to
//! the kernel, which answers "fragmentation needed" from the sender's gateway, and TCP
//! finds the path MTU and completes a transfer, with the fast path loaded.

use std::time::Duration;

use hgw_tests::{Lab, counter, ping, run_in_ok, tcp_transfer};

const UPLINK_MTU: u32 = 1400;

#[test]
fn too_big_gets_frag_needed_and_tcp_finds_the_path_mtu() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    for node in &lab.nodes {
        run_in_ok(
            &node.ns,
            "ip",
            &["link", "set", "dev", "eth0", "mtu", &UPLINK_MTU.to_string()],
        )?;
    }
    for node in 0..2 {
        lab.start_agent(node, &[])?
            .wait_ready(Duration::from_secs(15))?;
    }
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let agent = lab.agent(0).expect("agent");
    let before = agent.status()?;

    // 1472 bytes of ICMP payload = a 1500-byte IP packet, with DF.
    let out = ping(&from.ns, to.ip, 1, &["-M", "do", "-s", "1472"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("From {}", lab.nodes[0].gateway))
            && stdout.contains(&format!("mtu = {UPLINK_MTU}")),
        "expected frag needed (mtu = {UPLINK_MTU}) from the gateway:\n{stdout}"
    );
    // Fitting packets still take the fast path.
    let out = ping(&from.ns, to.ip, 3, &["-M", "do", "-s", "1372"])?;
    assert!(
        out.status.success(),
        "a packet of exactly the uplink MTU failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    tcp_transfer(&from.ns, &to.ns, to.ip, 4 << 20)?;
    let after = agent.status()?;
    let grew = |name| counter(&after, name) - counter(&before, name);
    assert!(grew("ipv4.pass_mtu") >= 1, "pass_mtu did not move");
    assert!(
        grew("ipv4.fwd_to_peer") >= 3 + 100,
        "the transfer did not take the fast path: fwd_to_peer +{}",
        grew("ipv4.fwd_to_peer")
    );
    Ok(())
}
