//! hgw's network-namespace lab: nodes and pods in flannel host-gw's topology, agents
//! running on the nodes, and traffic helpers, for the integration tests and `cargo xtask`.
//!
//! Needs root. Everything is created inside namespaces named `hgw<hex>-...` and deleted by
//! name when the [`Lab`] is dropped; the host's own interfaces, routes and firewall are
//! never touched.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use hgw_tests::{Lab, ping};
//! let lab = Lab::up(2, 1)?;
//! let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
//! let out = ping(&a.ns, lab.nodes[0].gateway, 1, &[])?;
//! assert!(out.status.success());
//! # let _ = b; Ok(()) }
//! ```

mod agent;
mod cmd;
mod cni;
pub mod cost;
mod etcd;
pub mod floor;
mod flows;
pub mod frames;
mod kernel;
mod kube_api;
mod lab;
mod netfilter;
mod netns;
pub mod progns;
mod raw;
mod stream;
mod tc;
mod traffic;
mod way;

pub use agent::{
    Agent, Credentials, PeerStatus, Status, agent_bin, built_agent_bin, counter, counter_sum,
    credentials, peer, status_at, uninstall, wait_ready_at,
};
pub use cni::{CniPod, POD_IFNAME, PortMapping, exec_plugin, read_conflist};
pub use etcd::{ETCD_IP, Etcd, LogLine, check_key_rejected, log_lines};
pub use flows::{
    CtEntry, add_kube_proxy_invalid_drop, conntrack_entries, count_sent_packets, invalid_drops,
    sent_packets, set_sysctls,
};
pub use kernel::{
    AttachedProgram, HGW_ROUTE_PROTOCOL, allow_forwarding, block_neighbour_discovery,
    block_neighbour_requests, drop_all_forwarding, enable_run_time_stats, hgw_nexthops,
    hgw_programs, hgw_routes, tcx_attached, tcx_programs, unblock_neighbour_discovery,
};
pub use kube_api::{
    ADMIN_TOKEN, FLANNEL_GRANTS, KubeApi, LAB_API_IP, LAB_API_PORT, PatchError, ReceivedPatch,
    Request, merge_patch, strategic_merge_patch,
};
pub use lab::{CLUSTER_CIDR, CLUSTER_CIDR_V6, Lab, Node, Pod, is_lab_id, net_conf_json};
pub use netfilter::{
    CNI_PATH, HostPort, KUBE_MARK_MASQ, OutsideHost, Proto, REPLY_BODY, ServicePort, TcpAnswer,
    UdpAnswer, ip6tables_restore, iptables_restore, is_ok_reply, kube_proxy_iptables,
    kube_proxy_nftables, nft_apply, restart_agents, run_with_input, tcp_request, udp_requests,
};
pub use netns::{in_netns, list_namespaces, run_in, run_in_ok};
pub use raw::{RawFrames, link_mac};
pub use stream::paced_tcp_stream;
pub use tc::{
    Hook, LegacyFilter, PacketMatch, PodBandwidth, Probe, ProbeLink, Verdict, delete_qdisc,
    ensure_clsact, hgw_filters, ifindex, ingress_filters, iperf3_rate, probe_pin_dir, qdiscs,
};
pub use traffic::{UdpFlow, ping, tcp_transfer, udp_exchange, udp_replied_exchange};
pub use way::{Grew, OnTheWay, Then, carried_flow_meets, flow_batch, hooks_of, settle};
