//! The kernel and the fast path as the reconciler sees them: [`Kernel`] as its
//! [`RouteTable`], [`Datapath`] as its [`FastPathMaps`], and the node's config as the
//! programs take it.

use std::net::IpAddr;

use hgw_common::{Endpoint, NextHop, NodeConfig};
use ipnet::IpNet;

use super::reconcile::{FastPathMaps, MapEntries, RouteTable};
use crate::{
    config::{Config, FastPath, Network},
    datapath::{Datapath, DatapathError},
    kernel::{HgwRoute, Kernel, KernelError, Link},
    node::{
        conntrack::{self, ConntrackError},
        forwarding::Forwarding,
    },
};

impl RouteTable for Kernel {
    async fn install(
        &self,
        destination: IpNet,
        gateway: IpAddr,
        oif: u32,
        ours_there: bool,
    ) -> Result<(), KernelError> {
        self.install_route(destination, gateway, oif, ours_there)
            .await
    }

    async fn delete(&self, route: HgwRoute) -> Result<(), KernelError> {
        self.delete_route(&route).await
    }

    async fn resolve(&self, oif: u32, ip: IpAddr) -> Result<(), KernelError> {
        self.resolve_neighbour(oif, ip).await
    }

    async fn lost(&self, destination: IpNet) {
        self.forget_nexthop(destination);
    }
}

impl FastPathMaps for Datapath {
    fn set_config(&mut self, node: NodeConfig) -> Result<(), DatapathError> {
        Datapath::set_config(self, node)
    }

    fn set_route(&mut self, cidr: IpNet, next_hop: NextHop) -> Result<(), DatapathError> {
        Datapath::set_route(self, cidr, next_hop)
    }

    fn remove_route(&mut self, cidr: IpNet) -> Result<(), DatapathError> {
        Datapath::remove_route(self, cidr)
    }

    fn set_endpoint(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<(), DatapathError> {
        Datapath::set_endpoint(self, ip, endpoint)
    }

    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        Datapath::remove_endpoint(self, ip)
    }

    fn attach_node(
        &mut self,
        bridge: (&str, u32),
        uplink: (&str, u32),
    ) -> Result<(), DatapathError> {
        Datapath::attach_node(self, bridge, uplink)
    }

    fn attach_port(&mut self, name: &str, index: u32) -> Result<(), DatapathError> {
        Datapath::attach_port(self, name, index)
    }

    fn detach_port(&mut self, index: u32) {
        Datapath::detach_port(self, index);
    }

    fn entries(&self) -> MapEntries {
        (self.routes(), self.endpoints())
    }

    fn set_device(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        if flags == 0 {
            Datapath::remove_device(self, ifindex)
        } else {
            Datapath::set_device(self, ifindex, flags)
        }
    }

    fn devices(&self) -> Vec<(u32, u32)> {
        Datapath::devices(self)
    }

    fn bump_generation(&mut self) -> Result<(), DatapathError> {
        Datapath::bump_generation(self)
    }
    fn publish_generation(&mut self) -> Result<(), DatapathError> {
        Datapath::publish_generation(self)
    }

    fn own_programs(&self) -> Vec<u32> {
        Datapath::own_programs(self).to_vec()
    }
}

/// What the programs need to know of this node, with the conntrack timeouts as they
/// are now and the forwarding sysctls as last read.
pub(super) fn node_config(
    network: &Network,
    (bridge, uplink): (&Link, &Link),
    config: &Config,
    forwarding: Forwarding,
) -> Result<NodeConfig, ConntrackError> {
    // Without an IPv6 pod CIDR the programs hand every IPv6 packet on, as the kernel
    // must then decide: it drops them.
    let v6 = network.v6.filter(|_| forwarding.ipv6_forwarded());
    Ok(NodeConfig {
        pod_net_v4: network.pod_cidr.network().octets(),
        pod_mask_v4: network.pod_cidr.netmask().octets(),
        pod_net_v6: v6
            .map(|v6| v6.pod_cidr.network().octets())
            .unwrap_or_default(),
        pod_mask_v6: v6
            .map(|v6| v6.pod_cidr.netmask().octets())
            .unwrap_or_default(),
        bridge_ifindex: bridge.index,
        bridge_mtu: bridge.mtu,
        bridge_mac: bridge.mac,
        uplink_mac: uplink.mac,
        gateway_v4: network.gateway().octets(),
        gateway_v6: network.gateway_v6().map(|g| g.octets()).unwrap_or_default(),
        cluster_net_v4: network.cluster_cidr.network().octets(),
        cluster_mask_v4: network.cluster_cidr.netmask().octets(),
        cluster_net_v6: v6
            .map(|v6| v6.cluster_cidr.network().octets())
            .unwrap_or_default(),
        cluster_mask_v6: v6
            .map(|v6| v6.cluster_cidr.netmask().octets())
            .unwrap_or_default(),
        // Only `established` mode needs conntrack at all; `all` mode caches flows'
        // route verdicts too.
        ct: if config.fast_path == FastPath::Established {
            conntrack::timeouts(config.ct_recheck_ms)?
        } else {
            conntrack::recheck_only(config.ct_recheck_ms)?
        },
        rp_filter_uplink: forwarding.rp_filter[0],
        rp_filter_bridge: forwarding.rp_filter[1],
        update_priority: u32::from(forwarding.update_priority),
        _pad: 0,
    })
}
