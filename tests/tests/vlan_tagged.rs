//! A VLAN-tagged frame is the kernel's, not the fast path's (issue 9, "other kernel
//! duties"). The kernel lifts an 802.1Q tag out of the frame into the skb before TC
//! ingress (`vlan_present`), so the bytes the program sees look like plain IPv4;
//! forwarding them would carry a frame of VLAN 100 as if it were untagged. The kernel
//! drops it: cni0 has no VLAN 100 device, so the frame is not for the node
//! (PACKET_OTHERHOST).
//!
//! This kernel is built without 802.1Q devices (CONFIG_VLAN_8021Q unset: `ip link add
//! ... type vlan` fails), so pod n1p1 writes the frames itself on a packet socket:
//! Ethernet to n1's cni0 MAC, an 802.1Q tag for VLAN 100, then IPv4/UDP from its own
//! address to pod n2p1 (so no other rule, such as the source check, applies). The same
//! frame without the tag is the control.
//!
//! `all` mode (no conntrack lookup, so nothing else hides the difference): untagged
//! frames arrive over the fast path (`fwd_to_peer` on n1), tagged ones do not arrive and
//! n1 counts them as `pass_not_ip`, none as `fwd_to_peer`. With kernel routes alone
//! (`--fast-path off`) the answers are the same: tagged nothing, untagged all.
//!
//! With the program before the VLAN rule, the tagged frames would have counted as
//! `fwd_to_peer` on n1 (behind the lifted tag is a valid IPv4 packet from a pod to a
//! peer's pod, sent to the gateway's MAC), failing the counter assertions.

use std::time::Duration;

use anyhow::ensure;
use hgw_tests::{Lab, RawFrames, counter, link_mac};

/// Frames per round.
const FRAMES: u64 = 50;
const VLAN: u16 = 100;
const PORT: u16 = 5501;

#[test]
fn vlan_tagged_frames_go_to_the_kernel() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let cni0_mac = link_mac(&lab.nodes[0].ns, "cni0")?.0;
    for mode in ["all", "off"] {
        for node in 0..2 {
            lab.start_agent(node, &["--fast-path", mode])?;
        }
        for agent in lab.agents() {
            agent.wait_ready(Duration::from_secs(15))?;
        }
        for vlan in [None, Some(VLAN)] {
            let before = lab.statuses()?;
            let frames = RawFrames {
                dst_mac: cni0_mac,
                src_mac: None,
                vlan,
            };
            let arrived = frames.send_and_count(&a, &b, PORT, FRAMES)?;
            let after = lab.statuses()?;
            let delta = |node: usize, name: &str| {
                counter(&after[node], name) - counter(&before[node], name)
            };
            let (not_ip, fwd) = (delta(0, "other.pass_not_ip"), delta(0, "ipv4.fwd_to_peer"));
            eprintln!(
                "{mode}, vlan {vlan:?}: {arrived} of {FRAMES} arrived; n1 pass_not_ip +{not_ip} fwd_to_peer +{fwd}"
            );
            match vlan {
                None => ensure!(
                    arrived == FRAMES,
                    "{mode}: untagged control, {arrived} of {FRAMES} arrived"
                ),
                Some(_) => ensure!(
                    arrived == 0,
                    "{mode}: {arrived} of {FRAMES} tagged frames arrived; the kernel drops them"
                ),
            }
            if mode == "all" {
                match vlan {
                    None => ensure!(
                        fwd >= FRAMES,
                        "untagged: n1 fwd_to_peer grew by {fwd} for {FRAMES} frames"
                    ),
                    Some(_) => ensure!(
                        not_ip >= FRAMES && fwd == 0,
                        "tagged: n1 pass_not_ip +{not_ip} (expected >= {FRAMES}), fwd_to_peer +{fwd} (expected 0)"
                    ),
                }
            }
        }
    }
    Ok(())
}
