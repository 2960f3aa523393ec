//! The uplink is deleted and made again under the same name (a new ifindex, a new MAC),
//! as a network manager or a VM's NIC hot-plug does: within a second the agent has its
//! program on the new device and its routes back; once the kernel has resolved the
//! peer's MAC again on the new device (ARP/NDP, the kernel's timing), traffic both ways
//! takes the fast path again. A next hop left on the old ifindex would redirect into a
//! device that no longer exists, and lose every packet.

use std::time::{Duration, Instant};

use hgw_tests::{Lab, counter, hgw_programs, hgw_routes, run_in_ok, tcp_transfer};

/// 1 MiB in GSO packets of at most 64 KiB: at least this many cross each program.
const MIN_PACKETS: u64 = 16;

#[test]
fn a_recreated_uplink_gets_the_fast_path_back_within_a_second() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    let sw = format!("{}-sw", lab.id);
    let old_index = ifindex(&n1.ns, "eth0")?;

    run_in_ok(&n1.ns, "ip", &["link", "del", "eth0"])?;
    run_in_ok(
        &n1.ns,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", &n1.name, "netns", &sw,
        ],
    )?;
    let recreated = Instant::now();
    for addr in [
        format!("{}/24", n1.uplink_ip),
        format!("{}/64", n1.uplink_ip6),
    ] {
        run_in_ok(&n1.ns, "ip", &["addr", "add", &addr, "dev", "eth0"])?;
    }
    run_in_ok(&n1.ns, "ip", &["link", "set", "eth0", "up"])?;
    run_in_ok(&sw, "ip", &["link", "set", &n1.name, "master", "br0", "up"])?;
    let new_index = ifindex(&n1.ns, "eth0")?;
    assert_ne!(old_index, new_index, "eth0 was not made again");

    let agent = lab.agent(0).expect("agent on n1");
    loop {
        let on_eth0 = hgw_programs(&n1.ns)?
            .iter()
            .any(|p| p.starts_with("eth0 ingress hgw_to_pod"));
        let routes = hgw_routes(&n1.ns)?;
        let routed = [&n2.pod_cidr, &n2.pod_cidr6]
            .iter()
            .all(|cidr| routes.iter().any(|r| r.starts_with(cidr.as_str())));
        if on_eth0 && routed {
            break;
        }
        assert!(
            recreated.elapsed() < Duration::from_secs(1),
            "after {:?}: program on eth0 {on_eth0}, routes {routed}",
            recreated.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "program and routes back on eth0 after {:?}",
        recreated.elapsed()
    );
    agent.wait_ready(Duration::from_secs(10))?;
    eprintln!("next hops resolved after {:?}", recreated.elapsed());

    let (a, b) = (&n1.pods[0], &n2.pods[0]);
    let before = agent.status()?;
    tcp_transfer(&a.ns, &b.ns, b.ip, 1 << 20)?;
    tcp_transfer(&b.ns, &a.ns, a.ip, 1 << 20)?;
    let after = agent.status()?;
    for name in ["ipv4.fwd_to_peer", "ipv4.fwd_to_pod"] {
        let grew = counter(&after, name) - counter(&before, name);
        assert!(
            grew >= MIN_PACKETS,
            "n1 {name} grew by {grew}, expected at least {MIN_PACKETS}: the fast path is not back on the new eth0 (ifindex {new_index})"
        );
    }
    Ok(())
}

fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let out = run_in_ok(ns, "cat", &[&format!("/sys/class/net/{dev}/ifindex")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
