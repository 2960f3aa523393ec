//! A flannel network config without room for pods, or this node's reservation over its
//! own uplink, is refused at start with an error naming the etcd key and the reason,
//! before the agent changes anything; nothing is claimed in etcd.

use hgw_tests::Etcd;
use hgw_tests::Lab;

const CONFIG: &str = "/coreos.com/network/config";

/// Runs n1's agent to its exit and checks that it failed naming `key` and `reason`.
fn refused(lab: &Lab, etcd: &Etcd, key: &str, reason: &str) -> anyhow::Result<()> {
    let subnets = || {
        etcd.ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ])
    };
    let before = subnets()?;
    let (status, stderr, _socket) = lab.run_agent_to_exit(0, &etcd.agent_config(lab, 0, ""))?;
    assert!(!status.success(), "{key}: the agent ran with it:\n{stderr}");
    // The error itself, not an info line before it, names the key.
    let error = stderr.split_once("Error:").map_or("", |(_, e)| e);
    assert!(
        error.contains(key) && error.contains(reason),
        "the error does not name {key} and say {reason:?}:\n{stderr}"
    );
    let after = subnets()?;
    assert_eq!(after, before, "{key}: a subnet was claimed");
    Ok(())
}

#[test]
fn network_configs_without_room_for_pods_are_refused_naming_the_key() -> anyhow::Result<()> {
    let lab = Lab::up(1, 0)?;
    let etcd = Etcd::start(&lab)?;
    for (config, reason) in [
        (
            r#"{"Network":"0.0.0.0/0","Backend":{"Type":"host-gw"}}"#,
            "Network 0.0.0.0/0 is a default route",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
            "SubnetLen 16 is too short",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
            "SubnetLen 31 leaves no room for pods",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.99.0.0"}"#,
            "SubnetMin 10.99.0.0 is outside",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.99.255.0"}"#,
            "SubnetMax 10.99.255.0 is outside",
        ),
        (
            r#"{"Network":"172.16.0.0/12"}"#,
            "overlaps the uplink's network 172.31.0.0/24",
        ),
        (
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"::/0"}"#,
            "IPv6Network ::/0 is a default route",
        ),
        (
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:244::/32","IPv6SubnetMin":"fd00:99::"}"#,
            "IPv6SubnetMin fd00:99:: is outside",
        ),
    ] {
        etcd.put(CONFIG, config)?;
        refused(&lab, &etcd, CONFIG, reason)?;
    }
    Ok(())
}

#[test]
fn this_nodes_reservation_over_its_uplink_is_refused_naming_the_key() -> anyhow::Result<()> {
    let lab = Lab::up(1, 0)?;
    let etcd = Etcd::start(&lab)?;
    etcd.put_network_config()?;
    // A reservation (no lease) for n1's PublicIP, over n1's own uplink network.
    let key = "/coreos.com/network/subnets/172.31.0.0-24";
    etcd.put(key, r#"{"PublicIP":"172.31.0.1","BackendType":"host-gw"}"#)?;
    refused(
        &lab,
        &etcd,
        key,
        "overlaps the uplink's network 172.31.0.0/24",
    )
}
