//! At start the agent removes routes carrying hgw's tag that no peer wants (left by an
//! earlier run), and never touches anyone else's routes, also to pod CIDRs.

use std::time::Duration;

use hgw_tests::{HGW_ROUTE_PROTOCOL, Lab, hgw_routes, run_in_ok};

#[test]
fn stale_hgw_routes_go_and_foreign_routes_stay() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let ns = lab.nodes[0].ns.clone();
    let proto = HGW_ROUTE_PROTOCOL.to_string();
    // Left by an earlier run for peers that no longer exist (tagged), and someone
    // else's, in the cluster CIDRs and outside them (not tagged).
    for route in [
        format!("-4 route add 10.244.60.0/24 via 172.31.0.60 dev eth0 onlink proto {proto}"),
        format!("-6 route add fd00:244:60::/64 via fd00:172:31::60 dev eth0 proto {proto}"),
        "-4 route add 10.244.50.0/24 via 172.31.0.2 dev eth0 proto static".into(),
        "-6 route add fd00:244:50::/64 via fd00:172:31::2 dev eth0 proto static".into(),
        "-4 route add 192.0.2.0/24 via 172.31.0.2 dev eth0".into(),
    ] {
        let args: Vec<&str> = route.split_whitespace().collect();
        run_in_ok(&ns, "ip", &args)?;
    }

    lab.start_agent(0, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let routes = hgw_routes(&ns)?;
    for stale in ["10.244.60.0/24", "fd00:244:60::/64"] {
        assert!(
            !routes.iter().any(|r| r.starts_with(stale)),
            "stale hgw route {stale} kept: {routes:?}"
        );
    }
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with(&format!("{} via", lab.nodes[1].pod_cidr))),
        "peer route missing: {routes:?}"
    );

    // Foreign routes survive the start-up sweep, and a restart's sweep too.
    lab.start_agent(0, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let all =
        String::from_utf8_lossy(&run_in_ok(&ns, "ip", &["route", "show"])?.stdout).into_owned();
    assert!(
        all.contains("10.244.50.0/24 via 172.31.0.2 dev eth0 proto static"),
        "foreign pod-CIDR route touched:\n{all}"
    );
    assert!(
        all.contains("192.0.2.0/24 via 172.31.0.2 dev eth0"),
        "foreign route touched:\n{all}"
    );
    let all6 = String::from_utf8_lossy(&run_in_ok(&ns, "ip", &["-6", "route", "show"])?.stdout)
        .into_owned();
    assert!(
        all6.contains("fd00:244:50::/64 via fd00:172:31::2 dev eth0 proto static"),
        "foreign IPv6 pod-CIDR route touched:\n{all6}"
    );
    Ok(())
}
