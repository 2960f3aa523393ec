//! A peer's MAC changes without any announcement. The fast path keeps no kernel
//! neighbour entry fresh by itself, so the agent asks the kernel to re-check STALE
//! entries: the probe to the old MAC fails, the kernel resolves the new one, and the
//! next hop follows. (Neighbour timers shortened in n1 so this takes seconds.)

use std::time::{Duration, Instant};

use hgw_tests::{Lab, ping, run_in_ok};

const NEW_MAC: &str = "02:68:67:77:00:12";

#[test]
fn an_unannounced_mac_change_is_found_by_probing() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    // Before n1 resolves n2: an entry's timer is armed with the times of its last change.
    for (key, value) in [
        ("base_reachable_time_ms", "500"),
        ("delay_first_probe_time", "1"),
        ("retrans_time_ms", "200"),
    ] {
        run_in_ok(
            &n1.ns,
            "sysctl",
            &["-qw", &format!("net.ipv4.neigh.eth0.{key}={value}")],
        )?;
    }
    for node in 0..2 {
        lab.start_agent(node, &[])?
            .wait_ready(Duration::from_secs(15))?;
    }
    run_in_ok(
        &n2.ns,
        "sysctl",
        &["-qw", "net.ipv4.conf.eth0.arp_notify=0"],
    )?;
    // n2 asks nobody anything (its ARP requests would teach n1 the new MAC): it only
    // answers, so n1 can learn the change only by probing.
    run_in_ok(&n2.ns, "nft", &["add", "table", "arp", "hgwtest"])?;
    run_in_ok(
        &n2.ns,
        "nft",
        &[
            "add",
            "chain",
            "arp",
            "hgwtest",
            "out",
            "{ type filter hook output priority 0; }",
        ],
    )?;
    run_in_ok(
        &n2.ns,
        "nft",
        &[
            "add",
            "rule",
            "arp",
            "hgwtest",
            "out",
            "arp",
            "operation",
            "request",
            "drop",
        ],
    )?;
    run_in_ok(
        &n2.ns,
        "ip",
        &["link", "set", "dev", "eth0", "address", NEW_MAC],
    )?;
    let changed = Instant::now();

    let agent = lab.agent(0).expect("agent");
    agent.wait_for(Duration::from_secs(30), |s| {
        s.peers
            .first()
            .is_some_and(|p| p.mac.as_deref() == Some(NEW_MAC))
    })?;
    eprintln!(
        "next hop followed the silent change after {:?}",
        changed.elapsed()
    );
    run_in_ok(&n2.ns, "nft", &["delete", "table", "arp", "hgwtest"])?;
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let out = ping(&from.ns, to.ip, 3, &[])?;
    assert!(
        out.status.success(),
        "no traffic after the change:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
