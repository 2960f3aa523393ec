//! What the flow tests (policy, long flows, connection close) read and write in the lab:
//! kube-proxy's INVALID drop on a node, conntrack sysctls and entries, and exact counts of
//! the packets a pod sent, taken by the pod's own netfilter (an independent count to hold
//! the agents' fast-path counters against).

use anyhow::{Context as _, bail};

use crate::netns::run_in_ok;

/// Comment on the pod-side counting rules of [`count_sent_packets`].
const SENT_COMMENT: &str = "hgw-lab-sent";

/// Adds kube-proxy's conntrack INVALID drop to node `ns` the way kube-proxy (iptables
/// mode) writes it: a `KUBE-FORWARD` chain jumped to from the top of FORWARD, whose
/// first rule drops what conntrack judges INVALID.
pub fn add_kube_proxy_invalid_drop(ns: &str) -> anyhow::Result<()> {
    run_in_ok(ns, "iptables", &["-w", "-N", "KUBE-FORWARD"])?;
    run_in_ok(
        ns,
        "iptables",
        &[
            "-w",
            "-I",
            "FORWARD",
            "1",
            "-m",
            "comment",
            "--comment",
            "kubernetes forwarding rules",
            "-j",
            "KUBE-FORWARD",
        ],
    )?;
    run_in_ok(
        ns,
        "iptables",
        &[
            "-w",
            "-A",
            "KUBE-FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// Packets kube-proxy's INVALID rule ([`add_kube_proxy_invalid_drop`]) dropped in `ns`.
pub fn invalid_drops(ns: &str) -> anyhow::Result<u64> {
    let out = run_in_ok(
        ns,
        "iptables",
        &["-w", "-L", "KUBE-FORWARD", "-v", "-n", "-x"],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `    pkts bytes target prot opt in out source destination ... ctstate INVALID`
    text.lines()
        .find(|l| l.contains("ctstate INVALID"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{ns}: no INVALID drop counter in KUBE-FORWARD:\n{text}"))
}

/// `sysctl -w KEY=VALUE` in `ns`, for each pair (per-namespace keys such as
/// `net.netfilter.nf_conntrack_tcp_timeout_established`).
pub fn set_sysctls(ns: &str, pairs: &[(&str, &str)]) -> anyhow::Result<()> {
    for (key, value) in pairs {
        run_in_ok(ns, "sysctl", &["-w", &format!("{key}={value}")])?;
    }
    Ok(())
}

/// One line of `conntrack -L`.
#[derive(Debug, Clone)]
pub struct CtEntry {
    /// Seconds left before it expires.
    pub timeout: u64,
    /// TCP state (`ESTABLISHED`, `TIME_WAIT`, `CLOSE`, ...); `None` for UDP.
    pub state: Option<String>,
    /// Seconds since the entry was made (`delta-time`), shown when
    /// `net.netfilter.nf_conntrack_timestamp` was 1 at its creation.
    pub age: Option<u64>,
    /// The whole line, for messages.
    pub line: String,
}

/// Entries in `ns`'s conntrack of protocol `proto` (`tcp`, `udp`) whose original
/// direction goes to port `dport`.
pub fn conntrack_entries(ns: &str, proto: &str, dport: u16) -> anyhow::Result<Vec<CtEntry>> {
    let port = dport.to_string();
    let out = run_in_ok(ns, "conntrack", &["-L", "-p", proto, "--dport", &port])?;
    let mut entries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `tcp 6 431999 ESTABLISHED src=... [ASSURED] mark=0 delta-time=3 use=1`
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(timeout) = fields[2].parse() else {
            bail!("{ns}: unexpected conntrack line {line:?}");
        };
        let state = (!fields[3].contains('=')).then(|| fields[3].to_owned());
        let age = fields
            .iter()
            .find_map(|f| f.strip_prefix("delta-time="))
            .and_then(|n| n.parse().ok());
        entries.push(CtEntry {
            timeout,
            state,
            age,
            line: line.to_owned(),
        });
    }
    Ok(entries)
}

/// Makes pod `ns` count the packets it sends that match `matches` (iptables match
/// arguments, e.g. `["-p", "tcp", "-d", "10.244.2.11", "--dport", "5201"]`): a rule
/// without a target in its own OUTPUT chain. Every packet the pod sends passes OUTPUT
/// once, as the same skb that then enters its node's bridge port (a GSO skb counts once
/// in both places), so [`sent_packets`] is exactly what the node's programs see of it.
pub fn count_sent_packets(ns: &str, matches: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["-w", "-A", "OUTPUT"];
    args.extend_from_slice(matches);
    args.extend_from_slice(&["-m", "comment", "--comment", SENT_COMMENT]);
    run_in_ok(ns, "iptables", &args)?;
    Ok(())
}

/// Packets counted so far by the rules [`count_sent_packets`] added in pod `ns`.
pub fn sent_packets(ns: &str) -> anyhow::Result<u64> {
    let out = run_in_ok(ns, "iptables", &["-w", "-L", "OUTPUT", "-v", "-n", "-x"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for line in text.lines().filter(|l| l.contains(SENT_COMMENT)) {
        total += line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("{ns}: unreadable counter line {line:?}"))?;
    }
    Ok(total)
}
