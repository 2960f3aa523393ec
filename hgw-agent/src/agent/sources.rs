//! How peer sources hand their peers to the agent's loop: one [`peer_channel`] per
//! source, straight to the loop. A source sends the whole set at start and after a
//! relist ([`PeerChange::All`]), and one peer at a time in between. What the loop has
//! not taken yet is merged, per peer, so a burst of changes costs one pass over the
//! peers it changed; a whole set replaces whatever waited before it.
//!
//! The static file source is in `source::file`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::Notify;

use crate::config::Peer;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::test_support::peer;

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
}
