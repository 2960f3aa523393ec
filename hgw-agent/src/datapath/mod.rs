//! The eBPF fast path: loads hgw's programs (`load`), attaches them (`attach`: tcx,
//! or cls_bpf on kernels without it), and owns the maps (`maps`, `counters`).
//!
//! Without pinning, the tcx links belong to this process: the kernel detaches them when
//! the agent exits, however it exits. With a pin directory (on a bpffs, `pins`), the
//! links and the maps are pinned there and outlive the agent: the programs keep
//! forwarding while no agent runs, and a new agent adopts them, putting its own
//! programs in place with a link update (`bpf_link_update`: never detached, not one
//! packet without a program) and reusing the maps whose layout it shares. cls_bpf
//! filters outlive the agent by themselves; the next one replaces their programs in
//! place. What earlier agents left on hooks this one does not use goes first
//! (`leftovers`).

mod attach;
mod counters;
mod leftovers;
mod load;
mod maps;
pub mod pin_owner;
mod pins;
pub mod probe;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier},
};
use hgw_common::{Endpoint, NextHop, NodeConfig, loader::LoaderError};

use crate::{config::Attach, tc::Scanner};

use attach::HookLink;
pub use attach::{FILTER_PRIORITY, FORCE_CLS_BPF, HookKind};
pub use counters::{CounterReader, Counters};
pub use leftovers::{TakenOff, take_off};

/// The programs, built by build.rs from hgw-ebpf.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hgw"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Load(#[from] LoaderError),
    #[error("pin directory {path}: {operation}: {source}")]
    PinDir {
        path: String,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning the link of {program} on {interface} at {path}: {reason}")]
    PinLink {
        program: &'static str,
        interface: String,
        path: String,
        reason: String,
    },
    #[error("clsact qdisc of {interface}: {source}")]
    Qdisc {
        interface: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error(transparent)]
    PinOwner(#[from] pin_owner::PinOwnerError),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{operation} program {program}: {source}")]
    Program {
        operation: &'static str,
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{operation} program {program} on {interface}'s ingress: {source}")]
    Hook {
        operation: &'static str,
        program: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "interface {interface} already runs hgw program {program} (id {id}): another hgw agent is running in this network namespace (stop it first), or an earlier agent's pins are in another pin_dir (`hgw-agent uninstall --pin-dir OLD` removes them)"
    )]
    AlreadyAttached {
        interface: String,
        program: String,
        id: u32,
    },
    #[error("{operation} map {map}: {source}")]
    Map {
        operation: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
}

pub struct Datapath {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    config: Array<MapData, NodeConfig>,
    routes_v4: LpmTrie<MapData, [u8; 4], NextHop>,
    routes_v6: LpmTrie<MapData, [u8; 16], NextHop>,
    counters: PerCpuArray<MapData, u64>,
    /// A second fd of the counters map, for [`Datapath::counter_reader`] (opening
    /// the map by id would need CAP_SYS_ADMIN).
    counters_fd: Option<std::os::fd::OwnedFd>,
    endpoints_v4: aya::maps::HashMap<MapData, [u8; 4], Endpoint>,
    endpoints_v6: aya::maps::HashMap<MapData, [u8; 16], Endpoint>,
    /// Interfaces whose tc hooks a redirect would skip: ifindex -> `DEVICE_*` bits.
    devices: aya::maps::HashMap<MapData, u32, u32>,
    /// The ids of hgw's own programs (to tell them from others on a tcx hook).
    own: Vec<u32>,
    /// Changed after every write to the maps above: the programs' cached flows found
    /// with the old contents are stale.
    generation: Array<MapData, u32>,
    /// What `generation` holds (only the agent writes it).
    generation_now: u32,
    /// Maps written since `generation` was last changed ([`Datapath::publish_generation`]).
    generation_pending: bool,
    /// Bridge ports `hgw_to_peer` is attached to (Attach::Ports).
    ports: HashMap<u32, HookLink>,
    attach: Attach,
    /// `hgw_to_pod` on the uplink (its ifindex).
    uplink: Option<(u32, HookLink)>,
    /// With Attach::Bridge, `hgw_to_peer` on the bridge (its ifindex).
    bridge: Option<(u32, HookLink)>,
    /// Where links and maps are pinned (`None`: nothing pinned).
    pins: Option<PathBuf>,
    /// tcx or cls_bpf, chosen at start.
    hook: HookKind,
    /// Interfaces whose `clsact` qdisc this agent added (cls_bpf; with pinning they
    /// are marked in the pin directory too, for the next agent and `uninstall`).
    added_qdiscs: BTreeSet<u32>,
}

fn program_error(
    operation: &'static str,
    program: &'static str,
) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        operation,
        program,
        source,
    }
}

fn hook_error(
    operation: &'static str,
    program: &'static str,
    interface: &str,
) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Hook {
        operation,
        program,
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

impl Datapath {
    /// Interface indexes of the ports `hgw_to_peer` is attached to.
    pub fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.keys().copied()
    }

    fn program(&mut self, program: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(program)
            .ok_or(DatapathError::MissingProgram(program))?
            .try_into()
            .map_err(program_error("finding", program))
    }

    /// The ids of hgw's programs.
    pub fn own_programs(&self) -> &[u32] {
        &self.own
    }

    /// Whether links and maps are pinned (they outlive the agent).
    pub fn pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Lets go of the fast path. Unpinned, hgw's tcx links and filters go with the
    /// datapath, then the `clsact` qdiscs this agent added for them where nothing else
    /// is left; pinned, all of it stays for the next agent (`uninstall` removes it).
    pub async fn close(self, scanner: &Scanner) {
        let qdiscs: Vec<u32> = if self.pinned() {
            Vec::new()
        } else {
            self.added_qdiscs.iter().copied().collect()
        };
        drop(self);
        scanner.delete_unused_clsacts(&qdiscs).await;
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// bpf-linker has LLVM expand memcpy in order, which leaves every memset, and any
    /// other memory builtin it does not expand, a call to compiler_builtins' byte-by-byte
    /// loop: a call and a return per zeroed part of a struct, which cost the full path
    /// some 20 ns each before they were taken out.
    #[test]
    fn the_programs_call_no_byte_loop_builtins() {
        let file = object::File::parse(super::PROGRAMS).expect("the embedded object parses");
        let mut calls = Vec::new();
        for section in file.sections() {
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let name = file
                    .symbol_by_index(index)
                    .and_then(|symbol| symbol.name())
                    .expect("a relocation's symbol has a name");
                if ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&name) {
                    calls.push(format!(
                        "{name} at {}+{offset:#x}",
                        section.name().unwrap_or("?")
                    ));
                }
            }
        }
        assert!(
            calls.is_empty(),
            "the programs call memory builtins: {calls:?}"
        );
    }
}
