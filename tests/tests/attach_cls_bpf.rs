//! Kernels without tcx (before 6.6, Debian 12's 6.1): hgw's programs sit on the hooks
//! as direct-action cls_bpf filters of a clsact qdisc, last (priority 65535), and keep
//! every promise of the tcx path. Forced here on a kernel with tcx by
//! `HGW_FORCE_CLS_BPF=1` (the agents inherit it); the kernel matrix runs the real one.
//!
//! - The agents say they attach with cls_bpf, no hgw program is on a tcx hook, and each
//!   hook has exactly one hgw filter, at priority 65535.
//! - A foreign cls_bpf filter before hgw's (priority 1) on n1's port and n2's uplink,
//!   one added before the agents started and one after: each still sees every
//!   datagram of a UDP flow, and the flow is on the fast path all the same
//!   (`fwd_to_peer` on n1, `fwd_to_pod` on n2, grow by at least the datagrams sent):
//!   what ran before hgw is not something its redirect skips.
//! - n1's agent SIGKILLed under a paced TCP stream, with kube-proxy's INVALID drop
//!   (a carried segment the kernel path sees is out of window, and dropped): the
//!   filters outlive it and carry 200 datagrams; the next agent replaces its filters'
//!   programs in place; no segment reaches the kernel path; one hgw filter per hook.
//! - `uninstall` on n1 deletes hgw's filters and the clsact qdisc hgw added where
//!   nothing else is left (the uplink), and leaves the foreign filter and its qdisc.
//! - Without pinning (`--pin-dir none`), an agent that stops deletes its filters and
//!   the clsact qdisc it added for them.
//! - An agent in `off` mode after a pinned one deletes the filters it left and the
//!   clsact qdisc it added.
//! - An unpinned agent whose attach fails halfway (someone's u32 filter holds hgw's
//!   priority on cni0, after hgw_to_pod went on the uplink) exits
//!   naming the program and the interface, and leaves neither its filter nor the
//!   clsact qdisc it added on the uplink; the other filter stays.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hgw_agent::datapath::{FILTER_PRIORITY, FORCE_CLS_BPF};
use hgw_tests::{
    Hook, Lab, PacketMatch, Probe, UdpFlow, Verdict, add_kube_proxy_invalid_drop, counter,
    hgw_filters, hgw_programs, ingress_filters, invalid_drops, paced_tcp_stream, probe_pin_dir,
    qdiscs, run_in_ok, uninstall,
};

const PORT_DEV: &str = "veth1";
const UPLINK_DEV: &str = "eth0";
const BATCH: usize = 100;
const WHILE_DOWN: usize = 200;
const GAP: Duration = Duration::from_secs(3);
/// Time for an agent to see a filter come (a netlink event): never measured here.
const SETTLE: Duration = Duration::from_millis(1500);
const READY: Duration = Duration::from_secs(15);

/// Exactly one hgw filter of `program` on `dev`, last; its program id.
fn one_hgw_filter(ns: &str, dev: &str, program: &str) -> anyhow::Result<u64> {
    let filters = hgw_filters(ns, dev)?;
    match filters.as_slice() {
        [(pref, name, id)] if *pref == u64::from(FILTER_PRIORITY) && name == program => Ok(*id),
        _ => anyhow::bail!(
            "{ns} {dev} ingress: hgw filters {filters:?}, expected one {program} at priority {FILTER_PRIORITY}"
        ),
    }
}

/// No hgw filter on the node's port, uplink or bridge.
fn no_hgw_filters(ns: &str, when: &str) -> anyhow::Result<()> {
    for dev in [PORT_DEV, UPLINK_DEV, "cni0"] {
        let filters = hgw_filters(ns, dev)?;
        ensure!(
            filters.is_empty(),
            "{ns} {dev}: hgw filters {when}: {filters:?}"
        );
    }
    Ok(())
}

fn has_clsact(ns: &str, dev: &str) -> anyhow::Result<bool> {
    Ok(qdiscs(ns, dev)?.iter().any(|q| q["kind"] == "clsact"))
}

#[test]
fn cls_bpf_filters_come_last_hand_on_restart_in_place_and_uninstall_cleanly() -> anyhow::Result<()>
{
    // SAFETY: set before any thread of this test binary starts (one test in it).
    unsafe { std::env::set_var(FORCE_CLS_BPF, "1") };
    let mut lab = Lab::up(2, 1)?;
    let pin_dir = probe_pin_dir(&lab)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let (a, b) = (n1.pods[0].clone(), n2.pods[0].clone());
    for node in &lab.nodes {
        add_kube_proxy_invalid_drop(&node.ns)?;
    }
    // Before the agents, no route leads to the other node's pods: this one counts any
    // UDP to the pod, which is only the flow.
    let any_udp = PacketMatch {
        dport: None,
        ..PacketMatch::udp_to(b.ip, 0)
    };
    let on_uplink = Probe::load(any_udp, Verdict::Next)?;
    let _uplink_filter = on_uplink.attach_legacy(&n2.ns, UPLINK_DEV, Hook::Ingress, 1, &pin_dir)?;

    // On the ports, as a user may still ask (without it, cls_bpf means cni0).
    lab.start_agents(&["--attach=ports"], READY)?;
    let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
    let port = flow.server_addr().port();
    for agent in lab.agents() {
        let log = agent.log();
        ensure!(
            log.contains("attaching as cls_bpf filters"),
            "node {}: the agent does not say it attaches with cls_bpf:\n{log}",
            agent.node
        );
        ensure!(
            log.contains("attach = ports without tcx"),
            "node {}: the agent does not warn about its qdiscs on the pod veths:\n{log}",
            agent.node
        );
    }
    for node in &lab.nodes {
        ensure!(
            hgw_programs(&node.ns)?.is_empty(),
            "{}: hgw programs on tcx hooks: {:?}",
            node.ns,
            hgw_programs(&node.ns)?
        );
    }
    let on_port = Probe::load(PacketMatch::udp_to(b.ip, port), Verdict::Next)?;
    let port_filter = on_port.attach_legacy(&n1.ns, PORT_DEV, Hook::Ingress, 1, &pin_dir)?;
    let ids_before = [
        one_hgw_filter(&n1.ns, PORT_DEV, "hgw_to_peer")?,
        one_hgw_filter(&n1.ns, UPLINK_DEV, "hgw_to_pod")?,
    ];
    one_hgw_filter(&n2.ns, UPLINK_DEV, "hgw_to_pod")?;
    std::thread::sleep(SETTLE);

    // The foreign filters run first and see everything; the flow is on the fast path.
    let before = lab.statuses()?;
    let seen_before = on_uplink.count()?;
    let got = flow.send(BATCH)?;
    let after = lab.statuses()?;
    let grew = |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
    let (to_peer, to_pod) = (grew(0, "ipv4.fwd_to_peer"), grew(1, "ipv4.fwd_to_pod"));
    let (seen_port, seen_uplink) = (on_port.count()?, on_uplink.count()? - seen_before);
    eprintln!(
        "{got}/{BATCH} arrived; n1 fwd_to_peer +{to_peer}, n2 fwd_to_pod +{to_pod}; probes saw {seen_port} (n1 {PORT_DEV}), {seen_uplink} (n2 {UPLINK_DEV})"
    );
    ensure!(got == BATCH, "{got} of {BATCH} datagrams arrived");
    ensure!(
        seen_port >= BATCH as u64 && seen_uplink >= BATCH as u64,
        "the filters before hgw's saw {seen_port} (n1 {PORT_DEV}) and {seen_uplink} (n2 {UPLINK_DEV}) of {BATCH} datagrams"
    );
    ensure!(
        to_peer >= BATCH as u64 && to_pod >= BATCH as u64,
        "n1 fwd_to_peer +{to_peer}, n2 fwd_to_pod +{to_pod} for {BATCH} datagrams: not on the fast path"
    );
    for (node, dev) in [(0, PORT_DEV), (1, UPLINK_DEV)] {
        let hook = after[node]
            .hooks
            .iter()
            .find(|h| h.interface == dev)
            .with_context(|| format!("n{}: status shows no hooks of {dev}", node + 1))?;
        ensure!(
            hook.hgw
                && hook.flags.is_empty()
                && hook.filters.len() == 1
                && hook.filters[0].priority == 1,
            "n{}: status of {dev}: expected hgw, the probe's filter alone (hgw's own not listed) and no flag: {hook:?}",
            node + 1
        );
    }

    // Restart without a gap, under a paced TCP stream.
    let log = paced_tcp_stream(&a.ns, &b.ns, b.ip, 7201, 500, || {
        std::thread::sleep(Duration::from_millis(500));
        let agent = lab.agent_mut(0).context("agent on n1")?;
        let before = agent.status()?;
        agent.kill()?;
        let killed = Instant::now();
        ensure!(
            flow.send(WHILE_DOWN)? == WHILE_DOWN,
            "datagrams lost while no agent ran"
        );
        std::thread::sleep(GAP.saturating_sub(killed.elapsed()));
        let agent = lab.start_agent(0, &["--attach=ports"])?;
        let after = agent.wait_ready(READY)?;
        let grew = counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
        ensure!(
            grew >= WHILE_DOWN as u64,
            "fwd_to_peer grew by {grew} across the restart, expected at least the {WHILE_DOWN} datagrams sent while no agent ran"
        );
        Ok(agent.log())
    })?;
    for node in &lab.nodes {
        let drops = invalid_drops(&node.ns)?;
        ensure!(
            drops == 0,
            "{}: kube-proxy's INVALID rule dropped {drops} segments: the kernel path saw the stream",
            node.ns
        );
    }
    for program in ["hgw_to_peer", "hgw_to_pod"] {
        ensure!(
            log.contains(&format!("{program} on "))
                && log.contains("replaced in place (cls_bpf filter updated)"),
            "the restarted agent did not replace {program}'s filter in place:\n{log}"
        );
    }
    let ids_after = [
        one_hgw_filter(&n1.ns, PORT_DEV, "hgw_to_peer")?,
        one_hgw_filter(&n1.ns, UPLINK_DEV, "hgw_to_pod")?,
    ];
    ensure!(
        ids_before.iter().zip(&ids_after).all(|(b, a)| b != a),
        "the restarted agent's programs are not in the filters: {ids_before:?} -> {ids_after:?}"
    );
    ensure!(
        flow.send(BATCH)? == BATCH,
        "the UDP flow stopped after the restart"
    );

    // uninstall: hgw's filters go, and the qdisc hgw added where nothing else is left.
    let agent = lab.agent_mut(0).context("agent on n1")?;
    let socket = agent.socket().to_owned();
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    ensure!(
        !hgw_filters(&n1.ns, UPLINK_DEV)?.is_empty(),
        "hgw's filter left with the agent (pinned, it stays)"
    );
    uninstall(&n1.ns, &lab.pin_dir(0), &socket)?;
    no_hgw_filters(&n1.ns, "after uninstall")?;
    let left = ingress_filters(&n1.ns, PORT_DEV)?;
    ensure!(
        matches!(left.as_slice(), [(1, name, _)] if name.starts_with("probe-")),
        "n1 {PORT_DEV}: the foreign filter did not stay alone: {left:?}"
    );
    ensure!(
        has_clsact(&n1.ns, PORT_DEV)?,
        "n1 {PORT_DEV}: the clsact qdisc holding the foreign filter went"
    );
    ensure!(
        !has_clsact(&n1.ns, UPLINK_DEV)?,
        "n1 {UPLINK_DEV}: the clsact qdisc hgw added is still there: {:?}",
        qdiscs(&n1.ns, UPLINK_DEV)?
    );
    port_filter.remove()?;

    // Without pinning, the agent deletes its filters when it stops, and the qdisc it
    // added for them.
    let agent = lab.start_agent(0, &["--attach=ports", "--pin-dir", "none"])?;
    agent.wait_ready(READY)?;
    one_hgw_filter(&n1.ns, UPLINK_DEV, "hgw_to_pod")?;
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    ensure!(
        hgw_filters(&n1.ns, UPLINK_DEV)?.is_empty(),
        "n1 {UPLINK_DEV}: an unpinned agent's filter stayed after it stopped: {:?}",
        hgw_filters(&n1.ns, UPLINK_DEV)?
    );
    ensure!(
        !has_clsact(&n1.ns, UPLINK_DEV)?,
        "n1 {UPLINK_DEV}: the clsact qdisc an unpinned agent added stayed after it stopped: {:?}",
        qdiscs(&n1.ns, UPLINK_DEV)?
    );

    // `off` after a pinned agent: its filters and the qdisc it added go, and nothing
    // forwards (the agent's log says what it removed).
    let agent = lab.start_agent(0, &["--attach=ports"])?;
    agent.wait_ready(READY)?;
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    one_hgw_filter(&n1.ns, UPLINK_DEV, "hgw_to_pod")?;
    let agent = lab.start_agent(0, &["--attach=ports", "--fast-path", "off"])?;
    agent.wait_ready(READY)?;
    no_hgw_filters(&n1.ns, "with the fast path off")?;
    ensure!(
        !has_clsact(&n1.ns, UPLINK_DEV)?,
        "n1 {UPLINK_DEV}: the clsact qdisc the pinned agent added stayed with the fast path off: {:?}",
        qdiscs(&n1.ns, UPLINK_DEV)?
    );
    let log = agent.log();
    ensure!(
        log.contains("removed 1 clsact qdiscs hgw added"),
        "the `off` agent did not say it removed the qdisc:\n{log}"
    );
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");

    // A start whose attach fails after the uplink's: nothing of it stays.
    let pref = FILTER_PRIORITY.to_string();
    run_in_ok(&n1.ns, "tc", &["qdisc", "add", "dev", "cni0", "clsact"])?;
    run_in_ok(
        &n1.ns,
        "tc",
        &[
            "filter", "add", "dev", "cni0", "ingress", "protocol", "all", "pref", &pref, "u32",
            "match", "u32", "0", "0",
        ],
    )?;
    let config = format!("attach = \"bridge\"\n{}", lab.agent_config(0));
    let (status, stderr, _) = lab.run_agent_to_exit(0, &config)?;
    // The error and its causes, without the log before it or a backtrace after.
    let error = stderr.rsplit("Error: ").next().unwrap_or_default();
    let error = error.split("Stack backtrace").next().unwrap_or_default();
    eprintln!("the failed start: {error}");
    ensure!(
        stderr.contains(&format!("{UPLINK_DEV}: clsact qdisc added")),
        "the failed start did not get past the uplink's attach (nothing to take off):\n{stderr}"
    );
    ensure!(
        !status.success() && error.contains("hgw_to_peer") && error.contains("cni0"),
        "an agent that cannot attach to cni0 did not fail naming the program and cni0 ({status}):\n{stderr}"
    );
    ensure!(
        hgw_filters(&n1.ns, UPLINK_DEV)?.is_empty() && !has_clsact(&n1.ns, UPLINK_DEV)?,
        "n1 {UPLINK_DEV}: a failed start left hgw's filter {:?} or its clsact qdisc {:?}",
        hgw_filters(&n1.ns, UPLINK_DEV)?,
        qdiscs(&n1.ns, UPLINK_DEV)?
    );
    let left = run_in_ok(&n1.ns, "tc", &["filter", "show", "dev", "cni0", "ingress"])?;
    let left = String::from_utf8_lossy(&left.stdout);
    ensure!(
        left.contains("u32") && !left.contains("hgw_"),
        "n1 cni0: the u32 filter did not stay alone:\n{left}"
    );
    Ok(())
}
