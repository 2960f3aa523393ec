//! An XDP program on the bridge keeps its effect with hgw as with kernel routes alone.
//! A bridge takes XDP only as generic XDP, which runs in `netif_receive_skb` on what
//! the bridge passes up from its ports: a pod's packets to the gateway, before they are
//! routed. hgw on the ports redirects them first, and carried them past it.
//!
//! A UDP flow from n1's pod to n2's pod, on the fast path in `established`; then an XDP
//! program dropping that flow attached to n1's cni0 (through a BPF link, which sends
//! no netlink event: the agent finds it within a second). With kernel routes alone
//! (`off`) none of the batch arrives; with hgw none either, `status` shows the program
//! on cni0, and the counters say where the batch went: handed to the kernel (hgw on the
//! ports, which flag cni0's ingress) or dropped before hgw on cni0 saw it. Detached,
//! the flow is back on the fast path.

use std::cell::RefCell;
use std::time::Duration;

use anyhow::ensure;
use hgw_tests::{
    Lab, OnTheWay, PacketMatch, Probe, ProbeLink, Status, Then, Verdict, carried_flow_meets,
    hooks_of,
};

const BATCH: usize = 50;
/// The agent reads the bridge's XDP every second.
const SETTLE: Duration = Duration::from_secs(5);

/// An XDP program on n1's cni0 dropping the flow; attached while it is on the way.
#[derive(Default)]
struct BridgeXdp {
    link: RefCell<Option<ProbeLink>>,
}

#[test]
fn an_xdp_program_on_the_bridge_holds_for_a_carried_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    carried_flow_meets(&mut lab, &[&BridgeXdp::default()], BATCH, SETTLE)
}

impl OnTheWay for BridgeXdp {
    fn what(&self) -> String {
        "generic XDP on n1's cni0 dropping the flow".to_owned()
    }

    fn node(&self) -> usize {
        0
    }

    fn set(&self, lab: &Lab, port: u16) -> anyhow::Result<bool> {
        let b = &lab.nodes[1].pods[0];
        let probe = Probe::load_xdp(PacketMatch::udp_to(b.ip, port), Verdict::Drop)?;
        let link = probe.attach_xdp_generic(&lab.nodes[0].ns, "cni0")?;
        *self.link.borrow_mut() = Some(link);
        Ok(true)
    }

    fn undo(&self, _lab: &Lab) -> anyhow::Result<()> {
        self.link.borrow_mut().take();
        Ok(())
    }

    /// cni0 shows the program; with hgw on the ports its ingress is flagged.
    fn shown(&self, status: &Status) -> anyhow::Result<Then> {
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
        status.hooks.iter().any(|h| h.interface == "cni0" && h.xdp)
    }
}
