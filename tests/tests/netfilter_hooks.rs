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

use std::time::Duration;

use anyhow::ensure;
use hgw_tests::{Lab, OnTheWay, Status, Then, carried_flow_meets, hooks_of, nft_apply};

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
    let places: Vec<&dyn OnTheWay> = PLACES.iter().map(|p| p as &dyn OnTheWay).collect();
    carried_flow_meets(&mut lab, &places, BATCH, SETTLE)
}

impl OnTheWay for Place {
    fn what(&self) -> String {
        format!(
            "a {} chain on n{} {}",
            self.family,
            self.node + 1,
            self.hook
        )
    }

    fn node(&self) -> usize {
        self.node
    }

    fn set(&self, lab: &Lab, port: u16) -> anyhow::Result<bool> {
        nft_apply(
            &lab.nodes[self.node].ns,
            &format!(
                "table {family} {TABLE} {{\n chain c {{\n type filter {hook} priority 0;\n udp dport {port} counter drop\n }}\n}}\n",
                family = self.family,
                hook = self.hook,
            ),
        )?;
        Ok(true)
    }

    fn undo(&self, lab: &Lab) -> anyhow::Result<()> {
        nft_apply(
            &lab.nodes[self.node].ns,
            &format!("delete table {} {TABLE}", self.family),
        )
    }

    /// `status` lists the chain on the place's interface with the flag it calls for,
    /// and no other.
    fn shown(&self, status: &Status) -> anyhow::Result<Then> {
        let hook = hooks_of(status, self.interface)?;
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
        Ok(if wanted.is_some() {
            self.then
        } else {
            Then::DroppedBefore
        })
    }

    fn listed(&self, status: &Status) -> bool {
        let owner = self.owner();
        status.hooks.iter().any(|h| {
            h.interface == self.interface && h.netfilter.iter().any(|n| n.ends_with(&owner))
        })
    }
}

impl Place {
    fn owner(&self) -> String {
        format!("chain {} {TABLE} c", self.family)
    }
}
