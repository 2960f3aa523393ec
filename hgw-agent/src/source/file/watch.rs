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
/// Events that come together (an editor's write, rename and chmod) are taken as one:
/// a wake-up that has not seen the file written whole waits this long for more.
const SETTLE: Duration = Duration::from_millis(5);
/// The file written whole: a writer closed it, or a file was renamed onto its name.
const COMPLETE: u32 = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;

pub struct FileWatch {
    inotify: Option<AsyncFd<OwnedFd>>,
    /// The file's name in the watched directory.
    name: Vec<u8>,
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
        let name = path
            .file_name()
            .map(|n| std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec())
            .unwrap_or_default();
        (
            Self {
                inotify,
                name,
                fallback,
            },
            error,
        )
    }

    /// Returns when the file may have changed: at once when it was written whole, else
    /// [`SETTLE`] after the first event (a write under way, a rename of the
    /// directory's other entries, as a ConfigMap volume does), or sooner if the file is
    /// written whole meanwhile.
    pub async fn changed(&mut self) {
        let Some(inotify) = &self.inotify else {
            self.fallback.tick().await;
            return;
        };
        let mut whole = tokio::select! {
            _ = self.fallback.tick() => return,
            ready = inotify.readable() => match ready {
                Ok(mut guard) => {
                    let whole = drain(inotify.get_ref(), &self.name);
                    guard.clear_ready();
                    whole
                }
                Err(_) => false,
            },
        };
        let settled = tokio::time::Instant::now() + SETTLE;
        while !whole {
            match tokio::time::timeout_at(settled, inotify.readable()).await {
                Ok(Ok(mut guard)) => {
                    whole = drain(inotify.get_ref(), &self.name);
                    guard.clear_ready();
                }
                _ => break,
            }
        }
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

/// Reads every pending event; whether one says the file `name` was written whole (the
/// others matter only as a wake-up: the caller rereads).
fn drain(fd: &OwnedFd, name: &[u8]) -> bool {
    let mut buf = [0u8; 4096];
    let mut whole = false;
    loop {
        // SAFETY: buf is writable for its length; the fd is non-blocking.
        let read = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(read @ 1..) = usize::try_from(read) else {
            return whole;
        };
        whole |= written_whole(&buf[..read], name);
    }
}

/// Whether the `struct inotify_event`s in `events` include [`COMPLETE`] for `name`.
fn written_whole(mut events: &[u8], name: &[u8]) -> bool {
    const HEAD: usize = 16;
    let mut whole = false;
    while events.len() >= HEAD {
        let word = |at: usize| {
            u32::from_ne_bytes([events[at], events[at + 1], events[at + 2], events[at + 3]])
        };
        let (mask, len) = (word(4), word(12) as usize);
        let Some(event_name) = events.get(HEAD..HEAD + len) else {
            break;
        };
        // The name is NUL-padded to an alignment.
        let event_name = event_name.split(|b| *b == 0).next().unwrap_or_default();
        whole |= mask & COMPLETE != 0 && event_name == name;
        events = &events[HEAD + len..];
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        padded.resize(name.len().div_ceil(16) * 16, 0);
        let mut e = Vec::new();
        for word in [1, mask, 0, padded.len() as u32] {
            e.extend(word.to_ne_bytes());
        }
        e.extend(padded);
        e
    }

    #[test]
    fn only_a_complete_write_of_the_file_counts_as_whole() {
        let modify = event(libc::IN_MODIFY, "hgw.toml");
        let closed = event(libc::IN_CLOSE_WRITE, "hgw.toml");
        let renamed = event(libc::IN_MOVED_TO, "hgw.toml");
        let other = event(libc::IN_CLOSE_WRITE, "hgw.toml.swp");
        assert!(!written_whole(&modify, b"hgw.toml"));
        assert!(!written_whole(&other, b"hgw.toml"));
        assert!(written_whole(
            &[modify.clone(), closed].concat(),
            b"hgw.toml"
        ));
        assert!(written_whole(&[other, renamed].concat(), b"hgw.toml"));
        // A cut-off event is not read past.
        assert!(!written_whole(
            &event(libc::IN_CLOSE_WRITE, "hgw.toml")[..20],
            b"hgw.toml"
        ));
    }
}
