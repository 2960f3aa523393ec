//! `hgw-agent status`: the running agent answers on a Unix socket with one JSON
//! document; the client prints it as is (`--json`) or as a table for people.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "connecting to the agent at {path}: {source} (is `hgw-agent run` running with this --status-socket?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the agent's answer from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("decoding the agent's answer: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub pod_cidr: String,
    pub uplink: String,
    pub bridge: String,
    /// Every route is installed and, with the fast path, every next hop's MAC is known.
    pub ready: bool,
    pub fast_path: bool,
    pub peers: Vec<PeerStatus>,
    pub counters: BTreeMap<String, u64>,
    /// Local pods the uplink program delivers to directly.
    #[serde(default)]
    pub endpoints: usize,
    /// Next hops in the fast-path route table.
    #[serde(default)]
    pub map_entries: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_ip: String,
    pub pod_cidr: String,
    /// The next hop's MAC, `None` while unresolved.
    pub mac: Option<String>,
    /// The kernel route (the fallback) is installed.
    pub route: bool,
    /// "static", or the etcd key it came from.
    pub source: String,
    /// The etcd lease (hex) that keeps it, if any.
    pub lease: Option<String>,
}

/// Sends `status` to one client and closes the connection.
pub async fn serve(mut stream: tokio::net::UnixStream, status: &Status) -> std::io::Result<()> {
    let body = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

pub async fn fetch(path: &Path) -> Result<Status, StatusError> {
    let display = path.display().to_string();
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| StatusError::Connect {
            path: display.clone(),
            source,
        })?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .map_err(|source| StatusError::Read {
            path: display,
            source,
        })?;
    Ok(serde_json::from_slice(&body)?)
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "node {}  pod CIDR {}  uplink {}  bridge {}",
            self.node, self.pod_cidr, self.uplink, self.bridge
        )?;
        let state = if self.ready { "ready" } else { "converging" };
        let path = if self.fast_path {
            "eBPF fast path + kernel routes"
        } else {
            "kernel routes only"
        };
        writeln!(
            f,
            "state {state}, {path}, {} local pods for direct delivery",
            self.endpoints
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:<16} {:<20} {:<18} {:<10} SOURCE",
            "PEER", "NODE IP", "POD CIDR", "NEXT-HOP MAC", "ROUTE"
        )?;
        for p in &self.peers {
            writeln!(
                f,
                "{:<16} {:<16} {:<20} {:<18} {:<10} {}{}",
                p.name,
                p.node_ip,
                p.pod_cidr,
                p.mac.as_deref().unwrap_or("unresolved"),
                if p.route { "installed" } else { "missing" },
                p.source,
                p.lease
                    .as_ref()
                    .map(|l| format!(" (lease {l})"))
                    .unwrap_or_default()
            )?;
        }
        if !self.counters.is_empty() {
            writeln!(f)?;
            writeln!(f, "{:<22} {:>12}", "COUNTER", "PACKETS")?;
            for (name, value) in &self.counters {
                writeln!(f, "{name:<22} {value:>12}")?;
            }
        }
        Ok(())
    }
}
