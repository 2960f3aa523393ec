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
    #[error(
        "another hgw agent{pid} is running in this network namespace (it holds the abstract socket @{AGENT_LOCK}): stop it first"
    )]
    AnotherAgent { pid: String },
    #[error("taking the abstract socket @{AGENT_LOCK}: {0}")]
    Lock(#[source] std::io::Error),
}

/// The abstract Unix socket one agent per network namespace holds.
pub const AGENT_LOCK: &str = "hgw-agent";

/// One agent per network namespace: a second one would stack its programs behind the
/// first one's and fight over the routes. An abstract Unix socket belongs to the
/// network namespace, needs no capability and no file, and goes with the process
/// however it ends (SIGKILL included). Held while the value lives.
#[derive(Debug)]
pub struct AgentLock(
    #[expect(dead_code, reason = "held, never read")] std::os::unix::net::UnixListener,
);

impl AgentLock {
    pub fn take() -> Result<Self, StatusError> {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        let addr = SocketAddr::from_abstract_name(AGENT_LOCK).map_err(StatusError::Lock)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => Ok(Self(listener)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let pid = UnixStream::connect_addr(&addr)
                    .ok()
                    .and_then(|stream| peer_pid(&stream))
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                Err(StatusError::AnotherAgent { pid })
            }
            Err(e) => Err(StatusError::Lock(e)),
        }
    }
}

/// The pid of the process that listens at the other end (SO_PEERCRED).
fn peer_pid(stream: &std::os::unix::net::UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd as _;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which outlives the
    // call; the fd is the stream's, open for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
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
