//! A frame from a pod whose source MAC is not a unicast address (all zeros,
//! multicast, broadcast) is dropped by the bridge (`br_handle_frame`,
//! `is_valid_ether_addr`) before it is routed. hgw on the ports sees the frame first,
//! and before it checked only the destination MAC: it carried such frames to the peer.
//!
//! Pod n1p1 writes IPv4/UDP frames to pod n2p1 on a packet socket, to n1's cni0 MAC,
//! from its own MAC (the control) and from each bad one. `all` mode (no conntrack
//! lookup, which would hide the difference: the kernel never saw such a flow): the
//! control arrives over the fast path (`fwd_to_peer` on n1); the others do not arrive,
//! and n1 counts them as `pass_source_mac` with hgw on the port, or never sees them with
//! hgw on the bridge (which dropped them). With kernel routes alone (`off`) the
//! answers are the same: the control all, the others nothing.

use std::time::Duration;

use anyhow::ensure;
use hgw_tests::{Lab, RawFrames, counter, hooks_of, link_mac, settle};

/// Frames per case.
const FRAMES: u64 = 50;
const PORT: u16 = 5502;

const CASES: &[(&str, Option<[u8; 6]>)] = &[
    ("the pod's own source MAC", None),
    ("an all-zero source MAC", Some([0; 6])),
    ("a multicast source MAC", Some([0x01, 0, 0x5e, 0, 0, 1])),
    ("the broadcast source MAC", Some([0xff; 6])),
];

#[test]
fn frames_from_a_source_mac_the_bridge_refuses_are_not_carried() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let cni0_mac = link_mac(&lab.nodes[0].ns, "cni0")?.0;
    let mut failures = Vec::new();
    for mode in ["all", "off"] {
        lab.start_agents(&["--fast-path", mode], Duration::from_secs(15))?;
        let on_port = mode != "off" && hgw_on_the_ports(&lab)?;
        for &(what, src_mac) in CASES {
            let before = lab.statuses()?;
            let frames = RawFrames {
                dst_mac: cni0_mac,
                src_mac,
                vlan: None,
            };
            let arrived = frames.send_and_count(&a, &b, PORT, FRAMES)?;
            let after = lab.statuses()?;
            let grew = |name: &str| counter(&after[0], name) - counter(&before[0], name);
            let (fwd, bad_mac) = (grew("ipv4.fwd_to_peer"), grew("ipv4.pass_source_mac"));
            eprintln!(
                "{mode}, {what}: {arrived} of {FRAMES} arrived; n1 fwd_to_peer +{fwd}, pass_source_mac +{bad_mac}"
            );
            let went_right = match (mode, src_mac) {
                (_, None) => arrived == FRAMES && (mode == "off" || fwd >= FRAMES),
                ("off", Some(_)) => arrived == 0,
                (_, Some(_)) if on_port => arrived == 0 && fwd == 0 && bad_mac >= FRAMES,
                (_, Some(_)) => arrived == 0 && fwd == 0 && bad_mac == 0,
            };
            if !went_right {
                failures.push(format!(
                    "{mode} (hgw on the port: {on_port}), {what}: {arrived} of {FRAMES} arrived, \
                     n1 fwd_to_peer +{fwd}, pass_source_mac +{bad_mac}"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Whether n1's agent put hgw's bridge-side program on the pods' ports rather than on
/// cni0, once its programs are attached (`status` lists a port only when something
/// shares its hooks).
fn hgw_on_the_ports(lab: &Lab) -> anyhow::Result<bool> {
    settle(lab, 0, Duration::from_secs(5), |status| {
        ensure!(
            hooks_of(status, "eth0")?.hgw,
            "hgw not on the uplink yet: {:?}",
            status.hooks
        );
        Ok(!hooks_of(status, "cni0")?.hgw)
    })
}
