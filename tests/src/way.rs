//! Where the batches of a carried flow went, for the tests that put something of the
//! kernel's on its way (a chain on a hook, a bridge port's state) and compare with
//! kernel routes alone: a UDP flow from n1's pod to n2's pod, the only traffic of the
//! two, and the counters of both nodes around each batch.

use std::time::{Duration, Instant};

use crate::{Lab, Status, UdpFlow, counter};

/// Where a batch went, as the counters tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Carried by both nodes' fast paths, straight into n2's pod.
    FastPath,
    /// The node's program handed it to the kernel: `pass_tc_hook`.
    HandedOn,
    /// n1 carried it, and n2's program delivered it through the bridge.
    ThroughTheBridge,
    /// Dropped on n1 before hgw's program saw it.
    DroppedBefore,
    /// Carried by both nodes' fast paths, some of it through n2's bridge while the
    /// bridge found the pod again (its neighbour entry for the pod failed meanwhile).
    Relearning,
}

/// How the counters of the two nodes grew over a batch.
#[derive(Debug)]
pub struct Grew {
    pub fwd_to_peer: u64,
    pub fwd_to_pod: u64,
    pub fwd_to_pod_direct: u64,
    /// `pass_tc_hook` of n1 and n2.
    pub pass_tc_hook: [u64; 2],
}

impl Grew {
    /// Whether a batch of `batch` datagrams went as `then` says, at node `node` (0:
    /// n1, 1: n2; n2's case means n1 carried it first).
    pub fn went(&self, batch: usize, node: usize, then: Then) -> bool {
        let batch = batch as u64;
        let peer_carried = node == 0 || self.fwd_to_peer >= batch;
        match then {
            Then::FastPath => self.fwd_to_peer >= batch && self.fwd_to_pod_direct >= batch,
            Then::HandedOn => peer_carried && self.pass_tc_hook[node] >= batch,
            Then::ThroughTheBridge => {
                self.fwd_to_peer >= batch && self.fwd_to_pod >= batch && self.fwd_to_pod_direct == 0
            }
            Then::DroppedBefore => self.fwd_to_peer == 0 && self.pass_tc_hook[0] == 0,
            Then::Relearning => self.fwd_to_peer >= batch && self.fwd_to_pod >= batch,
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

/// Sends `batch` datagrams on `flow`: how many arrived, and how the counters of n1 and
/// n2 grew meanwhile.
pub fn flow_batch(lab: &Lab, flow: &mut UdpFlow, batch: usize) -> anyhow::Result<(usize, Grew)> {
    let before: Vec<Status> = lab.statuses()?;
    let got = flow.send(batch)?;
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

/// Waits until the status of node `node` passes `check`, at most `longest` (the
/// agent's once-a-second reads: never measured); its last answer.
pub fn settle<T>(
    lab: &Lab,
    node: usize,
    longest: Duration,
    check: impl Fn(&Status) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + longest;
    loop {
        let result = check(&lab.statuses()?[node]);
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Something of the kernel's put on the way of a carried flow, then taken off again.
pub trait OnTheWay {
    /// What it is, for messages.
    fn what(&self) -> String;
    /// The node (0: n1, 1: n2) it is on, whose status shows it.
    fn node(&self) -> usize;
    /// Puts it on the way of the flow to UDP port `port`; `Ok(false)`: this kernel
    /// cannot (skipped, and said).
    fn set(&self, lab: &Lab, port: u16) -> anyhow::Result<bool>;
    fn undo(&self, lab: &Lab) -> anyhow::Result<()>;
    /// With hgw: `status` shows it as it should; where the batch must go then.
    fn shown(&self, status: &Status) -> anyhow::Result<Then>;
    /// Whether `status` still shows it.
    fn listed(&self, status: &Status) -> bool;
    /// Where the first batch goes once it is off the way again.
    fn back(&self) -> Then {
        Then::FastPath
    }
}

/// A UDP flow from n1's pod to n2's pod, with kernel routes alone (`off`) and with hgw
/// (`established`), meets each of `things` in turn: with it on the way, none of a
/// batch of `batch` datagrams may arrive, and with hgw `status` must show it within
/// `longest` and the counters say the batch went where [`OnTheWay::shown`] says;
/// off the way again, the whole batch arrives, with hgw on the fast path again.
pub fn carried_flow_meets(
    lab: &mut Lab,
    things: &[&dyn OnTheWay],
    batch: usize,
    longest: Duration,
) -> anyhow::Result<()> {
    use anyhow::ensure;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        let hgw = mode != "off";
        lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
        let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
        let port = flow.server_addr().port();
        let (got, grew) = flow_batch(lab, &mut flow, batch)?;
        eprintln!("{mode}: at first: {got}/{batch} arrived, {grew}");
        ensure!(
            got == batch,
            "{mode}: {got} of {batch} datagrams arrived at first"
        );
        ensure!(
            !hgw || grew.went(batch, 0, Then::FastPath),
            "{mode}: {grew}: the flow was not on the fast path to begin with"
        );
        for thing in things {
            let (what, node) = (thing.what(), thing.node());
            if !thing.set(lab, port)? {
                eprintln!("{mode}: {what}: skipped, this kernel cannot");
                continue;
            }
            let mut then = None;
            if hgw {
                match settle(lab, node, longest, |status| thing.shown(status)) {
                    Ok(expected) => then = Some(expected),
                    Err(e) => failures.push(format!("{mode}: {what}: {e:#}")),
                }
            }
            let (got, grew) = flow_batch(lab, &mut flow, batch)?;
            eprintln!("{mode}: {what}: {got}/{batch} arrived, {grew}");
            if got > 0 {
                failures.push(format!(
                    "{mode}: with {what}, {got} of {batch} datagrams arrived"
                ));
            }
            if let Some(then) = then
                && !grew.went(batch, node, then)
            {
                failures.push(format!(
                    "{mode}: with {what}, {grew}: the batch was not {then:?}"
                ));
            }
            thing.undo(lab)?;
            if hgw {
                settle(lab, node, longest, |status| {
                    ensure!(!thing.listed(status), "status still shows it");
                    Ok(())
                })
                .map_err(|e| e.context(format!("{mode}: {what} undone")))?;
            }
            let (got, grew) = flow_batch(lab, &mut flow, batch)?;
            eprintln!("{mode}: {what} undone: {got}/{batch} arrived, {grew}");
            ensure!(
                got == batch,
                "{mode}: {what} undone, yet only {got} of {batch} datagrams arrived"
            );
            if hgw && !grew.went(batch, 0, thing.back()) {
                failures.push(format!(
                    "{mode}: {what} undone, {grew}: not {:?}",
                    thing.back()
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// What `status` shows of `interface`'s hooks.
pub fn hooks_of<'a>(
    status: &'a Status,
    interface: &str,
) -> anyhow::Result<&'a hgw_common::status::HookStatus> {
    status
        .hooks
        .iter()
        .find(|h| h.interface == interface)
        .ok_or_else(|| anyhow::anyhow!("status shows no hooks of {interface}: {:?}", status.hooks))
}
