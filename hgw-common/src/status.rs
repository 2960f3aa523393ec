//! The agent's status document: what `hgw-agent status --json` prints and the status
//! socket serves. Here rather than in the agent so the lab and xtask read it as this type
//! without building the agent (whose build needs the eBPF toolchain that xtask installs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// `None` until the agent knows its network (etcd: once it holds a subnet).
    pub pod_cidr: Option<String>,
    /// Dual stack: the IPv6 pod CIDR.
    #[serde(default)]
    pub pod_cidr_v6: Option<String>,
    pub uplink: String,
    pub bridge: String,
    /// Every route is installed and, with the fast path, every next hop's MAC is known.
    pub ready: bool,
    /// The fast path's mode: "established", "all" or "off".
    pub fast_path: String,
    /// Why the fast path runs in another mode than configured (`None`: as configured).
    #[serde(default)]
    pub fast_path_note: Option<String>,
    /// The kernel's IPv4 reverse-path filter as the programs apply it, per interface
    /// packets enter the stack on (the uplink, the bridge): "off", "strict" or
    /// "loose". Empty without a fast path.
    #[serde(default)]
    pub rp_filter: BTreeMap<String, String>,
    /// Dual stack: the uplink and the bridge, where IPv6 is disabled on them
    /// (`disable_ipv6`): the kernel forwards no IPv6, so the fast path takes none.
    #[serde(default)]
    pub ipv6_disabled: Vec<String>,
    /// One entry per peer route: a dual-stack peer has two, IPv4 first.
    pub peers: Vec<PeerStatus>,
    /// Packet counters by family ("ipv4", "ipv6"; "other" for frames of neither), then
    /// by name.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    /// Local pods the uplink program delivers to directly.
    #[serde(default)]
    pub endpoints: usize,
    /// Next hops in the fast-path route table.
    #[serde(default)]
    pub map_entries: usize,
    /// What the agent waits for before it can be ready (etcd, the first peer set).
    #[serde(default)]
    pub waiting: Option<String>,
    /// What shares hgw's tc hooks, per interface hgw redirects from or past: the
    /// uplink and the bridge always, a bridge port only when something is on it.
    #[serde(default)]
    pub hooks: Vec<HookStatus>,
    /// What the running kernel offers the fast path and what the agent chose (`None`
    /// with `fast_path = "off"`: nothing probed).
    #[serde(default)]
    pub kernel: Option<KernelStatus>,
    /// The last peer change the agent applied (`None` before the first).
    #[serde(default)]
    pub last_change: Option<AppliedChange>,
}

/// A peer change (a source's whole set, or the peers that changed since) applied to the
/// kernel routes and the fast-path map: what the desired state changed, written; a
/// route the kernel refused shows in the peer's own entry (`route`), not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedChange {
    /// Pod CIDRs it added, moved or removed in the desired state.
    pub routes: usize,
    /// From taking the change to having its routes and map entries in place, in µs.
    pub took_us: u64,
    /// When they were in place (the fast path's flow caches are told a moment later),
    /// in µs since the Unix epoch: a bench compares it with its own clock, where
    /// polling for the result would add the polling's delay.
    pub done_unix_us: u64,
}

/// The running kernel as the fast path sees it: probed once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// `uname -r`.
    pub release: String,
    /// How the programs attach: "tcx" (Linux >= 6.6) or "cls_bpf" (a direct-action
    /// filter on a clsact qdisc, on older kernels).
    pub attach: String,
    /// Where the conntrack kfuncs and `struct nf_conn` were found ("vmlinux", "module
    /// nf_conntrack"); `None` outside `established` mode, which alone calls them.
    pub conntrack_kfuncs: Option<String>,
    /// Each kernel feature the programs use, and whether this kernel has it.
    pub features: BTreeMap<String, bool>,
}

impl std::fmt::Display for KernelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel {}: attach {}", self.release, self.attach)?;
        if let Some(home) = &self.conntrack_kfuncs {
            write!(f, ", conntrack kfuncs from {home}")?;
        }
        let missing: Vec<&str> = self
            .features
            .iter()
            .filter(|(_, found)| !**found)
            .map(|(name, _)| name.as_str())
            .collect();
        if missing.is_empty() {
            write!(f, ", every probed feature present")
        } else {
            write!(f, ", missing: {}", missing.join(", "))
        }
    }
}

/// One interface's tc hooks as hgw sees them, and the `DEVICE_*` flags that follow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookStatus {
    pub interface: String,
    pub ifindex: u32,
    /// "uplink", "bridge" or "port".
    pub role: String,
    /// hgw's own program runs on this interface's ingress.
    #[serde(default)]
    pub hgw: bool,
    /// tcx ingress programs that run before hgw's (they saw every packet).
    #[serde(default)]
    pub tcx_ingress_before: Vec<ProgramStatus>,
    /// tcx ingress programs a packet hgw redirects would skip: after hgw's on the same
    /// hook, or (on the bridge, with hgw on its ports) all of them.
    #[serde(default)]
    pub tcx_ingress_after: Vec<ProgramStatus>,
    #[serde(default)]
    pub tcx_egress: Vec<ProgramStatus>,
    /// Legacy filters of an `ingress` or `clsact` qdisc (hgw's own left out).
    #[serde(default)]
    pub filters: Vec<FilterStatus>,
    /// The root qdisc, when it is not the default `noqueue`.
    #[serde(default)]
    pub root_qdisc: Option<String>,
    /// nftables hooks on the interface: `ingress: chain netdev t c`, `egress: ...`,
    /// `bridge output/postrouting: chain bridge t c`, `ingress: flowtable inet t f`.
    #[serde(default)]
    pub netfilter: Vec<String>,
    /// What the bridge decides there that a redirect past it would not: `port state
    /// blocking`, `locked`, `vlan filtering`.
    #[serde(default)]
    pub bridge: Vec<String>,
    /// An XDP program is attached to the interface (on a bridge, generic XDP: it runs
    /// on what the bridge passes up from its ports).
    #[serde(default)]
    pub xdp: bool,
    /// The `DEVICE_*` flags the fast path reads for the interface: "ingress" (packets
    /// arriving here go to the kernel), "egress" (pods behind it get their packets
    /// through the bridge, not straight into the pod), "netfilter-egress" (the fast
    /// path sends nothing into it, or past it).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// A BPF program by id; its name only when the agent may read it (CAP_SYS_ADMIN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub id: u32,
    #[serde(default)]
    pub name: Option<String>,
}

impl std::fmt::Display for ProgramStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} ({name})", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// A legacy tc filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStatus {
    /// "ingress" or "egress".
    pub parent: String,
    /// The classifier: "u32", "bpf", "flower", "matchall", ...
    pub kind: String,
    pub priority: u16,
    #[serde(default)]
    pub chain: u32,
    /// A cls_bpf filter's program name.
    #[serde(default)]
    pub name: Option<String>,
}

impl std::fmt::Display for FilterStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} pref {}", self.parent, self.kind, self.priority)?;
        if self.chain != 0 {
            write!(f, " chain {}", self.chain)?;
        }
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        Ok(())
    }
}

impl HookStatus {
    /// What shares the hooks, in one line; "-" for nothing.
    pub fn shared(&self) -> String {
        let list = |programs: &[ProgramStatus]| {
            programs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.tcx_ingress_before.is_empty() {
            parts.push(format!(
                "tcx ingress before hgw: {}",
                list(&self.tcx_ingress_before)
            ));
        }
        if !self.tcx_ingress_after.is_empty() {
            parts.push(format!(
                "tcx ingress after hgw: {}",
                list(&self.tcx_ingress_after)
            ));
        }
        if !self.tcx_egress.is_empty() {
            parts.push(format!("tcx egress: {}", list(&self.tcx_egress)));
        }
        for filter in &self.filters {
            parts.push(format!("filter {filter}"));
        }
        if let Some(qdisc) = &self.root_qdisc {
            parts.push(format!("root qdisc {qdisc}"));
        }
        for hook in &self.netfilter {
            parts.push(format!("nftables {hook}"));
        }
        for duty in &self.bridge {
            parts.push(format!("bridge {duty}"));
        }
        if self.xdp {
            parts.push("xdp program".to_owned());
        }
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_ip: String,
    pub pod_cidr: String,
    /// The next hop's MAC, `None` while unresolved.
    pub mac: Option<String>,
    /// The kernel route (the fallback) is installed.
    pub route: bool,
    /// Another owner's route holds the prefix (its protocol): hgw leaves it alone and
    /// the fast path does not take the prefix.
    #[serde(default)]
    pub foreign_route: Option<String>,
    /// "static", or the etcd key it came from.
    pub source: String,
    /// The etcd lease (hex) that keeps it, if any.
    pub lease: Option<String>,
}

impl Status {
    /// A counter by family ("ipv4", "ipv6", "other") and name, 0 if absent.
    pub fn counter(&self, family: &str, name: &str) -> u64 {
        self.counters
            .get(family)
            .and_then(|counters| counters.get(name))
            .copied()
            .unwrap_or(0)
    }

    /// The peer entry for `pod_cidr`, if the agent has one.
    pub fn peer(&self, pod_cidr: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.pod_cidr == pod_cidr)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "node {}  pod CIDR {}  uplink {}  bridge {}",
            self.node,
            self.pod_cidr.as_deref().unwrap_or("(not known yet)"),
            self.uplink,
            self.bridge
        )?;
        let state = match (&self.waiting, self.ready) {
            (Some(waiting), _) => waiting.as_str(),
            (None, true) => "ready",
            (None, false) => "converging",
        };
        let path = if self.fast_path == "off" {
            "kernel routes only".to_owned()
        } else {
            format!("eBPF fast path ({}) + kernel routes", self.fast_path)
        };
        writeln!(
            f,
            "state {state}, {path}, {} local pods for direct delivery",
            self.endpoints
        )?;
        if let Some(note) = &self.fast_path_note {
            writeln!(f, "fast path: {note}")?;
        }
        if let Some(kernel) = &self.kernel {
            writeln!(f, "{kernel}")?;
        }
        if !self.rp_filter.is_empty() {
            let each: Vec<String> = self
                .rp_filter
                .iter()
                .map(|(interface, mode)| format!("{mode} on {interface}"))
                .collect();
            writeln!(f, "rp_filter {}", each.join(", "))?;
        }
        if !self.ipv6_disabled.is_empty() {
            writeln!(
                f,
                "IPv6 disabled on {}: the kernel forwards no IPv6, nor does the fast path",
                self.ipv6_disabled.join(", ")
            )?;
        }
        if let Some(change) = &self.last_change {
            writeln!(
                f,
                "last peer change: {} routes applied in {:.1} ms",
                change.routes,
                change.took_us as f64 / 1e3
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:<16} {:<20} {:<18} {:<10} SOURCE",
            "PEER", "NODE IP", "POD CIDR", "NEXT-HOP MAC", "ROUTE"
        )?;
        for p in &self.peers {
            writeln!(
                f,
                "{:<16} {:<16} {:<20} {:<18} {:<10} {}{}",
                p.name,
                p.node_ip,
                p.pod_cidr,
                p.mac.as_deref().unwrap_or("unresolved"),
                match (&p.foreign_route, p.route) {
                    (Some(_), _) => "foreign",
                    (None, true) => "installed",
                    (None, false) => "missing",
                },
                p.source,
                p.lease
                    .as_ref()
                    .map(|l| format!(" (lease {l})"))
                    .unwrap_or_default()
            )?;
        }
        if !self.counters.is_empty() {
            writeln!(f)?;
            write!(f, "{:<22}", "COUNTER")?;
            for family in self.counters.keys() {
                write!(f, " {:>12}", family.to_uppercase())?;
            }
            writeln!(f)?;
            let mut names: Vec<&String> = self.counters.values().flat_map(|c| c.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                write!(f, "{name:<22}")?;
                for counters in self.counters.values() {
                    match counters.get(name) {
                        Some(value) => write!(f, " {value:>12}")?,
                        None => write!(f, " {:>12}", "-")?,
                    }
                }
                writeln!(f)?;
            }
        }
        if !self.hooks.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<16} {:<7} {:<4} {:<14} SHARED WITH",
                "TC HOOKS ON", "ROLE", "HGW", "FLAGS"
            )?;
            for hook in &self.hooks {
                let flags = if hook.flags.is_empty() {
                    "-".to_owned()
                } else {
                    hook.flags.join(",")
                };
                writeln!(
                    f,
                    "{:<16} {:<7} {:<4} {:<14} {}",
                    hook.interface,
                    hook.role,
                    if hook.hgw { "yes" } else { "no" },
                    flags,
                    hook.shared()
                )?;
            }
        }
        Ok(())
    }
}
