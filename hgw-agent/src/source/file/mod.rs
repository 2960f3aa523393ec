//! The static file source: the peers of the config, and, with a config file, the
//! peers that differ each time the file changes (read again when `watch` says it may
//! have).

use std::{collections::HashSet, path::PathBuf};

use log::{info, warn};

use crate::agent::desired::DesiredState;
use crate::agent::sources::{PeerChange, PeerReceiver, PeerSender, peer_channel};
use crate::config::{Config, ConfigError, Peer, Source, refused};

#[cfg(test)]
pub(crate) mod test_support;
mod watch;
use watch::FileWatch;

/// Reads the config again (the same file and flags).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// The changes of the static peers: with a config file, the peers that differ are sent
/// whenever the file changes and still reads as a valid config. Only the peers are
/// applied live; other changes are named in a warning and wait for a restart.
///
/// The start's peers are not sent: `checked`, their desired state (the start's check),
/// is the loop's first whole set as it is. Each reload's changes are checked against a
/// copy of it, so a reload costs its changed peers, not all of them.
pub fn static_peers(
    reload: Option<(PathBuf, Reload)>,
    running: Config,
    checked: &DesiredState,
) -> PeerReceiver {
    let (tx, rx) = peer_channel();
    if let Some((path, reload)) = reload {
        tokio::spawn(watch_file(path, reload, (running, checked.clone()), tx));
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
    use test_support::peer;

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
