//! Looking at and poking the kernel state of a lab namespace: hgw's routes and programs,
//! netfilter rules that break the kernel path on purpose.

use aya::programs::SchedClassifier;
use aya::programs::tc::TcAttachType;

use crate::netns::{in_netns, run_in_ok};

/// The route protocol number hgw-agent tags its routes with: the agent's own constant.
pub use hgw_common::ROUTE_PROTOCOL as HGW_ROUTE_PROTOCOL;
/// nftables table the lab uses to drop forwarded packets ([`drop_all_forwarding`]).
const FORWARD_DROP_TABLE: &str = "hgw_lab_forward_drop";
/// nftables tables (arp and ip6) the lab uses to drop ARP and NDP
/// ([`block_neighbour_discovery`]).
const NEIGHBOUR_BLOCK_TABLE: &str = "hgw_lab_nd_block";

/// Routes in `ns` carrying hgw's protocol tag, IPv4 then IPv6, one `ip route` line
/// each as flannel's would read, e.g. `10.244.2.0/24 via 172.31.0.2 dev eth0 onlink`:
/// the nexthop object's id (`nhid N`) left out, its gateway and device kept (the
/// kernel lists them with the route).
pub fn hgw_routes(ns: &str) -> anyhow::Result<Vec<String>> {
    let proto = HGW_ROUTE_PROTOCOL.to_string();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let out = run_in_ok(ns, "ip", &[family, "route", "show", "proto", &proto])?;
        routes.extend(lines(&out.stdout).iter().map(|l| without_nexthop_id(l)));
    }
    Ok(routes)
}

/// `ip route`'s line without its `nhid N`.
fn without_nexthop_id(line: &str) -> String {
    let mut words = Vec::new();
    let mut rest = line.split_whitespace();
    while let Some(word) = rest.next() {
        if word == "nhid" {
            rest.next();
        } else {
            words.push(word);
        }
    }
    words.join(" ")
}

/// hgw's nexthop objects in `ns` (`ip nexthop` lines with hgw's protocol).
pub fn hgw_nexthops(ns: &str) -> anyhow::Result<Vec<String>> {
    let proto = HGW_ROUTE_PROTOCOL.to_string();
    let out = run_in_ok(ns, "ip", &["nexthop", "show", "protocol", &proto])?;
    Ok(lines(&out.stdout))
}

/// tcx programs attached in `ns` whose name starts with `hgw`, as
/// `DEV ingress|egress NAME id ID`, over every interface of the namespace.
pub fn hgw_programs(ns: &str) -> anyhow::Result<Vec<String>> {
    Ok(tcx_programs(ns)?
        .into_iter()
        .filter(|p| {
            p.split_whitespace()
                .nth(2)
                .is_some_and(|name| name.starts_with("hgw"))
        })
        .collect())
}

/// Every tcx program attached in `ns`, as `DEV ingress|egress NAME id ID`.
pub fn tcx_programs(ns: &str) -> anyhow::Result<Vec<String>> {
    Ok(tcx_attached(ns)?
        .iter()
        .map(|p| format!("{} {} {} id {}", p.dev, p.hook, p.name, p.id))
        .collect())
}

/// A tcx program attached in a lab namespace, with the kernel's run-time statistics at
/// the time of the query (zero unless [`enable_run_time_stats`] holds them on).
#[derive(Clone, Debug)]
pub struct AttachedProgram {
    pub dev: String,
    /// `ingress` or `egress`.
    pub hook: &'static str,
    pub name: String,
    pub id: u32,
    /// Total time the program ran, in ns, while statistics were on.
    pub run_time_ns: u64,
    /// Times it ran while statistics were on.
    pub run_count: u64,
}

/// Every tcx program attached in `ns`.
///
/// Debian's bpftool (7.1) predates tcx and does not list them, so this asks the kernel
/// directly (BPF_PROG_QUERY through aya) from a thread inside `ns`, where the
/// interface names resolve.
pub fn tcx_attached(ns: &str) -> anyhow::Result<Vec<AttachedProgram>> {
    // A kernel without tcx (before 6.6) has none, and refuses the query.
    if let Err(aya::programs::ProgramError::SyscallError(e)) =
        SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
        && matches!(
            e.io_error.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP)
        )
    {
        return Ok(Vec::new());
    }
    let out = run_in_ok(ns, "ip", &["-o", "link", "show"])?;
    // `3: eth0@if2: <...>`: the name is the second field, up to `@` or `:`.
    let devs: Vec<String> = lines(&out.stdout)
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|d| {
            d.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or(d)
                .to_owned()
        })
        .collect();
    in_netns(ns, || -> anyhow::Result<Vec<AttachedProgram>> {
        let mut found = Vec::new();
        for dev in &devs {
            for (hook, attach) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let (_, programs) = SchedClassifier::query_tcx(dev, attach)
                    .map_err(|e| anyhow::anyhow!("querying tcx {hook} of {dev} in {ns}: {e}"))?;
                found.extend(programs.iter().map(|p| AttachedProgram {
                    dev: dev.clone(),
                    hook,
                    name: p.name_as_str().unwrap_or("?").to_owned(),
                    id: p.id(),
                    run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: p.run_count(),
                }));
            }
        }
        Ok(found)
    })?
}

/// Turns on the kernel's run-time statistics of every BPF program
/// ([`AttachedProgram::run_time_ns`], `run_count`) until the returned fd is dropped
/// (BPF_ENABLE_STATS, Linux 5.8): unlike the `kernel.bpf_stats_enabled` sysctl, nothing
/// stays changed on the host if the holder dies. Every program run then pays for two
/// clock reads.
pub fn enable_run_time_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("turning on BPF run-time statistics: {e}"))
}

/// Makes node `ns` drop every packet on netfilter's forward hook, ahead of (and
/// regardless of) any accept rule the agent adds with iptables: a base chain with
/// policy drop in a table of the lab's own. Only the kernel path is affected; the fast
/// path never reaches the forward hook.
pub fn drop_all_forwarding(ns: &str) -> anyhow::Result<()> {
    nft(
        ns,
        &format!(
            "add table inet {FORWARD_DROP_TABLE}; add chain inet {FORWARD_DROP_TABLE} forward {{ type filter hook forward priority -300; policy drop; }}"
        ),
    )
}

/// Undoes [`drop_all_forwarding`].
pub fn allow_forwarding(ns: &str) -> anyhow::Result<()> {
    nft(ns, &format!("delete table inet {FORWARD_DROP_TABLE}"))
}

/// Makes node `ns` deaf and mute to neighbour discovery, ARP and NDP (input and output
/// dropped), so its neighbours cannot learn its MAC: it answers no request, and sends
/// none either (a request it sent would carry its MAC, and the receiver learns the
/// sender from it).
pub fn block_neighbour_discovery(ns: &str) -> anyhow::Result<()> {
    let chain = |family: &str, hook: &str, rule: &str| {
        format!(
            "add chain {family} {NEIGHBOUR_BLOCK_TABLE} {hook} {{ type filter hook {hook} priority 0; policy {rule}; }}"
        )
    };
    let ndp = |hook: &str| {
        format!(
            "add rule ip6 {NEIGHBOUR_BLOCK_TABLE} {hook} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} drop"
        )
    };
    nft(
        ns,
        &[
            format!("add table arp {NEIGHBOUR_BLOCK_TABLE}"),
            chain("arp", "input", "drop"),
            chain("arp", "output", "drop"),
            format!("add table ip6 {NEIGHBOUR_BLOCK_TABLE}"),
            chain("ip6", "input", "accept"),
            chain("ip6", "output", "accept"),
            ndp("input"),
            ndp("output"),
        ]
        .join("; "),
    )
}

/// Replaces [`block_neighbour_discovery`] with a block of the requests `ns` sends on
/// its uplink eth0 only (ARP requests, neighbour solicitations): it answers its
/// neighbours again, but cannot make them learn its MAC from a request of its own.
pub fn block_neighbour_requests(ns: &str) -> anyhow::Result<()> {
    unblock_neighbour_discovery(ns)?;
    nft(
        ns,
        &[
            format!("add table arp {NEIGHBOUR_BLOCK_TABLE}"),
            format!("add chain arp {NEIGHBOUR_BLOCK_TABLE} output {{ type filter hook output priority 0; policy accept; }}"),
            format!("add rule arp {NEIGHBOUR_BLOCK_TABLE} output oifname \"eth0\" arp operation request drop"),
            format!("add table ip6 {NEIGHBOUR_BLOCK_TABLE}"),
            format!("add chain ip6 {NEIGHBOUR_BLOCK_TABLE} output {{ type filter hook output priority 0; policy accept; }}"),
            format!("add rule ip6 {NEIGHBOUR_BLOCK_TABLE} output oifname \"eth0\" icmpv6 type nd-neighbor-solicit drop"),
        ]
        .join("; "),
    )
}

/// Undoes [`block_neighbour_discovery`] and [`block_neighbour_requests`].
pub fn unblock_neighbour_discovery(ns: &str) -> anyhow::Result<()> {
    nft(
        ns,
        &format!(
            "delete table arp {NEIGHBOUR_BLOCK_TABLE}; delete table ip6 {NEIGHBOUR_BLOCK_TABLE}"
        ),
    )
}

/// `nft COMMANDS` inside `ns`: one argument, `;`-separated commands (Debian 12's nft
/// rejects the `table { ... }` block syntax on the command line).
fn nft(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    run_in_ok(ns, "nft", &[ruleset])?;
    Ok(())
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}
