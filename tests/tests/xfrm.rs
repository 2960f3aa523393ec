//! IPsec (xfrm) policies over pod traffic. The kernel applies them to forwarded packets
//! after routing: a `dir out` policy encrypts (with no state yet, as an IPsec daemon
//! leaves it before its key exchange, it drops), a `dir fwd` policy with `action block`
//! or a default of `block` drops. A redirect would skip them, so the fast path runs
//! `off` while one covers pod traffic, in `established` and `all` mode alike.
//!
//! Each case runs a UDP flow from n1's pod to n2's, first with kernel routes alone
//! (`off`: the reference), then with the fast path (`established`; the first case
//! `all` too), in three steps:
//! 1. no policy: everything arrives (with the fast path, `fwd_to_peer` on n1 grows);
//! 2. the policy added on one node: nothing arrives, as with kernel routes alone, once
//!    that node's agent has taken its fast path off (within [`NOTICED`]: it looks
//!    every second), still running, its status saying why (`fast_path_note` names the
//!    policy);
//! 3. the policy gone and the agent restarted: the fast path carries the flow again.
//!
//! A policy elsewhere (the node's own traffic to another site, or `dir in`) leaves the
//! fast path alone. Before: with the fast path the flow arrived whole under each policy.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{Lab, UdpFlow, counter, run_in, run_in_ok};

const READY: Duration = Duration::from_secs(60);
const NOTICED: Duration = Duration::from_secs(5);
const BATCH: usize = 50;

/// A policy case: on which node, `ip xfrm` arguments to add it (given n1's and n2's
/// pod CIDRs and node addresses), and how to take it away again.
struct Case {
    what: &'static str,
    node: usize,
    add: fn(&Addrs) -> Vec<String>,
    remove: &'static [&'static str],
}

struct Addrs {
    cidr1: String,
    cidr2: String,
    ip1: String,
    ip2: String,
}

const CASES: &[Case] = &[
    Case {
        what: "an out policy on n1 whose ESP state is not there yet",
        node: 0,
        add: |a| {
            words(&format!(
                "policy add src {} dst {} dir out tmpl src {} dst {} proto esp mode tunnel",
                a.cidr1, a.cidr2, a.ip1, a.ip2
            ))
        },
        remove: &["policy", "flush"],
    },
    Case {
        what: "a fwd block policy on n2",
        node: 1,
        add: |a| {
            words(&format!(
                "policy add src {} dst {} dir fwd action block",
                a.cidr1, a.cidr2
            ))
        },
        remove: &["policy", "flush"],
    },
    Case {
        what: "a default of block for forwarded packets on n2",
        node: 1,
        add: |_| words("policy setdefault fwd block"),
        remove: &["policy", "setdefault", "fwd", "accept"],
    },
];

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

fn says_xfrm(note: Option<&str>) -> bool {
    note.is_some_and(|n| n.contains("IPsec (xfrm) policy"))
}

#[test]
fn the_fast_path_steps_aside_for_ipsec_policies_over_pod_traffic() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let addrs = Addrs {
        cidr1: lab.nodes[0].pod_cidr.clone(),
        cidr2: lab.nodes[1].pod_cidr.clone(),
        ip1: lab.nodes[0].uplink_ip.to_string(),
        ip2: lab.nodes[1].uplink_ip.to_string(),
    };
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        // `all` steps aside by the same check: once is enough.
        let modes: &[&str] = if i == 0 {
            &["off", "established", "all"]
        } else {
            &["off", "established"]
        };
        for &mode in modes {
            let what = format!("{mode}, {}", case.what);
            if let Err(e) = run_case(&mut lab, case, &addrs, mode, (&a, &b)) {
                failures.push(format!("{what}: {e:#}"));
            }
            let ns = lab.nodes[case.node].ns.clone();
            let _ = run_in(
                &ns,
                "ip",
                &["xfrm"]
                    .into_iter()
                    .chain(case.remove.iter().copied())
                    .collect::<Vec<_>>(),
            );
            for node in 0..2 {
                if let Some(agent) = lab.agent_mut(node) {
                    agent.stop()?;
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn run_case(
    lab: &mut Lab,
    case: &Case,
    addrs: &Addrs,
    mode: &str,
    (a, b): (&hgw_tests::Pod, &hgw_tests::Pod),
) -> anyhow::Result<()> {
    let fast = mode != "off";
    for node in 0..2 {
        lab.start_agent(node, &["--fast-path", mode])?;
    }
    for agent in lab.agents() {
        agent.wait_ready(READY)?;
    }
    let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
    let sent = |lab: &Lab, flow: &mut UdpFlow| -> anyhow::Result<(usize, u64)> {
        let before = lab.agent(0).context("n1's agent")?.status()?;
        let arrived = flow.send(BATCH)?;
        let after = lab.agent(0).context("n1's agent")?.status()?;
        Ok((
            arrived,
            counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer"),
        ))
    };
    // 1: no policy.
    let (arrived, carried) = sent(lab, &mut flow)?;
    eprintln!("{mode} before: {arrived}/{BATCH} arrived, fwd_to_peer +{carried}");
    ensure!(
        arrived == BATCH && (!fast || carried >= BATCH as u64),
        "before the policy: {arrived}/{BATCH} arrived, fwd_to_peer +{carried}"
    );
    // 2: the policy.
    let ns = lab.nodes[case.node].ns.clone();
    let mut args = vec!["xfrm".to_owned()];
    args.extend((case.add)(addrs));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_in_ok(&ns, "ip", &args)?;
    // Waited for (not yet judged: what matters first is where the packets go).
    let stepped_aside = if fast {
        let agent = lab.agent(case.node).context("the agent")?;
        Some(agent.wait_for(NOTICED, |s| s.fast_path == "off"))
    } else {
        None
    };
    let (arrived, carried) = sent(lab, &mut flow)?;
    eprintln!("{mode} with the policy: {arrived}/{BATCH} arrived, fwd_to_peer +{carried}");
    ensure!(
        arrived == 0,
        "with the policy: {arrived}/{BATCH} arrived (kernel routes alone drop them all)"
    );
    if let Some(stepped_aside) = stepped_aside {
        let status = stepped_aside.context("the agent did not take its fast path off")?;
        ensure!(
            says_xfrm(status.fast_path_note.as_deref()),
            "the status does not say why the fast path is off: {:?}",
            status.fast_path_note
        );
        let agent = lab.agent(case.node).context("the agent")?;
        ensure!(agent.is_running(), "the agent stopped");
    }
    // 3: gone, and the agent started again.
    let mut args = vec!["xfrm"];
    args.extend(case.remove.iter().copied());
    run_in_ok(&ns, "ip", &args)?;
    if fast {
        let agent = lab.agent_mut(case.node).context("the agent")?;
        ensure!(agent.stop()?.success(), "the agent did not exit 0");
        lab.start_agent(case.node, &["--fast-path", mode])?
            .wait_ready(READY)?;
    }
    let (arrived, carried) = sent(lab, &mut flow)?;
    eprintln!("{mode} after: {arrived}/{BATCH} arrived, fwd_to_peer +{carried}");
    ensure!(
        arrived == BATCH && (!fast || carried >= BATCH as u64),
        "without the policy again: {arrived}/{BATCH} arrived, fwd_to_peer +{carried}"
    );
    Ok(())
}

/// Policies that cannot meet pod traffic: the fast path stays.
#[test]
fn policies_elsewhere_leave_the_fast_path_alone() -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 1)?;
    let (a, b) = (lab.nodes[0].pods[0].clone(), lab.nodes[1].pods[0].clone());
    let n1 = lab.nodes[0].ns.clone();
    let (cidr1, cidr2) = (lab.nodes[0].pod_cidr.clone(), lab.nodes[1].pod_cidr.clone());
    let ip1 = lab.nodes[0].uplink_ip.to_string();
    run_in_ok(
        &n1,
        "ip",
        &[
            "xfrm",
            "policy",
            "add",
            "src",
            &ip1,
            "dst",
            "192.168.99.0/24",
            "dir",
            "out",
            "action",
            "block",
        ],
    )?;
    run_in_ok(
        &n1,
        "ip",
        &[
            "xfrm", "policy", "add", "src", &cidr2, "dst", &cidr1, "dir", "in", "action", "block",
        ],
    )?;
    lab.start_agents(&[], READY)?;
    let mut flow = UdpFlow::open(&a.ns, &b.ns, b.ip)?;
    let agent = lab.agent(0).context("n1's agent")?;
    let before = agent.status()?;
    let arrived = flow.send(BATCH)?;
    // A second's look at the policies has passed since the start.
    std::thread::sleep(Duration::from_millis(1500));
    let after = agent.status()?;
    ensure!(
        after.fast_path == "established" && after.fast_path_note.is_none(),
        "n1's agent with policies elsewhere: fast path {:?}, note {:?}",
        after.fast_path,
        after.fast_path_note
    );
    let carried = counter(&after, "ipv4.fwd_to_peer") - counter(&before, "ipv4.fwd_to_peer");
    ensure!(
        arrived == BATCH && carried >= BATCH as u64,
        "{arrived}/{BATCH} arrived, fwd_to_peer +{carried}"
    );
    Ok(())
}
