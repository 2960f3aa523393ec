//! The bench's `floor` mode: the cheapest forwarding a TC program can do on the bench's
//! wiring (hgw-ebpf/src/bin/floor.rs), attached to a lab whose agents run with
//! `--no-fast-path`. xtask builds the programs itself (the agent never ships them) and
//! attaches them with aya (tcx ingress), keeping them attached while the value lives.
//!
//! The floor redirects every IP frame, IPv6 neighbour discovery included, so the
//! pods' gateway entries are made permanent before it is attached (a pod could not
//! resolve its gateway any more; [`pin_gateways`], which the bench does in every
//! routed mode alike). Forwarding is then switched off in both nodes: the
//! kernel cannot carry a packet between the pods, so every one that arrives was
//! carried by the floor programs.

use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};
use aya::Ebpf;
use aya::programs::{SchedClassifier, TcAttachType};
use hgw_tests::floor::{PROG_TO_POD, PROG_TO_UPLINK, hop, load};
use hgw_tests::{Lab, in_netns, run_in_ok, tcx_programs};
use serde_json::Value;

use crate::util::{root, run};

/// The bench's labs have one pod per node: its host end on the node's cni0.
const POD_HOST_VETH: &str = "veth1";
const UPLINK: &str = "eth0";
const FORWARDING: [&str; 2] = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"];

/// Builds the floor programs for the BPF target (as aya-build builds the agent's, same
/// flags) into target/floor-ebpf; returns the object's path.
pub fn build() -> anyhow::Result<PathBuf> {
    let target_dir = root().join("target/floor-ebpf");
    println!("bench: building the floor programs (hgw-ebpf --bin floor)");
    run(std::process::Command::new("rustup")
        .current_dir(root().join("hgw-ebpf"))
        .args(["run", "nightly", "cargo", "build", "--release", "--quiet"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--bin", "floor", "--target-dir"])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    Ok(target_dir.join("bpfel-unknown-none/release/floor"))
}

/// The floor programs attached to both nodes of a two-node lab; detached on drop.
pub struct Floor {
    _nodes: Vec<Ebpf>,
}

/// An interface's (ifindex, MAC) in namespace `ns`.
fn link(ns: &str, dev: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let out = run_in_ok(ns, "ip", &["-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`ip -j link show dev {dev}` in {ns}"))?;
    let ifindex = v[0]["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("no ifindex for {dev} in {ns}"))?;
    let mac = v[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC for {dev} in {ns}"))?;
    Ok((ifindex, parse_mac(mac)?))
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s:?} is not 6 bytes"))
}

/// Makes the gateway entries of `lab`'s pods permanent, in both families.
///
/// The floor needs it (it redirects neighbour discovery too); every routed mode gets it,
/// so that none pays what the others do not: in a one-way flood a pod's gateway entry
/// goes stale after reachable_time (nothing confirms it), and for the five seconds
/// until the probe's answer every datagram leaves through neigh_resolve_output (seen
/// in a profile of `hgw`'s 1,000-flow test at about 70 ns per packet).
pub fn pin_gateways(lab: &Lab) -> anyhow::Result<()> {
    for node in &lab.nodes {
        let (_, bridge_mac) = link(&node.ns, "cni0")?;
        let mac = bridge_mac.map(|b| format!("{b:02x}")).join(":");
        for pod in &node.pods {
            for gateway in [node.gateway.to_string(), node.gateway6.to_string()] {
                run_in_ok(
                    &pod.ns,
                    "ip",
                    &[
                        "neigh",
                        "replace",
                        &gateway,
                        "lladdr",
                        &mac,
                        "dev",
                        "eth0",
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
    }
    Ok(())
}

/// Attaches the floor to `lab` (two nodes, one pod each, agents ready, gateways
/// pinned by [`pin_gateways`]): the programs on each node's pod veth and uplink, then
/// forwarding off in both nodes.
pub fn attach(lab: &Lab, object: &[u8]) -> anyhow::Result<Floor> {
    ensure!(
        lab.nodes.len() == 2 && lab.nodes.iter().all(|n| n.pods.len() == 1),
        "the floor needs two nodes with one pod each"
    );
    let mut nodes = Vec::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        let peer = &lab.nodes[1 - i];
        let pod = &node.pods[0];
        let (uplink, uplink_mac) = link(&node.ns, UPLINK)?;
        let (_, peer_uplink_mac) = link(&peer.ns, UPLINK)?;
        let (veth, veth_mac) = link(&node.ns, POD_HOST_VETH)?;
        let (_, pod_mac) = link(&pod.ns, "eth0")?;
        let mut ebpf = load(
            object,
            hop(uplink, peer_uplink_mac, uplink_mac),
            hop(veth, pod_mac, veth_mac),
        )?;
        for (name, dev) in [(PROG_TO_UPLINK, POD_HOST_VETH), (PROG_TO_POD, UPLINK)] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            in_netns(&node.ns, || prog.attach(dev, TcAttachType::Ingress))?
                .with_context(|| format!("attaching {name} to {dev} in {}", node.ns))?;
        }
        nodes.push(ebpf);
    }
    for node in &lab.nodes {
        for key in FORWARDING {
            run_in_ok(&node.ns, "sysctl", &["-qw", &format!("{key}=0")])?;
        }
    }
    Ok(Floor { _nodes: nodes })
}

/// The floor's path check, before a measurement: in both nodes exactly the floor
/// programs are attached (no agent program), where they belong, and forwarding is off.
pub fn check(lab: &Lab) -> anyhow::Result<String> {
    for node in &lab.nodes {
        let mut progs = tcx_programs(&node.ns)?;
        progs.sort();
        let names: Vec<String> = progs
            .iter()
            .map(|p| p.split(" id ").next().unwrap_or(p).to_owned())
            .collect();
        let want = [
            format!("{UPLINK} ingress {PROG_TO_POD}"),
            format!("{POD_HOST_VETH} ingress {PROG_TO_UPLINK}"),
        ];
        if names != want {
            bail!(
                "floor mode, but {} has programs [{}], expected [{}]",
                node.ns,
                progs.join("; "),
                want.join("; ")
            );
        }
        for key in FORWARDING {
            let out = run_in_ok(&node.ns, "sysctl", &["-n", key])?;
            let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if value != "0" {
                bail!("floor mode, but {key} is {value} in {}", node.ns);
            }
        }
    }
    Ok("floor programs only, forwarding off in both nodes".to_owned())
}
