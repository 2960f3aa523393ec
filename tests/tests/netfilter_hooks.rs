//! nftables chains on the interfaces' own hooks keep their effect with hgw as with
//! kernel routes alone: a chain of the `netdev` family on an interface's `ingress` runs
//! after tc ingress, where hgw redirects; one on `egress` is skipped by any redirect
//! from tc ingress into the interface (the kernel marks the packet `nf_skip_egress`);
//! an `inet` chain on `ingress` is the netdev ingress hook too; and a `bridge` family
//! chain runs on the frames a bridge takes in from a port and sends out to one.
//!
//! A UDP flow from n1's pod to n2's pod, on the fast path in `established`; then, one
//! at a time, a chain dropping the flow's datagrams on each hook of the way: n1's port
//! (`veth1`, ingress), bridge (`cni0`, ingress and the bridge family's prerouting) and
//! uplink (`eth0`, egress), n2's uplink (ingress, netdev and inet), bridge (egress and
//! the bridge family's output) and pod port (`veth1`, egress). With kernel routes alone
//! (`off`) none of the batch arrives; with hgw none either, and `status` shows the
//! chain on the interface with the flag the fast path follows. Removed, the flow
//! arrives again, in `established` on the fast path again.
//!
//! Before the agent read nftables' hooks, `established` carried every datagram past
//! every chain with hgw on the ports (50 of 50 each), and would past all but n1's
//! port's and its bridge's prerouting with hgw on the bridge.

use std::time::{Duration, Instant};

use anyhow::ensure;
use hgw_tests::{Lab, Status, UdpFlow, counter, nft_apply};

/// Datagrams per batch of the UDP flow.
const BATCH: usize = 50;
/// Longest wait for the agent to show a chain come or go (it asks for the ruleset's
/// generation every second): never measured here.
const SETTLE: Duration = Duration::from_secs(5);
const TABLE: &str = "hgw_test_hooks";

/// A dropping chain on one hook of the way.
struct Place {
    /// Node index (0: the sender's, 1: the receiver's).
    node: usize,
    family: &'static str,
    /// The chain's hook and device as nft writes them.
    hook: &'static str,
    /// The interface `status` shows it on, and the flag it gets there.
    shown: (&'static str, Flag),
}

/// The flag a chain's interface must get.
#[derive(Clone, Copy, Debug)]
enum Flag {
    Always(&'static str),
    /// `ingress`, where hgw's program runs on the interface (a port's, which runs
    /// before hgw's on the bridge otherwise).
    IngressWithHgwHere,
    /// `ingress`, where hgw's program does not (the bridge's prerouting, which runs
    /// before hgw's on the bridge but is skipped by a redirect from a port).
    IngressWithHgwElsewhere,
}

const PLACES: &[Place] = &[
    place(
        0,
        "netdev",
        "hook ingress device \"veth1\"",
        "veth1",
        Flag::IngressWithHgwHere,
    ),
    place(
        0,
        "netdev",
        "hook ingress device \"cni0\"",
        "cni0",
        Flag::Always("ingress"),
    ),
    place(
        0,
        "bridge",
        "hook prerouting",
        "cni0",
        Flag::IngressWithHgwElsewhere,
    ),
    place(
        0,
        "netdev",
        "hook egress device \"eth0\"",
        "eth0",
        Flag::Always("netfilter-egress"),
    ),
    place(
        1,
        "netdev",
        "hook ingress device \"eth0\"",
        "eth0",
        Flag::Always("ingress"),
    ),
    place(
        1,
        "inet",
        "hook ingress device \"eth0\"",
        "eth0",
        Flag::Always("ingress"),
    ),
    place(
        1,
        "netdev",
        "hook egress device \"cni0\"",
        "cni0",
        Flag::Always("netfilter-egress"),
    ),
    place(1, "bridge", "hook output", "cni0", Flag::Always("egress")),
    place(
        1,
        "netdev",
        "hook egress device \"veth1\"",
        "veth1",
        Flag::Always("netfilter-egress"),
    ),
];

const fn place(
    node: usize,
    family: &'static str,
    hook: &'static str,
    interface: &'static str,
    flag: Flag,
) -> Place {
    Place {
        node,
        family,
        hook,
        shown: (interface, flag),
    }
}

#[test]
fn nftables_chains_on_the_interfaces_hooks_drop_a_carried_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
        let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
        let port = flow.server_addr().port();
        let (got, fast) = batch(&lab, &mut flow)?;
        eprintln!("{mode}: before any chain: {got}/{BATCH} arrived, fast path +{fast:?}");
        ensure!(
            got == BATCH,
            "{mode}: {got} of {BATCH} datagrams arrived before any chain"
        );
        if mode == "established" {
            ensure!(
                fast.iter().all(|f| *f >= BATCH as u64),
                "{mode}: n1 fwd_to_peer and n2 fwd_to_pod grew by {fast:?}: the flow was not on the fast path to begin with"
            );
        }
        for place in PLACES {
            let ns = lab.nodes[place.node].ns.clone();
            let what = format!(
                "a {} chain on n{} {}",
                place.family,
                place.node + 1,
                place.hook
            );
            nft_apply(
                &ns,
                &format!(
                    "table {family} {TABLE} {{\n chain c {{\n type filter {hook} priority 0;\n udp dport {port} counter drop\n }}\n}}\n",
                    family = place.family,
                    hook = place.hook,
                ),
            )?;
            if mode == "established"
                && let Err(e) = settle(&lab, place, |status| chain_shown(status, place))
            {
                failures.push(format!("{mode}: {what}: {e:#}"));
            }
            let (got, fast) = batch(&lab, &mut flow)?;
            eprintln!("{mode}: {what}: {got}/{BATCH} arrived, fast path +{fast:?}");
            if got > 0 {
                failures.push(format!(
                    "{mode}: with {what}, {got} of {BATCH} datagrams arrived"
                ));
            }
            nft_apply(&ns, &format!("delete table {} {TABLE}", place.family))?;
            if mode == "established" {
                settle(&lab, place, |status| match chain_shown(status, place) {
                    Ok(()) => anyhow::bail!("status still shows the chain"),
                    Err(_) => Ok(()),
                })?;
            }
            let (got, fast) = batch(&lab, &mut flow)?;
            eprintln!("{mode}: {what} deleted: {got}/{BATCH} arrived, fast path +{fast:?}");
            ensure!(
                got == BATCH,
                "{mode}: {what} deleted, yet only {got} of {BATCH} datagrams arrived"
            );
            if mode == "established" && fast.iter().any(|f| *f < BATCH as u64) {
                failures.push(format!(
                    "{mode}: {what} deleted, n1 fwd_to_peer and n2 fwd_to_pod grew by {fast:?} for {BATCH} datagrams: not back on the fast path"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Waits until the status of the place's node passes `check`, at most [`SETTLE`];
/// the last failure if it never does.
fn settle(
    lab: &Lab,
    place: &Place,
    check: impl Fn(&Status) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let result = check(&lab.statuses()?[place.node]);
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `status` lists the chain on the place's interface, with the flag it calls for.
fn chain_shown(status: &Status, place: &Place) -> anyhow::Result<()> {
    let (interface, flag) = place.shown;
    let owner = format!("chain {} {TABLE} c", place.family);
    let Some(hook) = status.hooks.iter().find(|h| h.interface == interface) else {
        anyhow::bail!("status shows no hooks of {interface}: {:?}", status.hooks);
    };
    let wanted = match flag {
        Flag::Always(flag) => Some(flag),
        Flag::IngressWithHgwHere => hook.hgw.then_some("ingress"),
        Flag::IngressWithHgwElsewhere => (!hook.hgw).then_some("ingress"),
    };
    ensure!(
        hook.netfilter.iter().any(|h| h.ends_with(&owner))
            && wanted.is_none_or(|wanted| hook.flags.iter().any(|f| f == wanted)),
        "status of {interface}'s hooks does not show {owner} with the flag {wanted:?}: {hook:?}"
    );
    Ok(())
}

/// One batch of the flow: datagrams that arrived, and how much n1's `fwd_to_peer` and
/// n2's `fwd_to_pod` grew meanwhile (the flow is the only traffic of the two pods).
fn batch(lab: &Lab, flow: &mut UdpFlow) -> anyhow::Result<(usize, [u64; 2])> {
    let before: Vec<Status> = lab.statuses()?;
    let got = flow.send(BATCH)?;
    let after = lab.statuses()?;
    let grew = |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
    Ok((
        got,
        [grew(0, "ipv4.fwd_to_peer"), grew(1, "ipv4.fwd_to_pod")],
    ))
}
