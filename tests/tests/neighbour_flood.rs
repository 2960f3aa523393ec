//! A burst of 10,000 neighbour events (a pod flooding its bridge with MACs, the
//! uplink's ARP table churning): the agent takes each event for what it is, not as a
//! cue to dump the kernel's tables, so it stays responsive (status answers, a deleted
//! route is back within seconds) and its memory stays bounded.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use hgw_tests::{Lab, hgw_routes, ping, run_in_ok};

const EVENTS: u32 = 10_000;

/// The agent's resident memory now and at its peak, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[test]
fn ten_thousand_neighbour_events_leave_the_agent_responsive() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (node, peer) = (&lab.nodes[0], &lab.nodes[1]);
    let agent = lab.agent(0).expect("agent on n1");
    // A pod the agent delivers to directly, before the flood and after it.
    assert!(
        ping(&node.pods[0].ns, peer.pods[0].ip, 1, &[])?
            .status
            .success()
    );
    agent.wait_for(Duration::from_secs(5), |s| s.endpoints == 1)?;
    let (rss_before, _) = memory_kib(agent.pid())?;

    // A port of the bridge, for forwarding entries as a flooding pod makes them.
    let ports = run_in_ok(&node.ns, "ip", &["-o", "link", "show", "master", "cni0"])?;
    let ports = String::from_utf8_lossy(&ports.stdout).into_owned();
    let port = ports
        .lines()
        .find_map(|l| l.split(": ").nth(1))
        .and_then(|name| name.split('@').next())
        .ok_or_else(|| anyhow::anyhow!("no port on cni0: {ports}"))?
        .to_owned();

    let mut fdb = tempfile_in(lab.dir(), "fdb.batch")?;
    let mut neigh = tempfile_in(lab.dir(), "neigh.batch")?;
    for i in 0..EVENTS / 2 {
        let [_, a, b, c] = i.to_be_bytes();
        writeln!(
            fdb.1,
            "fdb add 02:f1:00:{a:02x}:{b:02x}:{c:02x} dev {port} master static"
        )?;
        writeln!(
            neigh.1,
            "neigh add 10.99.{b}.{c} lladdr 02:f2:00:{a:02x}:{b:02x}:{c:02x} dev eth0"
        )?;
    }
    drop((fdb.1, neigh.1));

    let started = Instant::now();
    run_in_ok(&node.ns, "bridge", &["-batch", &fdb.0])?;
    run_in_ok(&node.ns, "ip", &["-batch", &neigh.0])?;
    eprintln!("{EVENTS} entries added in {:?}", started.elapsed());

    // Status answers while the agent works through the burst.
    let asked = Instant::now();
    let status = agent.status()?;
    eprintln!("status answered in {:?} during the burst", asked.elapsed());
    assert_eq!(status.node, "n1");

    // The loop is free again: a route deleted now is back within seconds.
    let route = format!("{} via {} dev eth0", peer.pod_cidr, peer.uplink_ip);
    run_in_ok(&node.ns, "ip", &["route", "del", &peer.pod_cidr])?;
    let deleted = Instant::now();
    while !hgw_routes(&node.ns)?.iter().any(|r| r.starts_with(&route)) {
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "route to {} not back 5 s after the burst: the agent is still busy",
            peer.pod_cidr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("route back after {:?}", deleted.elapsed());
    assert!(agent.is_running(), "the agent stopped:\n{}", agent.log());

    let (rss, peak) = memory_kib(agent.pid())?;
    eprintln!("agent RSS {rss_before} KiB before, {rss} KiB after, peak {peak} KiB");
    assert!(
        peak < rss_before + 32 * 1024,
        "the agent's memory grew by {} KiB for {EVENTS} events",
        peak - rss_before
    );
    // Nothing of the flood is taken for a pod or a peer, and the pod is still known.
    let status = agent.status()?;
    assert_eq!(status.endpoints, 1, "{status}");
    assert_eq!(status.map_entries, 2, "{status:?}");
    Ok(())
}

/// A file in the lab's directory (removed with the lab), open for writing.
fn tempfile_in(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(String, std::io::BufWriter<std::fs::File>)> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path)?;
    Ok((
        path.to_string_lossy().into_owned(),
        std::io::BufWriter::new(file),
    ))
}
