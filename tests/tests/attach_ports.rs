//! With `--attach ports` the bridge-side program runs on each bridge port (the pods'
//! host-side veths) instead of cni0, follows pods as they come and go, and carries
//! their traffic (in the default `established` mode: UDP flows conntrack has seen
//! answered; pings go to the kernel).

use std::time::{Duration, Instant};

use hgw_tests::{Lab, counter_sum, hgw_programs, ping, udp_replied_exchange};

fn port_programs(ns: &str) -> anyhow::Result<Vec<String>> {
    Ok(hgw_programs(ns)?
        .into_iter()
        .filter(|p| p.contains("hgw_to_peer"))
        .collect())
}

#[test]
fn the_program_follows_the_bridge_ports() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 2)?;
    for node in 0..2 {
        lab.start_agent(node, &["--attach", "ports"])?
            .wait_ready(Duration::from_secs(15))?;
    }
    let ns = lab.nodes[0].ns.clone();
    let attached = port_programs(&ns)?;
    assert!(
        attached.iter().any(|p| p.starts_with("veth1 ingress"))
            && attached.iter().any(|p| p.starts_with("veth2 ingress")),
        "not on every port: {attached:?}"
    );
    assert!(
        !attached.iter().any(|p| p.starts_with("cni0")),
        "also on cni0: {attached:?}"
    );

    // A pod created while the agent runs gets the program within a second.
    let pod = lab.add_pod(0)?;
    let added = Instant::now();
    while !port_programs(&ns)?
        .iter()
        .any(|p| p.starts_with("veth3 ingress"))
    {
        assert!(
            added.elapsed() < Duration::from_secs(1),
            "new port not attached: {:?}",
            port_programs(&ns)?
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let before = lab.statuses()?;
    let targets: Vec<_> = lab.nodes[1].pods.clone();
    let mut sent = 0;
    for from in lab.nodes[0].pods.clone() {
        for to in &targets {
            let out = ping(&from.ns, to.ip, 1, &[])?;
            assert!(
                out.status.success(),
                "ping {} -> {}:\n{}",
                from.ip,
                to.ip,
                String::from_utf8_lossy(&out.stdout)
            );
            // Each datagram after the answer leaves through the sender's port program.
            const PACKETS: usize = 10;
            assert_eq!(
                udp_replied_exchange(&from.ns, &to.ns, to.ip, PACKETS)?,
                PACKETS,
                "UDP {} -> {}",
                from.ip,
                to.ip
            );
            sent += PACKETS as u64;
        }
    }
    let after = lab.statuses()?;
    let grew = counter_sum(&after, "ipv4.fwd_to_peer") - counter_sum(&before, "ipv4.fwd_to_peer");
    assert!(
        grew >= sent,
        "fwd_to_peer grew by {grew}, expected at least {sent}"
    );

    // A pod that goes away takes its port's program with it (the kernel drops a deleted
    // veth's programs); the agent notices and keeps running.
    hgw_tests::run_in_ok(&ns, "ip", &["link", "del", "veth3"])?;
    drop(pod);
    std::thread::sleep(Duration::from_millis(200));
    let left = port_programs(&ns)?;
    assert!(!left.iter().any(|p| p.starts_with("veth3")), "{left:?}");
    assert!(
        lab.agent(0).expect("agent").is_running(),
        "agent died when a port went away"
    );

    // A port taken out of the bridge keeps its veth: only the agent can take the program
    // off it. Put back, it gets the program again.
    hgw_tests::run_in_ok(&ns, "ip", &["link", "set", "veth2", "nomaster"])?;
    wait_for_port(&ns, "veth2", false)?;
    hgw_tests::run_in_ok(&ns, "ip", &["link", "show", "dev", "veth2"])?;
    hgw_tests::run_in_ok(&ns, "ip", &["link", "set", "veth2", "master", "cni0"])?;
    wait_for_port(&ns, "veth2", true)?;
    Ok(())
}

/// Waits up to a second until `dev`'s ingress has the port program (or has none).
fn wait_for_port(ns: &str, dev: &str, attached: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let on = |programs: &[String]| {
        programs
            .iter()
            .any(|p| p.starts_with(&format!("{dev} ingress")))
    };
    loop {
        let programs = port_programs(ns)?;
        if on(&programs) == attached {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(1),
            "{dev}: the port program is {} after a second: {programs:?}",
            if attached {
                "still missing"
            } else {
                "still there"
            }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
