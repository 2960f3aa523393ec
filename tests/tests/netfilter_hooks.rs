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
//! chain on the interface with the flag the fast path follows, and the counters say
//! where the batch went: handed to the kernel (`pass_tc_hook`), delivered through the
//! bridge (`fwd_to_pod` without `fwd_to_pod_direct`), or dropped before hgw saw it (a
//! chain that runs before hgw's program, with hgw on the bridge). Removed, the flow
//! arrives again, in `established` on the fast path again. Kernels with tcx put hgw
//! on the ports, 6.1 on the bridge: the kernel matrix runs both.
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
    /// The interface `status` shows it on.
    interface: &'static str,
    flag: Flag,
    /// Where the batch goes in `established` where the flag is set.
    then: Then,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// The node's program hands it to the kernel: `pass_tc_hook`.
    HandedOn,
    /// n2's program delivers it through the bridge.
    ThroughTheBridge,
    /// The chain dropped it before hgw's program saw it (no flag needed).
    DroppedBefore,
}

const PLACES: &[Place] = &[
    place(
        0,
        "netdev",
        "hook ingress device \"veth1\"",
        "veth1",
        Flag::IngressWithHgwHere,
        Then::HandedOn,
    ),
    place(
        0,
        "netdev",
        "hook ingress device \"cni0\"",
        "cni0",
        Flag::Always("ingress"),
        Then::HandedOn,
    ),
    place(
        0,
        "bridge",
        "hook prerouting",
        "cni0",
        Flag::IngressWithHgwElsewhere,
        Then::HandedOn,
    ),
    place(
        0,
        "netdev",
        "hook egress device \"eth0\"",
        "eth0",
        Flag::Always("netfilter-egress"),
        Then::HandedOn,
    ),
    place(
        1,
        "netdev",
        "hook ingress device \"eth0\"",
        "eth0",
        Flag::Always("ingress"),
        Then::HandedOn,
    ),
    place(
        1,
        "inet",
        "hook ingress device \"eth0\"",
        "eth0",
        Flag::Always("ingress"),
        Then::HandedOn,
    ),
    place(
        1,
        "netdev",
        "hook egress device \"cni0\"",
        "cni0",
        Flag::Always("netfilter-egress"),
        Then::HandedOn,
    ),
    place(
        1,
        "bridge",
        "hook output",
        "cni0",
        Flag::Always("egress"),
        Then::ThroughTheBridge,
    ),
    place(
        1,
        "netdev",
        "hook egress device \"veth1\"",
        "veth1",
        Flag::Always("netfilter-egress"),
        Then::ThroughTheBridge,
    ),
];

const fn place(
    node: usize,
    family: &'static str,
    hook: &'static str,
    interface: &'static str,
    flag: Flag,
    then: Then,
) -> Place {
    Place {
        node,
        family,
        hook,
        interface,
        flag,
        then,
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
        let (got, grew) = batch(&lab, &mut flow)?;
        eprintln!("{mode}: before any chain: {got}/{BATCH} arrived, {grew}");
        ensure!(
            got == BATCH,
            "{mode}: {got} of {BATCH} datagrams arrived before any chain"
        );
        if mode == "established" {
            ensure!(
                grew.on_the_fast_path(),
                "{mode}: {grew}: the flow was not on the fast path to begin with"
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
            let mut then = Then::DroppedBefore;
            if mode == "established" {
                match settle(&lab, place.node, |status| place.shown(status)) {
                    Ok(flagged) => then = if flagged { place.then } else { then },
                    Err(e) => failures.push(format!("{mode}: {what}: {e:#}")),
                }
            }
            let (got, grew) = batch(&lab, &mut flow)?;
            eprintln!("{mode}: {what}: {got}/{BATCH} arrived, {grew}");
            if got > 0 {
                failures.push(format!(
                    "{mode}: with {what}, {got} of {BATCH} datagrams arrived"
                ));
            }
            if mode == "established" && !grew.went(place.node, then) {
                failures.push(format!(
                    "{mode}: with {what}, {grew}: the batch was not {then:?}"
                ));
            }
            nft_apply(&ns, &format!("delete table {} {TABLE}", place.family))?;
            if mode == "established" {
                settle(&lab, place.node, |status| {
                    ensure!(!place.listed(status), "status still shows the chain");
                    Ok(())
                })?;
            }
            let (got, grew) = batch(&lab, &mut flow)?;
            eprintln!("{mode}: {what} deleted: {got}/{BATCH} arrived, {grew}");
            ensure!(
                got == BATCH,
                "{mode}: {what} deleted, yet only {got} of {BATCH} datagrams arrived"
            );
            if mode == "established" && !grew.on_the_fast_path() {
                failures.push(format!(
                    "{mode}: {what} deleted, {grew} for {BATCH} datagrams: not back on the fast path"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

impl Place {
    fn owner(&self) -> String {
        format!("chain {} {TABLE} c", self.family)
    }

    /// Whether `status` lists the chain on the place's interface.
    fn listed(&self, status: &Status) -> bool {
        let owner = self.owner();
        status.hooks.iter().any(|h| {
            h.interface == self.interface && h.netfilter.iter().any(|n| n.ends_with(&owner))
        })
    }

    /// `status` lists the chain on the place's interface with the flag it calls for,
    /// and no other; whether there is one.
    fn shown(&self, status: &Status) -> anyhow::Result<bool> {
        let Some(hook) = status.hooks.iter().find(|h| h.interface == self.interface) else {
            anyhow::bail!(
                "status shows no hooks of {}: {:?}",
                self.interface,
                status.hooks
            );
        };
        let wanted = match self.flag {
            Flag::Always(flag) => Some(flag),
            Flag::IngressWithHgwHere => hook.hgw.then_some("ingress"),
            Flag::IngressWithHgwElsewhere => (!hook.hgw).then_some("ingress"),
        };
        ensure!(
            self.listed(status) && hook.flags == Vec::from_iter(wanted.map(str::to_owned)),
            "status of {}'s hooks does not show {} with the flags {wanted:?} alone: {hook:?}",
            self.interface,
            self.owner()
        );
        Ok(wanted.is_some())
    }
}

/// Waits until the status of node `node` passes `check`, at most [`SETTLE`]; its
/// last answer.
fn settle<T>(
    lab: &Lab,
    node: usize,
    check: impl Fn(&Status) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let result = check(&lab.statuses()?[node]);
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How the counters of the two nodes grew over a batch (the flow is the only traffic
/// of the two pods).
struct Grew {
    fwd_to_peer: u64,
    fwd_to_pod: u64,
    fwd_to_pod_direct: u64,
    /// `pass_tc_hook` of n1 and n2.
    pass_tc_hook: [u64; 2],
}

impl Grew {
    fn on_the_fast_path(&self) -> bool {
        let batch = BATCH as u64;
        self.fwd_to_peer >= batch && self.fwd_to_pod_direct >= batch
    }

    /// Whether the batch went as `then` says at node `node`.
    fn went(&self, node: usize, then: Then) -> bool {
        let batch = BATCH as u64;
        let peer_carried = node == 0 || self.fwd_to_peer >= batch;
        peer_carried
            && match then {
                Then::HandedOn => self.pass_tc_hook[node] >= batch,
                Then::ThroughTheBridge => self.fwd_to_pod >= batch && self.fwd_to_pod_direct == 0,
                Then::DroppedBefore => self.fwd_to_peer == 0 && self.pass_tc_hook[node] == 0,
            }
    }
}

impl std::fmt::Display for Grew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n1 fwd_to_peer +{}, pass_tc_hook +{}; n2 fwd_to_pod +{} (direct +{}), pass_tc_hook +{}",
            self.fwd_to_peer,
            self.pass_tc_hook[0],
            self.fwd_to_pod,
            self.fwd_to_pod_direct,
            self.pass_tc_hook[1]
        )
    }
}

/// One batch of the flow: datagrams that arrived, and how the counters grew.
fn batch(lab: &Lab, flow: &mut UdpFlow) -> anyhow::Result<(usize, Grew)> {
    let before: Vec<Status> = lab.statuses()?;
    let got = flow.send(BATCH)?;
    let after = lab.statuses()?;
    let grew = |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
    Ok((
        got,
        Grew {
            fwd_to_peer: grew(0, "ipv4.fwd_to_peer"),
            fwd_to_pod: grew(1, "ipv4.fwd_to_pod"),
            fwd_to_pod_direct: grew(1, "ipv4.fwd_to_pod_direct"),
            pass_tc_hook: [grew(0, "ipv4.pass_tc_hook"), grew(1, "ipv4.pass_tc_hook")],
        },
    ))
}
