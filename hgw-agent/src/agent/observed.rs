//! What the kernel holds, as far as the agent needs it: the uplink's and the bridge's
//! links, the next hops' neighbour entries, the main table's owners per prefix, the
//! bridge's pods (IP -> MAC, MAC -> port), and what shares hgw's tc hooks on the
//! uplink, the bridge and its ports. Fed by dumps at a resync and by typed kernel
//! events in between (tc: an event says which interface to dump again, tcx hooks are
//! queried on a timer); never by the sources, and never written to the kernel.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use hgw_common::Endpoint;
use ipnet::IpNet;

use crate::{
    kernel::{
        BridgePort, BridgeView, KernelEvent, Link, Neighbour, PrefixOwners, nftables::NetfilterHook,
    },
    tc::{BridgeDuty, Hooks},
};

/// A next hop's neighbour entry on the uplink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NextHopEntry {
    pub mac: Option<[u8; 6]>,
    /// NUD_STALE: usable, not confirmed lately.
    pub stale: bool,
}

/// What an event changed, for the reconciler to act on that and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A next hop's MAC (or staleness) changed; `deleted`: its entry went away.
    NextHop { ip: IpAddr, deleted: bool },
    /// Who holds a prefix of the main table changed.
    Prefix(IpNet),
    /// These local pods' endpoints may have changed.
    Pods(Vec<IpAddr>),
    /// A port joined the bridge (`true`) or left it.
    Port {
        index: u32,
        name: String,
        joined: bool,
    },
    /// The uplink's or the bridge's MAC or MTU changed.
    Links,
    /// A qdisc or filter changed on this hooked interface (`None`: possibly on any):
    /// its hooks are to be dumped again.
    Tc(Option<u32>),
    /// What shares hgw's tc hooks changed (after a dump or a tcx query).
    Hooks,
    /// The kernel's routing (a table other than main, or a rule) changed.
    Routing,
    /// The uplink or the bridge was made again under its name or came up (the kernel
    /// drops routes through a device that goes, without telling), or events were lost:
    /// everything is looked at again.
    Resync,
}

#[derive(Debug, Clone)]
pub struct Observed {
    pub uplink_name: String,
    pub bridge_name: String,
    pub uplink: Link,
    pub bridge: Link,
    /// The uplink's neighbour entries, by IP.
    pub next_hops: HashMap<IpAddr, NextHopEntry>,
    /// The main table's prefixes and who holds them.
    pub prefixes: HashMap<IpNet, PrefixOwners>,
    /// The bridge's neighbour entries inside this node's pod CIDRs: pod IP -> MAC.
    pub pods: HashMap<IpAddr, [u8; 6]>,
    /// Learned forwarding entries for the pods' MACs only (a flood of other MACs costs
    /// nothing): MAC -> port.
    pub fdb: HashMap<[u8; 6], u32>,
    /// The bridge's ports: ifindex -> name.
    pub ports: HashMap<u32, String>,
    /// This node's pod CIDRs (only neighbours inside them are pods).
    pub pod_cidrs: Vec<IpNet>,
    /// What shares the tc hooks of the uplink, the bridge and its ports, by ifindex
    /// (an interface not scanned yet has no entry), with the nftables hooks on each.
    pub hooks: HashMap<u32, Hooks>,
    /// nftables' hooks on interfaces, by interface name (matched to the hooked
    /// interfaces in `hooks`).
    pub netfilter: Vec<NetfilterHook>,
    /// The bridge ports' settings, where known (matched into `hooks` as bridge duties).
    pub port_settings: HashMap<u32, BridgePort>,
    /// Whether the bridge filters by VLAN.
    pub vlan_filtering: bool,
    /// The pods' ends of the ports' veths, by port (read every second: what a pod
    /// does to its own interface sends no event here).
    pub pod_ends: HashMap<u32, Link>,
}

impl Observed {
    pub fn new(
        (uplink_name, uplink): (&str, Link),
        (bridge_name, bridge): (&str, Link),
        pod_cidrs: Vec<IpNet>,
    ) -> Self {
        Self {
            uplink_name: uplink_name.to_owned(),
            bridge_name: bridge_name.to_owned(),
            uplink,
            bridge,
            next_hops: HashMap::new(),
            prefixes: HashMap::new(),
            pods: HashMap::new(),
            fdb: HashMap::new(),
            ports: HashMap::new(),
            pod_cidrs,
            hooks: HashMap::new(),
            netfilter: Vec::new(),
            port_settings: HashMap::new(),
            vlan_filtering: false,
            pod_ends: HashMap::new(),
        }
    }

    /// The interfaces whose tc hooks matter: the uplink, the bridge, its ports.
    pub fn hooked(&self) -> Vec<u32> {
        [self.uplink.index, self.bridge.index]
            .into_iter()
            .chain(self.ports.keys().copied())
            .collect()
    }

    fn is_hooked(&self, ifindex: u32) -> bool {
        ifindex == self.uplink.index
            || ifindex == self.bridge.index
            || self.ports.contains_key(&ifindex)
    }

    /// The hooks of `scanned`'s interfaces, from dumps; with `all`, the hooks of every
    /// hooked interface (one missing from `scanned` is gone). Says whether anything
    /// changed.
    pub fn set_hooks(&mut self, scanned: HashMap<u32, Hooks>, all: bool) -> Option<Change> {
        let before = self.hooks.clone();
        if all {
            self.hooks.clear();
        }
        for (ifindex, hooks) in scanned {
            if self.is_hooked(ifindex) {
                self.hooks.insert(ifindex, hooks);
            }
        }
        self.match_duties();
        (self.hooks != before).then_some(Change::Hooks)
    }

    /// nftables' hooks, read again; says whether any hooked interface's changed.
    pub fn set_netfilter(&mut self, netfilter: Vec<NetfilterHook>) -> Option<Change> {
        let before = self.hooks.clone();
        self.netfilter = netfilter;
        self.match_duties();
        (self.hooks != before).then_some(Change::Hooks)
    }

    /// Each hooked interface's nftables hooks, by its name, and the bridge's duties
    /// there: a port's state and lock, the bridge's VLAN filtering.
    fn match_duties(&mut self) {
        for (ifindex, hooks) in &mut self.hooks {
            let name = if *ifindex == self.uplink.index {
                &self.uplink_name
            } else if *ifindex == self.bridge.index {
                &self.bridge_name
            } else if let Some(name) = self.ports.get(ifindex) {
                name
            } else {
                continue;
            };
            let bridge = *ifindex == self.bridge.index;
            hooks.netfilter = self
                .netfilter
                .iter()
                .filter(|h| h.covers(name, bridge))
                .map(|h| (h.hook, h.owner.clone()))
                .collect();
            // Only a bridge's XDP runs where a redirect could skip it.
            hooks.xdp = bridge && self.bridge.xdp;
            hooks.bridge = if bridge {
                self.vlan_filtering
                    .then_some(BridgeDuty::VlanFiltering)
                    .into_iter()
                    .collect()
            } else {
                let mut duties = self
                    .port_settings
                    .get(ifindex)
                    .map(|port| BridgeDuty::of_port(*port, self.bridge.mtu))
                    .unwrap_or_default();
                match self.pod_ends.get(ifindex) {
                    Some(end) => duties.extend(BridgeDuty::of_pod_end(end, self.bridge.mtu)),
                    // A veth whose other end was not read yet (a new pod, or reads
                    // failing): delivery through the bridge until it is.
                    None if self
                        .port_settings
                        .get(ifindex)
                        .is_some_and(|p| p.peer.is_some()) =>
                    {
                        duties.push(BridgeDuty::PodUnread);
                    }
                    None => {}
                }
                duties
            };
        }
    }

    /// The pods' ends of the ports, as read now; a change when the hooks differ.
    pub fn set_pod_ends(&mut self, ends: HashMap<u32, Link>) -> Option<Change> {
        self.set_polled(Vec::new(), None, ends)
    }

    /// What changes without an event, read again: the interfaces whose tcx programs
    /// changed (with their hooks), the bridge's XDP program (`None`: not read) and the
    /// pods' ends of the ports; one change when the hooks differ.
    pub fn set_polled(
        &mut self,
        tcx: Vec<(u32, Hooks)>,
        bridge_xdp: Option<bool>,
        pod_ends: HashMap<u32, Link>,
    ) -> Option<Change> {
        let before = self.hooks.clone();
        for (ifindex, hooks) in tcx {
            if self.is_hooked(ifindex) {
                self.hooks.insert(ifindex, hooks);
            }
        }
        if let Some(xdp) = bridge_xdp {
            self.bridge.xdp = xdp;
        }
        self.pod_ends = pod_ends;
        self.match_duties();
        (self.hooks != before).then_some(Change::Hooks)
    }

    /// The uplink's neighbour table, from a dump.
    pub fn set_next_hops(&mut self, neighbours: impl IntoIterator<Item = Neighbour>) {
        self.next_hops = neighbours
            .into_iter()
            .map(|n| {
                (
                    n.ip,
                    NextHopEntry {
                        mac: n.mac,
                        stale: n.stale,
                    },
                )
            })
            .collect();
    }

    /// The bridge's pods and forwarding entries and its ports, from dumps.
    pub fn set_bridge(
        &mut self,
        neighbours: impl IntoIterator<Item = Neighbour>,
        learned: HashMap<[u8; 6], u32>,
        view: BridgeView,
    ) {
        self.pods = neighbours
            .into_iter()
            .filter(|n| self.is_pod(n.ip))
            .filter_map(|n| Some((n.ip, n.mac?)))
            .collect();
        let macs: HashSet<[u8; 6]> = self.pods.values().copied().collect();
        self.fdb = learned
            .into_iter()
            .filter(|(mac, _)| macs.contains(mac))
            .collect();
        self.vlan_filtering = view.vlan_filtering;
        self.port_settings = view
            .ports
            .iter()
            .filter_map(|(index, _, port)| Some((*index, (*port)?)))
            .collect();
        self.ports = view
            .ports
            .into_iter()
            .map(|(index, name, _)| (index, name))
            .collect();
        self.match_duties();
    }

    fn is_pod(&self, ip: IpAddr) -> bool {
        self.pod_cidrs.iter().any(|cidr| cidr.contains(&ip))
    }

    /// Takes in one event; says what it changed, if anything the agent acts on.
    pub fn apply(&mut self, event: KernelEvent) -> Option<Change> {
        match event {
            KernelEvent::Neighbour { neighbour, deleted }
                if neighbour.ifindex == self.uplink.index =>
            {
                let entry = NextHopEntry {
                    mac: neighbour.mac,
                    stale: neighbour.stale,
                };
                let old = if deleted {
                    self.next_hops.remove(&neighbour.ip)
                } else {
                    self.next_hops.insert(neighbour.ip, entry)
                };
                (old.unwrap_or_default() != entry || deleted).then_some(Change::NextHop {
                    ip: neighbour.ip,
                    deleted,
                })
            }
            KernelEvent::Neighbour { neighbour, deleted }
                if neighbour.ifindex == self.bridge.index && self.is_pod(neighbour.ip) =>
            {
                let old = match neighbour.mac.filter(|_| !deleted) {
                    Some(mac) => self.pods.insert(neighbour.ip, mac),
                    None => self.pods.remove(&neighbour.ip),
                };
                (old != neighbour.mac.filter(|_| !deleted))
                    .then(|| Change::Pods(vec![neighbour.ip]))
            }
            KernelEvent::Neighbour { .. } => None,
            KernelEvent::Fdb { mac, port, deleted } => {
                // Only pods' MACs matter; a pod keeps its port after its forwarding
                // entry ages out (pods do not move between veths).
                if deleted || !self.pods.values().any(|m| *m == mac) {
                    return None;
                }
                (self.fdb.insert(mac, port) != Some(port))
                    .then(|| Change::Pods(self.pods_with(mac)))
            }
            KernelEvent::Route {
                destination,
                owner,
                key,
                deleted,
                replaced,
            } => {
                let entry = self.prefixes.entry(destination).or_default();
                let before = entry.clone();
                entry.apply(owner, key, deleted, replaced);
                let changed = *entry != before;
                if *entry == PrefixOwners::default() {
                    self.prefixes.remove(&destination);
                }
                changed.then_some(Change::Prefix(destination))
            }
            KernelEvent::Link {
                index,
                name,
                controller,
                link,
                port,
                vlan_filtering,
                deleted,
            } => self.on_link(
                index,
                name,
                controller,
                link,
                (port, vlan_filtering),
                deleted,
            ),
            KernelEvent::Tc {
                ifindex: Some(ifindex),
            } => self.is_hooked(ifindex).then_some(Change::Tc(Some(ifindex))),
            KernelEvent::Tc { ifindex: None } => Some(Change::Tc(None)),
            KernelEvent::Routing => Some(Change::Routing),
            KernelEvent::Lost => Some(Change::Resync),
            // The event loop turns it into its route's deletion (the kernel knows the
            // nexthop's route, this view does not).
            KernelEvent::NexthopDeleted { .. } => None,
        }
    }

    fn on_link(
        &mut self,
        index: u32,
        name: Option<String>,
        controller: Option<u32>,
        link: Option<Link>,
        (port, vlan_filtering): (Option<BridgePort>, Option<bool>),
        deleted: bool,
    ) -> Option<Change> {
        let named = |wanted: &str| name.as_deref() == Some(wanted);
        if !deleted
            && ((named(&self.uplink_name) && index != self.uplink.index)
                || (named(&self.bridge_name) && index != self.bridge.index))
        {
            return Some(Change::Resync);
        }
        if index == self.uplink.index || index == self.bridge.index {
            let current = if index == self.uplink.index {
                &mut self.uplink
            } else {
                &mut self.bridge
            };
            let link = link.filter(|_| !deleted)?;
            let came_up = link.up && !current.up;
            let changed = (link.mac, link.mtu, link.xdp) != (current.mac, current.mtu, current.xdp);
            *current = link;
            let filtering = vlan_filtering
                .filter(|on| index == self.bridge.index && *on != self.vlan_filtering);
            if let Some(on) = filtering {
                self.vlan_filtering = on;
            }
            // The ports' MTUs are measured against the bridge's.
            if filtering.is_some() || changed && index == self.bridge.index {
                self.match_duties();
            }
            // (The event loop syncs the devices map on `Links` too.)
            return if came_up {
                Some(Change::Resync)
            } else if changed {
                Some(Change::Links)
            } else {
                filtering.map(|_| Change::Hooks)
            };
        }
        let is_port = !deleted && controller == Some(self.bridge.index);
        let was_port = self.ports.contains_key(&index);
        match (is_port, was_port) {
            (true, false) => {
                let name = name?;
                self.ports.insert(index, name.clone());
                if let Some(port) = port {
                    self.port_settings.insert(index, port);
                }
                Some(Change::Port {
                    index,
                    name,
                    joined: true,
                })
            }
            (false, true) => {
                let name = self.ports.remove(&index).unwrap_or_default();
                self.hooks.remove(&index);
                self.port_settings.remove(&index);
                self.pod_ends.remove(&index);
                Some(Change::Port {
                    index,
                    name,
                    joined: false,
                })
            }
            // Renamed (nftables names its hooks' devices, and from Linux 6.16 hooks a
            // device that takes a listed name at once), or its settings changed.
            (true, true) => {
                let renamed = name.filter(|n| self.ports.get(&index) != Some(n));
                let known = self.port_settings.get(&index);
                // A message that does not say the MTU leaves it as it was.
                let settings = port
                    .map(|p| BridgePort {
                        mtu: p.mtu.or(known.and_then(|k| k.mtu)),
                        peer: p.peer.or(known.and_then(|k| k.peer)),
                        ..p
                    })
                    .filter(|p| known != Some(p));
                if renamed.is_none() && settings.is_none() {
                    return None;
                }
                if let Some(name) = renamed {
                    self.ports.insert(index, name);
                }
                if let Some(port) = settings {
                    self.port_settings.insert(index, port);
                }
                self.match_duties();
                Some(Change::Hooks)
            }
            (false, false) => None,
        }
    }

    /// The pods whose MAC is `mac`.
    fn pods_with(&self, mac: [u8; 6]) -> Vec<IpAddr> {
        self.pods
            .iter()
            .filter(|(_, m)| **m == mac)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Where the uplink program delivers to pod `ip` directly: its MAC from the bridge's
    /// neighbour table, its port from the forwarding table, or from `previous` when
    /// that entry aged out and the MAC is the same. `None`: the bridge delivers.
    pub fn endpoint(&self, ip: IpAddr, previous: Option<&Endpoint>) -> Option<Endpoint> {
        let mac = *self.pods.get(&ip)?;
        let ifindex = self
            .fdb
            .get(&mac)
            .copied()
            .or_else(|| previous.filter(|e| e.mac == mac).map(|e| e.ifindex))
            .filter(|port| self.ports.contains_key(port))?;
        Some(Endpoint {
            ifindex,
            mac,
            _pad: [0; 2],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fixtures::{BRIDGE, UPLINK, observed};
    use crate::kernel::{RouteKey, RouteOwner};

    fn neighbour(ifindex: u32, ip: &str, mac: Option<u8>) -> KernelEvent {
        KernelEvent::Neighbour {
            neighbour: Neighbour {
                ifindex,
                ip: ip.parse().expect("a valid literal"),
                mac: mac.map(|m| [2, 0, 0, 0, 1, m]),
                stale: false,
            },
            deleted: false,
        }
    }

    fn port(index: u32, controller: Option<u32>) -> KernelEvent {
        KernelEvent::Link {
            index,
            name: Some(format!("veth{index}")),
            controller,
            link: None,
            port: None,
            vlan_filtering: None,
            deleted: false,
        }
    }

    #[test]
    fn a_next_hop_change_is_reported_once() {
        let mut o = observed();
        let ip: IpAddr = "172.31.0.2".parse().expect("a valid literal");
        let change = Some(Change::NextHop { ip, deleted: false });
        assert_eq!(o.apply(neighbour(UPLINK, "172.31.0.2", Some(1))), change);
        assert_eq!(o.apply(neighbour(UPLINK, "172.31.0.2", Some(1))), None);
        assert_eq!(o.apply(neighbour(UPLINK, "172.31.0.2", Some(2))), change);
        assert_eq!(o.next_hops[&ip].mac, Some([2, 0, 0, 0, 1, 2]));
    }

    #[test]
    fn a_pod_becomes_an_endpoint_with_its_mac_and_port() {
        let mut o = observed();
        let ip: IpAddr = "10.244.1.5".parse().expect("a valid literal");
        o.apply(port(10, Some(BRIDGE)));
        assert_eq!(
            o.apply(neighbour(BRIDGE, "10.244.1.5", Some(5))),
            Some(Change::Pods(vec![ip]))
        );
        assert_eq!(o.endpoint(ip, None), None, "no port known yet");
        let fdb = KernelEvent::Fdb {
            mac: [2, 0, 0, 0, 1, 5],
            port: 10,
            deleted: false,
        };
        assert_eq!(o.apply(fdb), Some(Change::Pods(vec![ip])));
        let endpoint = o.endpoint(ip, None).expect("endpoint");
        assert_eq!(endpoint.ifindex, 10);
        // The forwarding entry ages out: the pod keeps its port.
        o.fdb.clear();
        assert_eq!(o.endpoint(ip, Some(&endpoint)), Some(endpoint));
        // The port leaves the bridge: no endpoint.
        assert!(matches!(
            o.apply(KernelEvent::Link {
                index: 10,
                name: None,
                controller: None,
                link: None,
                port: None,
                vlan_filtering: None,
                deleted: true
            }),
            Some(Change::Port { joined: false, .. })
        ));
        assert_eq!(o.endpoint(ip, Some(&endpoint)), None);
    }

    #[test]
    fn a_flood_of_unknown_macs_is_not_kept() {
        let mut o = observed();
        for i in 0..10_000u32 {
            let b = i.to_be_bytes();
            let event = KernelEvent::Fdb {
                mac: [2, 9, b[0], b[1], b[2], b[3]],
                port: 10,
                deleted: false,
            };
            assert_eq!(o.apply(event), None);
        }
        assert!(o.fdb.is_empty());
        // Neighbours outside the pod CIDR are not pods either.
        assert_eq!(o.apply(neighbour(BRIDGE, "192.168.5.5", Some(1))), None);
        assert!(o.pods.is_empty());
    }

    #[test]
    fn route_owners_follow_events() {
        let mut o = observed();
        let prefix: IpNet = "10.244.2.0/24".parse().expect("a valid literal");
        let event = |owner, deleted| KernelEvent::Route {
            destination: prefix,
            owner,
            key: RouteKey::default(),
            deleted,
            replaced: false,
        };
        let foreign = RouteOwner::Foreign("static".into());
        assert_eq!(
            o.apply(event(foreign.clone(), false)),
            Some(Change::Prefix(prefix))
        );
        assert_eq!(o.prefixes[&prefix].foreign(&prefix), Some("static"));
        assert_eq!(o.apply(event(foreign, true)), Some(Change::Prefix(prefix)));
        assert!(!o.prefixes.contains_key(&prefix));
    }

    /// Routes of different metrics (or TOS) share a prefix; a replace takes the place
    /// of the one of its own key, a deletion goes with its own; only one at hgw's key
    /// (IPv4: TOS 0, metric 0) holds the prefix against hgw.
    #[test]
    fn route_owners_are_kept_by_metric() {
        let mut o = observed();
        let prefix: IpNet = "10.244.2.0/24".parse().expect("a valid literal");
        let hgw = RouteOwner::Hgw {
            gateway: Some("172.31.0.2".parse().expect("a valid literal")),
            oif: Some(UPLINK),
        };
        let event = |owner: &RouteOwner, metric, deleted, replaced| KernelEvent::Route {
            destination: prefix,
            owner: owner.clone(),
            key: RouteKey { tos: 0, metric },
            deleted,
            replaced,
        };
        let ours = |o: &Observed| o.prefixes.get(&prefix).and_then(|p| p.ours);
        let foreign = |o: &Observed| {
            o.prefixes
                .get(&prefix)
                .and_then(|p| p.foreign(&prefix).map(str::to_owned))
        };
        let (boot, static_) = (
            RouteOwner::Foreign("boot".into()),
            RouteOwner::Foreign("static".into()),
        );
        o.apply(event(&hgw, 0, false, false));
        o.apply(event(&static_, 100, false, false));
        o.apply(event(&boot, 200, false, false));
        // Replaced at 100: hgw's route at 0 stays; neither other holds the prefix.
        o.apply(event(&static_, 100, false, true));
        assert!(
            ours(&o).is_some(),
            "hgw's route went with another metric's replace"
        );
        assert_eq!(foreign(&o), None);
        // Replaced at hgw's metric: hgw's route is gone, the static one holds it.
        o.apply(event(&static_, 0, false, true));
        assert!(ours(&o).is_none(), "hgw's route stayed after its replace");
        assert_eq!(foreign(&o).as_deref(), Some("static"));
        // A route with a TOS at metric 0 has a key of its own: it replaces nothing there.
        let tos = |deleted, replaced| KernelEvent::Route {
            destination: prefix,
            owner: boot.clone(),
            key: RouteKey {
                tos: 0x10,
                metric: 0,
            },
            deleted,
            replaced,
        };
        o.apply(tos(false, true));
        assert_eq!(foreign(&o).as_deref(), Some("static"));
        o.apply(tos(true, false));
        // Deleted at 0: the others of 100 and 200 are still known, and hold nothing.
        o.apply(event(&static_, 0, true, false));
        assert_eq!(foreign(&o), None);
        assert!(o.prefixes.contains_key(&prefix));
        o.apply(event(&static_, 100, true, false));
        o.apply(event(&boot, 200, true, false));
        assert!(
            !o.prefixes.contains_key(&prefix),
            "{:?}",
            o.prefixes.get(&prefix)
        );
    }

    #[test]
    fn tc_events_concern_hooked_interfaces_only() {
        let mut o = observed();
        let tc = |ifindex| KernelEvent::Tc { ifindex };
        assert_eq!(o.apply(tc(Some(UPLINK))), Some(Change::Tc(Some(UPLINK))));
        assert_eq!(o.apply(tc(Some(40))), None, "not a port");
        o.apply(port(40, Some(BRIDGE)));
        assert_eq!(o.apply(tc(Some(40))), Some(Change::Tc(Some(40))));
        assert_eq!(o.apply(tc(None)), Some(Change::Tc(None)));
        // Scanned hooks are kept for hooked interfaces only, and go with the port.
        let scanned = HashMap::from([(40, Hooks::default()), (41, Hooks::default())]);
        assert_eq!(o.set_hooks(scanned.clone(), false), Some(Change::Hooks));
        assert_eq!(o.set_hooks(scanned, false), None, "nothing new");
        assert!(o.hooks.contains_key(&40) && !o.hooks.contains_key(&41));
        o.apply(port(40, None));
        assert!(o.hooks.is_empty());
    }

    #[test]
    fn nftables_hooks_go_to_the_interfaces_they_name() {
        use crate::kernel::nftables::{Devices, Hook, NetfilterHook};
        let mut o = observed();
        o.apply(port(40, Some(BRIDGE)));
        let scanned = HashMap::from([
            (UPLINK, Hooks::default()),
            (BRIDGE, Hooks::default()),
            (40, Hooks::default()),
        ]);
        o.set_hooks(scanned, true);
        let hook = |hook, devices| NetfilterHook {
            hook,
            devices,
            owner: "chain netdev t c".into(),
        };
        let netfilter = vec![
            hook(Hook::Egress, Devices::Name("eth0".into())),
            hook(Hook::Ingress, Devices::Prefix("veth".into())),
            hook(Hook::BridgeOut, Devices::Bridges),
        ];
        assert_eq!(o.set_netfilter(netfilter.clone()), Some(Change::Hooks));
        assert_eq!(o.set_netfilter(netfilter), None, "nothing new");
        let on = |o: &Observed, ifindex: u32| -> Vec<Hook> {
            o.hooks[&ifindex]
                .netfilter
                .iter()
                .map(|(h, _)| *h)
                .collect()
        };
        assert_eq!(on(&o, UPLINK), [Hook::Egress]);
        assert_eq!(on(&o, BRIDGE), [Hook::BridgeOut]);
        assert_eq!(on(&o, 40), [Hook::Ingress]);
        // A dump of the port's tc hooks keeps its nftables hooks.
        o.set_hooks(HashMap::from([(40, Hooks::default())]), false);
        assert_eq!(on(&o, 40), [Hook::Ingress]);
        // Renamed out of the prefix, and back.
        let renamed = |name: &str| KernelEvent::Link {
            index: 40,
            name: Some(name.into()),
            controller: Some(BRIDGE),
            link: None,
            port: None,
            vlan_filtering: None,
            deleted: false,
        };
        assert_eq!(o.apply(renamed("pod40")), Some(Change::Hooks));
        assert!(on(&o, 40).is_empty());
        assert_eq!(o.apply(renamed("pod40")), None, "the same name");
        assert_eq!(o.apply(renamed("veth40")), Some(Change::Hooks));
        assert_eq!(on(&o, 40), [Hook::Ingress]);
        assert_eq!(o.set_netfilter(Vec::new()), Some(Change::Hooks));
        assert!(on(&o, UPLINK).is_empty() && on(&o, 40).is_empty());
        // Unreadable: a chain on every hook of every interface.
        o.set_netfilter(crate::kernel::nftables::unknown("EPERM"));
        for ifindex in [UPLINK, BRIDGE, 40] {
            assert_eq!(on(&o, ifindex), [Hook::Ingress, Hook::Egress]);
        }
    }

    /// Port 40 of the bridge, both hooked.
    fn observed_with_port_40() -> Observed {
        let mut o = observed();
        o.apply(port(40, Some(BRIDGE)));
        o.set_hooks(
            HashMap::from([(BRIDGE, Hooks::default()), (40, Hooks::default())]),
            true,
        );
        o
    }

    /// A forwarding port's settings.
    fn forwarding(mtu: Option<u32>, peer: Option<(i32, u32)>) -> BridgePort {
        BridgePort {
            state: crate::kernel::BR_STATE_FORWARDING,
            locked: false,
            no_flood: false,
            mtu,
            peer,
        }
    }

    /// Port 40's settings as a link message says them.
    fn port_40(settings: BridgePort) -> KernelEvent {
        KernelEvent::Link {
            index: 40,
            name: Some("veth40".into()),
            controller: Some(BRIDGE),
            link: None,
            port: Some(settings),
            vlan_filtering: None,
            deleted: false,
        }
    }

    #[test]
    fn a_ports_state_and_the_bridges_vlan_filtering_become_duties() {
        let mut o = observed_with_port_40();
        let settings = |state| {
            port_40(BridgePort {
                state,
                ..forwarding(None, None)
            })
        };
        assert_eq!(o.apply(settings(0)), Some(Change::Hooks));
        assert_eq!(o.hooks[&40].bridge, [BridgeDuty::PortState(0)]);
        assert_eq!(o.apply(settings(0)), None, "nothing new");
        assert_eq!(o.apply(settings(3)), Some(Change::Hooks));
        assert!(o.hooks[&40].bridge.is_empty());
        let link = o.bridge;
        let bridge = |vlan_filtering| KernelEvent::Link {
            index: BRIDGE,
            name: Some("cni0".into()),
            controller: None,
            link: Some(link),
            port: None,
            vlan_filtering,
            deleted: false,
        };
        assert_eq!(o.apply(bridge(Some(true))), Some(Change::Hooks));
        assert_eq!(o.hooks[&BRIDGE].bridge, [BridgeDuty::VlanFiltering]);
        // The bridge's own notifications say nothing of it: it stays.
        assert_eq!(o.apply(bridge(None)), None);
        assert!(o.vlan_filtering);
    }

    #[test]
    fn a_port_below_the_bridges_mtu_is_a_duty_until_the_bridge_comes_down_to_it() {
        let mut o = observed_with_port_40();
        let settings = |mtu| port_40(forwarding(mtu, None));
        let small = o.bridge.mtu - 100;
        assert_eq!(o.apply(settings(Some(small))), Some(Change::Hooks));
        assert_eq!(o.hooks[&40].bridge, [BridgeDuty::SmallMtu(small)]);
        // A notification without the MTU leaves it known.
        assert_eq!(o.apply(settings(None)), None);
        let mut link = o.bridge;
        link.mtu = small;
        let lowered = KernelEvent::Link {
            index: BRIDGE,
            name: Some("cni0".into()),
            controller: None,
            link: Some(link),
            port: None,
            vlan_filtering: None,
            deleted: false,
        };
        assert_eq!(o.apply(lowered), Some(Change::Links));
        assert!(o.hooks[&40].bridge.is_empty());
    }

    #[test]
    fn a_pods_end_not_read_yet_is_a_duty_until_it_is() {
        let mut o = observed_with_port_40();
        let veth = port_40(forwarding(Some(1500), Some((1, 2))));
        assert_eq!(o.apply(veth), Some(Change::Hooks));
        assert_eq!(o.hooks[&40].bridge, [BridgeDuty::PodUnread]);
        let mut end = o.bridge;
        assert_eq!(
            o.set_pod_ends(HashMap::from([(40, end)])),
            Some(Change::Hooks)
        );
        assert!(o.hooks[&40].bridge.is_empty());
        assert_eq!(o.set_pod_ends(HashMap::from([(40, end)])), None);
        end.xdp = true;
        assert_eq!(
            o.set_pod_ends(HashMap::from([(40, end)])),
            Some(Change::Hooks)
        );
        assert_eq!(o.hooks[&40].bridge, [BridgeDuty::PodXdp]);
        // An end read again with another MTU that is still no smaller than the
        // bridge's changes no duty: nothing to write.
        end.mtu += 100;
        assert_eq!(o.set_pod_ends(HashMap::from([(40, end)])), None);
    }

    #[test]
    fn one_poll_brings_tcx_the_bridges_xdp_and_the_pods_ends_together() {
        let mut o = observed_with_port_40();
        let veth = port_40(forwarding(Some(1500), Some((1, 2))));
        assert_eq!(o.apply(veth), Some(Change::Hooks));
        let end = o.bridge;
        let uplink = Hooks {
            tcx_ingress: vec![7],
            ..Hooks::default()
        };
        let polled = o.set_polled(
            vec![(UPLINK, uplink), (12345, Hooks::default())],
            Some(true),
            HashMap::from([(40, end)]),
        );
        assert_eq!(polled, Some(Change::Hooks));
        assert_eq!(o.hooks[&UPLINK].tcx_ingress, [7]);
        // Not a hooked interface: not kept.
        assert!(!o.hooks.contains_key(&12345));
        assert!(o.hooks[&BRIDGE].xdp);
        assert!(o.hooks[&40].bridge.is_empty());
        // The same again: no change. Not read (`None`): the bridge keeps what it had.
        let uplink = o.hooks[&UPLINK].clone();
        assert_eq!(
            o.set_polled(vec![(UPLINK, uplink)], None, HashMap::from([(40, end)])),
            None
        );
        assert!(o.hooks[&BRIDGE].xdp);
    }

    #[test]
    fn the_uplink_made_again_is_noticed() {
        let mut o = observed();
        let event = KernelEvent::Link {
            index: 99,
            name: Some("eth0".into()),
            controller: None,
            link: None,
            port: None,
            vlan_filtering: None,
            deleted: false,
        };
        assert_eq!(o.apply(event), Some(Change::Resync));
    }
}
