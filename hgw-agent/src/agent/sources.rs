//! Peer sources: tasks that publish whole peer sets on a `watch` channel. `None` until
//! the source has given its first whole set; a newer set replaces one the agent has
//! not taken yet, so bursts of changes coalesce.

use std::{path::PathBuf, sync::Arc};

use log::{info, warn};
use tokio::sync::{mpsc, watch};

use super::file_watch::FileWatch;
use crate::config::{Config, ConfigError, Peer, Source};

pub type PeerSet = Option<Arc<Vec<Peer>>>;

/// Reads the config again (the same file and flags).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// The static peers, known at once; with a config file, sent again whenever the file
/// changes and still reads as a valid config. Only the peers are applied live; other
/// changes are named in a warning and wait for a restart.
pub fn static_peers(
    peers: Vec<Peer>,
    reload: Option<(PathBuf, Reload)>,
    running: Config,
) -> watch::Receiver<PeerSet> {
    let (tx, rx) = watch::channel(Some(Arc::new(peers)));
    if let Some((path, reload)) = reload {
        tokio::spawn(watch_file(path, reload, running, tx));
    }
    rx
}

async fn watch_file(path: PathBuf, reload: Reload, running: Config, tx: watch::Sender<PeerSet>) {
    let (mut watch, error) = FileWatch::new(&path);
    if let Some(e) = error {
        warn!(
            "{}: no inotify ({e}): changes are seen within a second",
            path.display()
        );
    }
    // The file's bytes: only a change of content is applied (an event or a touch that
    // leaves them alone is not).
    let mut seen = std::fs::read(&path).ok();
    loop {
        watch.changed().await;
        let now = std::fs::read(&path).ok();
        if now == seen {
            continue;
        }
        seen = now;
        let config = match reload() {
            Ok(config) => config,
            Err(e) => {
                warn!("{}: changed but not applied: {e}", path.display());
                continue;
            }
        };
        let Source::Static { peers, .. } = &config.source else {
            warn!(
                "{}: changed its peer source; restart the agent to apply it",
                path.display()
            );
            continue;
        };
        let restart = config.restart_needed(&running);
        if !restart.is_empty() {
            warn!(
                "{}: only peers are applied without a restart; restart to apply {}",
                path.display(),
                restart.join(", ")
            );
        }
        info!(
            "{}: changed; applying its {} peers",
            path.display(),
            peers.len()
        );
        if tx.send(Some(Arc::new(peers.clone()))).is_err() {
            return;
        }
    }
}

/// etcd's peer sets, forwarded so that only the newest waits for the agent.
pub fn etcd_peers(mut updates: mpsc::Receiver<Vec<Peer>>) -> watch::Receiver<PeerSet> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        while let Some(peers) = updates.recv().await {
            if tx.send(Some(Arc::new(peers))).is_err() {
                return;
            }
        }
    });
    rx
}
