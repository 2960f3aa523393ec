//! Wakes the static source when its config file may have changed: inotify on the file's
//! directory (editors replace a file by renaming over it, and a Kubernetes ConfigMap
//! volume swaps a `..data` symlink, so the directory's events are the ones that tell),
//! with a slow timer behind it for a watch that goes stale (every second without
//! inotify). The caller compares contents: a wake-up is a hint, never a change.

use std::{
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// How often the file is read again without inotify.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// With inotify: how often anyway, for a watch that went stale unseen (the directory
/// replaced, a network filesystem whose remote changes send no event).
const SAFETY_NET_EVERY: Duration = Duration::from_secs(30);
/// Events that come together (an editor's write, rename and chmod) are taken as one.
const SETTLE: Duration = Duration::from_millis(5);

pub struct FileWatch {
    inotify: Option<AsyncFd<OwnedFd>>,
    fallback: tokio::time::Interval,
}

impl FileWatch {
    /// Watches `path`'s directory; without inotify (an error is returned for the log),
    /// the timer alone.
    pub fn new(path: &Path) -> (Self, Option<std::io::Error>) {
        let (inotify, error) = match watch_dir(path) {
            Ok(fd) => (Some(fd), None),
            Err(e) => (None, Some(e)),
        };
        let every = if inotify.is_some() {
            SAFETY_NET_EVERY
        } else {
            POLL_EVERY
        };
        let mut fallback = tokio::time::interval(every);
        fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (Self { inotify, fallback }, error)
    }

    /// Returns when the file may have changed.
    pub async fn changed(&mut self) {
        let Some(inotify) = &self.inotify else {
            self.fallback.tick().await;
            return;
        };
        tokio::select! {
            _ = self.fallback.tick() => return,
            ready = inotify.readable() => {
                if let Ok(mut guard) = ready {
                    drain(inotify.get_ref());
                    guard.clear_ready();
                }
            }
        }
        tokio::time::sleep(SETTLE).await;
        drain(inotify.get_ref());
    }
}

fn watch_dir(path: &Path) -> std::io::Result<AsyncFd<OwnedFd>> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscall; the fd returned is checked and then owned.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new inotify instance, ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_ATTRIB
        | libc::IN_MODIFY;
    // SAFETY: dir is a NUL-terminated path, fd an inotify instance.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), dir.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the AsyncFd owns the fd for its whole life, and as_raw_fd is that fd.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Reads every pending event (their content does not matter: the caller rereads).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    // SAFETY: buf is writable for its length; the fd is non-blocking.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}
