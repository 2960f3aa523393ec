//! The kernel matrix's smoke test (`cargo xtask matrix` runs it on each kernel, once per
//! mode): pods on two nodes talk over both families in the mode `HGW_MATRIX_MODE` names
//! (default `established`), the fast-path counters move, and both agents still run after
//! the traffic (on a kernel that refuses an attach, the status socket can exist before
//! the agent dies). The agents attach the way the kernel allows (tcx from 6.6, cls_bpf
//! filters before) and say so. A SIGKILLed agent's successor puts its programs in place
//! (no second program on a hook) and the flow stays on the fast path; `uninstall`
//! takes hgw's programs off. The peer routes sit on nexthop objects of their own. Under plain `cargo test` it is one more default-mode check.

use std::time::Duration;

use anyhow::Context as _;
use hgw_agent::datapath::FORCE_CLS_BPF;
use hgw_tests::{
    Lab, counter, counter_sum, hgw_filters, hgw_nexthops, hgw_programs, hgw_routes, ping,
    tcp_transfer, udp_replied_exchange, uninstall,
};

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
    // The kernel's answer to a tcx query (not its version), and the agent's own rule
    // for forcing cls_bpf.
    let tcx = hgw_agent::tc::tcx_supported();
    let cls_bpf = !tcx || std::env::var_os(FORCE_CLS_BPF).is_some_and(|v| v == "1");
    let said = if cls_bpf {
        "attaching as cls_bpf filters"
    } else {
        "attaching with tcx"
    };
    for agent in lab.agents() {
        assert!(
            agent.log().contains(said),
            "node {}: the agent does not say \"{said}\":\n{}",
            agent.node,
            agent.log()
        );
    }
    // Status says the same, and where the conntrack kfuncs came from: the module's BTF
    // where nf_conntrack is a module (it has an initstate; a built-in one has not).
    let module = std::path::Path::new("/sys/module/nf_conntrack/initstate").exists();
    let home = if module {
        "module nf_conntrack"
    } else {
        "vmlinux"
    };
    let kfuncs = (mode == "established").then_some(home);
    for status in lab.statuses()? {
        let kernel = status.kernel.context("status names no kernel features")?;
        assert_eq!(kernel.attach, if cls_bpf { "cls_bpf" } else { "tcx" });
        assert_eq!(kernel.conntrack_kfuncs.as_deref(), kfuncs, "{kernel}");
        assert_eq!(kernel.features.get("tcx"), Some(&tcx), "{kernel}");
    }
    // Where the bridge-side program went: each pod veth with tcx; cni0 with cls_bpf,
    // whose qdisc on a pod veth would fail the CNI bandwidth plugin's ADD.
    let on = |dev: &str| -> anyhow::Result<bool> {
        Ok(hgw_hooks(&lab.nodes[0].ns, cls_bpf)?
            .iter()
            .any(|hook| hook.starts_with(&format!("{dev}:"))))
    };
    let (port, bridge) = (on("veth1")?, on("cni0")?);
    assert_eq!(
        (port, bridge),
        (!cls_bpf, cls_bpf),
        "n1: hgw's bridge-side program on veth1 {port}, on cni0 {bridge} (cls_bpf {cls_bpf})"
    );
    // Each peer route (both families) on a nexthop object of its own, as the agent
    // installs them wherever the kernel has them (5.3+).
    for node in &lab.nodes {
        let (routes, nexthops) = (hgw_routes(&node.ns)?, hgw_nexthops(&node.ns)?);
        assert_eq!(
            (routes.len(), nexthops.len()),
            (2, 2),
            "{}: routes {routes:?}, nexthops {nexthops:?}",
            node.name
        );
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

    // A restart: the next agent's programs replace the running ones in place.
    let (n1, to_ns, to_ip) = (lab.nodes[0].ns.clone(), to.ns.clone(), to.ip);
    let from_ns = from.ns.clone();
    let agent = lab.agent_mut(0).context("agent on n1")?;
    agent.kill()?;
    let agent = lab.start_agent(0, &["--fast-path", &mode])?;
    let before = agent.wait_ready(READY)?;
    assert!(
        agent.log().contains("replaced in place"),
        "the restarted agent did not replace its programs in place:\n{}",
        agent.log()
    );
    let got = udp_replied_exchange(&from_ns, &to_ns, to_ip, UDP_PACKETS)?;
    let after = lab.agent(0).context("agent on n1")?.status()?;
    let grew = counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
    assert_eq!(got, UDP_PACKETS, "datagrams lost after the restart");
    assert!(
        grew >= UDP_PACKETS as u64,
        "after the restart, n1 fwd_to_peer grew by {grew} for {UDP_PACKETS} datagrams"
    );
    assert_eq!(
        hgw_hooks(&n1, cls_bpf)?.len(),
        2,
        "n1: hgw's hooks after the restart"
    );

    // uninstall takes them off.
    let agent = lab.agent_mut(0).context("agent on n1")?;
    let socket = agent.socket().to_owned();
    assert!(agent.stop()?.success(), "n1's agent did not exit 0");
    uninstall(&n1, &lab.pin_dir(0), &socket)?;
    let left = hgw_hooks(&n1, cls_bpf)?;
    assert!(
        left.is_empty(),
        "n1: hgw's programs after uninstall: {left:?}"
    );
    let (routes, nexthops) = (hgw_routes(&n1)?, hgw_nexthops(&n1)?);
    assert!(
        routes.is_empty() && nexthops.is_empty(),
        "n1: hgw's routes {routes:?} and nexthops {nexthops:?} after uninstall"
    );
    Ok(())
}

/// hgw's programs on the hooks of `ns`: tcx programs, or cls_bpf filters on the ingress
/// of the uplink, the pod's port and the bridge (one line each, `DEV: ...`).
fn hgw_hooks(ns: &str, cls_bpf: bool) -> anyhow::Result<Vec<String>> {
    if !cls_bpf {
        // `DEV ingress NAME id ID`, as `DEV: ...` like the filters below.
        return Ok(hgw_programs(ns)?
            .into_iter()
            .map(|p| p.replacen(' ', ": ", 1))
            .collect());
    }
    let mut found = Vec::new();
    for dev in ["eth0", "veth1", "cni0"] {
        found.extend(
            hgw_filters(ns, dev)?
                .into_iter()
                .map(|(pref, name, id)| format!("{dev}: pref {pref} {name} id {id}")),
        );
    }
    Ok(found)
}
