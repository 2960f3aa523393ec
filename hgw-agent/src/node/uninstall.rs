//! `hgw-agent uninstall`: takes hgw off the node on purpose, which stopping the agent
//! never does: the pinned programs and maps, hgw's cls_bpf filters (on kernels without
//! tcx) and the `clsact` qdiscs it added for them once nothing else uses them, hgw's
//! routes (`proto 104`), its nftables tables and its FORWARD accept rules. Pod traffic then follows whatever else the node
//! has (another CNI's routes, or none).

use std::path::Path;

use log::info;

use super::{conntrack, masq, setup};
use crate::kernel::Kernel;

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(
        "an agent is answering on {socket}: stop it first (uninstall would pull the fast path from under it)"
    )]
    AgentRunning { socket: String },
    #[error("removing pins under {path}: {source}")]
    Pins {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tc(#[from] crate::tc::TcError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("removing hgw's nexthops: {0}")]
    Nexthops(#[from] crate::kernel::NexthopError),
    #[error("{0}")]
    Rules(String),
}

/// What was removed, for the operator.
#[derive(Debug, Default)]
pub struct Removed {
    pub pins: usize,
    pub routes: usize,
    pub filters: usize,
    pub qdiscs: usize,
    pub nexthops: usize,
}

pub async fn uninstall(
    pin_dir: Option<&Path>,
    status_socket: &Path,
) -> Result<Removed, UninstallError> {
    if std::os::unix::net::UnixStream::connect(status_socket).is_ok() {
        return Err(UninstallError::AgentRunning {
            socket: status_socket.display().to_string(),
        });
    }
    let kernel = Kernel::connect()?;
    // A qdisc that cannot go is not fatal (an empty clsact qdisc does nothing); pins that
    // cannot go are, before routes and rules.
    let taken = crate::datapath::take_off(pin_dir, &crate::tc::Scanner::new(kernel.handle())).await;
    let mut removed = Removed {
        pins: taken.pins.map_err(|source| UninstallError::Pins {
            path: pin_dir.map(|d| d.display().to_string()).unwrap_or_default(),
            source,
        })?,
        filters: taken.filters,
        qdiscs: taken.qdiscs,
        ..Removed::default()
    };
    for route in kernel.hgw_routes().await? {
        kernel.delete_route(&route).await?;
        removed.routes += 1;
    }
    removed.nexthops = crate::kernel::remove_hgw_nexthops().await?;
    conntrack::remove_tracking().map_err(|e| UninstallError::Rules(e.to_string()))?;
    masq::remove().map_err(|e| UninstallError::Rules(e.to_string()))?;
    setup::remove_forward_accepts().map_err(|e| UninstallError::Rules(e.to_string()))?;
    info!(
        "uninstalled: {} pins (the programs went with their links), {} cls_bpf filters, {} clsact qdiscs hgw added, {} routes, {} nexthops, hgw's nftables tables and FORWARD rules",
        removed.pins, removed.filters, removed.qdiscs, removed.routes, removed.nexthops
    );
    Ok(removed)
}
