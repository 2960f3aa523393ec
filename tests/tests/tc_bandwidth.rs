//! The CNI `bandwidth` plugin's pod limits hold with hgw as with kernel routes alone
//! (issue 17, tests 1).
//!
//! Debian's /usr/lib/cni/bandwidth is called on n1's pod the way a container runtime
//! calls it for a pod with `kubernetes.io/ingress-bandwidth` and `egress-bandwidth` of
//! 8 Mbit/s (ADD with the bridge plugin's result as `prevResult` and
//! `runtimeConfig.bandwidth`), while the agents run. It shapes both directions on the
//! pod's host veth: what the pod sends through an `ingress` qdisc whose filter redirects
//! to an ifb with a `tbf`, what it receives through a `tbf` root qdisc. A redirect that
//! takes the packet past either (at the port's tcx ingress, before the legacy filters;
//! `bpf_redirect_peer` past the host veth's egress) lifts the limit.
//!
//! - An iperf3 TCP stream each way between n1's pod and n2's pod stays near the limit
//!   (between half and twice 8 Mbit/s), in `off` (kernel routes alone) and in
//!   `established` mode.
//! - The limits removed again (the plugin's DEL, then the qdiscs its DEL leaves on the
//!   veth, see [`PodBandwidth::del`]), the pod is back on the fast path: in
//!   `established` mode n1's `fwd_to_peer` and `fwd_to_pod_direct` grow by at least the
//!   datagrams of an answered UDP flow each way.
//!
//! Before issue 17's fix: `off` 7.7 / 7.7 Mbit/s, `established` far above the limit
//! (the issue measured 17 Gbit/s each way).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{
    Lab, PodBandwidth, Status, UdpFlow, count_sent_packets, counter, delete_qdisc, iperf3_rate,
    qdiscs, run_in_ok, sent_packets,
};

/// The limit each way, bits per second: kubelet's annotation `8M`.
const RATE: u64 = 8_000_000;
/// The bucket, bits: 32 KiB, a few full-size segments (kubelet passes a burst as large
/// as the CNI allows, which would let seconds of traffic through unshaped).
const BURST: u64 = 262_144;
/// Length of each iperf3 measurement after its omitted first second.
const SECONDS: u32 = 3;
const PORT: u16 = 5301;
/// Datagrams each way once the limits are gone.
const DATAGRAMS: usize = 200;
/// Time for the agent to see a qdisc change through its netlink events (it is asked to
/// act on the next packet after the event; nothing here measures how fast).
const SETTLE: Duration = Duration::from_millis(500);
/// The pod's host end on n1 (the lab names host veths `veth<j>`).
const HOST_VETH: &str = "veth1";

#[test]
fn bandwidth_plugin_limits_hold_with_hgw_as_with_kernel_routes() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (n1, a, b) = (
        lab.nodes[0].clone(),
        lab.nodes[0].pods[0].clone(),
        lab.nodes[1].pods[0].clone(),
    );
    // Exact counts of the UDP datagrams each pod sends the other, to hold the agents'
    // fast-path counters against.
    count_sent_packets(&a.ns, &["-p", "udp", "-d", &b.ip.to_string()])?;
    count_sent_packets(&b.ns, &["-p", "udp", "-d", &a.ip.to_string()])?;
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        for node in 0..2 {
            lab.start_agent(node, &["--fast-path", mode])?;
        }
        for agent in lab.agents() {
            agent.wait_ready(Duration::from_secs(15))?;
        }

        // A pod with limits, made while the agents run (as any new pod is).
        let mut limit = PodBandwidth::add(&n1.ns, &a.ns, HOST_VETH, a.ip, n1.gateway, RATE, BURST)?;
        std::thread::sleep(SETTLE);
        let kinds = qdisc_kinds(&n1.ns, HOST_VETH)?;
        ensure!(
            kinds.contains(&"tbf".to_owned()) && kinds.contains(&"ingress".to_owned()),
            "{mode}: the plugin left {kinds:?} on {HOST_VETH}, expected tbf and ingress"
        );
        let before = lab.statuses()?;
        let sends = iperf3_rate(&a.ns, &b.ns, b.ip, PORT, false, SECONDS)
            .with_context(|| format!("{mode}: iperf3 from the limited pod"))?;
        let receives = iperf3_rate(&a.ns, &b.ns, b.ip, PORT + 1, true, SECONDS)
            .with_context(|| format!("{mode}: iperf3 to the limited pod"))?;
        let after = lab.statuses()?;
        eprintln!(
            "{mode}: limited pod sends {:.2} Mbit/s, receives {:.2} Mbit/s (limit {} Mbit/s); n1 {}",
            sends / 1e6,
            receives / 1e6,
            RATE / 1_000_000,
            deltas(&before[0], &after[0]),
        );
        for (what, rate) in [("sends", sends), ("receives", receives)] {
            // Near the limit: a shaper that ran lets through about the rate, never 2x.
            #[expect(clippy::cast_precision_loss, reason = "8e6 is exact in an f64")]
            let limit = RATE as f64;
            if !(limit * 0.5..=limit * 2.0).contains(&rate) {
                failures.push(format!(
                    "{mode}: the limited pod {what} at {:.2} Mbit/s, not within 0.5x..2x of the {} Mbit/s limit",
                    rate / 1e6,
                    RATE / 1_000_000
                ));
            }
        }

        // The limits go. The plugin's DEL removes its ifb only (the tbf and the ingress
        // qdisc, whose filter now redirects to nothing, stay on the veth: a runtime's
        // DEL deletes the veth with them). The pod lives on here, so the test removes
        // what the veth's deletion would have.
        limit.del()?;
        let left = qdisc_kinds(&n1.ns, HOST_VETH)?;
        eprintln!("{mode}: after the plugin's DEL, {HOST_VETH} has qdiscs {left:?}");
        for (kind, parent) in [("tbf", "root"), ("ingress", "ingress")] {
            if left.iter().any(|k| k == kind) {
                delete_qdisc(&n1.ns, HOST_VETH, parent)?;
            }
        }
        std::thread::sleep(SETTLE);

        // Back on the fast path: an answered UDP flow each way.
        let mut out = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
        let mut back = UdpFlow::open(&b.ns, &a.ns, a.ip)?;
        let before = lab.statuses()?;
        let (sent_a0, sent_b0) = (sent_packets(&a.ns)?, sent_packets(&b.ns)?);
        let got_out = out.send(DATAGRAMS)?;
        let got_back = back.send(DATAGRAMS)?;
        let after = lab.statuses()?;
        let (sent_a, sent_b) = (
            sent_packets(&a.ns)? - sent_a0,
            sent_packets(&b.ns)? - sent_b0,
        );
        let delta = |name: &str| counter(&after[0], name) - counter(&before[0], name);
        eprintln!(
            "{mode}: limits gone: {got_out}/{DATAGRAMS} out, {got_back}/{DATAGRAMS} back; pod a sent {sent_a}, b {sent_b}; n1 {}",
            deltas(&before[0], &after[0])
        );
        ensure!(
            got_out == DATAGRAMS && got_back == DATAGRAMS,
            "{mode}: after the limits went, {got_out} and {got_back} of {DATAGRAMS} datagrams arrived"
        );
        if mode == "established" {
            for (what, got, sent) in [
                ("n1 fwd_to_peer", delta("ipv4.fwd_to_peer"), sent_a),
                (
                    "n1 fwd_to_pod_direct",
                    delta("ipv4.fwd_to_pod_direct"),
                    sent_b,
                ),
            ] {
                if got < sent {
                    failures.push(format!(
                        "{mode}: limits gone, {what} grew by {got}, fewer than the {sent} datagrams sent: not back on the fast path"
                    ));
                }
            }
        }
        // Nothing of the plugin is left on the veth for the next mode.
        ensure!(
            qdisc_kinds(&n1.ns, HOST_VETH)?
                .iter()
                .all(|k| k == "noqueue"),
            "{mode}: qdiscs left on {HOST_VETH}"
        );
    }
    let links = run_in_ok(&n1.ns, "ip", &["-o", "link", "show", "type", "ifb"])?;
    ensure!(
        links.stdout.is_empty(),
        "the plugin's ifb is still there: {}",
        String::from_utf8_lossy(&links.stdout)
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The kinds of the qdiscs on `dev` in `ns` (`noqueue`, `tbf`, `ingress`, ...).
fn qdisc_kinds(ns: &str, dev: &str) -> anyhow::Result<Vec<String>> {
    Ok(qdiscs(ns, dev)?
        .iter()
        .filter_map(|q| q["kind"].as_str().map(str::to_owned))
        .collect())
}

/// The fast-path counters and the reasons for the kernel that moved between two
/// statuses of one agent, `name +n` each.
fn deltas(before: &Status, after: &Status) -> String {
    let mut moved: Vec<String> = after
        .counters
        .get("ipv4")
        .into_iter()
        .flatten()
        .filter_map(|(name, &n)| {
            let d = n - before.counter("ipv4", name);
            (d > 0).then(|| format!("{name} +{d}"))
        })
        .collect();
    moved.sort();
    moved.join(", ")
}
