//! Three nodes start with nothing but the etcd endpoint: each acquires a distinct subnet
//! in flannel's schema, learns the others, and pods talk across nodes through the fast
//! path (the default `established` mode: UDP flows conntrack has seen answered; pings
//! go to the kernel).

use hgw_tests::{Etcd, counter_sum, ping, udp_replied_exchange};

#[test]
fn nodes_acquire_subnets_and_find_each_other_through_etcd() -> anyhow::Result<()> {
    let (lab, etcd) = Etcd::lab_with_agents(3, 1, 3)?;

    // Written as flannel writes it, so flannel could read it.
    let subnets = etcd.ctl(&["get", "--prefix", "/coreos.com/network/subnets/"])?;
    for node in &lab.nodes {
        let key = format!(
            "/coreos.com/network/subnets/{}",
            node.pod_cidr.replace('/', "-")
        );
        let value = format!(
            r#"{{"PublicIP":"{}","BackendType":"host-gw"}}"#,
            node.uplink_ip
        );
        assert!(
            subnets.contains(&format!("{key}\n{value}")),
            "missing {key} = {value} in:\n{subnets}"
        );
    }
    let leases = etcd.ctl(&["lease", "list"])?;
    assert!(
        leases.contains("found 3 leases"),
        "every node holds its subnet with a lease:\n{leases}"
    );

    let before = lab.statuses()?;
    let pairs = lab.cross_node_pod_pairs();
    const PACKETS: usize = 10;
    for (from, to) in &pairs {
        let out = ping(&from.ns, to.ip, 1, &[])?;
        assert!(
            out.status.success(),
            "ping {} -> {}:\n{}",
            from.ip,
            to.ip,
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            udp_replied_exchange(&from.ns, &to.ns, to.ip, PACKETS)?,
            PACKETS,
            "UDP {} -> {}",
            from.ip,
            to.ip
        );
    }
    let after = lab.statuses()?;
    let grew = counter_sum(&after, "ipv4.fwd_to_peer") - counter_sum(&before, "ipv4.fwd_to_peer");
    let sent = (pairs.len() * PACKETS) as u64;
    assert!(
        grew >= sent,
        "fwd_to_peer grew by {grew}, expected at least {sent}"
    );
    for status in &after {
        for peer in &status.peers {
            let source = &peer.source;
            assert!(
                source.starts_with("/coreos.com/network/subnets/"),
                "peer source {source}"
            );
            assert!(peer.lease.is_some(), "peer without lease: {peer:?}");
        }
    }
    Ok(())
}
