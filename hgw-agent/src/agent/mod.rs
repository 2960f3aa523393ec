//! The node agent. Data flows one way:
//!
//! ```text
//! peer sources (file, etcd) --> desired state --> reconciler --> kernel routes, BPF maps
//!                                    kernel events --> observed --^      status snapshot
//! ```
//!
//! Sources publish their peers' changes ([`sources`]); the desired state follows them,
//! checking every peer, as a pure function of the network, the peers and the node
//! ([`desired`]); what the kernel holds is
//! observed from dumps and typed events ([`observed`]); the [`reconcile::Reconciler`] is
//! the only writer, and writes only differences. Status is served from a snapshot the
//! loop publishes, on tasks of its own.
//!
//! `startup` checks the node, waits for the source (status says so meanwhile:
//! `waiting`), sets the node up and attaches the fast path; then `event_loop` runs
//! until SIGTERM or SIGINT. `adapters` make the kernel and the datapath the
//! reconciler's [`reconcile::RouteTable`] and [`reconcile::FastPathMaps`].

mod adapters;
pub mod desired;
mod event_loop;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod observed;
mod port_search;
pub mod reconcile;
pub mod sources;
mod startup;
mod waiting;

use std::{collections::HashSet, sync::Arc, time::Instant};

use hgw_common::status::{AppliedChange, KernelStatus};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

pub use crate::source::file::Reload;
use crate::{
    config::{Config, ConfigError, Network},
    datapath::{Datapath, DatapathError},
    kernel::{Kernel, KernelError},
    node::{
        caps::CapsError,
        cni::{CniError, NodeFiles},
        conntrack::ConntrackError,
        masq::MasqError,
        setup::SetupError,
    },
    serve::{
        http::Health,
        metrics::{MetricsError, Reconciles},
        status::Status,
    },
    source::etcd::EtcdError,
    source::kube::KubeError,
    tc::Scanner,
};
use desired::DesiredState;
use observed::Observed;
use port_search::PortSearch;
use reconcile::Reconciler;
pub use startup::run;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Masq(#[from] MasqError),
    #[error("status socket {path}: {reason}")]
    StatusSocket { path: String, reason: String },
    #[error("installing a signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Probe(#[from] crate::datapath::probe::ProbeError),
    #[error(transparent)]
    AnotherAgent(#[from] crate::node::lock::LockError),
}

/// SIGTERM and SIGINT, as one future.
struct Shutdown {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn new() -> Result<Self, AgentError> {
        Ok(Self {
            sigterm: signal(SignalKind::terminate()).map_err(AgentError::Signal)?,
            sigint: signal(SignalKind::interrupt()).map_err(AgentError::Signal)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.sigterm.recv() => {}
            _ = self.sigint.recv() => {}
        }
    }
}

struct Agent {
    config: Config,
    /// What the kernel offers the fast path, as probed at start (`None` with `off`).
    kernel_status: Option<KernelStatus>,
    network: Network,
    kernel: Kernel,
    observed: Observed,
    reconciler: Reconciler<Kernel, Datapath>,
    /// The first whole peer set, checked at the start into its desired state (the
    /// static peers), until the loop applies it.
    checked_peers: Option<DesiredState>,
    snapshot: watch::Sender<Arc<Status>>,
    last_fdb_dump: Option<Instant>,
    /// Which pods without a port are still looked for, and when.
    port_search: PortSearch,
    /// When the next forwarding dump may run, if one is wanted.
    fdb_due: Option<Instant>,
    /// subnet.env and the CNI config, which carry the uplink's MTU.
    files: NodeFiles,
    reconciles: Reconciles,
    health: Health,
    /// Dumps what shares hgw's tc hooks (`None`: no fast path).
    scanner: Option<Scanner>,
    /// Interfaces whose qdiscs or filters changed since their last dump.
    tc_dirty: HashSet<u32>,
    /// A change that may concern any interface (a shared filter block).
    tc_all_dirty: bool,
    /// The kernel's routing changed since the generation was last bumped.
    routing_dirty: bool,
    source_trouble: Option<watch::Receiver<Option<String>>>,
    last_change: Option<AppliedChange>,
    /// Why the fast path is not in the configured mode (IPVS, or an IPsec policy over
    /// pod traffic, came).
    fast_path_note: Option<String>,
    /// The forwarding sysctls the programs were last given.
    forwarding: crate::node::forwarding::Forwarding,
    /// Why they could not be read last time, if they could not.
    forwarding_error: Option<String>,
    /// nftables' hooks, read again when the ruleset changes.
    netfilter: crate::kernel::nftables::Watch,
    /// Why they could not be read last time, if they could not.
    netfilter_error: Option<String>,
    /// Why a pod's end of its veth could not be read last time, if one could not.
    pod_end_error: Option<String>,
}
