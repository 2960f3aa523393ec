//! Putting hgw's programs on the ingress hooks: with tcx where the kernel has it (6.6+),
//! else as a direct-action `cls_bpf` filter of a `clsact` qdisc (netlink).
//!
//! Both keep hgw after what was on the hook before it, and hand what they do not take
//! on (`TC_ACT_UNSPEC`: `TCX_NEXT` under tcx, the next filter under cls_bpf). tcx: a
//! link attached last, pinned to outlive the agent, updated in place by the next one.
//! cls_bpf: a filter at priority [`FILTER_PRIORITY`], the largest there is, so every
//! filter already on the hook runs first (filters run by ascending priority; tc's
//! default for a later one without `pref` is one less than the smallest there, so
//! before hgw too); always at handle [`FILTER_HANDLE`], so the next agent finds it and
//! replaces its program in place (a netlink replace: never deleted then added). A
//! filter belongs to the interface, not to a process: pinned or not it outlives a
//! crash; with pinning it is left on the hook on purpose when the agent exits.

use std::path::PathBuf;

use aya::programs::{
    LinkOrder, ProgramError, TcAttachType,
    links::{FdLink, Link as _},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use hgw_common::{PROG_TO_PEER, PROG_TO_POD};
use log::{debug, info, warn};

use super::{
    Datapath, DatapathError, hook_error,
    leftovers::{refuse_foreign_hgw, remove_filter},
    pins, program_error,
};
use crate::config::Attach;

/// hgw's cls_bpf filters' priority: last on the hook (see the module's doc).
pub const FILTER_PRIORITY: u16 = u16::MAX;
/// hgw's cls_bpf filters' handle ("hg"): where the next agent finds them.
pub const FILTER_HANDLE: u32 = 0x6867;
/// Set to `1`, the agent attaches with cls_bpf even where the kernel has tcx: the
/// path kernels before 6.6 take, tested on a newer kernel.
pub const FORCE_CLS_BPF: &str = "HGW_FORCE_CLS_BPF";

/// How hgw's programs sit on a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// A tcx link (6.6+).
    Tcx,
    /// A direct-action cls_bpf filter of a `clsact` (or `ingress`) qdisc.
    ClsBpf,
}

impl HookKind {
    /// tcx where the kernel has it (probed, not guessed from the version), else
    /// cls_bpf; [`FORCE_CLS_BPF`] picks cls_bpf. Says which, and why.
    pub fn choose(tcx: bool) -> Self {
        let forced = std::env::var_os(FORCE_CLS_BPF).is_some_and(|v| v == "1");
        if tcx && !forced {
            info!("attaching with tcx (the kernel has it)");
            return HookKind::Tcx;
        }
        if tcx {
            info!(
                "attaching as cls_bpf filters of clsact qdiscs, priority {FILTER_PRIORITY}: {FORCE_CLS_BPF}=1 (the kernel has tcx)"
            );
        } else {
            info!(
                "attaching as cls_bpf filters of clsact qdiscs, priority {FILTER_PRIORITY}: this kernel has no tcx (before 6.6)"
            );
        }
        HookKind::ClsBpf
    }

    pub const fn name(self) -> &'static str {
        match self {
            HookKind::Tcx => "tcx",
            HookKind::ClsBpf => "cls_bpf",
        }
    }

    /// Where the bridge-side program goes: as configured, else on the ports with tcx
    /// and on the bridge with cls_bpf. A cls_bpf filter needs a qdisc, and a pod veth's
    /// qdisc is the CNI plugins': the bandwidth plugin adds an `ingress` qdisc there and
    /// fails the pod's ADD ("file exists") if hgw's clsact came first.
    pub fn placement(self, configured: Option<Attach>) -> Attach {
        match (self, configured) {
            (_, Some(Attach::Bridge)) | (HookKind::ClsBpf, None) => Attach::Bridge,
            (HookKind::Tcx, _) => Attach::Ports,
            (HookKind::ClsBpf, Some(Attach::Ports)) => {
                warn!(
                    "attach = ports without tcx: hgw adds a clsact qdisc to each pod veth, and a CNI plugin that adds its own there (bandwidth) then fails that pod's ADD"
                );
                Attach::Ports
            }
        }
    }
}

/// A program on one interface's ingress.
pub(super) enum HookLink {
    /// A tcx link. Dropped, it is detached unless pinned.
    Tcx { _link: FdLink, pin: Option<PathBuf> },
    /// A cls_bpf filter.
    Filter(FilterLink),
}

/// hgw's cls_bpf filter on one interface. Without pinning, dropped, it is deleted;
/// with pinning (`outlives`), it stays for the next agent.
pub(super) struct FilterLink {
    link: Option<SchedClassifierLink>,
    outlives: bool,
}

impl Drop for FilterLink {
    fn drop(&mut self) {
        if self.outlives
            && let Some(link) = self.link.take()
        {
            // aya's link deletes the filter when dropped; this one is left on purpose.
            // It holds no fd or memory of note (an ifindex, a priority, a handle).
            std::mem::forget(link);
        }
    }
}

impl HookLink {
    /// Takes the program off the interface, pinned or not.
    pub(super) fn detach(self) {
        match self {
            HookLink::Tcx { pin, .. } => {
                if let Some(pin) = &pin {
                    let _ = pins::unpin_link(pin);
                }
            }
            HookLink::Filter(mut filter) => {
                // A device that is gone took its filters with it.
                if let Some(Err(e)) = filter.link.take().map(|link| link.detach()) {
                    debug!("deleting hgw's cls_bpf filter: {e}");
                }
            }
        }
    }
}

impl Datapath {
    /// Attaches `hgw_to_pod` to the uplink's ingress and, with [`Attach::Bridge`],
    /// `hgw_to_peer` to the bridge's, unless already attached to these very devices: a
    /// device deleted and made again under its name (a new ifindex) gets them again.
    pub fn attach_node(
        &mut self,
        (bridge, bridge_ifindex): (&str, u32),
        (uplink, uplink_ifindex): (&str, u32),
    ) -> Result<(), DatapathError> {
        // The old link goes first: it is on another device (gone, or renamed), and
        // under the same name it shares the new link's pin path, so taking it off
        // after the new one is pinned would detach the new one.
        if self.uplink.as_ref().map(|(i, _)| *i) != Some(uplink_ifindex) {
            if let Some((_, old)) = self.uplink.take() {
                old.detach();
            }
            let link = self.attach_hook(PROG_TO_POD, (uplink, uplink_ifindex))?;
            self.uplink = Some((uplink_ifindex, link));
        }
        if self.attach == Attach::Bridge
            && self.bridge.as_ref().map(|(i, _)| *i) != Some(bridge_ifindex)
        {
            if let Some((_, old)) = self.bridge.take() {
                old.detach();
            }
            let link = self.attach_hook(PROG_TO_PEER, (bridge, bridge_ifindex))?;
            self.bridge = Some((bridge_ifindex, link));
        }
        Ok(())
    }

    /// Attaches `hgw_to_peer` to a bridge port's ingress (a pod's host-side veth), so
    /// pod traffic is forwarded before the bridge runs. Idempotent.
    pub fn attach_port(&mut self, name: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.ports.contains_key(&ifindex) {
            return Ok(());
        }
        refuse_foreign_hgw(name, self.pins.as_deref())?;
        let link = self.attach_hook(PROG_TO_PEER, (name, ifindex))?;
        self.ports.insert(ifindex, link);
        Ok(())
    }

    /// Takes the program off a port that left the bridge, or forgets one that is gone.
    /// A clsact qdisc hgw added there is forgotten too: a deleted veth took it along
    /// (pods come and go by the thousand), and one that merely left the bridge keeps
    /// it, empty.
    pub fn detach_port(&mut self, ifindex: u32) {
        if let Some(link) = self.ports.remove(&ifindex) {
            link.detach();
        }
        self.added_qdiscs.remove(&ifindex);
    }

    fn attach_hook(
        &mut self,
        program: &'static str,
        (interface, ifindex): (&str, u32),
    ) -> Result<HookLink, DatapathError> {
        match self.hook {
            HookKind::Tcx => {
                let link = self.attach_tcx(program, interface)?;
                // A filter of an earlier agent that attached with cls_bpf would run
                // after this program, on what it hands on, with its own maps: it goes
                // now that this program is in place.
                remove_filter(interface, program);
                Ok(link)
            }
            HookKind::ClsBpf => {
                let link = self.attach_filter(program, (interface, ifindex))?;
                // An earlier agent's tcx link would run before any filter and take the
                // traffic: it goes now that this filter is in place.
                if let Some(dir) = &self.pins {
                    let pin = pins::link_pin_path(dir, program, interface);
                    if pin.exists() {
                        match pins::unpin_link(&pin) {
                            Ok(()) => info!(
                                "{}: an earlier agent's tcx link detached (this agent attaches with cls_bpf)",
                                pin.display()
                            ),
                            Err(e) => warn!("removing {}: {e}", pin.display()),
                        }
                    }
                }
                Ok(HookLink::Filter(link))
            }
        }
    }

    /// `program` on `interface`'s ingress with tcx. Pinned: a link pinned by an earlier
    /// agent and still on this interface gets this agent's program by a link update,
    /// in place; otherwise a new link is made and pinned.
    fn attach_tcx(
        &mut self,
        program: &'static str,
        interface: &str,
    ) -> Result<HookLink, DatapathError> {
        let pin = self
            .pins
            .as_ref()
            .map(|dir| pins::link_pin_path(dir, program, interface));
        let pin_error = |path: Option<&PathBuf>, reason: String| DatapathError::PinLink {
            program,
            interface: interface.to_owned(),
            path: path.map(|p| p.display().to_string()).unwrap_or_default(),
            reason,
        };
        if let Some(path) = &pin
            && let Some(old) = pins::adoptable(path, interface)
        {
            let link = SchedClassifierLink::try_from(old)
                .map_err(|e| pin_error(Some(path), e.to_string()))?;
            let prog = self.program(program)?;
            let id = prog.attach_to_link(link).map_err(hook_error(
                "replacing in place",
                program,
                interface,
            ))?;
            let link = prog
                .take_link(id)
                .map_err(program_error("taking the link of", program))?;
            let link = FdLink::try_from(link).map_err(|e| pin_error(Some(path), e.to_string()))?;
            info!("{program} on {interface}: replaced in place (pinned link updated)");
            return Ok(HookLink::Tcx {
                _link: link,
                pin: pin.clone(),
            });
        }
        let prog = self.program(program)?;
        // Last on the hook: what was there before hgw has seen every packet, so only
        // programs attached later are ones a redirect would skip (`DEVICE_INGRESS`).
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::last()),
            )
            .map_err(hook_error("attaching", program, interface))?;
        let link = prog
            .take_link(id)
            .map_err(program_error("taking the link of", program))?;
        let link = FdLink::try_from(link).map_err(|e| pin_error(None, e.to_string()))?;
        let link = match &pin {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                FdLink::from(
                    link.pin(path)
                        .map_err(|e| pin_error(Some(path), e.to_string()))?,
                )
            }
            None => link,
        };
        Ok(HookLink::Tcx { _link: link, pin })
    }

    /// `program` on `interface`'s ingress as hgw's cls_bpf filter: an earlier agent's
    /// filter there gets this program in place; otherwise the filter is added, with a
    /// `clsact` qdisc first when the interface has none (noted as hgw's, and marked in
    /// the pin directory for `uninstall`).
    fn attach_filter(
        &mut self,
        program: &'static str,
        (interface, ifindex): (&str, u32),
    ) -> Result<FilterLink, DatapathError> {
        let qdisc_error = |source| DatapathError::Qdisc {
            interface: interface.to_owned(),
            source,
        };
        match tc::qdisc_add_clsact(interface) {
            Ok(()) => {
                info!("{interface}: clsact qdisc added (it had none)");
                self.added_qdiscs.insert(ifindex);
                if let Some(dir) = &self.pins {
                    pins::mark_qdisc(dir, ifindex);
                }
            }
            // There already (a clsact, or an ingress qdisc, which takes ingress filters too).
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(qdisc_error(e)),
        }
        let handle = TcHandle::from(FILTER_HANDLE);
        let prog = self.program(program)?;
        let earlier = SchedClassifierLink::attached(
            interface,
            TcAttachType::Ingress,
            FILTER_PRIORITY,
            handle,
            None,
        )
        .map_err(|e| qdisc_error(TcError::IoError(e)))?;
        // Without NLM_F_CREATE: replaces the filter at (priority, handle) if there is one.
        let id = match prog.attach_to_link(earlier) {
            Ok(id) => {
                info!("{program} on {interface}: replaced in place (cls_bpf filter updated)");
                id
            }
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::ENOENT) =>
            {
                prog.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: FILTER_PRIORITY,
                        handle,
                        ..NlOptions::default()
                    }),
                )
                .map_err(hook_error("attaching", program, interface))?
            }
            Err(e) => return Err(hook_error("replacing in place", program, interface)(e)),
        };
        let link = prog
            .take_link(id)
            .map_err(program_error("taking the link of", program))?;
        Ok(FilterLink {
            link: Some(link),
            outlives: self.pins.is_some(),
        })
    }
}
