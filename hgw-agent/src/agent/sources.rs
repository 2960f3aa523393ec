//! How peer sources hand their peers to the agent's loop: one [`peer_channel`] per
//! source, straight to the loop. A source sends the whole set at start and after a
//! relist ([`PeerChange::All`]), and one peer at a time in between. What the loop has
//! not taken yet is merged, per peer, so a burst of changes costs one pass over the
//! peers it changed; a whole set replaces whatever waited before it.
//!
//! The static file source lives here too: it reads the file again when it changes,
//! and sends only the peers that differ.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use log::{info, warn};
use tokio::sync::Notify;

use super::{desired::DesiredState, file_watch::FileWatch};
use crate::config::{Config, ConfigError, Peer, Source, refused};

/// One change of a source's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// The whole peer set (at start, after a relist): peers not in it are gone.
    All(Vec<Peer>),
    /// A peer new or changed, under its [`Peer::key`].
    Upsert(Peer),
    /// The peer with this key is gone.
    Remove(String),
}

/// What the loop takes in one go: everything sent since it last took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerBatch {
    All(Vec<Peer>),
    /// Per key, the peer as it is now (`None`: gone).
    Changes(Vec<(String, Option<Peer>)>),
}

#[derive(Debug, Default)]
enum Pending {
    #[default]
    Nothing,
    All(HashMap<String, Peer>),
    Changes(HashMap<String, Option<Peer>>),
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    to_receiver: Notify,
    to_sender: Notify,
    sender_gone: AtomicBool,
    receiver_gone: AtomicBool,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding it leaves plain data behind: still usable.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The source's end.
#[derive(Debug)]
pub struct PeerSender(Arc<Shared>);

/// The loop's end.
#[derive(Debug)]
pub struct PeerReceiver(Arc<Shared>);

/// The loop went away.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

pub fn peer_channel() -> (PeerSender, PeerReceiver) {
    let shared = Arc::new(Shared::default());
    (PeerSender(shared.clone()), PeerReceiver(shared))
}

impl PeerSender {
    /// Sends `changes`, merged into what the loop has not taken yet.
    pub fn send(&self, changes: impl IntoIterator<Item = PeerChange>) -> Result<(), Closed> {
        if self.is_closed() {
            return Err(Closed);
        }
        let mut any = false;
        {
            let mut pending = self.0.pending();
            for change in changes {
                any = true;
                merge(&mut pending, change);
            }
        }
        if any {
            self.0.to_receiver.notify_one();
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.0.receiver_gone.load(Ordering::Acquire)
    }

    /// Returns once the loop has gone away.
    pub async fn closed(&self) {
        while !self.is_closed() {
            self.0.to_sender.notified().await;
        }
    }
}

fn merge(pending: &mut Pending, change: PeerChange) {
    match (pending, change) {
        (pending, PeerChange::All(peers)) => {
            *pending = Pending::All(peers.into_iter().map(|p| (p.key().to_owned(), p)).collect());
        }
        (Pending::All(all), PeerChange::Upsert(peer)) => {
            all.insert(peer.key().to_owned(), peer);
        }
        (Pending::All(all), PeerChange::Remove(key)) => {
            all.remove(&key);
        }
        (Pending::Changes(changes), PeerChange::Upsert(peer)) => {
            changes.insert(peer.key().to_owned(), Some(peer));
        }
        (Pending::Changes(changes), PeerChange::Remove(key)) => {
            changes.insert(key, None);
        }
        (pending @ Pending::Nothing, PeerChange::Upsert(peer)) => {
            *pending = Pending::Changes(HashMap::from([(peer.key().to_owned(), Some(peer))]));
        }
        (pending @ Pending::Nothing, PeerChange::Remove(key)) => {
            *pending = Pending::Changes(HashMap::from([(key, None)]));
        }
    }
}

impl Drop for PeerSender {
    fn drop(&mut self) {
        self.0.sender_gone.store(true, Ordering::Release);
        self.0.to_receiver.notify_one();
    }
}

impl PeerReceiver {
    /// What was sent since the last call, if anything.
    pub fn try_recv(&mut self) -> Option<PeerBatch> {
        match std::mem::take(&mut *self.0.pending()) {
            Pending::Nothing => None,
            Pending::All(all) => Some(PeerBatch::All(all.into_values().collect())),
            Pending::Changes(changes) => Some(PeerBatch::Changes(changes.into_iter().collect())),
        }
    }

    /// What was sent since the last call, waiting for something; `None` once the
    /// source is gone and everything it sent was taken. Cancel-safe.
    pub async fn recv(&mut self) -> Option<PeerBatch> {
        loop {
            if let Some(batch) = self.try_recv() {
                return Some(batch);
            }
            if self.0.sender_gone.load(Ordering::Acquire) {
                return None;
            }
            self.0.to_receiver.notified().await;
        }
    }
}

impl Drop for PeerReceiver {
    fn drop(&mut self) {
        self.0.receiver_gone.store(true, Ordering::Release);
        self.0.to_sender.notify_waiters();
        self.0.to_sender.notify_one();
    }
}

/// Reads the config again (the same file and flags).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// The static peers, known at once; with a config file, the peers that differ are sent
/// whenever the file changes and still reads as a valid config. Only the peers are
/// applied live; other changes are named in a warning and wait for a restart.
///
/// `checked` is the desired state of `peers` (the start's check): each reload's changes
/// are checked against it, so a reload costs its changed peers, not all of them.
pub fn static_peers(
    peers: Vec<Peer>,
    reload: Option<(PathBuf, Reload)>,
    running: Config,
    checked: DesiredState,
) -> PeerReceiver {
    let (tx, rx) = peer_channel();
    let _ = tx.send([PeerChange::All(peers.clone())]);
    if let Some((path, reload)) = reload {
        tokio::spawn(watch_file(path, reload, (running, checked), tx));
    }
    rx
}

/// One peer's entry in a reread file that differs from the one held: its key, the new
/// entry (`None`: gone) and the old one (`None`: new).
type Entry = (String, Option<Peer>, Option<Peer>);

/// The entries of `new` that differ from the peers `held`, a peer's place in the file
/// included (errors name it).
fn entries(held: &DesiredState, new: &[Peer]) -> Vec<Entry> {
    let mut entries: Vec<Entry> = new
        .iter()
        .filter(|p| held.peer(p.key()) != Some(*p))
        .map(|p| {
            (
                p.key().to_owned(),
                Some(p.clone()),
                held.peer(p.key()).cloned(),
            )
        })
        .collect();
    let keys: HashSet<&str> = new.iter().map(Peer::key).collect();
    entries.extend(
        held.peers()
            .filter(|p| !keys.contains(p.key()))
            .map(|p| (p.key().to_owned(), None, Some(p.clone()))),
    );
    entries
}

/// What the loop needs of `entries`: the peers whose routes may change (a place in the
/// file is no such change: a valid static set has no conflicts for it to settle).
fn changes(entries: Vec<Entry>) -> Vec<PeerChange> {
    entries
        .into_iter()
        .filter_map(|(key, new, old)| match (new, old) {
            (None, _) => Some(PeerChange::Remove(key)),
            (Some(new), Some(old)) => {
                let moved_only = Peer {
                    origin: new.origin,
                    ..old
                } == new;
                (!moved_only).then_some(PeerChange::Upsert(new))
            }
            (Some(new), None) => Some(PeerChange::Upsert(new)),
        })
        .collect()
}

async fn watch_file(
    path: PathBuf,
    reload: Reload,
    (running, mut checked): (Config, DesiredState),
    tx: PeerSender,
) {
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
        if tx.is_closed() {
            return;
        }
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
        // Every peer whose entry differs is checked against the others and this node;
        // a refused one leaves the whole file unapplied, and the state as it was.
        let entries = entries(&checked, peers);
        checked.apply(
            entries
                .iter()
                .map(|(key, new, _)| (key.clone(), new.clone())),
        );
        if let Some(e) = refused(&checked) {
            warn!("{}: changed but not applied: {e}", path.display());
            checked.apply(entries.into_iter().map(|(key, _, old)| (key, old)));
            continue;
        }
        let restart = config.restart_needed(&running);
        if !restart.is_empty() {
            warn!(
                "{}: only peers are applied without a restart; restart to apply {}",
                path.display(),
                restart.join(", ")
            );
        }
        let changes = changes(entries);
        info!(
            "{}: changed; applying its {} peers ({} changed)",
            path.display(),
            peers.len(),
            changes.len()
        );
        if tx.send(changes).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;

    fn peer(name: &str, ip: &str, index: usize) -> Peer {
        Peer {
            name: name.into(),
            node_ip: ip.parse().expect("ip"),
            pod_cidr: "10.244.2.0/24".parse().expect("cidr"),
            v6: None,
            source: "static".into(),
            lease: None,
            origin: Origin::Static { index },
            backend: None,
        }
    }

    #[tokio::test]
    async fn changes_the_loop_has_not_taken_are_merged_per_peer() {
        let (tx, mut rx) = peer_channel();
        tx.send([PeerChange::All(vec![peer("a", "172.31.0.2", 0)])])
            .expect("open");
        tx.send([PeerChange::Upsert(peer("b", "172.31.0.3", 1))])
            .expect("open");
        // Merged into the whole set that waits.
        let Some(PeerBatch::All(all)) = rx.recv().await else {
            panic!("a whole set")
        };
        assert_eq!(all.len(), 2);
        // A burst of changes to one peer: the last one only.
        for ip in ["172.31.0.4", "172.31.0.5", "172.31.0.6"] {
            tx.send([PeerChange::Upsert(peer("b", ip, 1))])
                .expect("open");
        }
        tx.send([PeerChange::Remove("a".into())]).expect("open");
        let Some(PeerBatch::Changes(mut changes)) = rx.recv().await else {
            panic!("changes")
        };
        changes.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            changes,
            [
                ("a".to_owned(), None),
                ("b".to_owned(), Some(peer("b", "172.31.0.6", 1)))
            ]
        );
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_sender_sees_the_loop_go() {
        let (tx, rx) = peer_channel();
        assert!(!tx.is_closed());
        drop(rx);
        tx.closed().await;
        assert_eq!(tx.send([PeerChange::Remove("a".into())]), Err(Closed));
    }

    #[test]
    fn a_reread_file_sends_only_the_peers_that_differ() {
        use crate::agent::{desired::desired, fixtures};
        let mut b = peer("b", "172.31.0.3", 1);
        b.pod_cidr = "10.244.3.0/24".parse().expect("cidr");
        let held = desired(
            &fixtures::network(),
            &[peer("a", "172.31.0.2", 0), b.clone()],
            None,
        );
        // b moved up a place (checked, but no change), a changed its IP, c is new.
        let mut c = peer("c", "172.31.0.4", 2);
        c.pod_cidr = "10.244.4.0/24".parse().expect("cidr");
        let new = [
            Peer {
                origin: Origin::Static { index: 0 },
                ..b
            },
            peer("a", "172.31.0.9", 1),
            c,
        ];
        let found = entries(&held, &new);
        assert_eq!(found.len(), 3, "{found:?}");
        let mut sent = changes(found);
        sent.sort_by_key(|c| match c {
            PeerChange::Upsert(p) => p.name.clone(),
            other => format!("{other:?}"),
        });
        assert_eq!(
            sent,
            [
                PeerChange::Upsert(new[1].clone()),
                PeerChange::Upsert(new[2].clone())
            ]
        );
        let gone = changes(entries(&held, &[peer("a", "172.31.0.2", 0)]));
        assert_eq!(gone, [PeerChange::Remove("b".into())]);
    }
}
