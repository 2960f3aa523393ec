//! What a redirect would skip: the agent marks the devices that carry a tc filter,
//! another program or a qdisc of the kernel's own in `HGW_DEVICES`. Something on the
//! ingress after hgw (`DEVICE_INGRESS`) hands the packet on (`pass_tc_hook`); a qdisc or
//! filter on the egress of a pod's host veth or of the bridge (`DEVICE_EGRESS`) makes
//! delivery go through the bridge (`bpf_redirect_neigh`), whose egress and the port's
//! run as on the kernel path, instead of straight into the pod. A netfilter egress hook
//! (`DEVICE_NF_EGRESS`), which any redirect from tc ingress skips, hands on what would
//! be sent into the uplink or the bridge, and sends a pod's packets through the bridge
//! when it is on the pod's veth.

use hgw_common::{DEVICE_EGRESS, DEVICE_INGRESS, DEVICE_NF_EGRESS};

use super::*;

/// The packets each program forwards as n1 stands, per family: hgw_to_peer to n2's
/// pod, hgw_to_pod to the pod with an endpoint entry (delivered straight into it).
fn forwarded_packets() -> Vec<(&'static str, &'static str, Vec<u8>, Vec<Slot>)> {
    use Counter::*;
    vec![
        (
            "to a peer",
            PROG_TO_PEER,
            to_peer([10, 244, 2, 11], 64),
            vec![Slot::V4(FwdToPeer)],
        ),
        (
            "IPv6, to a peer",
            PROG_TO_PEER,
            to_peer6("fd00:244:2::11", 64),
            vec![Slot::V6(FwdToPeer)],
        ),
        (
            "to a pod",
            PROG_TO_POD,
            to_pod([10, 244, 1, 12], 64),
            vec![Slot::V4(FwdToPod), Slot::V4(FwdToPodDirect)],
        ),
        (
            "IPv6, to a pod",
            PROG_TO_POD,
            to_pod6("fd00:244:1::12", 64),
            vec![Slot::V6(FwdToPod), Slot::V6(FwdToPodDirect)],
        ),
    ]
}

fn tc_hook(forwarded: &[Slot]) -> Slot {
    match forwarded[0] {
        Slot::V6(_) => Slot::V6(Counter::PassTcHook),
        _ => Slot::V4(Counter::PassTcHook),
    }
}

/// `DEVICE_INGRESS` on the device a program runs on (the bridge for hgw_to_peer, the
/// uplink for hgw_to_pod) hands its packets on: what runs after hgw there must see them.
/// On any other device, and `DEVICE_EGRESS` anywhere on the way out of the uplink, it
/// changes nothing; removing the mark brings the packets back to the fast path.
#[test]
fn a_hook_on_the_ingress_device_hands_the_packet_on() {
    let mut p = load();
    for (what, program, frame, forwarded) in forwarded_packets() {
        let (ingress, other) = if program == PROG_TO_PEER {
            (BRIDGE_IFINDEX, UPLINK_IFINDEX)
        } else {
            (UPLINK_IFINDEX, BRIDGE_IFINDEX)
        };
        p.expect_redirect(program, &frame, &forwarded, &format!("{what}: unmarked"));
        p.set_device(ingress, DEVICE_INGRESS);
        p.expect_pass(
            program,
            &frame,
            tc_hook(&forwarded),
            &format!("{what}: ingress marked"),
        );
        p.set_device(ingress, 0);
        p.set_device(other, DEVICE_INGRESS);
        if program == PROG_TO_PEER {
            // The uplink's egress is not skipped: the redirect goes out through it.
            p.set_device(UPLINK_IFINDEX, DEVICE_INGRESS | DEVICE_EGRESS);
        }
        p.expect_redirect(
            program,
            &frame,
            &forwarded,
            &format!("{what}: another device marked"),
        );
        p.set_device(other, 0);
        p.expect_redirect(
            program,
            &frame,
            &forwarded,
            &format!("{what}: unmarked again"),
        );
    }
}

/// hgw_to_peer on a bridge port (the skb's device a pod's host veth, set through the
/// test run's `__sk_buff` context): a mark on that port's ingress hands the packet on,
/// and so does one on the bridge's, which the kernel path runs next and a redirect from
/// the port would skip; a mark on another port changes nothing.
#[test]
fn from_a_port_a_hook_on_the_port_or_the_bridge_hands_the_packet_on() {
    let mut p = load();
    p.to_peer_ingress = POD_IFINDEX;
    for (what, program, frame, forwarded) in forwarded_packets() {
        if program != PROG_TO_PEER {
            continue;
        }
        p.expect_redirect(program, &frame, &forwarded, &format!("{what}: unmarked"));
        for (device, name) in [(POD_IFINDEX, "the port"), (BRIDGE_IFINDEX, "the bridge")] {
            p.set_device(device, DEVICE_INGRESS);
            p.expect_pass(
                program,
                &frame,
                tc_hook(&forwarded),
                &format!("{what}: {name}'s ingress marked"),
            );
            p.set_device(device, 0);
        }
        p.set_device(OTHER_PORT_IFINDEX, DEVICE_INGRESS);
        p.expect_redirect(
            program,
            &frame,
            &forwarded,
            &format!("{what}: another port marked"),
        );
        p.set_device(OTHER_PORT_IFINDEX, 0);
    }
}

/// `DEVICE_EGRESS` on the pod's host veth or on the bridge (a pod's bandwidth limit, a
/// filter): hgw_to_pod still forwards, but through the bridge (`fwd_to_pod` without
/// `fwd_to_pod_direct`), leaving the MACs to the bridge's neighbour entry, so that the
/// qdisc and filters run. A mark on another pod's veth, or on the pod veth's ingress,
/// leaves delivery straight into the pod.
#[test]
fn an_egress_qdisc_on_the_pods_veth_or_the_bridge_keeps_delivery_on_the_bridge() {
    use Counter::*;
    let mut p = load();
    for v6 in [false, true] {
        let (input, via_bridge, direct) = if v6 {
            (
                to_pod6("fd00:244:1::12", 64),
                vec![Slot::V6(FwdToPod)],
                vec![Slot::V6(FwdToPod), Slot::V6(FwdToPodDirect)],
            )
        } else {
            (
                to_pod([10, 244, 1, 12], 64),
                vec![Slot::V4(FwdToPod)],
                vec![Slot::V4(FwdToPod), Slot::V4(FwdToPodDirect)],
            )
        };
        let family = if v6 { "IPv6" } else { "IPv4" };
        for (device, name) in [
            (POD_IFINDEX, "the pod's veth"),
            (BRIDGE_IFINDEX, "the bridge"),
        ] {
            let what = format!("{family}, {name}'s egress marked");
            p.set_device(device, DEVICE_EGRESS);
            let out = p.expect_redirect(PROG_TO_POD, &input, &via_bridge, &what);
            assert_eq!(
                out[0..12],
                input[0..12],
                "{what}: the MACs are the bridge's neighbour entry's to set"
            );
            p.set_device(device, 0);
        }
        for (device, flags, name) in [
            (
                OTHER_PORT_IFINDEX,
                DEVICE_EGRESS,
                "another pod's veth's egress",
            ),
            (POD_IFINDEX, DEVICE_INGRESS, "the pod's veth's ingress"),
        ] {
            let what = format!("{family}, {name} marked");
            p.set_device(device, flags);
            let out = p.expect_redirect(PROG_TO_POD, &input, &direct, &what);
            assert_eq!(out[0..6], POD_MAC, "{what}: straight into the pod");
            p.set_device(device, 0);
        }
    }
}

/// `DEVICE_NF_EGRESS` on the device a program would send the packet into (the uplink
/// for hgw_to_peer, the bridge for hgw_to_pod) hands the packet on; on the pod's veth,
/// hgw_to_pod delivers through the bridge (whose egress leaves the packet to the veth's
/// hook); on a device off the packet's way it changes nothing.
#[test]
fn a_netfilter_egress_hook_on_the_way_out_hands_the_packet_on() {
    let mut p = load();
    for (what, program, frame, forwarded) in forwarded_packets() {
        let (into, off_the_way) = if program == PROG_TO_PEER {
            (UPLINK_IFINDEX, [BRIDGE_IFINDEX, POD_IFINDEX])
        } else {
            (BRIDGE_IFINDEX, [UPLINK_IFINDEX, OTHER_PORT_IFINDEX])
        };
        p.set_device(into, DEVICE_NF_EGRESS);
        p.expect_pass(
            program,
            &frame,
            tc_hook(&forwarded),
            &format!("{what}: the egress it is sent into marked"),
        );
        p.set_device(into, 0);
        for device in off_the_way {
            p.set_device(device, DEVICE_NF_EGRESS);
            p.expect_redirect(
                program,
                &frame,
                &forwarded,
                &format!("{what}: device {device} off the way marked"),
            );
            p.set_device(device, 0);
        }
        if program == PROG_TO_POD {
            p.set_device(POD_IFINDEX, DEVICE_NF_EGRESS);
            let out = p.expect_redirect(
                program,
                &frame,
                &forwarded[..1],
                &format!("{what}: the pod's veth marked"),
            );
            assert_eq!(out[0..12], frame[0..12], "{what}: through the bridge");
            p.set_device(POD_IFINDEX, 0);
        }
        p.expect_redirect(
            program,
            &frame,
            &forwarded,
            &format!("{what}: unmarked again"),
        );
    }
}
