//! `hgw-agent status`: the running agent answers on a Unix socket with one JSON
//! document; the client prints it as is (`--json`) or as a table for people.

use std::{collections::BTreeMap, path::Path};

use hgw_common::COUNTER_NOT_IP_NAME;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::datapath::{CounterReader, Counters};

/// The status document; shared with the lab, which reads it without building the agent.
pub use hgw_common::status::{FilterStatus, HookStatus, PeerStatus, ProgramStatus, Status};

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

/// The datapath's counters as the status shows them: family -> name -> packets.
pub fn counters_by_name(counters: &Counters) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut by_name: BTreeMap<String, BTreeMap<String, u64>> = counters
        .families
        .iter()
        .map(|(family, values)| {
            let values = values
                .iter()
                .map(|(counter, value)| (counter.name().to_owned(), *value))
                .collect();
            (family.name().to_owned(), values)
        })
        .collect();
    by_name.insert(
        "other".into(),
        BTreeMap::from([(COUNTER_NOT_IP_NAME.to_owned(), counters.not_ip)]),
    );
    by_name
}

/// Sends `status` to one client and closes the connection.
pub async fn serve(mut stream: tokio::net::UnixStream, status: &Status) -> std::io::Result<()> {
    let body = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// A client that does not read its answer within this is dropped.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers status clients from the latest snapshot the agent's loop published, with
/// the counters read at request time, on tasks of their own: a slow or stuck client
/// never holds up the loop.
pub fn spawn_server(
    listener: tokio::net::UnixListener,
    snapshot: tokio::sync::watch::Receiver<std::sync::Arc<Status>>,
    counters: std::sync::Arc<std::sync::OnceLock<CounterReader>>,
) {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("status socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut status = Status::clone(&snapshot.borrow());
            if let Some(reader) = counters.get() {
                match reader.read() {
                    Ok(values) => status.counters = counters_by_name(&values),
                    Err(e) => log::warn!("{e}"),
                }
            }
            tokio::spawn(async move {
                match tokio::time::timeout(CLIENT_TIMEOUT, serve(stream, &status)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::debug!("status client went away: {e}"),
                    Err(_) => log::debug!("status client too slow; dropped"),
                }
            });
        }
    });
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
