//! What shares hgw's tc hooks: the tcx programs (in order), the legacy `ingress` and
//! `clsact` filters and the root qdisc of each interface hgw redirects from or past
//! (the uplink, the bridge, its ports), nftables' hooks on them (see
//! [`crate::kernel::nftables`]), and the `DEVICE_*` flags that follow from them
//! (see `hgw_common::DEVICE_INGRESS`): a redirect must never skip what the kernel path
//! would have run.
//!
//! Legacy tc changes arrive as netlink events; tcx attach and detach send none, so the
//! tcx hooks are queried (`BPF_PROG_QUERY`, one syscall per hook) on a timer.

mod scan;

use std::collections::HashMap;

use hgw_common::{DEVICE_EGRESS, DEVICE_INGRESS, DEVICE_NF_EGRESS, status::FilterStatus};

pub use crate::kernel::nftables::Hook;

pub use scan::{Scanner, TcError, tcx_programs, tcx_supported};

/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the filters of an `ingress` qdisc, or
/// of a `clsact` qdisc's ingress, are dumped with this parent.
pub const PARENT_INGRESS: u32 = 0xFFFF_FFF2;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: a `clsact` qdisc's egress filters.
pub const PARENT_EGRESS: u32 = 0xFFFF_FFF3;
/// The root qdisc veths and bridges get: nothing queues or shapes there.
const DEFAULT_ROOT: &str = "noqueue";

/// Where an interface sits on the way of the packets hgw redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `hgw_to_pod` runs on its ingress.
    Uplink,
    /// Pods' gateway; `hgw_to_peer` runs on its ingress or on its ports'.
    Bridge,
    /// A pod's host veth.
    Port,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Bridge => "bridge",
            Role::Port => "port",
        }
    }
}

/// A legacy tc filter on an `ingress` or `clsact` qdisc. Ordered as they run on a
/// hook: by chain, then by priority.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Filter {
    /// On a `clsact` egress (else on the ingress).
    pub egress: bool,
    pub chain: u32,
    pub priority: u16,
    /// Its classifier: `u32`, `bpf`, `flower`, `matchall`, ...
    pub kind: String,
    /// A cls_bpf filter's program name.
    pub name: Option<String>,
    /// A cls_bpf filter's program id (hgw's own, on a kernel without tcx, is one of
    /// the agent's program ids).
    pub id: Option<u32>,
}

impl Filter {
    fn is_own(&self, own: &[u32]) -> bool {
        self.id.is_some_and(|id| own.contains(&id))
    }
}

/// What one interface's tc hooks hold, besides hgw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// tcx ingress programs by id, in the order they run (hgw's own included).
    pub tcx_ingress: Vec<u32>,
    /// tcx egress programs by id, in order.
    pub tcx_egress: Vec<u32>,
    /// The root qdisc's kind; `None`: none listed (a device that is down).
    pub root_qdisc: Option<String>,
    /// Legacy filters (hgw's own cls_bpf filter included), sorted.
    pub filters: Vec<Filter>,
    /// nftables hooks on the interface, with the chain or flowtable each is of.
    pub netfilter: Vec<(Hook, String)>,
    /// What the bridge decides here that a redirect past it would not.
    pub bridge: Vec<BridgeDuty>,
    /// An XDP program on the interface (from its link messages). It runs on what the
    /// interface takes in before tc does, so before hgw on the uplink or a port; a
    /// bridge's (generic XDP) runs on what the bridge passes up from its ports, which
    /// hgw on a port redirects first.
    pub xdp: bool,
}

/// What the bridge decides for frames through a port, or through itself, that a
/// redirect from a port, or delivery straight into a pod, would skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeDuty {
    /// The port is not forwarding (its spanning-tree state, `BR_STATE_*`; a port of a
    /// bridge that is down is disabled): the bridge drops what comes in through it and
    /// sends nothing out.
    PortState(u8),
    /// The port is locked: the bridge drops frames from MACs it has no entry for there.
    Locked,
    /// The bridge filters by VLAN: what it lets in from a port, and out to one, is up
    /// to the port's VLANs.
    VlanFiltering,
    /// The port is left out of floods (unicast flooding off, or proxy ARP on): a frame
    /// for a pod whose MAC the bridge has no entry for does not go there, where
    /// delivery straight into the pod would take it.
    NoFlood,
    /// The port's MTU is below the bridge's: the bridge drops a frame larger than the
    /// port's on the way out, where delivery straight into the pod would not.
    SmallMtu(u32),
    /// The pod's end of the veth has an MTU below the bridge's: the veth drops a
    /// frame larger than it when the port transmits (`veth_xmit`), where
    /// `bpf_redirect_peer` does not check.
    PodMtu(u32),
    /// The pod's end of the veth has an XDP program, which runs on what the port
    /// transmits, not on what `bpf_redirect_peer` puts into the pod.
    PodXdp,
    /// The pod's end of the veth has not been read (yet): what it would call for is
    /// not known.
    PodUnread,
}

impl BridgeDuty {
    /// A port's duties, on a bridge of MTU `bridge_mtu`.
    pub fn of_port(port: crate::kernel::BridgePort, bridge_mtu: u32) -> Vec<Self> {
        let mut duties = Vec::new();
        if port.state != crate::kernel::BR_STATE_FORWARDING {
            duties.push(Self::PortState(port.state));
        }
        if port.locked {
            duties.push(Self::Locked);
        }
        if port.no_flood {
            duties.push(Self::NoFlood);
        }
        if let Some(mtu) = port.mtu.filter(|mtu| *mtu < bridge_mtu) {
            duties.push(Self::SmallMtu(mtu));
        }
        duties
    }

    /// What the pod's end of a port's veth calls for, on a bridge of MTU `bridge_mtu`.
    pub fn of_pod_end(end: &crate::kernel::Link, bridge_mtu: u32) -> Vec<Self> {
        let mut duties = Vec::new();
        if end.mtu < bridge_mtu {
            duties.push(Self::PodMtu(end.mtu));
        }
        if end.xdp {
            duties.push(Self::PodXdp);
        }
        duties
    }

    pub fn name(self) -> String {
        match self {
            Self::PortState(state) => format!(
                "port state {}",
                match state {
                    0 => "disabled",
                    1 => "listening",
                    2 => "learning",
                    4 => "blocking",
                    _ => "unknown",
                }
            ),
            Self::Locked => "locked".to_owned(),
            Self::VlanFiltering => "vlan filtering".to_owned(),
            Self::NoFlood => "no unicast flood".to_owned(),
            Self::SmallMtu(mtu) => format!("mtu {mtu} below the bridge's"),
            Self::PodMtu(mtu) => format!("pod's mtu {mtu} below the bridge's"),
            Self::PodXdp => "xdp in the pod".to_owned(),
            Self::PodUnread => "pod's end not read".to_owned(),
        }
    }
}

impl Hooks {
    /// hgw's own cls_bpf filter on the ingress (when it attaches with cls_bpf).
    fn own_filter(&self, own: &[u32]) -> Option<&Filter> {
        self.filters.iter().find(|f| !f.egress && f.is_own(own))
    }

    /// The legacy filters other than hgw's.
    fn foreign_filters<'a>(&'a self, own: &'a [u32]) -> impl Iterator<Item = &'a Filter> + 'a {
        self.filters.iter().filter(|f| !f.is_own(own))
    }

    /// The tcx ingress programs other than hgw's that run before and after it on the
    /// way of a packet hgw redirects. `hgw_here`: hgw's program is on this ingress.
    /// On the bridge with hgw on its ports, all of them come after (the redirect at
    /// the port skips the bridge); on a port with hgw on the bridge, all before.
    pub fn ingress_split(&self, role: Role, hgw_here: bool, own: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let foreign = |ids: &[u32]| -> Vec<u32> {
            ids.iter().copied().filter(|id| !own.contains(id)).collect()
        };
        if !hgw_here {
            return match role {
                Role::Port => (foreign(&self.tcx_ingress), Vec::new()),
                Role::Uplink | Role::Bridge => (Vec::new(), foreign(&self.tcx_ingress)),
            };
        }
        // hgw as a cls_bpf filter: every tcx program runs before the filters.
        if self.own_filter(own).is_some() {
            return (foreign(&self.tcx_ingress), Vec::new());
        }
        match self.tcx_ingress.iter().rposition(|id| own.contains(id)) {
            Some(at) => (
                foreign(&self.tcx_ingress[..at]),
                foreign(&self.tcx_ingress[at + 1..]),
            ),
            // hgw's program is not (yet) on the hook, or not by tcx: whatever is there
            // is not known to run first.
            None => (Vec::new(), foreign(&self.tcx_ingress)),
        }
    }

    /// Whether a legacy filter on the ingress is on the redirect's way: everywhere but
    /// on a port whose packets hgw takes at the bridge (the port's filters ran first),
    /// and but before hgw's own cls_bpf filter (chain 0, a smaller priority: it ran
    /// on the packet first). Same priority as hgw's: not known to run first.
    fn ingress_filter_after(&self, role: Role, hgw_here: bool, own: &[u32]) -> bool {
        if !(hgw_here || role != Role::Port) {
            return false;
        }
        let hgw = self.own_filter(own).filter(|_| hgw_here);
        self.foreign_filters(own).any(|f| {
            !f.egress
                && !hgw
                    .is_some_and(|hgw| f.chain == 0 && hgw.chain == 0 && f.priority < hgw.priority)
        })
    }

    /// The `DEVICE_*` bits for this interface.
    pub fn flags(&self, role: Role, hgw_here: bool, own: &[u32]) -> u32 {
        let mut flags = self.netfilter_flags(role, hgw_here) | self.bridge_flags(role, hgw_here);
        let (_, after) = self.ingress_split(role, hgw_here, own);
        if !after.is_empty() || self.ingress_filter_after(role, hgw_here, own) {
            flags |= DEVICE_INGRESS;
        }
        // A redirect into the uplink goes through its egress like the kernel's own
        // packets; only delivery into a pod skips the bridge's and the veth's.
        if role != Role::Uplink && self.egress_shared(own) {
            flags |= DEVICE_EGRESS;
        }
        if self.xdp && role == Role::Bridge && !hgw_here {
            flags |= DEVICE_INGRESS;
        }
        flags
    }

    /// The `DEVICE_*` bits the nftables hooks call for. The netdev ingress hook runs
    /// after tc ingress: skipped where hgw redirects from this interface, or past it
    /// (the bridge, with hgw on its ports); a port's ran before hgw on the bridge. The
    /// netdev egress hook is skipped by any redirect into the interface. A bridge runs
    /// its `bridge` family chains on frames from a port before its own ingress (skipped
    /// only with hgw on the ports) and on frames it sends to a port (skipped only by
    /// delivery past it).
    fn netfilter_flags(&self, role: Role, hgw_here: bool) -> u32 {
        self.netfilter
            .iter()
            .map(|(hook, _)| match hook {
                Hook::Ingress if hgw_here || role != Role::Port => DEVICE_INGRESS,
                Hook::Egress => DEVICE_NF_EGRESS,
                Hook::BridgeIn if role == Role::Bridge && !hgw_here => DEVICE_INGRESS,
                Hook::BridgeOut if role == Role::Bridge => DEVICE_EGRESS,
                _ => 0,
            })
            .fold(0, |flags, flag| flags | flag)
    }

    /// The `DEVICE_*` bits the bridge's duties call for: on the way in, they matter
    /// where hgw redirects from the port, or from the ports past the bridge (with hgw
    /// on the bridge, the bridge has done them); on the way out, delivery goes through
    /// the bridge.
    fn bridge_flags(&self, role: Role, hgw_here: bool) -> u32 {
        self.bridge
            .iter()
            .map(|duty| {
                let way_in = match (duty, role) {
                    (BridgeDuty::PortState(_) | BridgeDuty::Locked, Role::Port) => hgw_here,
                    (BridgeDuty::VlanFiltering, Role::Bridge) => !hgw_here,
                    _ => false,
                };
                let way_out = !matches!(duty, BridgeDuty::Locked);
                (if way_in { DEVICE_INGRESS } else { 0 })
                    | (if way_out { DEVICE_EGRESS } else { 0 })
            })
            .fold(0, |flags, flag| flags | flag)
    }

    /// Anything on the egress: a qdisc other than `noqueue`, clsact egress filters, a
    /// tcx egress program (hgw has none there).
    fn egress_shared(&self, own: &[u32]) -> bool {
        self.root_qdisc
            .as_deref()
            .is_some_and(|k| k != DEFAULT_ROOT)
            || self.foreign_filters(own).any(|f| f.egress)
            || !self.tcx_egress.is_empty()
    }

    /// The status entry of this interface, `None` when nothing shares its hooks.
    pub fn status(
        &self,
        (interface, ifindex): (&str, u32),
        (role, hgw_here): (Role, bool),
        own: &[u32],
        names: &HashMap<u32, Option<String>>,
    ) -> hgw_common::status::HookStatus {
        use hgw_common::status::ProgramStatus;
        let program = |id: u32| ProgramStatus {
            id,
            name: names.get(&id).cloned().flatten(),
        };
        let (before, after) = self.ingress_split(role, hgw_here, own);
        let flags = self.flags(role, hgw_here, own);
        hgw_common::status::HookStatus {
            interface: interface.to_owned(),
            ifindex,
            role: role.name().to_owned(),
            hgw: hgw_here,
            tcx_ingress_before: before.into_iter().map(program).collect(),
            tcx_ingress_after: after.into_iter().map(program).collect(),
            tcx_egress: self.tcx_egress.iter().copied().map(program).collect(),
            filters: self
                .foreign_filters(own)
                .map(|f| FilterStatus {
                    parent: if f.egress { "egress" } else { "ingress" }.to_owned(),
                    kind: f.kind.clone(),
                    priority: f.priority,
                    chain: f.chain,
                    name: f.name.clone(),
                })
                .collect(),
            root_qdisc: self.root_qdisc.clone().filter(|k| k != DEFAULT_ROOT),
            netfilter: self
                .netfilter
                .iter()
                .map(|(hook, owner)| format!("{}: {owner}", hook.name()))
                .collect(),
            bridge: self.bridge.iter().map(|duty| duty.name()).collect(),
            xdp: self.xdp,
            flags: flag_names(flags),
        }
    }

    /// Whether anything at all shares the hooks (status lists only those ports).
    pub fn is_shared(&self, own: &[u32]) -> bool {
        !self.netfilter.is_empty()
            || !self.bridge.is_empty()
            || self.xdp
            || self.tcx_ingress.iter().any(|id| !own.contains(id))
            || !self.tcx_egress.is_empty()
            || self.foreign_filters(own).next().is_some()
            || self
                .root_qdisc
                .as_deref()
                .is_some_and(|k| k != DEFAULT_ROOT)
    }
}

/// `DEVICE_*` bits by name, for status.
pub fn flag_names(flags: u32) -> Vec<String> {
    [
        (DEVICE_INGRESS, "ingress"),
        (DEVICE_EGRESS, "egress"),
        (DEVICE_NF_EGRESS, "netfilter-egress"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_owned())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HGW: u32 = 10;
    const OWN: &[u32] = &[HGW, 11];

    fn filter(egress: bool, kind: &str) -> Filter {
        Filter {
            egress,
            kind: kind.into(),
            priority: 49152,
            chain: 0,
            name: None,
            id: None,
        }
    }

    /// hgw's own cls_bpf filter, last on the ingress.
    fn own_filter() -> Filter {
        Filter {
            kind: "bpf".into(),
            priority: u16::MAX,
            name: Some("hgw_to_pod".into()),
            id: Some(HGW),
            ..filter(false, "bpf")
        }
    }

    #[test]
    fn with_hgw_as_a_filter_what_runs_before_it_is_not_skipped() {
        let before = Filter {
            priority: 1,
            ..filter(false, "bpf")
        };
        let hooks = Hooks {
            tcx_ingress: vec![5],
            filters: vec![before.clone(), own_filter()],
            ..noqueue()
        };
        // tcx programs and a filter of a smaller priority ran first.
        assert_eq!(hooks.flags(Role::Uplink, true, OWN), 0);
        assert_eq!(
            hooks.ingress_split(Role::Uplink, true, OWN),
            (vec![5], vec![])
        );
        assert!(hooks.is_shared(OWN));
        let status = hooks.status(("eth0", 2), (Role::Uplink, true), OWN, &HashMap::new());
        assert_eq!(status.filters.len(), 1, "hgw's own filter is not listed");
        // hgw's filter alone shares nothing.
        let alone = Hooks {
            filters: vec![own_filter()],
            ..noqueue()
        };
        assert!(!alone.is_shared(OWN));
        assert_eq!(alone.flags(Role::Port, true, OWN), 0);
        // Another chain, the same priority, or a filter hgw's is not known for: after.
        for after in [
            Filter {
                chain: 1,
                ..before.clone()
            },
            Filter {
                priority: u16::MAX,
                ..before.clone()
            },
        ] {
            let hooks = Hooks {
                filters: vec![after, own_filter()],
                ..noqueue()
            };
            assert_eq!(hooks.flags(Role::Uplink, true, OWN), DEVICE_INGRESS);
        }
        let stale = Hooks {
            filters: vec![Filter {
                id: Some(99),
                ..own_filter()
            }],
            ..noqueue()
        };
        assert_eq!(stale.flags(Role::Uplink, true, OWN), DEVICE_INGRESS);
    }

    fn noqueue() -> Hooks {
        Hooks {
            root_qdisc: Some(DEFAULT_ROOT.into()),
            ..Hooks::default()
        }
    }

    #[test]
    fn programs_before_hgw_already_ran() {
        let hooks = Hooks {
            tcx_ingress: vec![5, HGW],
            ..noqueue()
        };
        assert_eq!(hooks.flags(Role::Uplink, true, OWN), 0);
        assert_eq!(
            hooks.ingress_split(Role::Uplink, true, OWN),
            (vec![5], vec![])
        );
        let later = Hooks {
            tcx_ingress: vec![5, HGW, 7],
            ..noqueue()
        };
        assert_eq!(later.flags(Role::Port, true, OWN), DEVICE_INGRESS);
        assert_eq!(
            later.ingress_split(Role::Port, true, OWN),
            (vec![5], vec![7])
        );
    }

    #[test]
    fn hgw_not_on_its_hook_yet_counts_everything_as_after() {
        let hooks = Hooks {
            tcx_ingress: vec![5],
            ..noqueue()
        };
        assert_eq!(hooks.flags(Role::Uplink, true, OWN), DEVICE_INGRESS);
    }

    #[test]
    fn the_bridge_with_hgw_on_its_ports_counts_anything_on_its_ingress() {
        let hooks = Hooks {
            tcx_ingress: vec![5],
            ..noqueue()
        };
        assert_eq!(hooks.flags(Role::Bridge, false, OWN), DEVICE_INGRESS);
        let filtered = Hooks {
            filters: vec![filter(false, "u32")],
            ..noqueue()
        };
        assert_eq!(filtered.flags(Role::Bridge, false, OWN), DEVICE_INGRESS);
        assert_eq!(noqueue().flags(Role::Bridge, false, OWN), 0);
    }

    #[test]
    fn a_ports_ingress_runs_before_hgw_on_the_bridge() {
        let hooks = Hooks {
            tcx_ingress: vec![5],
            filters: vec![filter(false, "u32")],
            ..noqueue()
        };
        assert_eq!(hooks.flags(Role::Port, false, OWN), 0);
        assert_eq!(
            hooks.ingress_split(Role::Port, false, OWN),
            (vec![5], vec![])
        );
    }

    #[test]
    fn the_bandwidth_plugin_sets_both_flags_on_a_port() {
        // Its egress limit: an ingress qdisc with a u32 filter (mirred to an ifb); its
        // ingress limit: a tbf root qdisc.
        let hooks = Hooks {
            tcx_ingress: vec![HGW],
            root_qdisc: Some("tbf".into()),
            filters: vec![filter(false, "u32")],
            ..Hooks::default()
        };
        assert_eq!(
            hooks.flags(Role::Port, true, OWN),
            DEVICE_INGRESS | DEVICE_EGRESS
        );
        assert!(hooks.is_shared(OWN));
    }

    #[test]
    fn egress_counts_on_the_bridge_and_ports_only() {
        let tcx = Hooks {
            tcx_ingress: vec![HGW],
            tcx_egress: vec![9],
            ..noqueue()
        };
        assert_eq!(tcx.flags(Role::Bridge, true, OWN), DEVICE_EGRESS);
        assert_eq!(tcx.flags(Role::Uplink, true, OWN), 0);
        let clsact = Hooks {
            tcx_ingress: vec![HGW],
            filters: vec![filter(true, "flower")],
            ..noqueue()
        };
        assert_eq!(clsact.flags(Role::Port, true, OWN), DEVICE_EGRESS);
        let fq = Hooks {
            tcx_ingress: vec![HGW],
            root_qdisc: Some("fq_codel".into()),
            ..Hooks::default()
        };
        assert_eq!(fq.flags(Role::Uplink, true, OWN), 0);
        assert_eq!(fq.flags(Role::Port, true, OWN), DEVICE_EGRESS);
    }

    #[test]
    fn nothing_shared_means_no_flags() {
        let hooks = Hooks {
            tcx_ingress: vec![HGW],
            ..noqueue()
        };
        assert!(!hooks.is_shared(OWN));
        for role in [Role::Uplink, Role::Bridge, Role::Port] {
            assert_eq!(hooks.flags(role, true, OWN), 0);
        }
        // A device that is down lists no root qdisc: nothing shapes there either.
        assert_eq!(Hooks::default().flags(Role::Port, true, OWN), 0);
    }

    /// Each case's hooks (`with` its thing) share the hooks and call for its flags.
    fn assert_flags<T: Copy + std::fmt::Debug>(
        with: impl Fn(T) -> Hooks,
        cases: &[(T, Role, bool, u32)],
    ) {
        for &(thing, role, here, flags) in cases {
            let hooks = with(thing);
            assert_eq!(
                hooks.flags(role, here, OWN),
                flags,
                "{thing:?} on a {role:?}, hgw here: {here}"
            );
            assert!(hooks.is_shared(OWN));
        }
    }

    #[test]
    fn only_a_bridges_xdp_is_skipped_and_only_from_its_ports() {
        let with = |xdp: bool| Hooks {
            tcx_ingress: vec![HGW],
            xdp,
            ..noqueue()
        };
        // (an XDP program, role, hgw here, flags): elsewhere it runs before tc.
        let cases = [
            (true, Role::Bridge, false, DEVICE_INGRESS),
            (true, Role::Bridge, true, 0),
            (true, Role::Uplink, true, 0),
            (true, Role::Port, true, 0),
        ];
        assert_flags(with, &cases);
    }

    #[test]
    fn nftables_hooks_flag_what_a_redirect_would_skip() {
        let with = |hook: Hook| Hooks {
            tcx_ingress: vec![HGW],
            netfilter: vec![(hook, "chain netdev t c".into())],
            ..noqueue()
        };
        // (hook, role, hgw here, flags)
        let cases = [
            (Hook::Ingress, Role::Uplink, true, DEVICE_INGRESS),
            (Hook::Ingress, Role::Port, true, DEVICE_INGRESS),
            (Hook::Ingress, Role::Bridge, true, DEVICE_INGRESS),
            // Skipped by a redirect from a port.
            (Hook::Ingress, Role::Bridge, false, DEVICE_INGRESS),
            // A port's ran before hgw on the bridge.
            (Hook::Ingress, Role::Port, false, 0),
            (Hook::Egress, Role::Uplink, true, DEVICE_NF_EGRESS),
            (Hook::Egress, Role::Bridge, true, DEVICE_NF_EGRESS),
            (Hook::Egress, Role::Port, false, DEVICE_NF_EGRESS),
            (Hook::BridgeIn, Role::Bridge, false, DEVICE_INGRESS),
            // Ran before the bridge's own ingress, where hgw is.
            (Hook::BridgeIn, Role::Bridge, true, 0),
            (Hook::BridgeOut, Role::Bridge, true, DEVICE_EGRESS),
            (Hook::BridgeOut, Role::Bridge, false, DEVICE_EGRESS),
        ];
        assert_flags(with, &cases);
        let status =
            with(Hook::Egress).status(("eth0", 2), (Role::Uplink, true), OWN, &HashMap::new());
        assert_eq!(status.netfilter, vec!["egress: chain netdev t c"]);
        assert_eq!(status.flags, vec!["netfilter-egress"]);
    }

    #[test]
    fn the_bridges_duties_flag_what_a_redirect_would_skip() {
        let with = |duty: BridgeDuty| Hooks {
            tcx_ingress: vec![HGW],
            bridge: vec![duty],
            ..noqueue()
        };
        let both = DEVICE_INGRESS | DEVICE_EGRESS;
        // (duty, role, hgw here, flags)
        let cases = [
            // hgw on the port redirects before the bridge drops; delivery past it too.
            (BridgeDuty::PortState(0), Role::Port, true, both),
            // hgw on the bridge: the bridge dropped it first.
            (BridgeDuty::PortState(2), Role::Port, false, DEVICE_EGRESS),
            (BridgeDuty::Locked, Role::Port, true, DEVICE_INGRESS),
            (BridgeDuty::Locked, Role::Port, false, 0),
            (BridgeDuty::VlanFiltering, Role::Bridge, false, both),
            (BridgeDuty::VlanFiltering, Role::Bridge, true, DEVICE_EGRESS),
            (BridgeDuty::NoFlood, Role::Port, true, DEVICE_EGRESS),
            (BridgeDuty::SmallMtu(1000), Role::Port, true, DEVICE_EGRESS),
            (BridgeDuty::SmallMtu(1000), Role::Port, false, DEVICE_EGRESS),
            (BridgeDuty::PodMtu(1000), Role::Port, true, DEVICE_EGRESS),
            (BridgeDuty::PodXdp, Role::Port, false, DEVICE_EGRESS),
            (BridgeDuty::PodUnread, Role::Port, true, DEVICE_EGRESS),
        ];
        assert_flags(with, &cases);
        let port = |state, locked, no_flood, mtu| crate::kernel::BridgePort {
            state,
            locked,
            no_flood,
            mtu,
            peer: None,
        };
        assert!(BridgeDuty::of_port(port(3, false, false, Some(1500)), 1500).is_empty());
        assert!(BridgeDuty::of_port(port(3, false, false, None), 1500).is_empty());
        assert_eq!(
            BridgeDuty::of_port(port(2, true, true, Some(1400)), 1500),
            [
                BridgeDuty::PortState(2),
                BridgeDuty::Locked,
                BridgeDuty::NoFlood,
                BridgeDuty::SmallMtu(1400),
            ]
        );
        assert_eq!(BridgeDuty::PortState(4).name(), "port state blocking");
        let end = |mtu, xdp| crate::kernel::Link {
            index: 2,
            mac: [2, 0, 0, 0, 0, 2],
            mtu,
            up: true,
            xdp,
        };
        assert!(BridgeDuty::of_pod_end(&end(1500, false), 1500).is_empty());
        assert_eq!(
            BridgeDuty::of_pod_end(&end(1400, true), 1500),
            [BridgeDuty::PodMtu(1400), BridgeDuty::PodXdp]
        );
    }

    #[test]
    fn status_names_what_shares_the_hooks() {
        let hooks = Hooks {
            tcx_ingress: vec![5, HGW, 7],
            root_qdisc: Some("tbf".into()),
            ..Hooks::default()
        };
        let names = HashMap::from([(7, Some("cilium".to_owned())), (5, None)]);
        let status = hooks.status(("veth1", 12), (Role::Port, true), OWN, &names);
        assert_eq!(status.tcx_ingress_before.len(), 1);
        assert_eq!(status.tcx_ingress_after[0].name.as_deref(), Some("cilium"));
        assert_eq!(status.root_qdisc.as_deref(), Some("tbf"));
        assert_eq!(status.flags, vec!["ingress", "egress"]);
    }
}
