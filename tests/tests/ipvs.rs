//! kube-proxy's ipvs mode: IPVS's NAT sets no conntrack NAT bits, so `established`
//! mode cannot tell its flows from plain ones and must not run beside it. Needs a
//! kernel with IPVS: the kernel matrix's Debian kernels, where `HGW_REQUIRE_IPVS=1`
//! makes a missing module a failure; elsewhere the test says it skipped. A module it
//! loaded goes again when it ends.
//!
//! - Agents on two nodes carry a UDP flow on the fast path (`fwd_to_peer` grows).
//! - A virtual service appears in n1's namespace (`ipvsadm -A`, as kube-proxy adds
//!   one per Service): within seconds n1's agent takes its fast path off (no hgw
//!   program, filter, clsact qdisc or pin left), keeps running, and its status says
//!   `off` and why; the flow goes on over kernel routes (`fwd_to_peer` stands still),
//!   as with kernel routes alone.
//! - Without the service an agent runs `established` again; stopped, it leaves its
//!   pinned fast path. An agent started once the service is back runs `off`, says
//!   why, and takes that fast path off.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, UdpFlow, counter, hgw_filters, hgw_programs, qdiscs, run_in, run_in_ok};

const READY: Duration = Duration::from_secs(60);
const NOTICED: Duration = Duration::from_secs(10);
const BATCH: usize = 100;
const SERVICE: &str = "10.96.0.10:80";
const DEVICES: [&str; 3] = ["eth0", "cni0", "veth1"];

/// The kernel's module loader (the matrix's guests point it at their kernel's modules).
fn modprobe() -> String {
    std::fs::read_to_string("/proc/sys/kernel/modprobe")
        .map(|p| p.trim().to_owned())
        .unwrap_or_else(|_| "modprobe".to_owned())
}

/// ip_vs, loaded for the test; unloaded when dropped if it was not loaded before.
struct IpvsModule {
    loaded_here: bool,
}

impl IpvsModule {
    /// `None`: this kernel has no IPVS.
    fn load() -> Option<Self> {
        let before = Path::new("/sys/module/ip_vs").exists();
        let loaded = before
            || std::process::Command::new(modprobe())
                .arg("ip_vs")
                .status()
                .is_ok_and(|s| s.success());
        // `then`, not `then_some`: a value made and dropped would unload the module.
        (loaded && Path::new("/sys/module/ip_vs").exists()).then(|| Self {
            loaded_here: !before,
        })
    }
}

impl Drop for IpvsModule {
    fn drop(&mut self) {
        if !self.loaded_here {
            return;
        }
        // The lab's namespaces go in the background and hold the module until then.
        for _ in 0..50 {
            let unloaded = std::process::Command::new(modprobe())
                .args(["-r", "ip_vs"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unloaded {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("ip_vs stays loaded: still in use after 5 s");
    }
}

/// No hgw program, filter, clsact qdisc (none was there before hgw) or pin on n1.
fn fast_path_gone(lab: &Lab, ns: &str, when: &str) -> anyhow::Result<()> {
    let programs = hgw_programs(ns)?;
    ensure!(
        programs.is_empty(),
        "{ns} {when}: hgw programs on tcx hooks: {programs:?}"
    );
    for dev in DEVICES {
        let filters = hgw_filters(ns, dev)?;
        ensure!(
            filters.is_empty(),
            "{ns} {dev} {when}: hgw filters: {filters:?}"
        );
        let clsact = qdiscs(ns, dev)?.iter().any(|q| q["kind"] == "clsact");
        ensure!(
            !clsact,
            "{ns} {dev} {when}: the clsact qdisc hgw added is still there"
        );
    }
    let pins: Vec<_> = std::fs::read_dir(lab.pin_dir(0))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(
        pins.is_empty(),
        "n1's pin directory {when} still holds {pins:?}"
    );
    Ok(())
}

/// Whether hgw's program sits on n1's uplink (tcx or cls_bpf).
fn on_uplink(ns: &str) -> anyhow::Result<bool> {
    Ok(hgw_programs(ns)?.iter().any(|p| p.starts_with("eth0 "))
        || !hgw_filters(ns, "eth0")?.is_empty())
}

fn says_ipvs(note: Option<&str>) -> bool {
    note.is_some_and(|n| n.contains("IPVS"))
}

#[test]
fn established_mode_steps_aside_for_ipvs() -> anyhow::Result<()> {
    let Some(_module) = IpvsModule::load() else {
        ensure!(
            std::env::var_os("HGW_REQUIRE_IPVS").is_none_or(|v| v != "1"),
            "HGW_REQUIRE_IPVS=1, but ip_vs could not be loaded"
        );
        eprintln!("skipped: this kernel has no IPVS (the kernel matrix runs this test)");
        return Ok(());
    };
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
    run_in_ok(&n1.ns, "ipvsadm", &["-A", "-t", SERVICE, "-s", "rr"])?;
    let agent = lab.agent(0).context("agent on n1")?;
    let status = agent
        .wait_for(NOTICED, |s| s.fast_path == "off")
        .context("n1's agent did not take its fast path off after IPVS came")?;
    ensure!(
        says_ipvs(status.fast_path_note.as_deref()),
        "n1's status does not say why the fast path is off: {:?}",
        status.fast_path_note
    );
    ensure!(agent.is_running(), "n1's agent stopped");
    fast_path_gone(&lab, &n1.ns, "once IPVS came")?;
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

    // Without IPVS an agent runs `established` again, and leaves it pinned when it
    // stops; started beside IPVS, the next one takes that off.
    run_in_ok(&n1.ns, "ipvsadm", &["-C"])?;
    let agent = lab.agent_mut(0).context("agent on n1")?;
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    let agent = lab.start_agent(0, &[])?;
    let status = agent.wait_ready(READY)?;
    ensure!(
        status.fast_path == "established" && status.fast_path_note.is_none(),
        "an agent started without IPVS: fast path {:?}, note {:?}",
        status.fast_path,
        status.fast_path_note
    );
    ensure!(agent.stop()?.success(), "n1's agent did not exit 0");
    ensure!(
        on_uplink(&n1.ns)?,
        "the pinned fast path did not stay after its agent stopped"
    );
    run_in_ok(&n1.ns, "ipvsadm", &["-A", "-t", SERVICE, "-s", "rr"])?;
    let agent = lab.start_agent(0, &[])?;
    let status = agent.wait_ready(READY)?;
    ensure!(
        status.fast_path == "off" && says_ipvs(status.fast_path_note.as_deref()),
        "an agent started beside IPVS: fast path {:?}, note {:?}",
        status.fast_path,
        status.fast_path_note
    );
    fast_path_gone(&lab, &n1.ns, "after a start beside IPVS")?;
    ensure!(
        flow.send(BATCH)? == BATCH,
        "datagrams lost with the agent started beside IPVS"
    );
    let _ = run_in(&n1.ns, "ipvsadm", &["-C"]);
    drop(lab);
    Ok(())
}
