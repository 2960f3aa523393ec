//! Prometheus metrics on `metrics_addr` (served by [`super::http`] with `/healthz` and
//! `/readyz`).
//!
//! Everything is read at scrape time from what the agent already keeps: the fast path's
//! per-CPU counters (summed over the CPUs, through the same [`CounterReader`] as
//! status), the status snapshot the loop publishes, the reconcile histogram and two
//! error counters.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use hgw_common::COUNTER_NOT_IP_NAME;
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, sync::watch};

use super::{
    http::{self, Health},
    status::Status,
};
use crate::datapath::CounterReader;

/// How many interfaces of the status carry the `DEVICE_*` flag `flag`.
fn hooks_with(status: &Status, flag: &str) -> u64 {
    status
        .hooks
        .iter()
        .filter(|h| h.flags.iter().any(|f| f == flag))
        .count() as u64
}

/// Netlink requests that failed (routes, neighbours, links, addresses, dumps).
static NETLINK_ERRORS: AtomicU64 = AtomicU64::new(0);
/// etcd requests that failed (connecting, reading, writing, watching, the lease).
static ETCD_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Counts one failed netlink request: called where `KernelError::Netlink` is made.
pub fn count_netlink_error() {
    NETLINK_ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// Counts one failed etcd request: called where `EtcdError::Client` is made.
pub fn count_etcd_error() {
    ETCD_ERRORS.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_addr {addr}: listening: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a reconcile was for: the histogram's `trigger` label.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// A new peer set.
    Peers,
    /// The periodic (or forced) comparison of everything with the kernel.
    Resync,
    /// A batch of kernel events.
    Events,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Peers => "peers",
            Trigger::Resync => "resync",
            Trigger::Events => "events",
        }
    }
}

type TriggerLabel = [(&'static str, &'static str); 1];

/// The reconcile durations, by trigger. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Reconciles(Family<TriggerLabel, Histogram>);

impl Default for Reconciles {
    fn default() -> Self {
        // 100 µs to ~13 s: a batch of events takes well under a millisecond, a resync
        // of thousands of routes seconds.
        Self(Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        }))
    }
}

impl Reconciles {
    /// Measures from now until the returned guard is dropped.
    pub fn time(&self, trigger: Trigger) -> ReconcileTimer {
        ReconcileTimer {
            family: self.0.clone(),
            trigger,
            start: Instant::now(),
        }
    }
}

/// Observes the time since it was made into the histogram when dropped.
pub struct ReconcileTimer {
    family: Family<TriggerLabel, Histogram>,
    trigger: Trigger,
    start: Instant,
}

impl ReconcileTimer {
    /// The time since it was made.
    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.family
            .get_or_create(&[("trigger", self.trigger.name())])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Listens on `addr` and serves `/metrics`, `/healthz` and `/readyz` on tasks of its
/// own. The returned [`Health`] is for the agent's loop.
pub fn spawn_server(
    addr: SocketAddr,
    reconciles: Reconciles,
    snapshot: watch::Receiver<Arc<Status>>,
    counters: Arc<OnceLock<CounterReader>>,
) -> Result<Health, MetricsError> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let mut registry = Registry::default();
    registry.register_with_unit(
        "hgw_reconcile_duration",
        "Time the agent took to apply a change to routes and maps, by what triggered it (peers: a new peer set; resync: the comparison with the kernel every 30 s or after lost events; events: a batch of kernel events)",
        Unit::Seconds,
        reconciles.0,
    );
    registry.register_collector(Box::new(StatusCollector {
        snapshot: snapshot.clone(),
        counters,
    }));
    Ok(http::spawn(listener, registry, snapshot))
}

/// Reads the counters and the latest status at scrape time.
struct StatusCollector {
    snapshot: watch::Receiver<Arc<Status>>,
    counters: Arc<OnceLock<CounterReader>>,
}

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

/// One route per family of a peer, by the state of its kernel route and next hop.
#[derive(Debug, Default, PartialEq, Eq)]
struct PeerRoutes {
    /// [family][route state][next hop resolved]: IPv4 first; installed, foreign,
    /// missing; resolved, unresolved.
    counts: [[[u64; 2]; 3]; 2],
}

const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];
const ROUTE_STATES: [&str; 3] = ["installed", "foreign", "missing"];
const NEXT_HOPS: [&str; 2] = ["resolved", "unresolved"];

impl PeerRoutes {
    fn of(status: &Status) -> Self {
        let mut routes = Self::default();
        for peer in &status.peers {
            let family = usize::from(peer.pod_cidr.contains(':'));
            let state = match (&peer.foreign_route, peer.route) {
                (Some(_), _) => 1,
                (None, true) => 0,
                (None, false) => 2,
            };
            let hop = usize::from(peer.mac.is_none());
            routes.counts[family][state][hop] += 1;
        }
        routes
    }

    fn installed(&self) -> u64 {
        self.counts.iter().map(|f| f[0][0] + f[0][1]).sum()
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Nothing rather than part of the counters when the map cannot be read.
        if let Some(reader) = self.counters.get() {
            match reader.read() {
                Ok(counters) => {
                    let mut metric = encoder.encode_descriptor(
                        "hgw_packets",
                        "Packets the fast path's programs saw, summed over the CPUs, by family and counter: fwd_* were forwarded by the fast path (fwd_to_pod_direct is part of fwd_to_pod), pass_* were left to the kernel, the counter saying why (the names of `hgw-agent status`)",
                        None,
                        MetricType::Counter,
                    )?;
                    for (family, values) in &counters.families {
                        for (counter, value) in values {
                            let labels = [("family", family.name()), ("counter", counter.name())];
                            ConstCounter::new(*value).encode(metric.encode_family(&labels)?)?;
                        }
                    }
                    let labels = [("family", "other"), ("counter", COUNTER_NOT_IP_NAME)];
                    ConstCounter::new(counters.not_ip).encode(metric.encode_family(&labels)?)?;
                }
                Err(e) => warn!("metrics: {e}"),
            }
        }

        let status = self.snapshot.borrow().clone();
        let routes = PeerRoutes::of(&status);
        let mut metric = encoder.encode_descriptor(
            "hgw_peer_routes",
            "Peer routes (one per peer and family) by the state of the kernel route (installed; foreign: another owner's route holds the prefix; missing: not installed yet or failed) and of the next hop's MAC (resolved or not)",
            None,
            MetricType::Gauge,
        )?;
        for (f, family) in FAMILIES.iter().enumerate() {
            for (s, state) in ROUTE_STATES.iter().enumerate() {
                for (h, hop) in NEXT_HOPS.iter().enumerate() {
                    let labels = [("family", *family), ("route", *state), ("next_hop", *hop)];
                    ConstGauge::new(routes.counts[f][s][h] as i64)
                        .encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let gauges = [
            (
                "hgw_routes_installed",
                "Kernel routes hgw has installed to peers' pod CIDRs (the fallback path)",
                routes.installed(),
            ),
            (
                "hgw_fast_path_routes",
                "Entries of the fast path's route maps (peer pod CIDRs with a known next hop)",
                status.map_entries as u64,
            ),
            (
                "hgw_fast_path_endpoints",
                "Local pods the uplink program delivers to directly",
                status.endpoints as u64,
            ),
            (
                "hgw_tc_hooks_ingress",
                "Interfaces with something on their tc ingress, or an nftables hook after it, that a redirect would skip (DEVICE_INGRESS): packets arriving there go to the kernel",
                hooks_with(&status, "ingress"),
            ),
            (
                "hgw_tc_hooks_egress",
                "Interfaces with a qdisc, filter or program on their egress (DEVICE_EGRESS): pods behind them get their packets through the bridge",
                hooks_with(&status, "egress"),
            ),
            (
                "hgw_tc_hooks_netfilter_egress",
                "Interfaces with an nftables netdev egress chain (DEVICE_NF_EGRESS), which any redirect skips: nothing is sent into the uplink or the bridge, or past a pod's veth, while it is there",
                hooks_with(&status, "netfilter-egress"),
            ),
            (
                "hgw_ready",
                "1 when every peer route is installed and, with the fast path, every next hop's MAC is known",
                u64::from(status.ready),
            ),
        ];
        for (name, help, value) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(metric)?;
        }
        let errors = [
            (
                "hgw_netlink_errors",
                "Netlink requests (routes, neighbours, links, dumps) that failed",
                &NETLINK_ERRORS,
            ),
            (
                "hgw_etcd_errors",
                "etcd requests (connect, read, write, watch, lease) that failed",
                &ETCD_ERRORS,
            ),
        ];
        for (name, help, value) in errors {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(metric)?;
        }
        Ok(())
    }
}

/// The values of one metric in a scrape, by their label text (`{family="ipv4",...}`,
/// or "" without labels): for the tests.
pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some((labels, value)) => (format!("{{{labels}}}"), value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => (String::new(), value),
                None => continue,
            },
        };
        if let Ok(value) = value.trim().parse() {
            found.push((labels, value));
        }
    }
    found
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::serve::status::PeerStatus;

    fn peer(pod_cidr: &str, route: bool, foreign: bool, mac: bool) -> PeerStatus {
        PeerStatus {
            name: "n2".into(),
            node_ip: "172.31.0.2".into(),
            pod_cidr: pod_cidr.into(),
            mac: mac.then(|| "02:00:00:00:00:02".into()),
            route,
            foreign_route: foreign.then(|| "static".into()),
            source: "static".into(),
            lease: None,
        }
    }

    /// A status of node n1 with these peers.
    pub(in crate::serve) fn status(peers: Vec<PeerStatus>, ready: bool) -> Status {
        Status {
            node: "n1".into(),
            pod_cidr: Some("10.244.1.0/24".into()),
            pod_cidr_v6: None,
            uplink: "eth0".into(),
            bridge: "cni0".into(),
            ready,
            fast_path: "established".into(),
            fast_path_note: None,
            rp_filter: BTreeMap::new(),
            ipv6_disabled: Vec::new(),
            peers,
            counters: BTreeMap::new(),
            endpoints: 3,
            map_entries: 2,
            waiting: None,
            hooks: Vec::new(),
            kernel: None,
            last_change: None,
        }
    }

    fn scrape(status: Status) -> String {
        let (_tx, rx) = watch::channel(Arc::new(status));
        let mut registry = Registry::default();
        let reconciles = Reconciles::default();
        drop(reconciles.time(Trigger::Peers));
        registry.register_with_unit(
            "hgw_reconcile_duration",
            "help",
            Unit::Seconds,
            reconciles.0.clone(),
        );
        registry.register_collector(Box::new(StatusCollector {
            snapshot: rx,
            counters: Arc::new(OnceLock::new()),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[test]
    fn peers_are_counted_by_family_route_and_next_hop() {
        let text = scrape(status(
            vec![
                peer("10.244.2.0/24", true, false, true),
                peer("fd00:244:2::/64", true, false, false),
                peer("10.244.3.0/24", false, true, true),
                peer("10.244.4.0/24", false, false, false),
            ],
            false,
        ));
        let value = |labels: &str| {
            samples(&text, "hgw_peer_routes")
                .into_iter()
                .find(|(l, _)| l == labels)
                .map(|(_, v)| v)
        };
        let labels = |family: &str, route: &str, hop: &str| {
            format!("{{family=\"{family}\",route=\"{route}\",next_hop=\"{hop}\"}}")
        };
        assert_eq!(value(&labels("ipv4", "installed", "resolved")), Some(1.0));
        assert_eq!(value(&labels("ipv6", "installed", "unresolved")), Some(1.0));
        assert_eq!(value(&labels("ipv4", "foreign", "resolved")), Some(1.0));
        assert_eq!(value(&labels("ipv4", "missing", "unresolved")), Some(1.0));
        // Every combination is there, zeros included: series do not come and go.
        assert_eq!(samples(&text, "hgw_peer_routes").len(), 12);
        assert_eq!(value(&labels("ipv6", "missing", "resolved")), Some(0.0));
        assert_eq!(
            samples(&text, "hgw_routes_installed"),
            [(String::new(), 2.0)]
        );
        assert_eq!(samples(&text, "hgw_ready"), [(String::new(), 0.0)]);
        assert_eq!(
            samples(&text, "hgw_fast_path_endpoints"),
            [(String::new(), 3.0)]
        );
        assert!(text.contains("# TYPE hgw_netlink_errors counter"), "{text}");
        assert_eq!(samples(&text, "hgw_netlink_errors_total").len(), 1);
        assert_eq!(
            samples(&text, "hgw_reconcile_duration_seconds_count"),
            [("{trigger=\"peers\"}".to_owned(), 1.0)]
        );
        // No counters reader: no hgw_packets at all, rather than zeros.
        assert!(!text.contains("hgw_packets"), "{text}");
    }

    #[test]
    fn errors_are_counted() {
        let before = NETLINK_ERRORS.load(Ordering::Relaxed);
        count_netlink_error();
        count_etcd_error();
        assert!(NETLINK_ERRORS.load(Ordering::Relaxed) > before);
        let text = scrape(status(Vec::new(), true));
        let (_, value) = samples(&text, "hgw_etcd_errors_total")[0].clone();
        assert!(value >= 1.0, "{text}");
        assert_eq!(samples(&text, "hgw_ready"), [(String::new(), 1.0)]);
    }
}
