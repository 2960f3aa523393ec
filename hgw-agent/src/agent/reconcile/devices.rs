//! The programs on the uplink, the bridge and (in ports mode) each port, and the
//! devices map: what shares hgw's tc hooks on each interface, for the fast path and
//! for status.

use std::collections::HashMap;

use log::{info, warn};

use super::{FastPathMaps, Reconciler, RouteTable};
use crate::{agent::observed::Observed, serve::status::HookStatus, tc::Role};

impl<R: RouteTable, M: FastPathMaps> Reconciler<R, M> {
    /// The programs back on the uplink and the bridge, and on every port.
    pub fn attach(&mut self, observed: &Observed) {
        let Some(maps) = &mut self.maps else { return };
        if let Err(e) = maps.attach_node(
            (&observed.bridge_name, observed.bridge.index),
            (&observed.uplink_name, observed.uplink.index),
        ) {
            warn!("{e}");
        }
        if self.follow_ports {
            for (index, name) in &observed.ports {
                if let Err(e) = maps.attach_port(name, *index) {
                    warn!("bridge port {name}: {e}");
                }
            }
        }
    }

    /// Where an interface sits on the redirect's way, and whether hgw's program runs
    /// on its ingress; `None`: not an interface hgw redirects from or past.
    fn placement(&self, ifindex: u32, observed: &Observed) -> Option<(Role, bool)> {
        if ifindex == observed.uplink.index {
            Some((Role::Uplink, true))
        } else if ifindex == observed.bridge.index {
            Some((Role::Bridge, !self.follow_ports))
        } else if observed.ports.contains_key(&ifindex) {
            Some((Role::Port, self.follow_ports))
        } else {
            None
        }
    }

    fn interface_name<'a>(&self, ifindex: u32, observed: &'a Observed) -> &'a str {
        if ifindex == observed.uplink.index {
            &observed.uplink_name
        } else if ifindex == observed.bridge.index {
            &observed.bridge_name
        } else {
            observed.ports.get(&ifindex).map_or("", String::as_str)
        }
    }

    /// The devices map brought to what the observed hooks say: an entry for each
    /// hooked interface with flags, none for the others; only differences written.
    pub fn sync_devices(&mut self, observed: &Observed) {
        let Some(maps) = &self.maps else { return };
        let own = maps.own_programs();
        self.warn_programs_before(observed, &own);
        let want: HashMap<u32, u32> = observed
            .hooks
            .iter()
            .filter_map(|(ifindex, hooks)| {
                let (role, here) = self.placement(*ifindex, observed)?;
                let flags = hooks.flags(role, here, &own);
                (flags != 0).then_some((*ifindex, flags))
            })
            .collect();
        let mut writes: Vec<(u32, u32)> = want
            .iter()
            .filter(|(ifindex, flags)| self.devices.get(ifindex) != Some(flags))
            .map(|(ifindex, flags)| (*ifindex, *flags))
            .collect();
        writes.extend(
            self.devices
                .keys()
                .filter(|ifindex| !want.contains_key(ifindex))
                .map(|ifindex| (*ifindex, 0)),
        );
        for (ifindex, flags) in writes {
            let name = self.interface_name(ifindex, observed).to_owned();
            let Some(maps) = &mut self.maps else { return };
            match maps.set_device(ifindex, flags) {
                Ok(()) if flags == 0 => {
                    if self.devices.remove(&ifindex).is_some() && !name.is_empty() {
                        info!("tc hooks of {name}: nothing a redirect would skip");
                    }
                }
                Ok(()) => {
                    self.devices.insert(ifindex, flags);
                    info!(
                        "tc hooks of {name} (ifindex {ifindex}): {} (the fast path leaves what they concern to the kernel)",
                        crate::tc::flag_names(flags).join(" and ")
                    );
                }
                Err(e) => warn!("{e}"),
            }
        }
    }

    /// Programs that run before hgw's on a hook it redirects from see every packet
    /// first and may take it: an earlier agent's, pinned in another `pin_dir`, would
    /// take all of hgw's traffic while this agent's counters stay at 0. Without
    /// CAP_SYS_ADMIN they cannot be named (with it, a pinned hgw program elsewhere is
    /// refused at start), so say so once per change, by id.
    fn warn_programs_before(&mut self, observed: &Observed, own: &[u32]) {
        for (ifindex, hooks) in &observed.hooks {
            let Some((role, true)) = self.placement(*ifindex, observed) else {
                continue;
            };
            let (before, _) = hooks.ingress_split(role, true, own);
            if self.warned_before.get(ifindex) == Some(&before) {
                continue;
            }
            if !before.is_empty() {
                warn!(
                    "{} ingress: tcx programs {before:?} run before hgw's and see every packet first; if one is an earlier hgw agent's (pinned in another pin_dir), remove it with `hgw-agent uninstall --pin-dir OLD`",
                    self.interface_name(*ifindex, observed)
                );
            }
            self.warned_before.insert(*ifindex, before);
        }
    }

    /// What shares hgw's hooks: the uplink and the bridge, and each port with
    /// something on it. Program names from `names`, where known.
    pub fn hook_status(
        &self,
        observed: &Observed,
        names: &HashMap<u32, Option<String>>,
    ) -> Vec<HookStatus> {
        let Some(maps) = &self.maps else {
            return Vec::new();
        };
        let own = maps.own_programs();
        let mut ports: Vec<(&String, u32)> = observed
            .ports
            .iter()
            .map(|(ifindex, name)| (name, *ifindex))
            .collect();
        ports.sort();
        [observed.uplink.index, observed.bridge.index]
            .into_iter()
            .chain(ports.into_iter().map(|(_, ifindex)| ifindex))
            .filter_map(|ifindex| {
                let placement = self.placement(ifindex, observed)?;
                let hooks = observed.hooks.get(&ifindex).cloned().unwrap_or_default();
                if placement.0 == Role::Port && !hooks.is_shared(&own) {
                    return None;
                }
                let name = self.interface_name(ifindex, observed);
                Some(hooks.status((name, ifindex), placement, &own, names))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_support::{FakeMaps, FakeRoutes, HGW_PROGRAM, block_on, desired_state};
    use super::super::*;
    use crate::agent::fixtures::{UPLINK, observed};
    use crate::kernel::KernelEvent;

    #[test]
    fn the_devices_map_follows_the_hooks_writing_only_differences() {
        use crate::{agent::fixtures::BRIDGE, tc::Hooks};
        use hgw_common::{DEVICE_EGRESS, DEVICE_INGRESS};
        let routes = FakeRoutes::default();
        let mut observed = observed();
        // Left by an earlier agent in a pinned map, for an interface now clean.
        let maps = FakeMaps {
            devices: BTreeMap::from([(UPLINK, DEVICE_INGRESS)]),
            ..FakeMaps::default()
        };
        let mut r = Reconciler::new(&routes, Some(maps), true, desired_state());
        observed.apply(KernelEvent::Link {
            index: 20,
            name: Some("veth20".into()),
            controller: Some(BRIDGE),
            link: None,
            port: None,
            vlan_filtering: None,
            deleted: false,
        });
        let clean = Hooks {
            tcx_ingress: vec![HGW_PROGRAM],
            root_qdisc: Some("noqueue".into()),
            ..Hooks::default()
        };
        let limited = Hooks {
            root_qdisc: Some("tbf".into()),
            ..clean.clone()
        };
        let scanned = HashMap::from([
            (UPLINK, clean.clone()),
            // hgw on the ports: anything on the bridge's ingress is skipped.
            (
                BRIDGE,
                Hooks {
                    tcx_ingress: vec![7],
                    ..Hooks::default()
                },
            ),
            (20, limited),
        ]);
        let change = observed.set_hooks(scanned, true).expect("a change");
        block_on(r.on_change(change, &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(
            maps.devices,
            BTreeMap::from([(BRIDGE, DEVICE_INGRESS), (20, DEVICE_EGRESS)])
        );
        assert_eq!(maps.writes, 3, "two set, one removed");
        assert!(maps.generation >= 3, "every write makes cached flows stale");
        let status = r.hook_status(&observed, &HashMap::new());
        assert_eq!(
            status
                .iter()
                .map(|h| h.interface.as_str())
                .collect::<Vec<_>>(),
            ["eth0", "cni0", "veth20"]
        );
        // The limit is removed: only that entry goes.
        r.maps.as_mut().expect("present").writes = 0;
        let change = observed.set_hooks(HashMap::from([(20, clean)]), false);
        block_on(r.on_change(change.expect("a change"), &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!(maps.devices, BTreeMap::from([(BRIDGE, DEVICE_INGRESS)]));
        assert_eq!(maps.writes, 1);
        assert_eq!(r.hook_status(&observed, &HashMap::new()).len(), 2);
        // A routing change: no write, a new generation.
        let generation = maps.generation;
        block_on(r.on_change(Change::Routing, &observed));
        let maps = r.maps.as_ref().expect("present");
        assert_eq!((maps.writes, maps.generation), (1, generation + 1));
    }
}
