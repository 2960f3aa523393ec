//! `cargo xtask demo`: a 3-node, 2-pods-per-node dual-stack lab, one agent per node,
//! traffic over IPv4 and IPv6 between every pair of pods on different nodes, and the
//! agents' counters, per family, to show which path the traffic took. The agents run in
//! the default mode, `established`: TCP and UDP take the fast path once conntrack has
//! accepted their flow (the UDP exchange gets an answer before its counted datagrams),
//! pings always go to the kernel. The lab is torn down on every exit: success, failure
//! and Ctrl-C.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use hgw_tests::{Lab, Status, counter_sum, ping, tcp_transfer, udp_replied_exchange};

use crate::util::Interrupt;

const NODES: usize = 3;
const PODS: usize = 2;
const PINGS: u32 = 3;
const TCP_BYTES: usize = 1 << 20;
const UDP_PACKETS: usize = 100;
/// TCP and UDP run for every STRIDE-th pair only: enough to cover each node pair.
const BULK_STRIDE: usize = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One line of the results table.
struct Check {
    what: String,
    /// "ipv4" or "ipv6", as the agents' counters name the families.
    family: &'static str,
    from: IpAddr,
    to: IpAddr,
    result: anyhow::Result<String>,
}

/// Both addresses of a pod pair, one family at a time: (family, from, to).
fn families(from: &hgw_tests::Pod, to: &hgw_tests::Pod) -> [(&'static str, IpAddr, IpAddr); 2] {
    [
        ("ipv4", from.ip.into(), to.ip.into()),
        ("ipv6", from.ip6.into(), to.ip6.into()),
    ]
}

pub fn demo() -> anyhow::Result<ExitCode> {
    // Before anything is built, so an interrupt during the build is noticed too.
    let interrupt = Interrupt::install("cleaning up after the current step")?;
    crate::build()?;
    interrupt.check()?;

    let mut lab = Lab::up(NODES, PODS)?;
    println!("lab {}: {} namespaces", lab.id, lab.namespaces().len());
    // From here on `lab` is dropped on every return path, which cleans up.
    let mode = start_agents(&mut lab, &interrupt)?;
    let before = lab.statuses()?;

    let checks = run_traffic(&lab, &interrupt)?;
    let after = lab.statuses()?;
    print_checks(&checks);
    print_counters(&lab, &before, &after);

    let failed = checks.iter().filter(|c| c.result.is_err()).count();
    let fast_path_ok = judge_counters(&mode, &checks, &before, &after);
    drop(lab);
    println!("\nlab removed");
    if failed > 0 || !fast_path_ok {
        println!("demo: FAILED ({failed} of {} checks failed)", checks.len());
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "demo: all {} checks passed, traffic took the fast path (mode {mode})",
        checks.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts the agents in their default mode; returns that mode (`fast_path` in their
/// status), which must be the same on every node.
fn start_agents(lab: &mut Lab, interrupt: &Interrupt) -> anyhow::Result<String> {
    for node in 0..lab.nodes.len() {
        lab.start_agent(node, &[])?;
    }
    let mut modes = Vec::new();
    for agent in lab.agents() {
        interrupt.check()?;
        let status = agent.wait_ready(READY_TIMEOUT)?;
        let mode = status.fast_path;
        println!(
            "agent on {}: ready (pid {}), fast path mode: {mode}",
            lab.nodes[agent.node].name,
            agent.pid()
        );
        modes.push(mode);
    }
    modes.dedup();
    match modes.as_slice() {
        [mode] => Ok(mode.clone()),
        _ => bail!("the agents run in different modes: {modes:?}"),
    }
}

fn run_traffic(lab: &Lab, interrupt: &Interrupt) -> anyhow::Result<Vec<Check>> {
    let pairs = lab.cross_node_pod_pairs();
    let mut checks = Vec::new();
    for (from, to) in &pairs {
        for (family, from_ip, to_ip) in families(from, to) {
            interrupt.check()?;
            let result = ping(&from.ns, to_ip, PINGS, &[]).and_then(|out| {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let summary = stdout
                    .lines()
                    .find(|l| l.contains("packets transmitted"))
                    .unwrap_or("")
                    .to_owned();
                if out.status.success() {
                    Ok(summary)
                } else {
                    bail!("{summary}")
                }
            });
            checks.push(Check {
                what: format!("ping x{PINGS}"),
                family,
                from: from_ip,
                to: to_ip,
                result,
            });
        }
    }
    for (from, to) in pairs.iter().step_by(BULK_STRIDE) {
        for (family, from_ip, to_ip) in families(from, to) {
            interrupt.check()?;
            let result = tcp_transfer(&from.ns, &to.ns, to_ip, TCP_BYTES)
                .map(|()| format!("{TCP_BYTES} bytes intact"));
            checks.push(Check {
                what: "tcp 1 MiB".into(),
                family,
                from: from_ip,
                to: to_ip,
                result,
            });
            // Answered first, so conntrack has accepted the flow before the counted
            // datagrams go.
            let result = udp_replied_exchange(&from.ns, &to.ns, to_ip, UDP_PACKETS).and_then(|n| {
                let line = format!("{n}/{UDP_PACKETS} datagrams");
                if n == UDP_PACKETS {
                    Ok(line)
                } else {
                    bail!("{line}")
                }
            });
            checks.push(Check {
                what: format!("udp x{UDP_PACKETS}"),
                family,
                from: from_ip,
                to: to_ip,
                result,
            });
        }
    }
    Ok(checks)
}

fn print_checks(checks: &[Check]) {
    println!(
        "\n{:<10} {:<15} {:<15} {:<5} detail",
        "check", "from", "to", "ok?"
    );
    for c in checks {
        let (mark, detail) = match &c.result {
            Ok(detail) => ("ok", detail.clone()),
            Err(e) => ("FAIL", format!("{e:#}")),
        };
        println!(
            "{:<10} {:<15} {:<15} {mark:<5} {detail}",
            c.what,
            c.from.to_string(),
            c.to.to_string()
        );
    }
}

/// Counter growth per node, for every counter any agent reports (`FAMILY.NAME`).
fn print_counters(lab: &Lab, before: &[Status], after: &[Status]) {
    let mut names: Vec<String> = after
        .iter()
        .flat_map(|s| &s.counters)
        .flat_map(|(family, counters)| counters.keys().map(move |name| format!("{family}.{name}")))
        .collect();
    names.sort();
    names.dedup();
    print!("\n{:<28}", "counter (growth)");
    for agent in lab.agents() {
        print!(" {:>10}", lab.nodes[agent.node].name);
    }
    println!();
    for name in &names {
        print!("{name:<28}");
        for (b, a) in before.iter().zip(after) {
            let grown = hgw_tests::counter(a, name).saturating_sub(hgw_tests::counter(b, name));
            print!(" {grown:>10}");
        }
        println!();
    }
}

/// Whether the counters show the traffic took the fast path, per family. Each UDP
/// datagram after the answer crosses one bridge-side program (`fwd_to_peer`) and one
/// uplink-side program (`fwd_to_pod`), and so does each TCP data segment after the
/// handshake (segments coalesce, GSO: at least one per 64 KiB). Pings: in `established`
/// mode every echo request and reply meets both programs and goes to the kernel
/// (`pass_ct_proto`); in `all` mode they take the fast path like the datagrams.
fn judge_counters(mode: &str, checks: &[Check], before: &[Status], after: &[Status]) -> bool {
    let mut ok = true;
    let icmp_is_fast = mode == "all";
    for family in ["ipv4", "ipv6"] {
        let passed = |kind: &str| {
            checks
                .iter()
                .filter(|c| c.family == family && c.what.starts_with(kind) && c.result.is_ok())
                .count() as u64
        };
        let echoes = passed("ping") * u64::from(PINGS) * 2;
        let flows = passed("udp") * UDP_PACKETS as u64 + passed("tcp") * (TCP_BYTES as u64 / 65536);
        let mut expect = |name: &str, expected: u64, low: &str| {
            let name = format!("{family}.{name}");
            let grown = counter_sum(after, &name).saturating_sub(counter_sum(before, &name));
            let good = grown >= expected && grown > 0;
            let verdict = if good { "ok" } else { low };
            println!("{name}: grew by {grown}, expected at least {expected}: {verdict}");
            ok &= good;
        };
        for name in ["fwd_to_peer", "fwd_to_pod"] {
            let expected = flows + if icmp_is_fast { echoes } else { 0 };
            expect(name, expected, "TOO LOW: not the fast path");
        }
        if mode == "established" {
            expect(
                "pass_ct_proto",
                echoes * 2,
                "TOO LOW: pings did not reach the conntrack rule",
            );
        }
    }
    ok
}
