//! What outlives the agent on bpffs: the pin directory (its bpffs, its owner), the
//! pinned tcx links and maps, and marks for the `clsact` qdiscs hgw made (bpffs holds
//! only directories and BPF objects: a mark is an empty directory).

use std::path::{Path, PathBuf};

use std::os::fd::AsFd as _;

use aya::programs::links::{FdLink, PinnedLink};
use hgw_common::{PROG_TO_PEER, sys};
use log::{debug, info, warn};

use super::DatapathError;
use crate::config::Attach;

/// Where the link of `program` on `interface` is pinned.
pub(super) fn link_pin_path(dir: &Path, program: &str, interface: &str) -> PathBuf {
    dir.join("links").join(format!("{program}@{interface}"))
}

/// The program a pinned link holds, if the pin is there.
pub(super) fn pinned_program(path: &Path) -> Option<u32> {
    pinned_tcx_link(path).map(|(program, _)| program)
}

/// The link pinned at `path` if it still holds a program on `interface` (a device made
/// again under the name has none of it: that pin is removed).
pub(super) fn adoptable(path: &Path, interface: &str) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    let ifindex =
        std::fs::read_to_string(Path::new("/sys/class/net").join(interface).join("ifindex"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
    let on_interface = pinned_tcx_link(path).is_some_and(|(_, on)| Some(on) == ifindex);
    if on_interface && let Ok(link) = PinnedLink::from_pin(path) {
        return Some(FdLink::from(link));
    }
    let _ = unpin_link(path);
    None
}

/// The program id and the interface of the tcx link pinned at `path`, from the link's
/// own info (`BPF_OBJ_GET_INFO_BY_FD` on a link this process opens needs no
/// CAP_SYS_ADMIN, unlike naming a hook's programs by id). A link whose device is gone
/// has interface 0.
fn pinned_tcx_link(path: &Path) -> Option<(u32, u32)> {
    const BPF_LINK_TYPE_TCX: u32 = 11;
    /// `struct bpf_link_info` up to its union (8-byte aligned), of which tcx uses the
    /// first two words: ifindex, attach_type.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        union: [u32; 16],
    }
    let fd = sys::obj_get(path).ok()?;
    let mut info = LinkInfo::default();
    // SAFETY: a link's info, no pointers in it.
    let found = unsafe { sys::obj_info(fd.as_fd(), &mut info) }.is_ok();
    (found && info.kind == BPF_LINK_TYPE_TCX).then_some((info.prog_id, info.union[0]))
}

/// bpffs mounted where the pins go (mounted when missing: at /sys/fs/bpf for a path
/// under it, else on the directory itself), the directories made, and the pins of
/// links that cannot be adopted removed: interfaces that are gone, and the bridge-side
/// program on hooks this attach mode does not use.
pub(super) fn prepare_pin_dir(
    dir: &Path,
    bridge: &str,
    attach: Attach,
) -> Result<(), DatapathError> {
    let error = |operation: &'static str| {
        move |source| DatapathError::PinDir {
            path: dir.display().to_string(),
            operation,
            source,
        }
    };
    let mount_point = if dir.starts_with(BPFFS_DEFAULT) {
        Path::new(BPFFS_DEFAULT)
    } else {
        dir
    };
    std::fs::create_dir_all(mount_point).map_err(error("creating"))?;
    if !on_bpffs(mount_point) {
        mount_bpffs(mount_point).map_err(error("mounting bpffs"))?;
        info!("mounted bpffs at {}", mount_point.display());
        super::pin_owner::warn_if_private_mount(mount_point);
    }
    std::fs::create_dir_all(dir).map_err(error("creating"))?;
    // Before anything in it is trusted: interfaces' names and indexes repeat across
    // network namespaces.
    super::pin_owner::claim(dir)?;
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(error("creating"))?;
    }
    // Marks of qdiscs on interfaces that are gone: the qdiscs went with them.
    for ifindex in marked_qdiscs(dir) {
        // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into `name`.
        let exists = unsafe {
            let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
            !libc::if_indextoname(ifindex, name.as_mut_ptr()).is_null()
        };
        if !exists {
            let _ = std::fs::remove_dir(dir.join(QDISCS).join(ifindex.to_string()));
        }
    }
    let links = std::fs::read_dir(dir.join("links")).map_err(error("listing"))?;
    for entry in links.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((program, interface)) = name.split_once('@') else {
            continue;
        };
        let exists = Path::new("/sys/class/net").join(interface).exists();
        let unused = program == PROG_TO_PEER
            && match attach {
                Attach::Ports => interface == bridge,
                Attach::Bridge => interface != bridge,
            };
        if !exists || unused {
            let _ = unpin_link(&entry.path());
        }
    }
    Ok(())
}

/// An earlier agent of this network namespace pinned its programs in another directory
/// (`pin_dir` changed without `uninstall`): they would sit first on the hooks and take
/// the traffic while this agent's counters stay at 0. Their pins go, and with them the
/// programs (no process holds them: the agent lock keeps a second agent out).
pub(super) fn remove_earlier_pins(own: Option<&Path>) {
    for dir in super::pin_owner::earlier_pin_dirs(own) {
        // The qdiscs it made are still hgw's, for this agent's `uninstall`.
        if let Some(own) = own {
            for ifindex in marked_qdiscs(&dir) {
                mark_qdisc(own, ifindex);
            }
        }
        match remove_pins(&dir) {
            Ok(n) => warn!(
                "removed {n} pins an earlier agent of this network namespace left in {} (pin_dir changed without `hgw-agent uninstall`); its programs were first on the hooks",
                dir.display()
            ),
            Err(e) => warn!(
                "{}: an earlier agent's pins, whose programs sit first on the hooks, could not be removed: {e}; remove them with `hgw-agent uninstall --pin-dir {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
}

/// Removes the link and map pins under `dir` and the directories, if they are there;
/// each pinned link is detached first ([`unpin_link`]). Returns how many pins went.
pub fn remove_pins(dir: &Path) -> std::io::Result<usize> {
    let mut count = 0;
    if let Ok(marks) = std::fs::read_dir(dir.join(QDISCS)) {
        for mark in marks {
            std::fs::remove_dir(mark?.path())?;
        }
        std::fs::remove_dir(dir.join(QDISCS))?;
    }
    for sub in ["links", "maps"] {
        let sub = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if sub.ends_with("links") {
                unpin_link(&path)?;
            } else {
                std::fs::remove_file(path)?;
            }
            count += 1;
        }
        std::fs::remove_dir(&sub)?;
    }
    if dir.exists() {
        super::pin_owner::unmark(dir)?;
        std::fs::remove_dir(dir)?;
    }
    Ok(count)
}

/// Detaches the BPF link pinned at `path` at once (BPF_OBJ_GET, then BPF_LINK_DETACH:
/// no capability beyond access to the pin), leaving the pin.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    sys::link_detach(sys::obj_get(path)?.as_fd())
}

/// Removes the link pin at `path`, detaching its link first: unlinking a link's last
/// pin drops it only after an RCU grace period, so its program would stay on the hook
/// for a moment, long enough for the hook checks that follow (this agent's, a new
/// agent's, uninstall's) to see it. A link already gone is no error.
pub(super) fn unpin_link(path: &Path) -> std::io::Result<()> {
    // A link whose device went is detached already.
    if let Err(e) = detach_pinned_link(path) {
        debug!("detaching the link pinned at {}: {e}", path.display());
    }
    std::fs::remove_file(path)
}

/// Under the pin directory, one empty directory per `clsact` qdisc hgw added, named
/// by the interface's index.
const QDISCS: &str = "qdiscs";

/// Notes that hgw added the `clsact` qdisc of interface `ifindex` (so `uninstall` may
/// delete it once nothing else uses it).
pub(super) fn mark_qdisc(dir: &Path, ifindex: u32) {
    let mark = dir.join(QDISCS).join(ifindex.to_string());
    if let Err(e) = std::fs::create_dir_all(&mark) {
        warn!(
            "{}: {e}; `uninstall` will leave the clsact qdisc of interface {ifindex}",
            mark.display()
        );
    }
}

/// The interfaces whose `clsact` qdisc hgw added, by index.
pub fn marked_qdiscs(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir.join(QDISCS))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

const BPFFS_DEFAULT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
