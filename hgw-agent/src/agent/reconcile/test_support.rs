//! The fake main table and fast-path maps the reconciler's tests run against, and
//! their peers.

use std::{cell::RefCell, collections::BTreeMap, net::IpAddr};

use hgw_common::{Endpoint, NextHop, NodeConfig};
use ipnet::IpNet;

use super::{FastPathMaps, MapEntries, RouteTable};
use crate::{
    agent::{
        desired::{DesiredState, NodeFacts},
        fixtures::{self, UPLINK, network},
        observed::Observed,
    },
    config::{Origin, Peer},
    datapath::DatapathError,
    kernel::{HgwRoute, KernelError, KernelEvent, RouteKey, RouteOwner},
};

/// A main table: prefix -> (hgw's next hop, or someone else's protocol).
#[derive(Default)]
pub(super) struct FakeRoutes {
    pub(super) table: RefCell<BTreeMap<IpNet, Result<IpAddr, String>>>,
    pub(super) writes: RefCell<Vec<String>>,
    pub(super) resolved: RefCell<Vec<IpAddr>>,
}

impl RouteTable for &FakeRoutes {
    async fn install(
        &self,
        destination: IpNet,
        gateway: IpAddr,
        oif: u32,
        ours_there: bool,
    ) -> Result<(), KernelError> {
        let mut table = self.table.borrow_mut();
        if let Some(Err(protocol)) = table.get(&destination) {
            return Err(KernelError::ForeignRoute {
                destination,
                protocol: protocol.clone(),
            });
        }
        assert_eq!(oif, UPLINK);
        self.writes.borrow_mut().push(format!(
            "{} {destination} via {gateway}",
            if ours_there { "replace" } else { "add" }
        ));
        table.insert(destination, Ok(gateway));
        Ok(())
    }

    async fn delete(&self, route: HgwRoute) -> Result<(), KernelError> {
        let mut table = self.table.borrow_mut();
        if matches!(table.get(&route.destination), Some(Ok(_))) {
            table.remove(&route.destination);
            self.writes
                .borrow_mut()
                .push(format!("del {}", route.destination));
        }
        Ok(())
    }

    async fn resolve(&self, _oif: u32, ip: IpAddr) -> Result<(), KernelError> {
        self.resolved.borrow_mut().push(ip);
        Ok(())
    }

    async fn lost(&self, destination: IpNet) {
        self.writes.borrow_mut().push(format!("lost {destination}"));
    }
}

#[derive(Default)]
pub(super) struct FakeMaps {
    pub(super) routes: BTreeMap<IpNet, NextHop>,
    pub(super) devices: BTreeMap<u32, u32>,
    pub(super) writes: usize,
    pub(super) generation: u32,
    /// Route writes not yet published (one generation for all of them).
    pub(super) pending: bool,
}

impl FastPathMaps for FakeMaps {
    fn set_config(&mut self, _: NodeConfig) -> Result<(), DatapathError> {
        Ok(())
    }
    fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
        self.writes += 1;
        self.pending = true;
        self.routes.insert(cidr, next_hop);
        Ok(())
    }
    fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        self.writes += 1;
        self.pending = true;
        self.routes.remove(&cidr);
        Ok(())
    }
    fn set_endpoint(&mut self, _: IpAddr, _: Endpoint) -> Result<(), DatapathError> {
        Ok(())
    }
    fn remove_endpoint(&mut self, _: IpAddr) -> Result<(), DatapathError> {
        Ok(())
    }
    fn attach_node(&mut self, _: (&str, u32), _: (&str, u32)) -> Result<(), DatapathError> {
        Ok(())
    }
    fn attach_port(&mut self, _: &str, _: u32) -> Result<(), DatapathError> {
        Ok(())
    }
    fn detach_port(&mut self, _: u32) {}
    fn entries(&self) -> MapEntries {
        (
            self.routes.iter().map(|(c, h)| (*c, *h)).collect(),
            Vec::new(),
        )
    }
    fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        self.writes += 1;
        self.generation += 1;
        if flags == 0 {
            self.devices.remove(&ifindex);
        } else {
            self.devices.insert(ifindex, flags);
        }
        Ok(())
    }
    fn devices(&self) -> Vec<(u32, u32)> {
        self.devices.iter().map(|(i, f)| (*i, *f)).collect()
    }
    fn bump_generation(&mut self) -> Result<(), DatapathError> {
        self.generation += 1;
        Ok(())
    }
    fn publish_generation(&mut self) -> Result<(), DatapathError> {
        if std::mem::take(&mut self.pending) {
            self.generation += 1;
        }
        Ok(())
    }
    fn own_programs(&self) -> Vec<u32> {
        vec![HGW_PROGRAM]
    }
}

pub(super) const HGW_PROGRAM: u32 = 100;

fn node() -> NodeFacts {
    fixtures::node("172.31.0.1/16", &[])
}

pub(super) fn desired_state() -> DesiredState {
    DesiredState::new(network(), Some(node()))
}

pub(super) fn peers(n: u16) -> Vec<Peer> {
    (2..2 + n)
        .map(|i| Peer {
            name: format!("n{i}"),
            node_ip: format!("172.31.{}.{}", i / 250, i % 250 + 2)
                .parse()
                .expect("a valid literal"),
            pod_cidr: format!("10.{}.{}.0/24", 100 + i / 250, i % 250)
                .parse()
                .expect("a valid literal"),
            v6: None,
            source: "static".into(),
            lease: None,
            origin: Origin::Static { index: i.into() },
            backend: None,
        })
        .collect()
}

/// Feeds the fake table's state back as route events, as the kernel would.
pub(super) fn observe_routes(observed: &mut Observed, routes: &FakeRoutes) {
    observed.prefixes.clear();
    for (destination, owner) in routes.table.borrow().iter() {
        let owner = match owner {
            Ok(gateway) => RouteOwner::Hgw {
                gateway: Some(*gateway),
                oif: Some(UPLINK),
            },
            Err(protocol) => RouteOwner::Foreign(protocol.clone()),
        };
        observed.apply(KernelEvent::Route {
            destination: *destination,
            owner,
            key: RouteKey::hgw(destination),
            deleted: false,
            replaced: false,
        });
    }
}

pub(super) fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}
