//! One agent per network namespace: a second one would stack its programs behind the
//! first one's and fight over the routes. Two guards, held while [`AgentLock`] lives and
//! released however the process ends (SIGKILL included):
//! - the abstract Unix socket @hgw-agent: it belongs to the network namespace, so it
//!   finds an agent whatever its runtime directory. Any process can bind it, so one held
//!   by a process that is not root and not of the agent's user, or that does not accept
//!   connections as an agent does, is passed over with a warning;
//! - flock on `agent-<netns inode>.lock` in the agent's runtime directory (the status
//!   socket's), which only root and the agent's user can write: what a process of another
//!   user cannot take first.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt as _,
        unix::{
            fs::{MetadataExt as _, OpenOptionsExt as _},
            net::{SocketAddr, UnixListener, UnixStream},
        },
    },
    path::Path,
};

use log::warn;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another hgw agent{pid} is running in this network namespace (it holds {what}): stop it first"
    )]
    AnotherAgent { pid: String, what: String },
    #[error("taking the abstract socket @{AGENT_SOCKET}: {0}")]
    Socket(#[source] io::Error),
    #[error("reading this process's network namespace (/proc/self/ns/net): {0}")]
    Netns(#[source] io::Error),
    #[error("taking the lock file {path}: {source}")]
    File { path: String, source: io::Error },
}

/// The abstract Unix socket one agent per network namespace holds.
pub const AGENT_SOCKET: &str = "hgw-agent";

/// Held, never read.
#[derive(Debug)]
pub struct AgentLock {
    _socket: Option<UnixListener>,
    _file: Option<File>,
}

impl AgentLock {
    /// Takes both guards; `dir` is the agent's runtime directory (it exists).
    pub fn take(dir: &Path) -> Result<Self, LockError> {
        let socket = take_socket()?;
        let file = take_file(dir)?;
        Ok(Self {
            _socket: socket,
            _file: file,
        })
    }
}

fn take_socket() -> Result<Option<UnixListener>, LockError> {
    let addr = SocketAddr::from_abstract_name(AGENT_SOCKET).map_err(LockError::Socket)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let holder = UnixStream::connect_addr(&addr)
                .ok()
                .and_then(|s| peer_cred(&s));
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            match holder {
                Some(cred) if cred.uid == 0 || cred.uid == euid => Err(LockError::AnotherAgent {
                    pid: pid_text(cred.pid),
                    what: format!("the abstract socket @{AGENT_SOCKET}"),
                }),
                Some(cred) => {
                    warn!(
                        "the abstract socket @{AGENT_SOCKET} is held by pid {} of uid {}, not an hgw agent's user: passed over; the lock file guards this namespace",
                        cred.pid, cred.uid
                    );
                    Ok(None)
                }
                None => {
                    warn!(
                        "the abstract socket @{AGENT_SOCKET} is held by a process that does not accept connections as an hgw agent does: passed over; the lock file guards this namespace"
                    );
                    Ok(None)
                }
            }
        }
        Err(e) => Err(LockError::Socket(e)),
    }
}

/// The lock file, locked and holding our pid; `None` when the file there is not ours
/// (a directory others can write, such as /tmp), which the socket then guards alone.
fn take_file(dir: &Path) -> Result<Option<File>, LockError> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map_err(LockError::Netns)?
        .ino();
    let path = dir.join(format!("agent-{netns}.lock"));
    let error = |source| LockError::File {
        path: path.display().to_string(),
        source,
    };
    let opened = File::options()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    let mut file = match opened {
        Ok(file) => file,
        // Another user's file or a symlink: not something an agent made.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::ELOOP)) => {
            warn!("{}: {e}; not an hgw agent's, left alone", path.display());
            return Ok(None);
        }
        Err(e) => return Err(error(e)),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let owner = file.metadata().map_err(error)?.uid();
    if owner != euid && owner != 0 {
        warn!(
            "{} belongs to uid {owner}, not an hgw agent's user: left alone",
            path.display()
        );
        return Ok(None);
    }
    // SAFETY: flock on the file's own open descriptor; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(error(e));
        }
        // Its holder wrote its pid there; a short read only loses the pid in the message.
        let mut text = String::new();
        let _ = file.take(32).read_to_string(&mut text);
        return Err(LockError::AnotherAgent {
            pid: text.trim().parse().map(pid_text).unwrap_or_default(),
            what: format!("the lock file {}", path.display()),
        });
    }
    file.set_len(0).map_err(error)?;
    file.rewind().map_err(error)?;
    write!(file, "{}", std::process::id()).map_err(error)?;
    Ok(Some(file))
}

fn pid_text(pid: i32) -> String {
    if pid > 0 {
        format!(" (pid {pid})")
    } else {
        String::new()
    }
}

/// The credentials of the process that listens at the other end (SO_PEERCRED).
fn peer_cred(stream: &UnixStream) -> Option<libc::ucred> {
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
    (rc == 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hgw-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        dir
    }

    #[test]
    fn a_held_lock_file_names_its_holder() {
        let dir = temp_dir("held");
        let first = take_file(&dir).expect("first").expect("the file guard");
        match take_file(&dir) {
            Err(LockError::AnotherAgent { pid, what }) => {
                assert_eq!(pid, format!(" (pid {})", std::process::id()));
                assert!(what.contains("agent-"), "{what}");
            }
            other => panic!("a second lock was not refused: {other:?}"),
        }
        drop(first);
        assert!(take_file(&dir).expect("after release").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlink_in_place_of_the_lock_file_is_left_alone() {
        let dir = temp_dir("symlink");
        let netns = std::fs::metadata("/proc/self/ns/net").expect("netns").ino();
        let target = dir.join("target");
        std::os::unix::fs::symlink(&target, dir.join(format!("agent-{netns}.lock")))
            .expect("symlink");
        assert!(take_file(&dir).expect("take").is_none());
        assert!(!target.exists(), "the symlink was followed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
