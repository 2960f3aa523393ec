//! NetworkPolicy in FORWARD holds beside the fast path (issue 9, tests 4), with
//! kube-proxy's `-m conntrack --ctstate INVALID -j DROP` on both nodes, in `established`
//! mode and, for the same answers, with `--fast-path off`:
//! - a policy controller's REJECT for one pod pair in FORWARD on the destination node
//!   (a chain of its own jumped to from FORWARD, as kube-router writes it) refuses that
//!   pair's connections, while another pair to the same pod flows, in `established` mode
//!   on the fast path (its counters grow by at least 90 % of the packets sent);
//! - FORWARD policy DROP without an accept for a pair stops its new connections, while
//!   a pair with an accept flows (on the fast path).
//!
//! A new TCP connection's SYN always goes to the kernel, so FORWARD judges it; the fast
//! path only carries flows conntrack has seen accepted both ways.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use hgw_tests::{
    CLUSTER_CIDR, Lab, Pod, add_kube_proxy_invalid_drop, count_sent_packets, counter, in_netns,
    invalid_drops, run_in_ok, sent_packets, tcp_transfer,
};

/// How long a connect may take before it counts as dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes sent over the allowed pair's connection.
const TRANSFER: usize = 1 << 20;
/// The policy controller's chain, named like kube-router's.
const POLICY_CHAIN: &str = "KUBE-ROUTER-FORWARD";

/// How a blocked pair's connect must fail.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Blocked {
    /// REJECT --reject-with tcp-reset: connection refused.
    Refused,
    /// DROP: no answer, the connect times out.
    TimedOut,
}

#[test]
fn reject_for_one_pod_pair_holds_while_another_pair_takes_the_fast_path() -> anyhow::Result<()> {
    policy_case(Blocked::Refused, |n2, blocked_from, to, first| {
        if !first {
            // The chain and its jump at the top of FORWARD stay across agent restarts.
            return Ok(());
        }
        iptables(n2, &["-N", POLICY_CHAIN])?;
        iptables(
            n2,
            &[
                "-I",
                "FORWARD",
                "1",
                "-m",
                "comment",
                "--comment",
                "kube-router netpol - TEMCG2JMHZYE7H7T",
                "-j",
                POLICY_CHAIN,
            ],
        )?;
        iptables(
            n2,
            &[
                "-A",
                POLICY_CHAIN,
                "-s",
                &blocked_from.ip.to_string(),
                "-d",
                &to.ip.to_string(),
                "-p",
                "tcp",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        )
    })
}

#[test]
fn forward_policy_drop_stops_new_connections_without_an_accept() -> anyhow::Result<()> {
    policy_case(Blocked::TimedOut, |n2, _blocked_from, _to, _first| {
        iptables(n2, &["-P", "FORWARD", "DROP"])?;
        // The agent's node setup accepts the whole cluster CIDR (again at every start);
        // a policy that denies by default has no such rule. The allowed pair gets its own
        // accepts (added by `policy_case`), the blocked pair none.
        for direction in ["-s", "-d"] {
            let rule = [
                direction,
                CLUSTER_CIDR,
                "-m",
                "comment",
                "--comment",
                "hgw",
                "-j",
                "ACCEPT",
            ];
            while iptables(n2, &[&["-C", "FORWARD"], &rule[..]].concat()).is_ok() {
                iptables(n2, &[&["-D", "FORWARD"], &rule[..]].concat())?;
            }
        }
        Ok(())
    })
}

/// Two nodes with two pods each; `policy` writes the rule that blocks n1p1 -> n2p1 on n2
/// (the destination node), after every agent start (`first` for the first). n1p2 ->
/// n2p1 is accepted. Runs both pairs with the agents in `established` mode, then in
/// `off` mode, and compares.
fn policy_case(
    blocked: Blocked,
    policy: impl Fn(&str, &Pod, &Pod, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut lab = Lab::up(2, 2)?;
    for node in &lab.nodes {
        add_kube_proxy_invalid_drop(&node.ns)?;
    }
    let (blocked_from, allowed_from) = (lab.nodes[0].pods[0].clone(), lab.nodes[0].pods[1].clone());
    let to = lab.nodes[1].pods[0].clone();
    let n2 = lab.nodes[1].ns.clone();
    // One segment per skb (no 64 KB GSO skbs over the veths): the 1 MB transfer is then
    // hundreds of packets, so the 90 % bound below means something.
    for pod in [&allowed_from, &to] {
        run_in_ok(&pod.ns, "ip", &["link", "set", "eth0", "gso_max_segs", "1"])?;
    }
    for mode in ["established", "off"] {
        // Agents first: their node setup appends the cluster accepts the policy may remove.
        for node in 0..2 {
            lab.start_agent(node, &["--fast-path", mode])?;
        }
        for agent in lab.agents() {
            agent.wait_ready(Duration::from_secs(15))?;
        }
        policy(&n2, &blocked_from, &to, mode == "established")?;
        if mode == "established" {
            // Stateless accepts for the allowed pair, both ways, as a policy would add
            // (ahead of nothing else: with policy ACCEPT they change nothing).
            for (s, d) in [(&allowed_from, &to), (&to, &allowed_from)] {
                iptables(
                    &n2,
                    &[
                        "-A",
                        "FORWARD",
                        "-s",
                        &s.ip.to_string(),
                        "-d",
                        &d.ip.to_string(),
                        "-j",
                        "ACCEPT",
                    ],
                )?;
            }
            count_sent_packets(&allowed_from.ns, &["-p", "tcp", "-d", &to.ip.to_string()])?;
            count_sent_packets(&to.ns, &["-p", "tcp", "-d", &allowed_from.ip.to_string()])?;
        }

        let before = lab.statuses()?;
        let (sent_out0, sent_back0) = (sent_packets(&allowed_from.ns)?, sent_packets(&to.ns)?);
        // The blocked pair, before and after the allowed pair's transfer.
        expect_blocked(&blocked_from, &to, 6001, blocked, mode)?;
        tcp_transfer(&allowed_from.ns, &to.ns, to.ip, TRANSFER)
            .with_context(|| format!("{mode}: the allowed pair's transfer"))?;
        expect_blocked(&blocked_from, &to, 6002, blocked, mode)?;
        let after = lab.statuses()?;
        let sent_out = sent_packets(&allowed_from.ns)? - sent_out0;
        let sent_back = sent_packets(&to.ns)? - sent_back0;
        let delta =
            |node: usize, name: &str| counter(&after[node], name) - counter(&before[node], name);
        eprintln!(
            "{mode}: allowed pair sent {sent_out} packets out, {sent_back} back; n1 fwd_to_peer +{} fwd_to_pod +{}; n2 fwd_to_peer +{} fwd_to_pod +{}; n2 pass_tcp_syn +{}",
            delta(0, "ipv4.fwd_to_peer"),
            delta(0, "ipv4.fwd_to_pod"),
            delta(1, "ipv4.fwd_to_peer"),
            delta(1, "ipv4.fwd_to_pod"),
            delta(1, "ipv4.pass_tcp_syn"),
        );
        if mode == "established" {
            for (what, got, sent) in [
                ("n1 fwd_to_peer", delta(0, "ipv4.fwd_to_peer"), sent_out),
                ("n2 fwd_to_pod", delta(1, "ipv4.fwd_to_pod"), sent_out),
                ("n2 fwd_to_peer", delta(1, "ipv4.fwd_to_peer"), sent_back),
                ("n1 fwd_to_pod", delta(0, "ipv4.fwd_to_pod"), sent_back),
            ] {
                ensure!(
                    got * 10 >= sent * 9,
                    "{what} grew by {got}: the fast path carried less than 90 % of the allowed pair's {sent} packets"
                );
            }
            // The blocked SYNs reached n2's kernel (and its FORWARD chain) through the
            // program, not around it.
            ensure!(
                delta(1, "ipv4.pass_tcp_syn") >= 2,
                "n2 handed {} SYNs to the kernel, expected the blocked pair's too",
                delta(1, "ipv4.pass_tcp_syn")
            );
        } else {
            ensure!(
                delta(0, "ipv4.fwd_to_peer") + delta(1, "ipv4.fwd_to_pod") == 0,
                "off: the fast path forwarded packets"
            );
        }
    }
    for node in &lab.nodes {
        let drops = invalid_drops(&node.ns)?;
        ensure!(
            drops == 0,
            "{}: the INVALID rule dropped {drops} packets",
            node.ns
        );
    }
    Ok(())
}

/// A connect from `from` to `to`:`port` must fail the way `blocked` says: refused by a
/// REJECT, or timed out by a DROP. A listener waits there, so only the policy stops it.
fn expect_blocked(
    from: &Pod,
    to: &Pod,
    port: u16,
    blocked: Blocked,
    mode: &str,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from((to.ip, port));
    let _listener = in_netns(&to.ns, || TcpListener::bind(addr))?.context("listening")?;
    let result = in_netns(&from.ns, || {
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
    })?;
    let kind = match result {
        Ok(_) => anyhow::bail!(
            "{mode}: {} -> {addr} connected: the policy did not hold",
            from.ip
        ),
        Err(e) => e.kind(),
    };
    let expected = match blocked {
        Blocked::Refused => kind == ErrorKind::ConnectionRefused,
        Blocked::TimedOut => matches!(kind, ErrorKind::TimedOut | ErrorKind::WouldBlock),
    };
    ensure!(
        expected,
        "{mode}: {} -> {addr} failed with {kind:?}, expected {blocked:?}",
        from.ip
    );
    Ok(())
}

/// `iptables -w ARGS` in node `ns`.
fn iptables(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run_in_ok(ns, "iptables", &all)?;
    Ok(())
}
