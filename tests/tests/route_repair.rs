//! An admin deletes a route hgw installed (IPv4, then IPv6), or flushes the nexthop
//! objects hgw's routes sit on, which takes the routes with them: the agent puts them
//! back within 200 ms, from the netlink event rather than a poll, each on a nexthop of
//! its own again, and leaves no nexthop behind. The uplink going down and up: back
//! within a second. Beside someone's backup route of another metric on the same
//! prefix, hgw's route is hgw's: replacing the backup leaves it, deleting it brings it
//! back, as without the backup.

use std::time::{Duration, Instant};

use hgw_tests::{HGW_ROUTE_PROTOCOL, Lab, Node, hgw_nexthops, hgw_routes, peer, run_in_ok};

/// `peer`'s routes on `node` (both families), as [`hgw_routes`] shows them.
fn peer_routes(peer: &Node) -> [String; 2] {
    [
        format!("{} via {} dev eth0", peer.pod_cidr, peer.uplink_ip),
        format!("{} via {} dev eth0", peer.pod_cidr6, peer.uplink_ip6),
    ]
}

/// Waits until every one of `routes` is on `node`, for at most `limit` after `since`.
fn wait_back(
    node: &Node,
    routes: &[String],
    what: &str,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<()> {
    loop {
        let now = hgw_routes(&node.ns)?;
        if routes
            .iter()
            .all(|want| now.iter().any(|r| r.starts_with(want)))
        {
            eprintln!("{what}: routes back after {:?}", since.elapsed());
            return Ok(());
        }
        let waited = since.elapsed();
        assert!(
            waited < limit,
            "{what}: routes not back after {waited:?}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_deleted_hgw_route_is_back_within_200ms() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (node, peer) = (&lab.nodes[0], &lab.nodes[1]);
    let routes = peer_routes(peer);
    let back = |what: &str| {
        wait_back(
            node,
            &routes,
            what,
            Instant::now(),
            Duration::from_millis(200),
        )
    };
    let on_own_nexthops = |what: &str| -> anyhow::Result<()> {
        let nexthops = hgw_nexthops(&node.ns)?;
        let proto = HGW_ROUTE_PROTOCOL.to_string();
        let raw = run_in_ok(&node.ns, "ip", &["route", "show", "proto", &proto])?;
        let raw6 = run_in_ok(&node.ns, "ip", &["-6", "route", "show", "proto", &proto])?;
        let listed = format!(
            "{}{}",
            String::from_utf8_lossy(&raw.stdout),
            String::from_utf8_lossy(&raw6.stdout)
        );
        assert_eq!(
            nexthops.len(),
            2,
            "{what}: one nexthop per route, none left over: {nexthops:?}"
        );
        for (nexthop, gateway) in nexthops
            .iter()
            .zip([peer.uplink_ip.to_string(), peer.uplink_ip6.to_string()])
        {
            assert!(
                nexthop.contains(&format!("via {gateway} dev eth0")) && nexthop.contains("onlink"),
                "{what}: {nexthop}"
            );
            let id = nexthop.split_whitespace().nth(1).unwrap_or_default();
            assert!(
                listed.contains(&format!("nhid {id} via {gateway}")),
                "{what}: no route on nexthop {id}: {listed}"
            );
        }
        Ok(())
    };
    on_own_nexthops("at start")?;
    for cidr in [&peer.pod_cidr, &peer.pod_cidr6] {
        for attempt in 0..3 {
            run_in_ok(&node.ns, "ip", &["route", "del", cidr])?;
            back(&format!("{cidr} attempt {attempt}"))?;
        }
    }
    on_own_nexthops("after the routes were deleted")?;
    run_in_ok(&node.ns, "ip", &["nexthop", "flush"])?;
    back("nexthops flushed")?;
    on_own_nexthops("after the nexthops were flushed")?;
    Ok(())
}

/// The uplink goes down (the kernel drops the nexthops on it and their routes, IPv4
/// without a route event) and comes back: the agent's resync puts both routes back
/// within a second, each on a nexthop of its own, none left over.
#[test]
fn routes_are_back_after_the_uplink_goes_down_and_up() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let node = &lab.nodes[0];
    run_in_ok(&node.ns, "ip", &["link", "set", "eth0", "down"])?;
    std::thread::sleep(Duration::from_millis(300));
    eprintln!(
        "uplink down: routes {:?}, nexthops {:?}",
        hgw_routes(&node.ns)?,
        hgw_nexthops(&node.ns)?
    );
    run_in_ok(&node.ns, "ip", &["link", "set", "eth0", "up"])?;
    let routes = peer_routes(&lab.nodes[1]);
    wait_back(
        node,
        &routes,
        "uplink up",
        Instant::now(),
        Duration::from_secs(1),
    )?;
    let nexthops = hgw_nexthops(&node.ns)?;
    assert_eq!(nexthops.len(), 2, "one nexthop per route: {nexthops:?}");
    // No install tried on the down uplink, so no warning per route.
    let log = lab.agents()[0].log();
    assert!(
        !log.contains("reinstalling it") && !log.contains("Network is down"),
        "{log}"
    );
    Ok(())
}

/// A backup route to each of the peer's prefixes at another metric (IPv4 100, IPv6
/// 2048, beside hgw's 0 and 1024), made the way an admin would (`ip route add`, proto
/// boot): replacing it leaves hgw's route in the agent's view (status names no foreign
/// route, the route stays), and hgw's route deleted comes back within 200 ms.
#[test]
fn a_backup_route_of_another_metric_leaves_hgw_its_route() -> anyhow::Result<()> {
    let lab = Lab::up_with_agents(2, 1)?;
    let (node, other) = (&lab.nodes[0], &lab.nodes[1]);
    let routes = peer_routes(other);
    let agent = &lab.agents()[0];
    for (family, cidr, gateway, moved, metric) in [
        (
            "-4",
            &other.pod_cidr,
            other.uplink_ip.to_string(),
            "172.31.0.99",
            "100",
        ),
        (
            "-6",
            &other.pod_cidr6,
            other.uplink_ip6.to_string(),
            "fd00:172:31::99",
            "2048",
        ),
    ] {
        let backup = |cmd: &'static str, via: &str| {
            let args = [
                family, "route", cmd, cidr, "via", via, "dev", "eth0", "onlink", "metric", metric,
            ];
            run_in_ok(&node.ns, "ip", &args)
        };
        backup("add", &gateway)?;
        // Another gateway: the kernel replaces the route, and says so.
        backup("replace", moved)?;
        // The agent sees the replace within milliseconds; watched for a second.
        let watched = Instant::now();
        while watched.elapsed() < Duration::from_secs(1) {
            let status = agent.status()?;
            let seen = peer(&status, cidr);
            assert!(
                seen.foreign_route.is_none() && seen.route,
                "{cidr}: after the backup's replace the agent sees {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_back(
            node,
            &routes,
            "the backup replaced",
            Instant::now(),
            Duration::ZERO,
        )?;
        let proto = HGW_ROUTE_PROTOCOL.to_string();
        run_in_ok(
            &node.ns,
            "ip",
            &[family, "route", "del", cidr, "proto", &proto],
        )?;
        wait_back(
            node,
            &routes,
            &format!("{cidr} deleted beside the backup"),
            Instant::now(),
            Duration::from_millis(200),
        )?;
        backup("del", moved)?;
    }
    Ok(())
}
