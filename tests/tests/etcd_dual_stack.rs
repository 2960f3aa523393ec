//! Dual stack from etcd, written as flannel writes it (`EnableIPv6`, `IPv6Network`,
//! `IPv6SubnetLen` in the config; `A.B.C.D-LEN&IPV6-LEN` keys with `PublicIPv6`): each
//! agent claims both families in one key, reads the others', and IPv6 pods on different
//! nodes talk through the fast path. The IPv6 side of an entry gets the same checks as
//! the IPv4 side, each refused with a warning naming the key.

use std::time::Duration;

use hgw_tests::{
    Etcd, Status, check_key_rejected, counter_sum, hgw_routes, ping, udp_replied_exchange,
};
use serde_json::Value;

const SUBNETS: &str = "/coreos.com/network/subnets/";

/// Whether `status` has a peer entry `pod_cidr` via `node_ip` with its route in.
fn has_peer(status: &Status, pod_cidr: &str, node_ip: &str) -> bool {
    status
        .peers
        .iter()
        .any(|p| p.pod_cidr == pod_cidr && p.node_ip == node_ip && p.route)
}

fn peer_cidrs(status: &Status) -> Vec<String> {
    let mut cidrs: Vec<String> = status.peers.iter().map(|p| p.pod_cidr.clone()).collect();
    cidrs.sort();
    cidrs
}

#[test]
fn two_agents_claim_dual_stack_subnets_and_ipv6_pods_talk() -> anyhow::Result<()> {
    let (lab, etcd) = Etcd::lab_with_agents_dual_stack(3, 1, 2)?;

    // Each agent's one claim holds both families, as flannel's MakeSubnetKey writes it.
    let listing = etcd.ctl(&["get", "--prefix", SUBNETS])?;
    let lines: Vec<&str> = listing.lines().collect();
    for (i, node) in lab.nodes[..2].iter().enumerate() {
        let key = format!(
            "{SUBNETS}{}&{}",
            node.pod_cidr.replace('/', "-"),
            Etcd::pod_cidr6(i).replace('/', "-")
        );
        let at = lines
            .iter()
            .position(|l| *l == key)
            .unwrap_or_else(|| panic!("no key {key} in:\n{listing}"));
        let value: Value = serde_json::from_str(lines[at + 1])?;
        assert_eq!(
            value["PublicIP"],
            node.uplink_ip.to_string().as_str(),
            "{key}"
        );
        assert_eq!(
            value["PublicIPv6"],
            node.uplink_ip6.to_string().as_str(),
            "{key}"
        );
        let status = lab.agent(i).expect("agent").status()?;
        assert_eq!(status.pod_cidr_v6, Some(Etcd::pod_cidr6(i)));
    }
    assert_eq!(lines.len(), 4, "one key per agent:\n{listing}");

    // n3's entry as flanneld writes it (no agent there): a dual-stack peer for both.
    let n3 = &lab.nodes[2];
    etcd.put(
        &format!("{SUBNETS}10.244.3.0-24&fd00:244:3::-48"),
        &format!(
            r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"host-gw"}}"#,
            n3.uplink_ip, n3.uplink_ip6
        ),
    )?;
    for i in 0..2 {
        let other = &lab.nodes[1 - i];
        let agent = lab.agent(i).expect("agent");
        let status = agent.wait_for(Duration::from_secs(5), |s| {
            has_peer(s, "fd00:244:3::/48", &n3.uplink_ip6.to_string())
                && has_peer(s, "10.244.3.0/24", &n3.uplink_ip.to_string())
        })?;
        let v6 = Etcd::pod_cidr6(1 - i);
        assert!(
            has_peer(&status, &other.pod_cidr, &other.uplink_ip.to_string())
                && has_peer(&status, &v6, &other.uplink_ip6.to_string()),
            "n{}: no dual-stack peer {}: {status}",
            i + 1,
            other.name
        );
        let routes = hgw_routes(&lab.nodes[i].ns)?;
        let want = format!("{v6} via {}", other.uplink_ip6);
        assert!(
            routes.iter().any(|r| r.starts_with(&want)),
            "n{}: no `{want}` in {routes:?}",
            i + 1
        );
    }

    // IPv6 pod to pod, both ways, and a UDP flow the fast path carries.
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    for (a, b) in [(from, to), (to, from)] {
        let out = ping(&a.ns, b.ip6, 3, &[])?;
        assert!(
            out.status.success(),
            "ping {} -> {} failed:\n{}",
            a.ip6,
            b.ip6,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let before = lab.statuses()?;
    const UDP_PACKETS: usize = 100;
    let arrived = udp_replied_exchange(&from.ns, &to.ns, to.ip6, UDP_PACKETS)?;
    assert_eq!(arrived, UDP_PACKETS, "UDP {} -> {}", from.ip6, to.ip6);
    let after = lab.statuses()?;
    let grew = counter_sum(&after, "ipv6.fwd_to_peer") - counter_sum(&before, "ipv6.fwd_to_peer");
    assert!(
        grew >= UDP_PACKETS as u64,
        "ipv6.fwd_to_peer grew by {grew}: the fast path did not carry the IPv6 flow"
    );
    Ok(())
}

/// (key, value, what the warning must say) for n1, whose PublicIPv6 is fd00:172:31::1
/// and whose uplink is fd00:172:31::/64; n2 holds 10.244.2.0/24 and fd00:244:2::/48.
const BAD: &[(&str, &str, &str)] = &[
    (
        "10.244.40.0-24&fd00:99::-48",
        r#"{"PublicIP":"172.31.0.40","PublicIPv6":"fd00:172:31::40"}"#,
        "fd00:99::/48 is outside the IPv6Network fd00:244::/32",
    ),
    (
        "10.244.41.0-24&fd00:244:2::-48",
        r#"{"PublicIP":"172.31.0.41","PublicIPv6":"fd00:172:31::41"}"#,
        "fd00:244:2::/48 overlaps the older entry /coreos.com/network/subnets/10.244.2.0-24&fd00:244:2::-48",
    ),
    (
        "10.244.42.0-24&fd00:244:42::-48",
        r#"{"PublicIP":"172.31.0.42","PublicIPv6":"fd00:172:31::2"}"#,
        "PublicIPv6 fd00:172:31::2 is already the address of the older entry /coreos.com/network/subnets/10.244.2.0-24&fd00:244:2::-48",
    ),
    (
        "10.244.43.0-24&fd00:244:43::-48",
        r#"{"PublicIP":"172.31.0.43"}"#,
        "an IPv6 subnet without PublicIPv6",
    ),
    (
        "10.244.44.0-24&fd00:244:44::-48",
        r#"{"PublicIP":"172.31.0.44","PublicIPv6":"nope"}"#,
        "PublicIPv6 \"nope\" is not an IPv6 address",
    ),
    (
        "10.244.45.0-24&fd00:172:31::-64",
        r#"{"PublicIP":"172.31.0.45","PublicIPv6":"fd00:172:31::45"}"#,
        "fd00:172:31::/64 overlaps the uplink's network fd00:172:31::/64",
    ),
    (
        "10.244.46.0-24&fd00:244:46::-48",
        r#"{"PublicIP":"172.31.0.46","PublicIPv6":"fd00:172:31::1"}"#,
        "PublicIPv6 fd00:172:31::1 is this node's address",
    ),
];

#[test]
fn bad_ipv6_sides_are_ignored_and_named() -> anyhow::Result<()> {
    let (lab, etcd) = Etcd::lab_with_agents_dual_stack(2, 0, 2)?;
    for (key, value, _) in BAD {
        etcd.put(&format!("{SUBNETS}{key}"), value)?;
    }
    // A valid entry written after the bad ones proves the agent has seen them all.
    etcd.put(
        &format!("{SUBNETS}10.244.50.0-24&fd00:244:50::-48"),
        r#"{"PublicIP":"172.31.0.50","PublicIPv6":"fd00:172:31::50","BackendType":"host-gw"}"#,
    )?;
    let agent = lab.agent(0).expect("agent");
    let status = agent.wait_for(Duration::from_secs(5), |s| {
        has_peer(s, "fd00:244:50::/48", "fd00:172:31::50")
    })?;
    assert_eq!(
        peer_cidrs(&status),
        [
            "10.244.2.0/24",
            "10.244.50.0/24",
            "fd00:244:2::/48",
            "fd00:244:50::/48"
        ],
        "only n2 and the valid new entry are peers, in both families"
    );
    let log = agent.log();
    for (key, _, reason) in BAD {
        if let Err(e) = check_key_rejected(&log, &format!("{SUBNETS}{key}"), reason) {
            panic!("{e:#}\n{log}");
        }
    }
    Ok(())
}
