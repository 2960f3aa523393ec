//! A peer whose MAC the agent does not know yet (no ARP and no NDP answer): its traffic
//! is left to the kernel (which resolves the MAC and delivers), the counters of each
//! family say why, and once the kernel has resolved it the agent picks the MAC up and
//! the fast path takes over (in the default `established` mode, for a flow conntrack
//! has seen answered: the MAC check comes first, so one-way traffic shows it too).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hgw_tests::{
    Lab, Status, block_neighbour_discovery, block_neighbour_requests, counter, run_in_ok,
    udp_exchange, udp_replied_exchange, unblock_neighbour_discovery,
};

#[test]
fn traffic_to_an_unresolved_next_hop_still_arrives() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    // n2 answers no ARP and no neighbour solicitation: n1's agent cannot learn its MAC.
    block_neighbour_discovery(&lab.nodes[1].ns)?;
    lab.start_agent(0, &[])?;
    lab.start_agent(1, &[])?;
    // One status entry per family, IPv4 first.
    let unresolved =
        |s: &Status| (0..2).all(|i| s.peers.get(i).is_some_and(|p| p.route && p.mac.is_none()));
    let status = lab.agents()[0].wait_for(Duration::from_secs(15), unresolved)?;
    assert!(
        !status.ready,
        "ready although a next hop is unresolved:\n{status}"
    );

    // The kernel's own retries of the agent's first request must be over (entries
    // FAILED), or n2's answer to one of them would beat the traffic below.
    let n1 = lab.nodes[0].ns.clone();
    let peer_ips = [
        lab.nodes[1].uplink_ip.to_string(),
        lab.nodes[1].uplink_ip6.to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let out = run_in_ok(&n1, "ip", &["neigh", "show", "dev", "eth0"])?;
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let failed = |ip: &str| {
            table
                .lines()
                .all(|l| !l.starts_with(&format!("{ip} ")) || l.contains("FAILED"))
        };
        if peer_ips.iter().all(|ip| failed(ip)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2's entries never FAILED:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // n2 answers again, but sends no requests of its own, from which n1 would learn
    // its MAC before the traffic below makes n1's kernel ask.
    block_neighbour_requests(&lab.nodes[1].ns)?;
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    const PACKETS: usize = 20;
    let cases: [(usize, &str, IpAddr); 2] = [(0, "ipv4", to.ip.into()), (1, "ipv6", to.ip6.into())];
    // Both families at once, right after the unblocking: the agent's own retries
    // (every 10 s) would otherwise resolve the next hops first.
    for (_, family, to_ip) in cases {
        let arrived = udp_exchange(&from.ns, &to.ns, to_ip, PACKETS)?;
        assert_eq!(
            arrived, PACKETS,
            "{family}: packets to an unresolved next hop were lost"
        );
    }
    let status = lab.agents()[0].status()?;
    for (_, family, _) in cases {
        let no_mac = format!("{family}.pass_no_mac");
        assert!(
            counter(&status, &no_mac) > 0,
            "{no_mac} did not move: {:?}",
            status.counters
        );
    }

    // The kernel resolved n2 for those packets; the agent follows the neighbour events.
    for (entry, _, _) in cases {
        lab.agents()[0].wait_for(Duration::from_secs(5), |s| {
            s.peers.get(entry).is_some_and(|p| p.mac.is_some())
        })?;
    }
    // n1 knows n2 now; n2 may ask again, as the answers of the flows below need n1's
    // MAC (the entry n2 made from n1's requests may have gone stale and failed).
    unblock_neighbour_discovery(&lab.nodes[1].ns)?;
    for (_, family, to_ip) in cases {
        let status = lab.agents()[0].status()?;
        let fwd = format!("{family}.fwd_to_peer");
        let fwd_before = counter(&status, &fwd);
        assert_eq!(
            udp_replied_exchange(&from.ns, &to.ns, to_ip, PACKETS)?,
            PACKETS
        );
        let fwd_after = counter(&lab.agents()[0].status()?, &fwd);
        assert!(
            fwd_after >= fwd_before + PACKETS as u64,
            "{family}: fast path did not take over: {fwd} {fwd_before} -> {fwd_after}"
        );
    }
    Ok(())
}
