//! This node's lease, kept alive in a task of its own.

use std::time::Duration;

use etcd_client::LeaseClient;
use log::warn;
use tokio::sync::{mpsc, watch};

use super::{EtcdError, RETRY};

/// This node's lease as the watch loop holds it: its id, published to the keeper,
/// and the keeper's word when it is gone.
pub(super) struct Lease {
    pub(super) id: i64,
    pub(super) renewed: watch::Sender<i64>,
    pub(super) lost: mpsc::Receiver<i64>,
}

enum KeepEnd {
    /// The watch loop took another lease.
    Renewed,
    /// etcd says the lease has expired.
    Lost,
    /// The keep-alive stream ended (etcd restarted or unreachable).
    Broken,
    /// The watch loop is gone.
    Closed,
}

/// Keeps this node's lease alive in a task of its own, so nothing else (a burst of
/// changes, a slow agent, a blocked send) can let it expire. Follows the id the watch
/// loop publishes in `lease` and reports a lost lease on `lost`.
pub(super) async fn keep_alive(
    mut client: LeaseClient,
    endpoints: String,
    ttl: i64,
    mut lease: watch::Receiver<i64>,
    lost: mpsc::Sender<i64>,
) {
    let period = Duration::from_secs((ttl / 3).max(1) as u64);
    loop {
        let id = *lease.borrow_and_update();
        let end = keep_one(&mut client, id, period, &mut lease).await;
        let end = end.unwrap_or_else(|source| {
            let error = EtcdError::Client {
                operation: "keeping the lease alive",
                endpoints: endpoints.clone(),
                source,
            };
            warn!("{error}; retrying");
            KeepEnd::Broken
        });
        match end {
            KeepEnd::Renewed => {}
            KeepEnd::Closed => return,
            KeepEnd::Lost => {
                if lost.send(id).await.is_err() || lease.changed().await.is_err() {
                    return;
                }
            }
            KeepEnd::Broken => {
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    changed = lease.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}

async fn keep_one(
    client: &mut LeaseClient,
    id: i64,
    period: Duration,
    lease: &mut watch::Receiver<i64>,
) -> Result<KeepEnd, etcd_client::Error> {
    // Opening the stream sends the first request.
    let (mut keeper, mut responses) = client.keep_alive(id).await?;
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => keeper.keep_alive().await?,
            response = responses.message() => match response? {
                Some(r) if r.ttl() <= 0 => return Ok(KeepEnd::Lost),
                Some(_) => {}
                None => return Ok(KeepEnd::Broken),
            },
            changed = lease.changed() => {
                return Ok(if changed.is_ok() { KeepEnd::Renewed } else { KeepEnd::Closed });
            }
        }
    }
}
