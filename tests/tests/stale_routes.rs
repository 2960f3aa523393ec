//! At start the agent removes routes carrying hgw's tag that no peer wants (left by an
//! earlier run), plain or on hgw's nexthops, and hgw's nexthops no route uses; it never
//! touches anyone else's routes, also to pod CIDRs, nor anyone else's nexthops.

use std::time::Duration;

use anyhow::Context as _;
use hgw_tests::{HGW_ROUTE_PROTOCOL, Lab, hgw_nexthops, hgw_routes, peer, ping, run_in_ok};

/// Nexthop ids as hgw hands them out (from 0x68670000), for leftovers and a foreign one
/// on the id the agent would take next.
const STALE_NEXTHOP: u32 = 0x6867_0010;
const UNUSED_NEXTHOP: u32 = 0x6867_0011;
const FOREIGN_NEXTHOP: u32 = 0x6867_0012;

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
        // An earlier run's route on its nexthop, and a nexthop of hgw's without a route.
        format!("nexthop add id {STALE_NEXTHOP} via 172.31.0.61 dev eth0 onlink proto {proto}"),
        format!("-4 route add 10.244.61.0/24 nhid {STALE_NEXTHOP} proto {proto}"),
        format!("nexthop add id {UNUSED_NEXTHOP} via 172.31.0.62 dev eth0 onlink proto {proto}"),
        // Someone else's, on the id after hgw's highest: the agent skips it.
        format!("nexthop add id {FOREIGN_NEXTHOP} via 172.31.0.63 dev eth0 onlink"),
    ] {
        let args: Vec<&str> = route.split_whitespace().collect();
        run_in_ok(&ns, "ip", &args)?;
    }

    lab.start_agent(0, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let routes = hgw_routes(&ns)?;
    for stale in ["10.244.60.0/24", "fd00:244:60::/64", "10.244.61.0/24"] {
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
    let nexthops = hgw_nexthops(&ns)?;
    assert_eq!(
        nexthops.len(),
        routes.len(),
        "one of hgw's nexthops per route, the leftovers gone: {nexthops:?}"
    );
    for gone in [STALE_NEXTHOP, UNUSED_NEXTHOP, FOREIGN_NEXTHOP] {
        assert!(
            !nexthops
                .iter()
                .any(|n| n.starts_with(&format!("id {gone} "))),
            "{gone}: {nexthops:?}"
        );
    }
    let foreign = run_in_ok(
        &ns,
        "ip",
        &["nexthop", "show", "id", &FOREIGN_NEXTHOP.to_string()],
    )?;
    assert!(
        String::from_utf8_lossy(&foreign.stdout).contains("via 172.31.0.63"),
        "someone else's nexthop touched"
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

/// Someone else's route on a peer's prefix: hgw never takes it over (no NLM_F_REPLACE
/// over a route it does not own) and keeps the prefix out of the fast path, so packets
/// get the kernel's answer (here a blackhole) in every mode; once that route goes, hgw
/// installs its own; when someone replaces hgw's route, hgw lets go again, and of the
/// nexthop its route was on, which the next start deletes unless a route is on it.
#[test]
fn a_foreign_route_on_a_peer_prefix_is_left_alone_and_out_of_the_fast_path() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());
    let peer_cidrs = [n2.pod_cidr.clone(), n2.pod_cidr6.clone()];
    for cidr in &peer_cidrs {
        run_in_ok(
            &n1.ns,
            "ip",
            &["route", "add", "blackhole", cidr, "proto", "static"],
        )?;
    }
    // `all` mode: without the conntrack gate, a map entry for the prefix would carry
    // the pings past the blackhole.
    lab.start_agent(0, &["--fast-path", "all"])?
        .wait_ready(Duration::from_secs(15))?;
    lab.start_agent(1, &[])?
        .wait_ready(Duration::from_secs(15))?;
    let agent = lab.agent(0).expect("agent on n1");

    let status = agent.status()?;
    for cidr in &peer_cidrs {
        let shown = route_of(&n1.ns, cidr)?;
        assert!(
            shown.starts_with(&format!("blackhole {cidr} ")) && shown.contains("proto static"),
            "the foreign route to {cidr} was touched: {shown:?}"
        );
        let peer = peer(&status, cidr);
        assert_eq!(
            peer.foreign_route.as_deref(),
            Some("static"),
            "{cidr}: {peer:?}"
        );
    }
    assert_eq!(
        status.map_entries, 0,
        "foreign prefixes in the fast-path map"
    );
    let (from, to) = (&n1.pods[0], &n2.pods[0]);
    assert!(
        !ping(&from.ns, to.ip, 2, &[])?.status.success(),
        "pings got past the kernel's blackhole"
    );

    // The foreign route goes: hgw's own comes, and the fast path takes the prefix.
    run_in_ok(&n1.ns, "ip", &["route", "del", "blackhole", &n2.pod_cidr])?;
    wait_until(|| {
        let status = agent.status()?;
        Ok(
            route_of(&n1.ns, &n2.pod_cidr)?.contains(&format!("proto {HGW_ROUTE_PROTOCOL}"))
                && peer(&status, &n2.pod_cidr).foreign_route.is_none()
                && status.map_entries == 1,
        )
    })?;
    let out = ping(&from.ns, to.ip, 2, &[])?;
    assert!(
        out.status.success(),
        "no answer over hgw's route:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let first = nexthop_of(&n1.ns, &n2.pod_cidr)?;
    let on_nexthops = hgw_nexthops(&n1.ns)?;
    assert_eq!(
        on_nexthops.len(),
        1,
        "hgw's route on a nexthop of its own: {on_nexthops:?}"
    );

    // Someone replaces hgw's route: hgw lets go of the prefix.
    run_in_ok(
        &n1.ns,
        "ip",
        &[
            "route",
            "replace",
            "blackhole",
            &n2.pod_cidr,
            "proto",
            "static",
        ],
    )?;
    wait_until(|| {
        let status = agent.status()?;
        Ok(
            peer(&status, &n2.pod_cidr).foreign_route.as_deref() == Some("static")
                && status.map_entries == 0,
        )
    })?;
    assert!(
        route_of(&n1.ns, &n2.pod_cidr)?.starts_with("blackhole"),
        "hgw took the route back"
    );
    assert!(
        !ping(&from.ns, to.ip, 2, &[])?.status.success(),
        "pings got past the kernel's blackhole"
    );

    // The foreign route goes: hgw's comes back, on a new nexthop of its own (the one
    // it let go of is neither changed nor used again).
    run_in_ok(&n1.ns, "ip", &["route", "del", "blackhole", &n2.pod_cidr])?;
    wait_until(|| {
        Ok(route_of(&n1.ns, &n2.pod_cidr)?.contains(&format!("proto {HGW_ROUTE_PROTOCOL}")))
    })?;
    let second = nexthop_of(&n1.ns, &n2.pod_cidr)?;
    assert_ne!(
        first, second,
        "hgw's route came back on the nexthop it let go of"
    );

    // Someone puts a route of their own on hgw's nexthop: hgw lets go of the prefix,
    // and the nexthop stays, with that route on it.
    run_in_ok(
        &n1.ns,
        "ip",
        &[
            "route",
            "replace",
            &n2.pod_cidr,
            "nhid",
            &second,
            "proto",
            "static",
        ],
    )?;
    let let_go = format!(
        "hgw's route to {} was replaced: its nexthop {second} is no longer used",
        n2.pod_cidr
    );
    wait_until(|| {
        let status = agent.status()?;
        Ok(
            peer(&status, &n2.pod_cidr).foreign_route.as_deref() == Some("static")
                && agent.log().contains(&let_go),
        )
    })
    .with_context(|| format!("the agent did not say {let_go:?}:\n{}", agent.log()))?;
    let on_second = |when: &str| -> anyhow::Result<()> {
        let shown = route_of(&n1.ns, &n2.pod_cidr)?;
        anyhow::ensure!(
            shown.contains(&format!("nhid {second}")) && shown.contains("proto static"),
            "the foreign route on hgw's nexthop went {when}: {shown:?}"
        );
        Ok(())
    };
    on_second("when hgw let go of the prefix")?;

    // The next agent's start deletes the nexthop no route is on, and spares the one
    // the foreign route is on.
    lab.agent_mut(0).context("agent on n1")?.stop()?;
    lab.start_agent(0, &["--fast-path", "all"])?
        .wait_ready(Duration::from_secs(15))?;
    on_second("when the agent restarted")?;
    let left = hgw_nexthops(&n1.ns)?;
    assert!(
        matches!(left.as_slice(), [only] if only.starts_with(&format!("id {second} "))),
        "hgw's nexthops after the restart: {left:?}, expected only {second} (not {first})"
    );
    Ok(())
}

/// The nexthop id of the route to `cidr`.
fn nexthop_of(ns: &str, cidr: &str) -> anyhow::Result<String> {
    let shown = route_of(ns, cidr)?;
    let mut words = shown.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "nhid")
        .and_then(|_| words.next())
        .map(str::to_owned)
        .with_context(|| format!("no nexthop in {shown:?}"))
}

/// `ip route show exact CIDR` (either family), trimmed.
fn route_of(ns: &str, cidr: &str) -> anyhow::Result<String> {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    let out = run_in_ok(ns, "ip", &[family, "route", "show", "exact", cidr])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Polls `done` for up to 2 s (the agent follows route events in milliseconds).
fn wait_until(mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while !done()? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(2),
            "not converged after 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
