//! What other agents left on the hooks: an earlier agent's cls_bpf filters outlive it
//! and are removed where this one does not attach; `uninstall` and the `off` mode take
//! everything off ([`take_off`]); a live agent's tcx programs mean a second agent,
//! which is refused.

use std::path::Path;

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    tc::{self, TcError},
};
use hgw_common::{PROG_TO_PEER, PROG_TO_POD};
use log::{debug, info, warn};

use super::{DatapathError, pins};
use crate::config::Attach;

/// Deletes hgw's cls_bpf filter of `program` (by its name) from `interface`'s
/// ingress, if there is one; returns whether one went.
pub(super) fn remove_filter(interface: &str, program: &str) -> bool {
    match tc::qdisc_detach_program(interface, TcAttachType::Ingress, program) {
        Ok(()) => {
            info!("{interface}: an earlier agent's cls_bpf filter of {program} deleted");
            true
        }
        // None there, or no qdisc to hold one.
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(TcError::NetlinkError(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            false
        }
        Err(e) => {
            warn!("{interface}: deleting hgw's cls_bpf filter of {program}: {e}");
            false
        }
    }
}

/// What [`take_off`] removed.
#[derive(Debug)]
pub struct TakenOff {
    /// Pins under the pin directory (the programs go with their links), or why they
    /// could not all go.
    pub pins: std::io::Result<usize>,
    /// hgw's cls_bpf filters.
    pub filters: usize,
    /// `clsact` qdiscs hgw added, where nothing else was left on them.
    pub qdiscs: usize,
}

/// Takes hgw's fast path off this network namespace, for `uninstall` and the `off`
/// mode (what an earlier agent left would go on forwarding): the pins under `pin_dir`,
/// hgw's cls_bpf filters on every interface (a filter outlives its agent, pinned or
/// not), then the `clsact` qdiscs hgw added for them (their marks, read before the pins
/// go) where no filter is left. A pin that cannot go is returned, after the rest went.
pub async fn take_off(pin_dir: Option<&Path>, scanner: &crate::tc::Scanner) -> TakenOff {
    let qdiscs = pin_dir.map(pins::marked_qdiscs).unwrap_or_default();
    let pins = pin_dir.map_or(Ok(0), pins::remove_pins);
    let filters = remove_filters_but(|_, _| false);
    let qdiscs = scanner.delete_unused_clsacts(&qdiscs).await;
    TakenOff {
        pins,
        filters,
        qdiscs,
    }
}

/// At start, whichever way this agent attaches: an earlier agent's filters on hooks
/// this configuration does not use (`hgw_to_pod` off the uplink; `hgw_to_peer` on the
/// bridge with [`Attach::Ports`], on any other interface with [`Attach::Bridge`]) would
/// go on forwarding with its programs. (Its tcx links' pins go in `prepare_pin_dir`.)
pub(super) fn remove_unused_filters(bridge: &str, uplink: &str, attach: Attach) -> usize {
    remove_filters_but(|interface, program| match (program, attach) {
        (PROG_TO_POD, _) => interface == uplink,
        (_, Attach::Ports) => interface != bridge,
        (_, Attach::Bridge) => interface == bridge,
    })
}

/// Deletes hgw's filters from every interface but where `keep(interface, program)`.
fn remove_filters_but(keep: impl Fn(&str, &str) -> bool) -> usize {
    let Ok(interfaces) = std::fs::read_dir("/sys/class/net") else {
        return 0;
    };
    let mut removed = 0;
    for entry in interfaces.flatten() {
        let interface = entry.file_name().to_string_lossy().into_owned();
        for program in [PROG_TO_PEER, PROG_TO_POD] {
            if !keep(&interface, program) {
                removed += usize::from(remove_filter(&interface, program));
            }
        }
    }
    removed
}

/// tcx stacks programs: a second agent would run behind the first one and see nothing,
/// so an hgw program already on the hook means another agent is alive. Its links die
/// with it; we do not take them away from under it. Naming the programs on a hook
/// needs CAP_SYS_ADMIN (their info is read by id); without it, the agent lock
/// ([`crate::node::lock::AgentLock`], taken first) is what keeps a second agent out. (A
/// cls_bpf filter outlives its agent: there the lock alone tells a live one.)
pub(super) fn refuse_foreign_hgw(
    interface: &str,
    pins: Option<&std::path::Path>,
) -> Result<(), DatapathError> {
    let attached = match SchedClassifier::query_tcx(interface, TcAttachType::Ingress) {
        Ok((_, programs)) => programs,
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EPERM) => {
            debug!(
                "{interface}: programs already on its ingress cannot be named without CAP_SYS_ADMIN ({}); the agent lock guards against a second agent",
                e.call
            );
            return Ok(());
        }
        // No tcx entry on this hook yet, or a kernel without tcx: nothing of ours is there.
        Err(_) => return Ok(()),
    };
    // Programs held by links pinned here are an earlier agent's, left to be adopted.
    let pinned: Vec<u32> = pins
        .into_iter()
        .flat_map(|dir| {
            [PROG_TO_PEER, PROG_TO_POD]
                .map(|program| pins::pinned_program(&pins::link_pin_path(dir, program, interface)))
        })
        .flatten()
        .collect();
    for info in attached {
        let name = info.name_as_str().unwrap_or_default();
        if (name == PROG_TO_PEER || name == PROG_TO_POD) && !pinned.contains(&info.id()) {
            return Err(DatapathError::AlreadyAttached {
                interface: interface.to_owned(),
                program: name.to_owned(),
                id: info.id(),
            });
        }
    }
    Ok(())
}
