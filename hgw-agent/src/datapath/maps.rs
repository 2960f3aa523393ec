//! The maps the agent writes (node config, routes, local endpoints, devices) and the
//! generation that tells the programs their cached flows are stale.

use std::net::IpAddr;

use aya::maps::{MapError, lpm_trie::Key};
use hgw_common::{
    Endpoint, MAP_CONFIG, MAP_DEVICES, MAP_ENDPOINTS_V4, MAP_ENDPOINTS_V6, MAP_GENERATION,
    MAP_ROUTES_V4, MAP_ROUTES_V6, NextHop, NodeConfig,
};
use ipnet::IpNet;

use super::{Datapath, DatapathError};

impl Datapath {
    /// Writes what the programs know of this node (its MACs may change while it runs).
    pub fn set_config(&mut self, node: NodeConfig) -> Result<(), DatapathError> {
        let result = self
            .config
            .set(0, node, 0)
            .map_err(map_error("writing", MAP_CONFIG));
        self.next_generation(result)
    }

    /// After a write to the config, routes or endpoints (done or not: a failed one
    /// may have changed something too), every cached flow is stale: noted here, and
    /// made so for the programs by [`Datapath::publish_generation`].
    fn next_generation(&mut self, result: Result<(), DatapathError>) -> Result<(), DatapathError> {
        self.generation_pending = true;
        result
    }

    /// Changes the generation if the maps were written since it last changed: the
    /// programs look every cached flow's next packet up again. Once per pass of the
    /// agent's loop, so that 5,000 entries written together cost one generation write,
    /// not 5,000.
    pub fn publish_generation(&mut self) -> Result<(), DatapathError> {
        if !std::mem::take(&mut self.generation_pending) {
            return Ok(());
        }
        self.generation_now = self.generation_now.wrapping_add(1);
        self.generation
            .set(0, self.generation_now, 0)
            .map_err(map_error("writing", MAP_GENERATION))
    }

    /// Sets interface `ifindex`'s `DEVICE_*` bits (non-zero: zero is no entry).
    pub fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        let result = self
            .devices
            .insert(ifindex, flags, 0)
            .map_err(map_error("updating", MAP_DEVICES));
        self.next_generation(result)
    }

    /// Interface `ifindex` has nothing a redirect would skip.
    pub fn remove_device(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let result = absent_is_fine(self.devices.remove(&ifindex));
        self.next_generation(result.map_err(map_error("deleting from", MAP_DEVICES)))
    }

    /// The devices map's entries now (an earlier agent's, when pinned).
    pub fn devices(&self) -> Vec<(u32, u32)> {
        self.devices.iter().filter_map(Result::ok).collect()
    }

    /// The kernel's routing changed (a route or a rule): cached flows ask the FIB again.
    pub fn bump_generation(&mut self) -> Result<(), DatapathError> {
        self.next_generation(Ok(()))
    }

    pub fn set_endpoint(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<(), DatapathError> {
        let (result, map) = match ip {
            IpAddr::V4(ip) => (
                self.endpoints_v4.insert(ip.octets(), endpoint, 0),
                MAP_ENDPOINTS_V4,
            ),
            IpAddr::V6(ip) => (
                self.endpoints_v6.insert(ip.octets(), endpoint, 0),
                MAP_ENDPOINTS_V6,
            ),
        };
        self.next_generation(result.map_err(map_error("updating", map)))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        let (result, map) = match ip {
            IpAddr::V4(ip) => (self.endpoints_v4.remove(&ip.octets()), MAP_ENDPOINTS_V4),
            IpAddr::V6(ip) => (self.endpoints_v6.remove(&ip.octets()), MAP_ENDPOINTS_V6),
        };
        self.next_generation(absent_is_fine(result).map_err(map_error("deleting from", map)))
    }

    pub fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
        let prefix = u32::from(cidr.prefix_len());
        let (result, map) = match cidr {
            IpNet::V4(net) => (
                self.routes_v4
                    .insert(&Key::new(prefix, net.network().octets()), next_hop, 0),
                MAP_ROUTES_V4,
            ),
            IpNet::V6(net) => (
                self.routes_v6
                    .insert(&Key::new(prefix, net.network().octets()), next_hop, 0),
                MAP_ROUTES_V6,
            ),
        };
        self.next_generation(result.map_err(map_error("updating", map)))
    }

    pub fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        let prefix = u32::from(cidr.prefix_len());
        let (result, map) = match cidr {
            IpNet::V4(net) => (
                self.routes_v4
                    .remove(&Key::new(prefix, net.network().octets())),
                MAP_ROUTES_V4,
            ),
            IpNet::V6(net) => (
                self.routes_v6
                    .remove(&Key::new(prefix, net.network().octets())),
                MAP_ROUTES_V6,
            ),
        };
        self.next_generation(absent_is_fine(result).map_err(map_error("deleting from", map)))
    }

    /// The fast-path routes the maps hold now (left by an earlier agent, when pinned).
    pub fn routes(&self) -> Vec<(IpNet, NextHop)> {
        let v4 = self
            .routes_v4
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, hop)| {
                let net = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                Some((IpNet::V4(net), hop))
            });
        let v6 = self
            .routes_v6
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, hop)| {
                let net = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                Some((IpNet::V6(net), hop))
            });
        v4.chain(v6).collect()
    }

    /// The local pods the maps hold now.
    pub fn endpoints(&self) -> Vec<(IpAddr, Endpoint)> {
        let v4 = self
            .endpoints_v4
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, e)| (IpAddr::from(ip), e));
        let v6 = self
            .endpoints_v6
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, e)| (IpAddr::from(ip), e));
        v4.chain(v6).collect()
    }
}

pub(super) fn map_error(
    operation: &'static str,
    map: &'static str,
) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        operation,
        map,
        source,
    }
}

/// Deleting what is not there is done.
fn absent_is_fine(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
