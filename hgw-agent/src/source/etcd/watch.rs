//! Following the subnets: the whole peer set of each listing, then each change the
//! watch brings; a broken watch or a lost lease starts it over.

use etcd_client::{Client, EventType, WatchOptions};
use log::{info, warn};

use super::{
    EtcdError, RETRY,
    claim::{Listing, acquire},
    connect::Shared,
    entries::{SubnetKey, checked, peers_of},
    lease::Lease,
    listing::{self, Warned, list},
    network::SubnetSpace,
};
use crate::agent::sources::{PeerChange, PeerSender};

/// Keeps the peers current until the agent goes away. etcd being unreachable only
/// delays updates: the agent keeps the last peers it was sent, so forwarding goes on.
pub(super) async fn run(
    mut client: Client,
    shared: Shared,
    space: SubnetSpace,
    (mut own, listed): (SubnetKey, Listing),
    mut lease: Lease,
    tx: PeerSender,
) {
    let mut warned = Warned::default();
    let mut listed = Some(listed);
    loop {
        let result = watch(
            &mut client,
            &shared,
            &space,
            (own, listed.take()),
            &tx,
            &mut warned,
            &mut lease,
        )
        .await;
        if tx.is_closed() {
            return;
        }
        match result {
            Ok(WatchEnd::LeaseLost) => {
                warn!(
                    "etcd: lease {:x} is gone; claiming {} again",
                    lease.id,
                    own.key(&shared.config.prefix)
                );
                match renew(&mut client, &shared, &space, own).await {
                    Ok((new_lease, new_own)) => {
                        // Best effort: the old lease may hold nothing any more.
                        let _ = client.lease_revoke(lease.id).await;
                        lease.id = new_lease;
                        lease.renewed.send_replace(new_lease);
                        if new_own != own {
                            warn!(
                                "etcd: {} was taken while our lease was gone; holding {}, but pods keep using the old subnets until the agent restarts",
                                own.key(&shared.config.prefix),
                                new_own.key(&shared.config.prefix)
                            );
                            own = new_own;
                        }
                    }
                    Err(e) => warn!("{e}"),
                }
            }
            Ok(WatchEnd::Broken) => {
                info!("etcd: watch ended (compaction or server restart); listing again")
            }
            Err(e) => warn!("{e}; retrying"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn renew(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    own: SubnetKey,
) -> Result<(i64, SubnetKey), EtcdError> {
    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let (own, _) = acquire(client, shared, space, lease, Some(own)).await?;
    Ok((lease, own))
}

enum WatchEnd {
    Broken,
    LeaseLost,
}

/// Sends the whole peer set of a listing (`listed`, else a new one), then each change
/// the watch brings, until the watch breaks or the lease is lost.
async fn watch(
    client: &mut Client,
    shared: &Shared,
    space: &SubnetSpace,
    (own, listed): (SubnetKey, Option<Listing>),
    tx: &PeerSender,
    warned: &mut Warned,
    lease: &mut Lease,
) -> Result<WatchEnd, EtcdError> {
    let prefix = &shared.config.prefix;
    let own_key = own.key(prefix);
    let (entries, revision) = match listed {
        Some(listed) => listed,
        None => list(client, shared).await?,
    };
    let peers = peers_of(prefix, &own_key, &entries, space, warned);
    drop(entries);
    if tx.send([PeerChange::All(peers)]).is_err() {
        return Ok(WatchEnd::Broken);
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(listing::MAX_MESSAGE)
        .watch(shared.subnets_prefix(), Some(options))
        .await
        .map_err(shared.error("watching subnets"))?;
    loop {
        tokio::select! {
            Some(id) = lease.lost.recv() => {
                if id == lease.id {
                    return Ok(WatchEnd::LeaseLost);
                }
            }
            () = tx.closed() => return Ok(WatchEnd::Broken),
            message = stream.message() => {
                let Some(response) = message.map_err(shared.error("watching subnets"))? else {
                    return Ok(WatchEnd::Broken);
                };
                if response.canceled() || response.compact_revision() != 0 {
                    return Ok(WatchEnd::Broken);
                }
                let mut changes = Vec::new();
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match event.event_type() {
                        EventType::Delete if key == own_key => return Ok(WatchEnd::LeaseLost),
                        EventType::Put if key == own_key => {}
                        EventType::Put => {
                            let peer = listing::entry(kv).and_then(|(key, entry)| {
                                checked(prefix, &key, &entry, space, warned)
                            });
                            changes.push(match peer {
                                Some(peer) => PeerChange::Upsert(peer),
                                // Whatever it was before, it is no peer now.
                                None => PeerChange::Remove(key.to_owned()),
                            });
                        }
                        EventType::Delete => {
                            warned.forget(key);
                            changes.push(PeerChange::Remove(key.to_owned()));
                        }
                    }
                }
                if tx.send(changes).is_err() {
                    return Ok(WatchEnd::Broken);
                }
            }
        }
    }
}
