//! The lease is kept alive whatever the agent is busy with. Here its loop is stuck
//! writing a large status to a client that never reads, while a burst of subnet
//! changes arrives, each a new whole peer set the agent cannot take: this node's lease
//! (TTL 5 s, the least the agent takes) stays the same for three TTLs, and once the
//! reader goes, the agent gets the newest peer set.

use std::{
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hgw_tests::{Etcd, Lab, log_lines, run_in_ok};
use serde_json::Value;

/// Enough peers that their status outgrows a Unix socket's buffer.
const PEERS: usize = 3000;
const BURST: usize = 40;
const OWN: &str = "/coreos.com/network/subnets/10.0.1.0-24";

/// The lease id the key `OWN` is attached to (None: the key is gone).
fn own_lease(etcd: &Etcd) -> anyhow::Result<Option<i64>> {
    let out: Value = serde_json::from_str(&etcd.ctl(&["get", OWN, "-w", "json"])?)?;
    Ok(out["kvs"][0]["lease"].as_i64())
}

/// Peer `i`'s entry: `10.A.B.0/24` via `172.30.A.B`.
fn entry(i: usize) -> (String, String) {
    let (a, b) = (1 + i / 250, 1 + i % 250);
    (
        format!("/coreos.com/network/subnets/10.{a}.{b}.0-24"),
        format!(r#"{{"PublicIP":"172.30.{a}.{b}","BackendType":"host-gw"}}"#),
    )
}

#[test]
fn a_stuck_agent_and_a_burst_of_changes_never_let_the_lease_expire() -> anyhow::Result<()> {
    let mut lab = Lab::up(1, 0)?;
    let etcd = Etcd::start(&lab)?;
    // Room on the uplink for thousands of peers' addresses, as the control-plane bench.
    run_in_ok(
        &lab.nodes[0].ns,
        "ip",
        &["addr", "add", "172.30.0.1/16", "dev", "eth0"],
    )?;
    etcd.put(
        "/coreos.com/network/config",
        r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#,
    )?;
    etcd.put_many(&(0..PEERS).map(entry).collect::<Vec<_>>())?;
    let config = etcd
        .agent_config(&lab, 0, "")
        .replace("lease_ttl = 10", "lease_ttl = 5");
    let agent = lab.start_agent_with_config(0, &config, &[])?;
    agent.wait_for(Duration::from_secs(30), |s| s.map_entries == PEERS)?;
    let lease = own_lease(&etcd)?.context("the agent holds no subnet")?;

    // A status client that never reads.
    let stuck = UnixStream::connect(agent.socket()).context("connecting to status")?;
    std::thread::sleep(Duration::from_millis(500));
    for i in PEERS..PEERS + BURST {
        let (key, value) = entry(i);
        etcd.put(&key, &value)?;
    }
    let start = Instant::now();
    let mut lost = Vec::new();
    while start.elapsed() < Duration::from_secs(15) {
        let held = own_lease(&etcd)?;
        if held != Some(lease) {
            lost.push((start.elapsed(), held));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        lost.is_empty(),
        "the lease {lease:x} lapsed while the agent was stuck: {lost:?}"
    );
    drop(stuck);
    agent.wait_for(Duration::from_secs(30), |s| s.map_entries == PEERS + BURST)?;
    let log = agent.log();
    let warned: Vec<&str> = log_lines(&log)
        .filter(|l| l.level == "WARN" && l.message.contains("lease"))
        .map(|l| l.message)
        .collect();
    assert!(warned.is_empty(), "{warned:#?}");
    Ok(())
}
