//! What the agent serves and says before its loop runs: the status socket (taken with
//! the network namespace's agent lock), and a status that says what the agent waits
//! for while a source that cannot start yet is tried again.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hgw_common::status::KernelStatus;
use log::warn;
use tokio::{net::UnixListener, sync::watch};

use super::AgentError;
use crate::{config::Config, node::lock::AgentLock, serve::status::Status};

/// How soon an unreachable source (etcd, the Kubernetes API) is asked again at start,
/// doubling up to the maximum.
pub(super) const SOURCE_RETRY_FIRST: Duration = Duration::from_secs(1);
const SOURCE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Removes the status socket when the agent stops before it runs.
pub(super) struct SocketGuard(pub(super) PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What status says before the agent knows its network: not ready, and why.
pub(super) fn waiting_status(
    config: &Config,
    kernel: Option<KernelStatus>,
    fast_path_note: Option<String>,
    waiting: String,
) -> Status {
    Status {
        node: config.node_name.clone(),
        pod_cidr: None,
        pod_cidr_v6: None,
        uplink: config.uplink.clone(),
        bridge: config.bridge.clone(),
        ready: false,
        fast_path: config.fast_path.name().to_owned(),
        fast_path_note,
        rp_filter: Default::default(),
        ipv6_disabled: Vec::new(),
        peers: Vec::new(),
        counters: Default::default(),
        endpoints: 0,
        map_entries: 0,
        waiting: Some(waiting),
        hooks: Vec::new(),
        kernel,
        last_change: None,
    }
}

/// Says, in status, what the agent waits for now.
fn set_waiting(snapshot: &watch::Sender<Arc<Status>>, waiting: String) {
    snapshot.send_modify(|status| {
        let mut next = Status::clone(status);
        next.waiting = Some(waiting);
        *status = Arc::new(next);
    });
}

/// The status socket (mode 0600), and the network namespace's agent lock.
pub(super) fn bind_status_socket(config: &Config) -> Result<(UnixListener, AgentLock), AgentError> {
    let path = &config.status_socket;
    let error = |reason: String| AgentError::StatusSocket {
        path: path.display().to_string(),
        reason,
    };
    // The status socket's directory is the agent's runtime directory, which holds its lock.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| error(e.to_string()))?;
    let lock = AgentLock::take(dir)?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(error("another agent is answering on it".into()));
    }
    // A socket left by an agent that is gone; never anything else.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)
                .map_err(|e| error(format!("removing a stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(error(
                "exists and is not a socket: left as it is; remove it or choose another status_socket".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| error(e.to_string()))?;
    // Status names the node's peers and addresses: for root (and the agent's user).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| error(format!("setting mode 0600: {e}")))?;
    Ok((listener, lock))
}

/// How a source that could not start is tried again.
pub(super) enum Retry {
    /// From 1 s, doubling, up to 30 s, as flanneld retries etcd.
    Backoff,
    /// Every so often: something that comes by itself soon (a Node's pod CIDR).
    Every(Duration),
}

/// A source's `start`, retried while `retry` says how (an error it gives no way is
/// returned): meanwhile the node keeps the routes it has (nothing is swept and no
/// program attached before the source answers) and status says what the agent waits
/// for (`what`). The caller stops waiting on SIGTERM or SIGINT.
pub(super) async fn wait_for_source<S, E, Fut>(
    what: &str,
    snapshot: &watch::Sender<Arc<Status>>,
    mut start: impl FnMut() -> Fut,
    retry: impl Fn(&E) -> Option<Retry>,
) -> Result<S, AgentError>
where
    Fut: Future<Output = Result<S, E>>,
    E: std::fmt::Display + Into<AgentError>,
{
    let mut backoff = SOURCE_RETRY_FIRST;
    set_waiting(snapshot, format!("waiting for {what}: connecting"));
    loop {
        let error = match start().await {
            Ok(source) => return Ok(source),
            Err(error) => error,
        };
        let wait = match retry(&error) {
            None => return Err(error.into()),
            Some(Retry::Every(wait)) => wait,
            Some(Retry::Backoff) => {
                let wait = backoff;
                backoff = (backoff * 2).min(SOURCE_RETRY_MAX);
                wait
            }
        };
        warn!("{error}; retrying in {wait:?}, routes left as they are");
        set_waiting(snapshot, format!("waiting for {what}: {error}"));
        tokio::time::sleep(wait).await;
    }
}
