//! Pods made the way kubelet makes them: the agents write flannel's subnet.env and, with
//! `cni_conf`, a CNI network config list; the lab runs Debian's real plugins (bridge,
//! host-local, portmap) from that list as a container runtime does (ADD, then DEL).
//!
//! - subnet.env is flannel's, field for field; the list names cni0, the uplink MTU,
//!   the node's pod CIDRs (both families) and portmap. When the uplink's MTU changes,
//!   both are written again.
//! - Each pod gets an address from its node's pod CIDRs; the agent takes it for direct
//!   delivery (status `endpoints`); an answered UDP flow between the two nodes' pods
//!   goes through the fast path on both nodes, over both families.
//! - A hostPort that portmap made for n2's pod answers n1's pod, which the server sees
//!   as itself (portmap only masquerades hairpin and localhost traffic).
//! - After DEL the agent forgets the pod (endpoints back to 0), host-local's file for
//!   the address is gone and the hostPort rules with it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hgw_tests::{
    CniPod, Lab, PortMapping, Proto, UdpFlow, counter, is_ok_reply, ping, run_in_ok, tcp_request,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);
const PACKETS: usize = 20;
const HOST_PORT: u16 = 8082;
const CONTAINER_PORT: u16 = 80;

#[test]
fn pods_from_the_agents_cni_config() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 0)?;
    for node in 0..lab.nodes.len() {
        let conf = lab.cni_conf_path(node).to_string_lossy().into_owned();
        lab.start_agent(node, &["--cni-conf", &conf])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(Duration::from_secs(15))?;
    }
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());

    for (i, node) in [&n1, &n2].into_iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            std::fs::read_to_string(lab.subnet_env_path(i))?,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{n}.1/24\n\
                 FLANNEL_IPV6_NETWORK=fd00:244::/32\nFLANNEL_IPV6_SUBNET=fd00:244:{n}::1/64\n\
                 FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"
            ),
            "{}'s subnet.env",
            node.name
        );
        let list: Value = serde_json::from_str(&std::fs::read_to_string(lab.cni_conf_path(i))?)?;
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap"], "{list}");
        assert_eq!(list["plugins"][0]["bridge"], "cni0");
        assert_eq!(list["plugins"][0]["mtu"], 1500);
        assert_eq!(
            list["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            node.pod_cidr6.as_str()
        );
    }

    let mut a = lab.add_cni_pod(0, &lab.cni_conf_path(0), &[])?;
    let mapping = PortMapping {
        host_port: HOST_PORT,
        container_port: CONTAINER_PORT,
        proto: Proto::Tcp,
    };
    let mut b = lab.add_cni_pod(1, &lab.cni_conf_path(1), &[mapping])?;
    for (pod, node, n) in [(&a, &n1, 1u16), (&b, &n2, 2)] {
        let v4 = pod.ip.octets();
        assert!(
            v4[..3] == [10, 244, n as u8] && pod.ip != node.gateway,
            "{}: {} not a pod address of {}",
            pod.ns,
            pod.ip,
            node.pod_cidr
        );
        let v6 = pod.ip6.expect("dual stack").segments();
        assert!(
            v6[..4] == [0xfd00, 0x244, n, 0] && pod.ip6 != Some(node.gateway6),
            "{}: {:?} not in {}",
            pod.ns,
            pod.ip6,
            node.pod_cidr6
        );
    }
    let b_lease = lab.cni_data_dir(1).join("hgw").join(b.ip.to_string());
    assert!(b_lease.exists(), "host-local has no {}", b_lease.display());

    // The first exchange goes through the bridges, which teaches each node's kernel
    // (and so its agent) where its pod is.
    assert!(ping(&a.ns, b.ip, 1, &[])?.status.success(), "ping a -> b");
    for agent in lab.agents() {
        agent.wait_for(WAIT, |s| s.endpoints >= 1)?;
    }

    let statuses = || lab.statuses();
    for (server_ip, family) in [
        (IpAddr::V4(b.ip), "ipv4"),
        (b.ip6.expect("v6").into(), "ipv6"),
    ] {
        let mut flow = UdpFlow::open(&a.ns, &b.ns, server_ip)?;
        let before = statuses()?;
        assert_eq!(flow.send(PACKETS)?, PACKETS, "{family}: datagrams lost");
        let after = statuses()?;
        for (node, name) in [(0, "fwd_to_peer"), (1, "fwd_to_pod")] {
            let name = format!("{family}.{name}");
            let grew = counter(&after[node], &name) - counter(&before[node], &name);
            assert!(
                grew >= PACKETS as u64,
                "n{} {name} grew by {grew}, expected at least {PACKETS}: the flow left the fast path",
                node + 1
            );
        }
    }

    // The hostPort portmap made for b, from a's node.
    let listen = SocketAddr::from((b.ip, CONTAINER_PORT));
    let host_port = SocketAddr::from((n2.uplink_ip, HOST_PORT));
    let answer = tcp_request(&a.ns, &b.ns, listen, host_port, WAIT)?;
    assert!(is_ok_reply(&answer.reply), "reply {:?}", answer.reply);
    assert_eq!(
        answer.server_saw.ip(),
        IpAddr::V4(a.ip),
        "the server's peer"
    );
    let dnat = format!("--to-destination {}:{CONTAINER_PORT}", b.ip);
    assert!(nat_rules(&n2.ns)?.contains(&dnat), "no portmap DNAT");

    b.del()?;
    lab.agent(1)
        .expect("agent")
        .wait_for(WAIT, |s| s.endpoints == 0)?;
    assert!(
        !b_lease.exists(),
        "host-local kept {} after DEL",
        b_lease.display()
    );
    assert!(
        !nat_rules(&n2.ns)?.contains(&dnat),
        "portmap DEL left the DNAT"
    );
    // A DEL twice is no error (runtimes retry it); this one is a no-op here.
    b.del()?;
    let again: CniPod = lab.add_cni_pod(1, &lab.cni_conf_path(1), &[])?;
    assert!(
        ping(&a.ns, again.ip, 1, &[])?.status.success(),
        "ping a -> the new pod"
    );

    // The uplink's MTU changes: both files follow.
    run_in_ok(&n1.ns, "ip", &["link", "set", "eth0", "mtu", "1400"])?;
    let deadline = Instant::now() + WAIT;
    loop {
        let env = std::fs::read_to_string(lab.subnet_env_path(0))?;
        let list: Value = serde_json::from_str(&std::fs::read_to_string(lab.cni_conf_path(0))?)?;
        if env.contains("FLANNEL_MTU=1400\n") && list["plugins"][0]["mtu"] == 1400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MTU 1400 not written within {WAIT:?}: {env} {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    a.del()?;
    Ok(())
}

fn nat_rules(ns: &str) -> anyhow::Result<String> {
    let out = run_in_ok(ns, "iptables", &["-w", "-t", "nat", "-S"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
