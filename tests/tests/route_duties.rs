//! The admin's routes and rules decide where pod traffic goes, with hgw as with kernel
//! routes alone (issue 17, tests 3).
//!
//! Two nodes on the lab's switch as usual, and a router namespace joined to each node
//! by a second link (n<i> `eth1` 172.30.i.1/24 <-> router `r<i>` 172.30.i.254/24; the
//! router routes each pod CIDR to its node and counts every pod-to-pod UDP datagram it
//! forwards, per source and destination, in its FORWARD chain). Each case runs answered
//! UDP flows between pods of the two nodes, in `off` (kernel routes alone) and then in
//! `established` mode, in three steps:
//! 1. before the admin's change: everything arrives, nothing crosses the router, and in
//!    `established` each flow is on the fast path (`fwd_to_peer` on its sending node
//!    and `fwd_to_pod` on its receiving node grow by at least its datagrams);
//! 2. the change made while the flows run, the same flows go on: a rerouted flow crosses
//!    the router with all but at most [`IN_FLIGHT`] of its datagrams, a blackholed or
//!    refused one arrives with at most that many, and in `established` the fast path
//!    carries at most that many of either (the sending node's for a rerouted or
//!    blackholed flow, the receiving node's for a refused one: it moves on its next
//!    packets); a flow the change does not touch still arrives directly, on the fast
//!    path of both nodes;
//! 3. new flows opened after the change go the same ways from their first packet (but
//!    for a flow whose answers the change blackholes: it cannot be opened).
//!
//! The cases: (a) a more specific route (/32) for one remote pod through the router, on
//! each node for the other's pod; (b) an `ip rule` that sends one pod's traffic (from
//! it on its node, to it on the other) to a table of its own, whose routes go through
//! the router, while the node's other pod talks directly; (c) a blackhole /32 for one
//! remote pod, while the other direction flows; (d) on a node whose reverse-path filter
//! is strict (`rp_filter` 1), a /32 for a remote pod through the router: that pod's
//! packets still come in on the uplink, where the kernel now drops them, and in loose
//! mode (2) it does not; and the same strict node where an `ip rule iif cni0` sends
//! the way back through the router (the kernel looks the way back up as coming in from
//! the device a forwarded packet leaves by).
//!
//! Before issue 17's fix, `established`: the rerouted flows crossed the router with none
//! (or only their first) of their datagrams, and the blackholed flow arrived. Before the
//! programs checked sources, (d)'s strict node took all of them on the fast path.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, Pod, Status, UdpFlow, counter, run_in_ok, udp_exchange};

/// Datagrams per flow and step.
const BATCH: usize = 100;
/// Datagrams of a flow that may still take the old way after the change: those the
/// agent may carry before its netlink event for the change arrives.
const IN_FLIGHT: u64 = 3;
/// The routing table case (b) sends one pod's traffic to.
const TABLE: &str = "100";

/// Where a flow must go once the change is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Straight to the other node, on the fast path in `established`.
    Direct,
    /// Through the router.
    Router,
    /// Nowhere: a blackhole on its sending node.
    Dropped,
    /// Nowhere: the receiving node's reverse-path filter drops it (the sending node's
    /// fast path may carry it there).
    Refused,
}

/// One flow of a case: from pod (node, pod index) to pod, and where it goes after the
/// change.
struct FlowCase {
    from: (usize, usize),
    to: (usize, usize),
    way: Way,
}

#[test]
fn a_more_specific_route_through_another_router_takes_the_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let router = add_router(&mut lab)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let (n1, n2) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
    let to_b = format!("{}/32", b.ip);
    let to_a = format!("{}/32", a.ip);
    let change = vec![
        (
            n1.clone(),
            vec!["route", "add", &to_b, "via", "172.30.1.254", "dev", "eth1"],
        ),
        (
            n2.clone(),
            vec!["route", "add", &to_a, "via", "172.30.2.254", "dev", "eth1"],
        ),
    ];
    let undo = vec![
        (n1.clone(), vec!["route", "del", &to_b]),
        (n2.clone(), vec!["route", "del", &to_a]),
    ];
    run_case(
        &mut lab,
        &router,
        &[
            FlowCase {
                from: (0, 0),
                to: (1, 0),
                way: Way::Router,
            },
            FlowCase {
                from: (1, 0),
                to: (0, 0),
                way: Way::Router,
            },
        ],
        &change,
        &undo,
    )
}

#[test]
fn an_ip_rule_sends_one_pods_traffic_through_another_table() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 2)?;
    let router = add_router(&mut lab)?;
    let a = lab.nodes[0].pods[0].clone();
    let (n1, n2) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
    let (cidr1, cidr2) = (lab.nodes[0].pod_cidr.clone(), lab.nodes[1].pod_cidr.clone());
    // The tables' routes exist before the rules, as an admin would write them; only the
    // rules change where traffic goes.
    route_in_table(&n1, &cidr2, 1)?;
    route_in_table(&n2, &cidr1, 2)?;
    let a_ip = a.ip.to_string();
    let change = vec![
        (
            n1.clone(),
            vec!["rule", "add", "pref", "100", "from", &a_ip, "lookup", TABLE],
        ),
        (
            n2.clone(),
            vec!["rule", "add", "pref", "100", "to", &a_ip, "lookup", TABLE],
        ),
    ];
    let undo = vec![
        (n1.clone(), vec!["rule", "del", "pref", "100"]),
        (n2.clone(), vec!["rule", "del", "pref", "100"]),
    ];
    run_case(
        &mut lab,
        &router,
        &[
            FlowCase {
                from: (0, 0),
                to: (1, 0),
                way: Way::Router,
            },
            FlowCase {
                from: (1, 0),
                to: (0, 0),
                way: Way::Router,
            },
            // n1's other pod: neither rule matches it.
            FlowCase {
                from: (0, 1),
                to: (1, 0),
                way: Way::Direct,
            },
            FlowCase {
                from: (1, 0),
                to: (0, 1),
                way: Way::Direct,
            },
        ],
        &change,
        &undo,
    )
}

#[test]
fn a_blackhole_for_a_remote_pod_drops_its_flow() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let router = add_router(&mut lab)?;
    let b = lab.nodes[1].pods[0].clone();
    let n1 = lab.nodes[0].ns.clone();
    let to_b = format!("{}/32", b.ip);
    run_case(
        &mut lab,
        &router,
        &[
            FlowCase {
                from: (0, 0),
                to: (1, 0),
                way: Way::Dropped,
            },
            // The other direction is no business of n1's blackhole.
            FlowCase {
                from: (1, 0),
                to: (0, 0),
                way: Way::Direct,
            },
        ],
        &[(n1.clone(), vec!["route", "add", "blackhole", &to_b])],
        &[(n1.clone(), vec!["route", "del", "blackhole", &to_b])],
    )
}

#[test]
fn a_strict_reverse_path_filter_drops_a_pod_whose_way_back_moved() -> anyhow::Result<()> {
    reverse_path_case("1", Way::Refused, WayBack::Route)
}

#[test]
fn a_loose_reverse_path_filter_keeps_a_pod_whose_way_back_moved() -> anyhow::Result<()> {
    reverse_path_case("2", Way::Direct, WayBack::Route)
}

/// The kernel looks a forwarded packet's way back up as coming in from the device the
/// packet leaves by (cni0 here): an `ip rule iif cni0` decides it.
#[test]
fn a_strict_reverse_path_filter_follows_a_rule_for_the_way_back() -> anyhow::Result<()> {
    reverse_path_case("1", Way::Refused, WayBack::Rule)
}

/// (d) at run time: n2's way back to n1's pod through the router from the start, and
/// `rp_filter` 0, so the kernel takes that pod's packets on n2's uplink and so does the
/// fast path; set to strict on the uplink alone (`conf.eth0`, the kernel takes the
/// larger of it and `conf.all`) while the flow runs, the fast path on n2 lets go of it
/// once the agent shows the change (it reads the sysctls every second), and the flow
/// is dropped (the kernel's answer in the strict case above); set back to 0, the flow
/// is back on the fast path.
#[test]
fn an_rp_filter_set_while_the_agent_runs_applies_to_running_flows() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    add_router(&mut lab)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let n2 = lab.nodes[1].ns.clone();
    let to_a = format!("{}/32", a.ip);
    run_in_ok(
        &n2,
        "ip",
        &["route", "add", &to_a, "via", "172.30.2.254", "dev", "eth1"],
    )?;
    for node in 0..2 {
        lab.start_agent(node, &["--fast-path", "established"])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(Duration::from_secs(15))?;
    }
    let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
    let mut failures = Vec::new();
    for (value, mode, taken) in [
        ("0", "off", true),
        ("1", "strict", false),
        ("0", "off", true),
    ] {
        run_in_ok(
            &n2,
            "sysctl",
            &["-w", &format!("net.ipv4.conf.eth0.rp_filter={value}")],
        )?;
        let agent = lab.agent(1).context("n2's agent")?;
        agent.wait_for(Duration::from_secs(3), |s| {
            s.rp_filter.get("eth0").map(String::as_str) == Some(mode)
        })?;
        let before = agent.status()?;
        let arrived = flow.send(BATCH)?;
        let fast_in =
            counter(&agent.status()?, "ipv4.fwd_to_pod") - counter(&before, "ipv4.fwd_to_pod");
        eprintln!("rp_filter {value}: {arrived}/{BATCH} arrived, fwd_to_pod +{fast_in} on n2");
        let batch = BATCH as u64;
        let ok = if taken {
            arrived == BATCH && fast_in >= batch
        } else {
            arrived == 0 && fast_in == 0
        };
        if !ok {
            failures.push(format!(
                "rp_filter {value} on n2's eth0: {arrived}/{BATCH} arrived, fwd_to_pod +{fast_in}"
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// How n2's way back to n1's pod moves to the router in (d).
#[derive(Clone, Copy)]
enum WayBack {
    /// A /32 for the pod through it.
    Route,
    /// `ip rule iif cni0` to a table with n1's pod CIDR through it (made beforehand).
    Rule,
}

/// (d): n2's `rp_filter` set to `mode` before the agents start; then n2's way back to
/// n1's pod goes through the router (`how`), while that pod's packets still come in on
/// n2's uplink (`a_to_b`), and n2's own to it cross the router.
fn reverse_path_case(mode: &str, a_to_b: Way, how: WayBack) -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let router = add_router(&mut lab)?;
    let a = lab.nodes[0].pods[0].clone();
    let n2 = lab.nodes[1].ns.clone();
    let cidr1 = lab.nodes[0].pod_cidr.clone();
    run_in_ok(
        &n2,
        "sysctl",
        &["-w", &format!("net.ipv4.conf.all.rp_filter={mode}")],
    )?;
    let to_a = format!("{}/32", a.ip);
    let (change, undo) = match how {
        WayBack::Route => (
            vec!["route", "add", &to_a, "via", "172.30.2.254", "dev", "eth1"],
            vec!["route", "del", &to_a],
        ),
        WayBack::Rule => {
            route_in_table(&n2, &cidr1, 2)?;
            (
                vec!["rule", "add", "pref", "100", "iif", "cni0", "lookup", TABLE],
                vec!["rule", "del", "pref", "100"],
            )
        }
    };
    run_case(
        &mut lab,
        &router,
        &[
            FlowCase {
                from: (0, 0),
                to: (1, 0),
                way: a_to_b,
            },
            FlowCase {
                from: (1, 0),
                to: (0, 0),
                way: Way::Router,
            },
        ],
        &[(n2.clone(), change)],
        &[(n2.clone(), undo)],
    )
}

/// `ip route add CIDR via <the router> dev eth1 table TABLE` on node `n` (1-based), as an
/// admin writes a table's routes before the rules that use it.
fn route_in_table(ns: &str, cidr: &str, n: usize) -> anyhow::Result<()> {
    let via = format!("172.30.{n}.254");
    run_in_ok(
        ns,
        "ip",
        &[
            "route", "add", cidr, "via", &via, "dev", "eth1", "table", TABLE,
        ],
    )?;
    Ok(())
}

/// The router namespace `<id>-r` and the second links, n<i> eth1 <-> r r<i>.
fn add_router(lab: &mut Lab) -> anyhow::Result<String> {
    let r = lab.add_extra_namespace("r")?;
    for (i, node) in lab.nodes.iter().enumerate() {
        let n = i + 1;
        let (side, node_ip, router_ip) = (
            format!("r{n}"),
            format!("172.30.{n}.1/24"),
            format!("172.30.{n}.254/24"),
        );
        // Made in the node with its peer moved straight into the router namespace.
        run_in_ok(
            &node.ns,
            "ip",
            &[
                "link", "add", "eth1", "type", "veth", "peer", "name", &side, "netns", &r,
            ],
        )?;
        run_in_ok(&node.ns, "ip", &["addr", "add", &node_ip, "dev", "eth1"])?;
        run_in_ok(&node.ns, "ip", &["link", "set", "eth1", "up"])?;
        run_in_ok(&r, "ip", &["addr", "add", &router_ip, "dev", &side])?;
        run_in_ok(&r, "ip", &["link", "set", &side, "up"])?;
        run_in_ok(
            &r,
            "ip",
            &[
                "route",
                "add",
                &node.pod_cidr,
                "via",
                &format!("172.30.{n}.1"),
            ],
        )?;
    }
    run_in_ok(&r, "sysctl", &["-w", "net.ipv4.ip_forward=1"])?;
    // A counting rule (no target) for every ordered pair of pods on different nodes.
    for (from, to) in lab.cross_node_pod_pairs() {
        run_in_ok(
            &r,
            "iptables",
            &[
                "-w",
                "-A",
                "FORWARD",
                "-s",
                &from.ip.to_string(),
                "-d",
                &to.ip.to_string(),
                "-p",
                "udp",
            ],
        )?;
    }
    Ok(r)
}

/// UDP datagrams from `from` to `to` the router forwarded so far.
fn crossed(router: &str, from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<u64> {
    let out = run_in_ok(router, "iptables", &["-w", "-v", "-S", "FORWARD"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `-A FORWARD -s 10.244.1.11/32 -d 10.244.2.11/32 -p udp -c 12 840`
    let rule = format!("-A FORWARD -s {from}/32 -d {to}/32 -p udp -c ");
    text.lines()
        .find_map(|l| l.strip_prefix(&rule))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter for {from} -> {to} in the router's FORWARD:\n{text}"))
}

/// What one flow did in one batch.
struct Seen {
    arrived: usize,
    crossed: u64,
    /// Growth of `fwd_to_peer` on the sending node.
    fast: u64,
    /// Growth of `fwd_to_pod` on the receiving node.
    fast_in: u64,
}

/// One batch of `flow`: datagrams that arrived, that crossed the router, that the
/// sending and the receiving node's fast path took. Flows are sent one at a time, so
/// each node's counters grow by one flow's packets only.
fn batch(
    lab: &Lab,
    router: &str,
    (from_node, to_node): (usize, usize),
    from: &Pod,
    to: &Pod,
    send: impl FnOnce() -> anyhow::Result<usize>,
) -> anyhow::Result<Seen> {
    let before: Vec<Status> = lab.statuses()?;
    let crossed0 = crossed(router, from.ip, to.ip)?;
    let arrived = send()?;
    let after = lab.statuses()?;
    Ok(Seen {
        arrived,
        crossed: crossed(router, from.ip, to.ip)? - crossed0,
        fast: counter(&after[from_node], "ipv4.fwd_to_peer")
            - counter(&before[from_node], "ipv4.fwd_to_peer"),
        fast_in: counter(&after[to_node], "ipv4.fwd_to_pod")
            - counter(&before[to_node], "ipv4.fwd_to_pod"),
    })
}

fn run_case(
    lab: &mut Lab,
    router: &str,
    flows: &[FlowCase],
    change: &[(String, Vec<&str>)],
    undo: &[(String, Vec<&str>)],
) -> anyhow::Result<()> {
    let pod = |lab: &Lab, (node, j): (usize, usize)| lab.nodes[node].pods[j].clone();
    let mut failures = Vec::new();
    for mode in ["off", "established"] {
        for node in 0..2 {
            lab.start_agent(node, &["--fast-path", mode])?;
        }
        for agent in lab.agents() {
            agent.wait_ready(Duration::from_secs(15))?;
        }
        let mut open = Vec::new();
        for f in flows {
            let (from, to) = (pod(lab, f.from), pod(lab, f.to));
            open.push(UdpFlow::open(&from.ns, &to.ns, to.ip)?);
        }

        // 1: before the change, every flow direct (and fast).
        for (f, flow) in flows.iter().zip(open.iter_mut()) {
            let (from, to) = (pod(lab, f.from), pod(lab, f.to));
            let seen = batch(lab, router, (f.from.0, f.to.0), &from, &to, || {
                flow.send(BATCH)
            })?;
            let what = format!("{mode} before: {} -> {}", from.ip, to.ip);
            eprintln!(
                "{what}: {}/{BATCH} arrived, {} crossed the router, fwd_to_peer +{}, fwd_to_pod +{}",
                seen.arrived, seen.crossed, seen.fast, seen.fast_in
            );
            ensure!(
                seen.arrived == BATCH && seen.crossed == 0,
                "{what}: {} of {BATCH} arrived, {} crossed the router",
                seen.arrived,
                seen.crossed
            );
            if mode == "established" {
                ensure!(
                    seen.fast >= BATCH as u64 && seen.fast_in >= BATCH as u64,
                    "{what}: fwd_to_peer grew by {} and fwd_to_pod by {} for {BATCH} datagrams: not on the fast path to begin with",
                    seen.fast,
                    seen.fast_in
                );
            }
        }

        for (ns, args) in change {
            run_in_ok(ns, "ip", args)?;
        }
        // 2: the same flows, right after the change; 3: new flows.
        for step in ["running", "new"] {
            for (f, flow) in flows.iter().zip(open.iter_mut()) {
                let (from, to) = (pod(lab, f.from), pod(lab, f.to));
                // A new flow is opened with an answer; one whose answers the change
                // blackholes cannot be (step 2 showed where its datagrams go).
                let answers_dropped = flows.iter().any(|g| {
                    matches!(g.way, Way::Dropped | Way::Refused) && g.from == f.to && g.to == f.from
                });
                if step == "new" && answers_dropped {
                    continue;
                }
                let seen = if step == "running" {
                    batch(lab, router, (f.from.0, f.to.0), &from, &to, || {
                        flow.send(BATCH)
                    })?
                } else if matches!(f.way, Way::Dropped | Way::Refused) {
                    // Nothing would answer a new flow's first datagram: one way.
                    batch(lab, router, (f.from.0, f.to.0), &from, &to, || {
                        udp_exchange(&from.ns, &to.ns, to.ip, BATCH)
                    })?
                } else {
                    let mut fresh = UdpFlow::open(&from.ns, &to.ns, to.ip)
                        .with_context(|| format!("{mode}: a new flow {} -> {}", from.ip, to.ip))?;
                    batch(lab, router, (f.from.0, f.to.0), &from, &to, || {
                        fresh.send(BATCH)
                    })?
                };
                let what = format!("{mode} {step} flow {} -> {} ({:?})", from.ip, to.ip, f.way);
                eprintln!(
                    "{what}: {}/{BATCH} arrived, {} crossed the router, fwd_to_peer +{}, fwd_to_pod +{}",
                    seen.arrived, seen.crossed, seen.fast, seen.fast_in
                );
                let batch = BATCH as u64;
                let arrived = seen.arrived as u64;
                let ok = match f.way {
                    Way::Direct => {
                        arrived == batch
                            && seen.crossed == 0
                            && (mode == "off" || (seen.fast >= batch && seen.fast_in >= batch))
                    }
                    Way::Router => {
                        arrived == batch
                            && seen.crossed + IN_FLIGHT >= batch
                            && (mode == "off" || seen.fast <= IN_FLIGHT)
                    }
                    Way::Dropped => {
                        arrived <= IN_FLIGHT
                            && seen.crossed == 0
                            && (mode == "off" || seen.fast <= IN_FLIGHT)
                    }
                    Way::Refused => {
                        arrived <= IN_FLIGHT
                            && seen.crossed == 0
                            && (mode == "off" || seen.fast_in <= IN_FLIGHT)
                    }
                };
                if !ok {
                    failures.push(format!(
                        "{what}: {arrived}/{batch} arrived, {} crossed the router, fwd_to_peer +{}, fwd_to_pod +{}",
                        seen.crossed, seen.fast, seen.fast_in
                    ));
                }
            }
        }
        for (ns, args) in undo {
            run_in_ok(ns, "ip", args)?;
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
