//! kube-proxy's ipvs mode: IPVS's NAT sets no conntrack NAT bits, so `established`
//! mode cannot tell its flows from plain ones and must not run beside it. Needs a
//! kernel with IPVS (the kernel matrix's Debian kernels; this test says so and passes
//! where the module cannot be loaded).
//!
//! - Agents on two nodes carry a UDP flow on the fast path (`fwd_to_peer` grows).
//! - A virtual service appears in n1's namespace (`ipvsadm -A`, as kube-proxy adds
//!   one per Service): within seconds n1's agent takes its fast path off (no hgw
//!   program or filter on its hooks, its pins gone), keeps running, and its status
//!   says `off` and why; the flow goes on over kernel routes, as with kernel routes
//!   alone.
//! - An agent started on n1 while IPVS has the service runs with the fast path off
//!   (status says why) instead of refusing to start.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, UdpFlow, counter, hgw_filters, hgw_programs, run_in, run_in_ok};

const READY: Duration = Duration::from_secs(60);
const NOTICED: Duration = Duration::from_secs(10);
const BATCH: usize = 100;

/// Loads ip_vs with the kernel's own module loader (the matrix's guests point it at
/// their kernel's modules); whether the kernel has IPVS now.
fn load_ipvs() -> bool {
    let modprobe = std::fs::read_to_string("/proc/sys/kernel/modprobe")
        .map(|p| p.trim().to_owned())
        .unwrap_or_else(|_| "modprobe".to_owned());
    let loaded = std::process::Command::new(&modprobe)
        .arg("ip_vs")
        .status()
        .is_ok_and(|s| s.success());
    loaded && std::path::Path::new("/proc/net/ip_vs").exists()
}

/// No hgw program, filter or pin left on n1.
fn fast_path_gone(lab: &Lab, ns: &str) -> anyhow::Result<()> {
    let programs = hgw_programs(ns)?;
    ensure!(
        programs.is_empty(),
        "{ns}: hgw programs still on tcx hooks: {programs:?}"
    );
    for dev in ["eth0", "cni0", "veth1"] {
        let filters = hgw_filters(ns, dev)?;
        ensure!(
            filters.is_empty(),
            "{ns} {dev}: hgw filters still there: {filters:?}"
        );
    }
    let pins: Vec<_> = std::fs::read_dir(lab.pin_dir(0))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(pins.is_empty(), "n1's pin directory still holds {pins:?}");
    Ok(())
}

#[test]
fn established_mode_steps_aside_for_ipvs() -> anyhow::Result<()> {
    if !load_ipvs() {
        eprintln!("skipped: this kernel has no IPVS (the kernel matrix runs this test)");
        return Ok(());
    }
    let mut lab = Lab::up(2, 1)?;
    let (n1, a, b) = (
        lab.nodes[0].clone(),
        lab.nodes[0].pods[0].clone(),
        lab.nodes[1].pods[0].clone(),
    );
    lab.start_agents(&[], READY)?;
    let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
    let before = lab.agent(0).context("agent on n1")?.status()?;
    ensure!(flow.send(BATCH)? == BATCH, "datagrams lost before IPVS");
    let after = lab.agent(0).context("agent on n1")?.status()?;
    let grew = counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
    ensure!(
        grew >= BATCH as u64,
        "n1 fwd_to_peer +{grew} for {BATCH} datagrams: not on the fast path before IPVS"
    );

    // A virtual service, as kube-proxy's ipvs mode adds for a Service.
    run_in_ok(
        &n1.ns,
        "ipvsadm",
        &["-A", "-t", "10.96.0.10:80", "-s", "rr"],
    )?;
    let agent = lab.agent(0).context("agent on n1")?;
    let status = agent
        .wait_for(NOTICED, |s| s.fast_path == "off")
        .context("n1's agent did not take its fast path off after IPVS came")?;
    let note = status.fast_path_note.clone().unwrap_or_default();
    ensure!(
        note.contains("IPVS"),
        "n1's status does not say why the fast path is off: {note:?}"
    );
    ensure!(agent.is_running(), "n1's agent stopped");
    fast_path_gone(&lab, &n1.ns)?;
    let before = agent.status()?;
    ensure!(
        flow.send(BATCH)? == BATCH,
        "datagrams lost over kernel routes"
    );
    let after = agent.status()?;
    ensure!(
        counter(&after, "ipv4.fwd_to_peer") == counter(&before, "ipv4.fwd_to_peer"),
        "n1's fast path still forwarded after it was taken off"
    );

    // A start beside IPVS runs without the fast path.
    let agent = lab.agent_mut(0).context("agent on n1")?;
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    let agent = lab.start_agent(0, &[])?;
    let status = agent.wait_ready(READY)?;
    ensure!(
        status.fast_path == "off"
            && status
                .fast_path_note
                .as_deref()
                .is_some_and(|n| n.contains("IPVS")),
        "an agent started beside IPVS: fast path {:?}, note {:?}",
        status.fast_path,
        status.fast_path_note
    );
    fast_path_gone(&lab, &n1.ns)?;
    ensure!(
        flow.send(BATCH)? == BATCH,
        "datagrams lost with the restarted agent"
    );
    // The module stays loaded (other namespaces may use it); the service went with
    // the lab's namespace.
    let _ = run_in(&n1.ns, "ipvsadm", &["-C"]);
    Ok(())
}
