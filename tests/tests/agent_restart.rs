//! Restarts without a gap: the agent pins its tcx links and maps, so the programs keep
//! forwarding while no agent runs, and the next agent puts its programs in place with a
//! link update (never detached, then attached). Under a paced TCP stream and a two-way
//! UDP flow, with kube-proxy's INVALID drop on both nodes (which drops a carried TCP
//! segment the kernel path sees out of window): SIGKILL the agent, start it again 3 s
//! later, and nothing is lost; the fast-path counters grew while no agent ran. A
//! restart with another program (`--fast-path all` loads other code) is the same. Then
//! `hgw-agent uninstall` takes it all off the node.

use std::time::{Duration, Instant};

use hgw_tests::{
    Lab, UdpFlow, add_kube_proxy_invalid_drop, agent_bin, counter, hgw_nexthops, hgw_programs,
    hgw_routes, invalid_drops, paced_tcp_stream, run_in_ok,
};

const GAP: Duration = Duration::from_secs(3);
/// Datagrams each way while no agent runs.
const WHILE_DOWN: usize = 200;

fn lab() -> anyhow::Result<Lab> {
    let lab = Lab::up_with_agents(2, 1)?;
    for node in &lab.nodes {
        add_kube_proxy_invalid_drop(&node.ns)?;
    }
    Ok(lab)
}

/// The ids of n1's hgw programs on eth0 (one, unless programs were stacked).
fn eth0_programs(ns: &str) -> anyhow::Result<Vec<String>> {
    Ok(hgw_programs(ns)?
        .into_iter()
        .filter(|p| p.starts_with("eth0 "))
        .collect())
}

/// SIGKILLs n1's agent under traffic and starts it again after [`GAP`] with
/// `restart_args`; returns the restarted agent's log.
fn kill_and_restart(lab: &mut Lab, port: u16, restart_args: &[&str]) -> anyhow::Result<String> {
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    let mut udp = UdpFlow::open(&from.ns, &to.ns, to.ip)?;
    assert_eq!(udp.send(20)?, 20, "the UDP flow is not answered");
    let programs_before = eth0_programs(&n1.ns)?;
    let log = paced_tcp_stream(&from.ns, &to.ns, to.ip, port, 500, || {
        std::thread::sleep(Duration::from_millis(500));
        let agent = lab.agent_mut(0).expect("agent on n1");
        let before = agent.status()?;
        agent.kill()?;
        let killed = Instant::now();
        // No agent runs: the programs must carry this flow both ways.
        assert_eq!(
            udp.send(WHILE_DOWN)?,
            WHILE_DOWN,
            "datagrams lost while no agent ran"
        );
        assert_eq!(
            eth0_programs(&n1.ns)?,
            programs_before,
            "the program on n1's eth0 changed while no agent ran"
        );
        std::thread::sleep(GAP.saturating_sub(killed.elapsed()));
        let agent = lab.start_agent(0, restart_args)?;
        let after = agent.wait_ready(Duration::from_secs(15))?;
        // Counters live in a pinned map: what the programs counted meanwhile is there.
        for name in ["ipv4.fwd_to_peer", "ipv4.fwd_to_pod"] {
            let grew = counter(&after, name) - counter(&before, name);
            assert!(
                grew >= WHILE_DOWN as u64,
                "{name} grew by {grew} across the restart, expected at least the {WHILE_DOWN} datagrams sent while no agent ran: the fast path left"
            );
        }
        Ok(agent.log())
    })?;
    assert_eq!(udp.send(20)?, 20, "the UDP flow stopped after the restart");
    for node in &lab.nodes {
        assert_eq!(
            invalid_drops(&node.ns)?,
            0,
            "{}: kube-proxy's INVALID rule dropped segments: the kernel path saw the stream",
            node.ns
        );
    }
    Ok(log)
}

#[test]
fn a_killed_agent_leaves_the_fast_path_running_and_the_next_adopts_it() -> anyhow::Result<()> {
    let mut lab = lab()?;
    let before = eth0_programs(&lab.nodes[0].ns)?;
    let log = kill_and_restart(&mut lab, 7101, &[])?;
    assert!(
        log.contains("hgw_to_pod on eth0: replaced in place"),
        "the restarted agent did not update the pinned link:\n{log}"
    );
    assert!(
        log.contains("pinned maps reused"),
        "the restarted agent made new maps:\n{log}"
    );
    let after = eth0_programs(&lab.nodes[0].ns)?;
    assert_eq!(after.len(), 1, "programs stacked on eth0: {after:?}");
    assert_ne!(
        before, after,
        "the restarted agent's own program is not in place"
    );
    Ok(())
}

#[test]
fn a_different_program_replaces_the_running_one_in_place() -> anyhow::Result<()> {
    let mut lab = lab()?;
    // `all` mode loads other code (no conntrack lookup) into the same links and maps.
    let log = kill_and_restart(&mut lab, 7102, &["--fast-path", "all"])?;
    assert!(
        log.contains("hgw_to_pod on eth0: replaced in place"),
        "the new program was not put in place by a link update:\n{log}"
    );
    let after = eth0_programs(&lab.nodes[0].ns)?;
    assert_eq!(after.len(), 1, "programs stacked on eth0: {after:?}");
    Ok(())
}

#[test]
fn stopping_leaves_the_pinned_fast_path_and_uninstall_removes_it() -> anyhow::Result<()> {
    let mut lab = Lab::up_with_agents(2, 1)?;
    let n1 = lab.nodes[0].clone();
    let socket = lab.agent(0).expect("agent").socket().to_owned();
    let pins = lab.pin_dir(0);
    let status = lab.agent_mut(0).expect("agent").stop()?;
    assert!(status.success(), "agent did not exit 0 on SIGTERM");
    assert!(
        !eth0_programs(&n1.ns)?.is_empty(),
        "the pinned program left with the agent"
    );

    let uninstall = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        run_in_ok(
            &n1.ns,
            &agent_bin().to_string_lossy(),
            &[
                &["uninstall", "--pin-dir", &pins.to_string_lossy()],
                &["--status-socket", &socket.to_string_lossy()][..],
                args,
            ]
            .concat(),
        )
    };
    assert!(
        !hgw_nexthops(&n1.ns)?.is_empty(),
        "the routes left by the stopped agent are on hgw's nexthops"
    );
    uninstall(&[])?;
    assert!(
        hgw_nexthops(&n1.ns)?.is_empty(),
        "hgw nexthops left after uninstall: {:?}",
        hgw_nexthops(&n1.ns)?
    );
    assert!(
        hgw_programs(&n1.ns)?.is_empty(),
        "programs still attached after uninstall: {:?}",
        hgw_programs(&n1.ns)?
    );
    assert!(
        hgw_routes(&n1.ns)?.is_empty(),
        "hgw routes left after uninstall: {:?}",
        hgw_routes(&n1.ns)?
    );
    assert!(!pins.exists(), "{} is still there", pins.display());
    let tables = run_in_ok(&n1.ns, "nft", &["list", "tables"])?;
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains("inet hgw"),
        "hgw's nftables tables left: {tables}"
    );
    // n2's agent still runs: uninstall there refuses.
    let n2_socket = lab.agent(1).expect("agent").socket().to_owned();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.nodes[1].ns])
        .arg(agent_bin())
        .args(["uninstall", "--pin-dir"])
        .arg(lab.pin_dir(1))
        .arg("--status-socket")
        .arg(&n2_socket)
        .output()?;
    assert!(!out.status.success(), "uninstall ran under a live agent");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!hgw_programs(&lab.nodes[1].ns)?.is_empty());
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_is_rebuilt() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    // What another hgw version might have left: a route map of another type and size.
    let maps = lab.prepare_pin_dir(0)?.join("maps");
    std::fs::create_dir_all(&maps)?;
    let stale = maps.join("HGW_ROUTES_V4");
    run_in_ok(
        &lab.nodes[0].ns,
        "bpftool",
        &[
            "map",
            "create",
            &stale.to_string_lossy(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "HGW_ROUTES_V4",
        ],
    )?;
    for node in 0..2 {
        lab.start_agent(node, &[])?
            .wait_ready(Duration::from_secs(15))?;
    }
    let log = lab.agent(0).expect("agent on n1").log();
    assert!(
        log.contains("pinned maps of another layout replaced") && log.contains("HGW_ROUTES_V4"),
        "the stale map was not named as replaced:\n{log}"
    );
    // The new map is the one the programs use: traffic rides the fast path.
    let (from, to) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let agent = lab.agent(0).expect("agent on n1");
    let before = agent.status()?;
    let mut udp = UdpFlow::open(&from.ns, &to.ns, to.ip)?;
    assert_eq!(udp.send(50)?, 50);
    let grew = counter(&agent.status()?, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
    assert!(
        grew >= 49,
        "fwd_to_peer grew by {grew} for 50 datagrams: the rebuilt route map is not in use"
    );
    Ok(())
}
