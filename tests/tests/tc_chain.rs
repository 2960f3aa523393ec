//! Other tc filters and programs on hgw's hooks keep running, and keep their effect,
//! with hgw as with kernel routes alone (issue 17, tests 2).
//!
//! Two kinds of neighbour on the same ingress hooks as hgw's programs: a tcx program
//! attached after hgw's (`BPF_F_AFTER`), and a legacy tc filter (a `clsact` qdisc's
//! direct-action `cls_bpf` filter: this kernel has no `gact` and no `matchall`, see
//! `hgw_tests::Probe`). Each is a probe that counts one flow's packets, and, for the
//! second test, drops them. Both on the bridge port of the sending pod (n1's `veth1`)
//! and on the uplink of the receiving node (n2's `eth0`).
//!
//! - Pings from n1's pod to n2's pod (ICMP: `established` always hands it to the
//!   kernel): every probe counts every echo request, in `off` and in `established`.
//!   A program that ends the chain (`TCX_PASS`, what `TC_ACT_OK` is under tcx) for the
//!   packets it leaves to the kernel hides them from both.
//! - A UDP flow the fast path already carries: a dropping probe added on the port or
//!   the uplink, as a tcx program or as a legacy filter, drops the next datagrams (none
//!   arrives), in `off` and `established`; removed again, the flow arrives again, and in
//!   `established` is back on the fast path (`fwd_to_peer` grows by the datagrams).
//!
//! - In `established`, `hgw-agent status` shows both probes on each interface (the tcx
//!   one after hgw's program) and the interface's ingress flagged.
//!
//! Before issue 17's fix, `established`: no probe counted a ping, and no dropper
//! dropped a datagram.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{
    Hook, Lab, LegacyFilter, PacketMatch, Probe, ProbeLink, Status, UdpFlow, Verdict, counter,
    ping, probe_pin_dir, tcx_programs,
};

const PINGS: u32 = 10;
/// Datagrams per batch of the UDP flow.
const BATCH: usize = 50;
/// Time for the agent to see a filter or program come or go (filters: netlink events;
/// tcx programs have none, the agent looks again on its own): never measured here.
const SETTLE: Duration = Duration::from_millis(1500);
/// The sending pod's bridge port on n1, and n2's uplink.
const PORT_DEV: &str = "veth1";
const UPLINK_DEV: &str = "eth0";

/// How a probe is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// tcx, after hgw's program.
    Tcx,
    /// A filter of a `clsact` qdisc.
    Legacy,
}

/// An attached probe; dropping it detaches it.
enum Attached {
    Tcx(ProbeLink),
    Legacy(LegacyFilter),
}

impl Attached {
    fn remove(self) -> anyhow::Result<()> {
        match self {
            Attached::Tcx(link) => {
                drop(link);
                Ok(())
            }
            Attached::Legacy(filter) => filter.remove(),
        }
    }
}

fn attach(
    probe: &Probe,
    kind: Kind,
    ns: &str,
    dev: &str,
    pin_dir: &std::path::Path,
) -> anyhow::Result<Attached> {
    Ok(match kind {
        Kind::Tcx => Attached::Tcx(probe.attach_tcx(ns, dev, Hook::Ingress)?),
        Kind::Legacy => {
            Attached::Legacy(probe.attach_legacy(ns, dev, Hook::Ingress, 1, pin_dir)?)
        }
    })
}

#[test]
fn filters_and_programs_after_hgw_see_the_packets_it_hands_to_the_kernel() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let pin_dir = probe_pin_dir(&lab)?;
    let (n1, n2) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
        let places = [
            (Kind::Tcx, n1.as_str(), PORT_DEV),
            (Kind::Legacy, n1.as_str(), PORT_DEV),
            (Kind::Tcx, n2.as_str(), UPLINK_DEV),
            (Kind::Legacy, n2.as_str(), UPLINK_DEV),
        ];
        let mut probes = Vec::new();
        for (kind, ns, dev) in places {
            let probe = Probe::load(PacketMatch::icmp_to(b.ip), Verdict::Next)?;
            let attached = attach(&probe, kind, ns, dev, &pin_dir)?;
            probes.push((kind, ns, dev, probe, attached));
        }
        if mode == "established" {
            for (ns, dev) in [(n1.as_str(), PORT_DEV), (n2.as_str(), UPLINK_DEV)] {
                probe_after_hgw(ns, dev)?;
            }
        }
        std::thread::sleep(SETTLE);
        let before = lab.statuses()?;
        if mode == "established" {
            // The agent's status names what shares its hooks, and flags them.
            for (node, dev) in [(0, PORT_DEV), (1, UPLINK_DEV)] {
                if let Err(e) = hooks_shown(&before[node], dev) {
                    failures.push(format!("{mode}: n{}: {e:#}", node + 1));
                }
            }
        }
        let out = ping(&a.ns, b.ip, PINGS, &[])?;
        let after = lab.statuses()?;
        ensure!(
            out.status.success(),
            "{mode}: ping {} -> {} failed: {}",
            a.ip,
            b.ip,
            String::from_utf8_lossy(&out.stdout)
        );
        let passed = |node: usize| {
            counter(&after[node], "ipv4.pass_ct_proto")
                - counter(&before[node], "ipv4.pass_ct_proto")
        };
        eprintln!(
            "{mode}: {PINGS} pings; n1 pass_ct_proto +{}, n2 pass_ct_proto +{}",
            passed(0),
            passed(1)
        );
        for (kind, ns, dev, probe, attached) in probes {
            let seen = probe.count()?;
            eprintln!("{mode}: {kind:?} probe on {ns} {dev} ingress counted {seen} echo requests");
            if seen < u64::from(PINGS) {
                failures.push(format!(
                    "{mode}: the {kind:?} probe on {ns} {dev} ingress saw {seen} of the {PINGS} echo requests"
                ));
            }
            attached.remove()?;
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn a_dropping_filter_or_program_after_hgw_drops_a_carried_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let pin_dir = probe_pin_dir(&lab)?;
    let (n1, n2) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
        let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
        let port = flow.server_addr().port();
        // The flow on its way first: in `established`, on the fast path.
        let (got, fast) = batch(&lab, &mut flow)?;
        eprintln!("{mode}: before any dropper: {got}/{BATCH} arrived, n1 fwd_to_peer +{fast}");
        ensure!(
            got == BATCH,
            "{mode}: {got} of {BATCH} datagrams arrived before any dropper"
        );
        if mode == "established" {
            ensure!(
                fast >= BATCH as u64,
                "{mode}: n1 fwd_to_peer grew by {fast}: the flow was not on the fast path to begin with"
            );
        }
        for (kind, ns, dev) in [
            (Kind::Legacy, n1.as_str(), PORT_DEV),
            (Kind::Tcx, n1.as_str(), PORT_DEV),
            (Kind::Legacy, n2.as_str(), UPLINK_DEV),
            (Kind::Tcx, n2.as_str(), UPLINK_DEV),
        ] {
            let place = format!("{kind:?} dropper on {ns} {dev} ingress");
            let probe = Probe::load(PacketMatch::udp_to(b.ip, port), Verdict::Drop)?;
            let attached = attach(&probe, kind, ns, dev, &pin_dir)
                .with_context(|| format!("{mode}: adding the {place}"))?;
            if mode == "established" && kind == Kind::Tcx {
                probe_after_hgw(ns, dev)?;
            }
            std::thread::sleep(SETTLE);
            let (got, fast) = batch(&lab, &mut flow)?;
            let dropped = probe.count()?;
            eprintln!(
                "{mode}: {place}: {got}/{BATCH} arrived, it dropped {dropped}, n1 fwd_to_peer +{fast}"
            );
            if got > 0 || dropped < BATCH as u64 {
                failures.push(format!(
                    "{mode}: with a {place}, {got} of {BATCH} datagrams arrived and it dropped {dropped}"
                ));
            }
            attached.remove()?;
            std::thread::sleep(SETTLE);
            let (got, fast) = batch(&lab, &mut flow)?;
            eprintln!("{mode}: {place} removed: {got}/{BATCH} arrived, n1 fwd_to_peer +{fast}");
            ensure!(
                got == BATCH,
                "{mode}: {place} removed, yet only {got} of {BATCH} datagrams arrived"
            );
            if mode == "established" && fast < BATCH as u64 {
                failures.push(format!(
                    "{mode}: {place} removed, n1 fwd_to_peer grew by {fast} for {BATCH} datagrams: not back on the fast path"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The premise: on `dev`'s tcx ingress in `ns`, hgw's program runs and the probe comes
/// after it.
fn probe_after_hgw(ns: &str, dev: &str) -> anyhow::Result<()> {
    let prefix = format!("{dev} ingress ");
    let names: Vec<String> = tcx_programs(ns)?
        .iter()
        .filter_map(|p| p.strip_prefix(&prefix))
        .filter_map(|p| p.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let hgw = names.iter().position(|n| n.starts_with("hgw"));
    let probe = names.iter().position(|n| n == "lab_probe");
    ensure!(
        matches!((hgw, probe), (Some(h), Some(p)) if h < p),
        "{ns} {dev}: tcx ingress runs {names:?}, expected hgw's program and then the probe"
    );
    Ok(())
}

/// `status` lists, for `dev`, the tcx probe after hgw's program and the legacy filter,
/// and flags the interface's ingress.
fn hooks_shown(status: &Status, dev: &str) -> anyhow::Result<()> {
    let hook = status
        .hooks
        .iter()
        .find(|h| h.interface == dev)
        .with_context(|| format!("status shows no hooks of {dev}: {:?}", status.hooks))?;
    ensure!(
        hook.hgw
            && hook
                .tcx_ingress_after
                .iter()
                .any(|p| p.name.as_deref() == Some("lab_probe"))
            && hook
                .filters
                .iter()
                .any(|f| f.parent == "ingress" && f.kind == "bpf")
            && hook.flags.iter().any(|f| f == "ingress"),
        "status of {dev}'s hooks does not show hgw, the probe after it, the filter and the ingress flag: {hook:?}"
    );
    Ok(())
}

/// One batch of the flow: datagrams that arrived, and how much n1's `fwd_to_peer`
/// grew meanwhile (the flow is the only traffic n1's pod sends).
fn batch(lab: &Lab, flow: &mut UdpFlow) -> anyhow::Result<(usize, u64)> {
    let before: Vec<Status> = lab.statuses()?;
    let got = flow.send(BATCH)?;
    let after = lab.statuses()?;
    Ok((
        got,
        counter(&after[0], "ipv4.fwd_to_peer") - counter(&before[0], "ipv4.fwd_to_peer"),
    ))
}
