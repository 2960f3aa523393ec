//! An XDP program on the way of a carried flow keeps its effect with hgw as with kernel
//! routes alone, where hgw's redirects could pass it by:
//! - on the bridge: a bridge takes XDP only as generic XDP, which runs in
//!   `netif_receive_skb` on what the bridge passes up from its ports (a pod's packets
//!   to the gateway, before they are routed); hgw on the ports redirects them first;
//! - in the receiving pod, native on its end of the veth: it runs when the port
//!   transmits to the pod (`veth_xmit`); delivery straight into the pod
//!   (`bpf_redirect_peer`) enters past it.
//!
//! A UDP flow from n1's pod to n2's pod, on the fast path in `established`; then, one
//! at a time, an XDP program dropping that flow attached through a BPF link (which
//! sends no netlink event, and in the pod none that reaches the node: the agent
//! looks every second). With kernel routes alone (`off`) none of the batch arrives;
//! with hgw none either, `status` shows the program, and the counters say where the
//! batch went: handed to the kernel (the bridge's, with hgw on the ports), dropped
//! before hgw on cni0 saw it, or delivered through n2's bridge (the pod's). Detached,
//! the flow is back on the fast path.

use std::cell::RefCell;
use std::time::Duration;

use anyhow::ensure;
use hgw_tests::{
    Lab, OnTheWay, PacketMatch, Probe, ProbeLink, Status, Then, Verdict, carried_flow_meets,
    hooks_of,
};

const BATCH: usize = 50;
/// The agent reads the bridge's XDP and the pods' ends every second.
const SETTLE: Duration = Duration::from_secs(5);

/// An XDP program dropping the flow; attached while it is on the way.
struct Xdp {
    /// On n1's cni0 (generic), or on n2's pod's eth0 (native).
    in_pod: bool,
    link: RefCell<Option<ProbeLink>>,
}

#[test]
fn xdp_programs_on_the_way_hold_for_a_carried_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let things = [false, true].map(|in_pod| Xdp {
        in_pod,
        link: RefCell::new(None),
    });
    let things: Vec<&dyn OnTheWay> = things.iter().map(|t| t as &dyn OnTheWay).collect();
    carried_flow_meets(&mut lab, &things, BATCH, SETTLE)
}

impl OnTheWay for Xdp {
    fn what(&self) -> String {
        if self.in_pod {
            "native XDP in n2's pod dropping the flow".to_owned()
        } else {
            "generic XDP on n1's cni0 dropping the flow".to_owned()
        }
    }

    fn node(&self) -> usize {
        usize::from(self.in_pod)
    }

    fn set(&self, lab: &Lab, port: u16) -> anyhow::Result<bool> {
        let b = &lab.nodes[1].pods[0];
        let probe = Probe::load_xdp(PacketMatch::udp_to(b.ip, port), Verdict::Drop)?;
        let link = if self.in_pod {
            probe.attach_xdp(&b.ns, "eth0", true)?
        } else {
            probe.attach_xdp(&lab.nodes[0].ns, "cni0", false)?
        };
        *self.link.borrow_mut() = Some(link);
        Ok(true)
    }

    fn undo(&self, _lab: &Lab) -> anyhow::Result<()> {
        self.link.borrow_mut().take();
        Ok(())
    }

    /// The bridge's: cni0 shows it, and with hgw on the ports its ingress is flagged.
    /// The pod's: its port shows it, flagged for delivery through the bridge.
    fn shown(&self, status: &Status) -> anyhow::Result<Then> {
        if self.in_pod {
            let hook = hooks_of(status, "veth1")?;
            ensure!(
                self.listed(status) && hook.flags == ["egress"],
                "status of veth1 does not show the pod's XDP with the egress flag: {hook:?}"
            );
            return Ok(Then::ThroughTheBridge);
        }
        let hook = hooks_of(status, "cni0")?;
        let (flags, then): (&[&str], Then) = if hook.hgw {
            (&[], Then::DroppedBefore)
        } else {
            (&["ingress"], Then::HandedOn)
        };
        ensure!(
            hook.xdp && hook.flags == flags,
            "status of cni0 does not show the XDP program with the flags {flags:?}: {hook:?}"
        );
        Ok(then)
    }

    fn listed(&self, status: &Status) -> bool {
        status.hooks.iter().any(|h| {
            if self.in_pod {
                h.interface == "veth1" && h.bridge.iter().any(|d| d == "xdp in the pod")
            } else {
                h.interface == "cni0" && h.xdp
            }
        })
    }
}
