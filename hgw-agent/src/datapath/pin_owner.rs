//! Which network namespace a pin directory belongs to, and whether its pins can outlive
//! the agent.
//!
//! Adoption matches pinned links by interface name and index, and both repeat across
//! network namespaces: two agents in different namespaces sharing a pin directory would
//! take over each other's links and maps. So a pin directory carries its namespace as
//! an empty directory `netns-<inode>` (bpffs allows directories, not files), and an
//! agent of another namespace that still exists is refused.

use std::path::{Path, PathBuf};

use log::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PinOwnerError {
    #[error("pin directory {dir}: {operation}: {source}")]
    Io {
        dir: String,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pin_dir {dir} holds the pins of the agent of another network namespace (net:[{owner}]), which still exists; give each namespace's agent a pin_dir of its own"
    )]
    OtherNamespace { dir: String, owner: u64 },
}

const MARKER_PREFIX: &str = "netns-";

/// The inode of a process's network namespace (`net:[N]`), from `/proc/PID/ns/net`.
fn netns_of(ns_link: &Path) -> Option<u64> {
    std::fs::metadata(ns_link)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// This process's network namespace.
pub fn current_netns() -> std::io::Result<u64> {
    std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Whether a network namespace with this inode still exists: a process is in it, or
/// `ip netns` names it (a bind mount under /run/netns keeps it alive with no process).
fn netns_exists(inode: u64) -> bool {
    let in_proc = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
                && netns_of(&e.path().join("ns/net")) == Some(inode)
        });
    in_proc
        || ["/run/netns", "/var/run/netns"].iter().any(|dir| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| netns_of(&e.path()) == Some(inode))
        })
}

/// The namespaces whose markers are in `dir`.
fn markers(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let inode = name.strip_prefix(MARKER_PREFIX)?.parse().ok()?;
            Some((inode, e.path()))
        })
        .collect())
}

/// What to do with a pin directory's markers, for the agent of namespace `me`: the
/// owner to refuse for (a live namespace other than `me`), else the markers to remove
/// (dead namespaces') and whether `me`'s must be made.
fn decide(
    me: u64,
    found: &[(u64, PathBuf)],
    exists: impl Fn(u64) -> bool,
) -> Result<(Vec<PathBuf>, bool), u64> {
    if let Some((owner, _)) = found.iter().find(|(ns, _)| *ns != me && exists(*ns)) {
        return Err(*owner);
    }
    let stale = found
        .iter()
        .filter(|(ns, _)| *ns != me)
        .map(|(_, path)| path.clone())
        .collect();
    Ok((stale, !found.iter().any(|(ns, _)| *ns == me)))
}

/// Claims `dir` (which exists) for this process's network namespace: refuses if the
/// agent of another, live namespace claimed it; takes over the pins of a namespace that
/// is gone (their links went with its interfaces; the maps are rewritten).
pub fn claim(dir: &Path) -> Result<(), PinOwnerError> {
    let io = |operation: &'static str| {
        move |source| PinOwnerError::Io {
            dir: dir.display().to_string(),
            operation,
            source,
        }
    };
    let me = current_netns().map_err(io("reading /proc/self/ns/net"))?;
    let found = markers(dir).map_err(io("listing"))?;
    let (stale, make) =
        decide(me, &found, netns_exists).map_err(|owner| PinOwnerError::OtherNamespace {
            dir: dir.display().to_string(),
            owner,
        })?;
    for path in stale {
        info!(
            "{}: its network namespace is gone; the pins are this namespace's now",
            path.display()
        );
        let _ = std::fs::remove_dir(&path);
    }
    if make {
        std::fs::create_dir(dir.join(format!("{MARKER_PREFIX}{me}")))
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io("marking its network namespace"))?;
    }
    Ok(())
}

/// How deep below a bpffs mount point, and how many directories in all, the search for
/// an earlier agent's pin directory looks: bounded whatever is pinned on the node.
const SEARCH_DEPTH: usize = 4;
const SEARCH_DIRS: usize = 10_000;

/// The bpffs mount points this process sees (/proc/self/mountinfo).
fn bpffs_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fstype = fs.split_whitespace().next()?;
            let point = mount.split_whitespace().nth(4)?;
            // mountinfo escapes spaces and the like as octal; such paths are skipped.
            (fstype == "bpf" && !point.contains('\\')).then(|| PathBuf::from(point))
        })
        .collect()
}

/// Pin directories other than `own` on this process's bpffs mounts that an agent of
/// this network namespace marked: an earlier agent's, left when `pin_dir` changed (or
/// became "none") without `uninstall`. Its pinned programs would sit first on the hooks
/// and take the traffic. The agent lock keeps a second live agent out of the namespace,
/// so they are no one else's.
pub fn earlier_pin_dirs(own: Option<&Path>) -> Vec<PathBuf> {
    let Ok(me) = current_netns() else {
        return Vec::new();
    };
    let own = own.and_then(|dir| std::fs::canonicalize(dir).ok());
    let mut found = Vec::new();
    let mut seen = 0;
    let mut stack: Vec<(PathBuf, usize)> = bpffs_mounts().into_iter().map(|m| (m, 0)).collect();
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > SEARCH_DIRS {
            warn!("stopped looking for earlier pin directories after {SEARCH_DIRS} directories");
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let subdirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        let marked = subdirs
            .iter()
            .any(|d| d.file_name() == Some(std::ffi::OsStr::new(&format!("{MARKER_PREFIX}{me}"))));
        if marked {
            if std::fs::canonicalize(&dir).ok() != own {
                found.push(dir);
            }
            continue;
        }
        if depth < SEARCH_DEPTH {
            stack.extend(subdirs.into_iter().map(|d| (d, depth + 1)));
        }
    }
    found
}

/// Removes the namespace markers from `dir` (uninstall: the pins are gone).
pub fn unmark(dir: &Path) -> std::io::Result<()> {
    for (_, path) in markers(dir)? {
        std::fs::remove_dir(path)?;
    }
    Ok(())
}

/// Says so when a bpffs the agent just mounted lives only in a mount namespace of this
/// process's own (`ip netns exec` makes one, and mounts a fresh /sys in it): its pins
/// die with the process, so a restart does not keep the fast path.
pub fn warn_if_private_mount(mount_point: &Path) {
    let mnt = |pid: &str| netns_of(&Path::new("/proc").join(pid).join("ns/mnt"));
    let (me, init) = (mnt("self"), mnt("1"));
    if me.is_some() && (me != init || std::process::id() == 1) {
        warn!(
            "bpffs was not mounted at {} in this mount namespace (ip netns exec and containers make their own), so the agent mounted one that lives only as long as this process: the pins will not keep the fast path across a restart. Mount bpffs where the agent's namespace shares it (mount -t bpf bpf /sys/fs/bpf on the host, a hostPath in a pod), or run with pin_dir = \"none\"",
            mount_point.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(ns: u64) -> (u64, PathBuf) {
        (ns, PathBuf::from(format!("/pins/{MARKER_PREFIX}{ns}")))
    }

    #[test]
    fn a_live_namespace_keeps_its_pins_from_another() {
        let found = [marker(7)];
        assert_eq!(decide(9, &found, |_| true), Err(7));
    }

    #[test]
    fn the_pins_of_a_namespace_that_is_gone_are_taken_over() {
        let found = [marker(7)];
        let (stale, make) = decide(9, &found, |ns| ns == 9).expect("taken over");
        assert_eq!(stale, vec![PathBuf::from("/pins/netns-7")]);
        assert!(make);
    }

    #[test]
    fn the_own_namespace_and_an_unmarked_directory_are_claimed() {
        assert_eq!(decide(9, &[marker(9)], |_| true), Ok((Vec::new(), false)));
        assert_eq!(decide(9, &[], |_| true), Ok((Vec::new(), true)));
    }

    #[test]
    fn this_process_namespace_exists() {
        let me = current_netns().expect("own netns");
        assert!(netns_exists(me));
        assert!(!netns_exists(u64::MAX));
    }
}
