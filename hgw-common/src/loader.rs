//! Loads hgw's eBPF object, doing the one step aya 0.14 cannot: calls to the kernel's
//! conntrack kfuncs. rustc emits no BTF for extern functions, so aya sees each call as
//! a call to an unknown local function. Before aya parses the object, each call whose
//! relocation names a kfunc is rewritten into a kfunc call (src_reg =
//! BPF_PSEUDO_KFUNC_CALL, imm = the function's id in vmlinux BTF), which aya then leaves
//! alone and the verifier resolves. The offsets the programs read from `struct nf_conn`
//! come from the same BTF, as read-only globals (see hgw_common::GLOBAL_*).

use aya::{Ebpf, EbpfLoader};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

use crate::btf::{BtfError, KernelBtf};
use crate::{GLOBAL_CONNTRACK, GLOBAL_CT_STATUS_OFFSET, GLOBAL_CT_TIMEOUT_OFFSET, KFUNCS};

const BPF_JMP_CALL: u8 = 0x85;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K).
const MOV64_R0_IMM: u8 = 0xb7;
const INSN_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "this kernel has no conntrack kfunc {name} (needs CONFIG_NF_CONNTRACK built in, Linux 6.1 or later): fast_path = \"established\" cannot run here; use fast_path = \"all\" (only on clusters without NAT on pod traffic and without FORWARD policy) or \"off\""
    )]
    KfuncMissing { name: &'static str },
    #[error("reading the eBPF object's ELF: {0}")]
    Elf(#[from] object::Error),
    #[error("the eBPF object's call to {name} at file offset {offset} is not a call instruction")]
    NotACall { name: String, offset: u64 },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("reading the eBPF object's maps: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("pinned map {path}: {reason}")]
    Pin { path: String, reason: String },
}

/// The maps kept across agent restarts when pinned: the programs' state.
pub const PINNED_MAPS: &[&str] = &[
    crate::MAP_CONFIG,
    crate::MAP_ROUTES_V4,
    crate::MAP_ROUTES_V6,
    crate::MAP_ENDPOINTS_V4,
    crate::MAP_ENDPOINTS_V6,
    crate::MAP_COUNTERS,
    // The tc hooks a restart must keep honouring before the new agent's first scan.
    crate::MAP_DEVICES,
    // Shared with the programs a restart replaces, so their cached flows also go stale
    // when the new agent writes the maps above.
    crate::MAP_GENERATION,
];

/// Each pinned map by name, with what happened to it at load.
pub type PinnedMaps = Vec<(&'static str, PinnedMap)>;

/// What happened to each pinned map at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedMap {
    /// None was pinned: made and pinned.
    Created,
    /// The pinned one has the object's layout: the programs use it, state and all.
    Reused,
    /// The pinned one's layout differs (another hgw version): replaced by a new one.
    Rebuilt,
}

/// What loading in `established` mode needs from the running kernel, checked without
/// loading anything: the agent calls it before it changes anything on the node.
pub fn check_kernel() -> Result<(), LoaderError> {
    kernel_facts(&KernelBtf::vmlinux()?, true).map(drop)
}

/// The kfuncs' BTF ids (`None`: missing, allowed without `conntrack`) and the
/// `nf_conn` offsets of `status` and `timeout`.
#[expect(clippy::type_complexity, reason = "a private helper's plain tuple")]
fn kernel_facts(
    btf: &KernelBtf,
    conntrack: bool,
) -> Result<(Vec<(&'static str, Option<u32>)>, u32, u32), LoaderError> {
    let mut kfuncs = Vec::with_capacity(KFUNCS.len());
    for &name in KFUNCS {
        match btf.function(name) {
            Some(id) => kfuncs.push((name, Some(id))),
            None if conntrack => return Err(LoaderError::KfuncMissing { name }),
            None => kfuncs.push((name, None)),
        }
    }
    if !conntrack {
        return Ok((kfuncs, 0, 0));
    }
    Ok((
        kfuncs,
        btf.member_offset("nf_conn", "status")?,
        btf.member_offset("nf_conn", "timeout")?,
    ))
}

/// Loads hgw's eBPF object `elf` (as built from hgw-ebpf); with `conntrack`
/// (`established` mode) its programs look up each packet's conntrack entry, which needs
/// the kernel's conntrack kfuncs.
pub fn load(elf: &[u8], conntrack: bool) -> Result<Ebpf, LoaderError> {
    Ok(load_pinned(elf, conntrack, None)?.0)
}

/// [`load`], with the maps of [`PINNED_MAPS`] pinned in `pin_dir` (a directory on a
/// bpffs): a map already pinned there is reused when its layout (type, key and value
/// size, max entries, flags) is the object's, and replaced otherwise.
pub fn load_pinned(
    elf: &[u8],
    conntrack: bool,
    pin_dir: Option<&std::path::Path>,
) -> Result<(Ebpf, PinnedMaps), LoaderError> {
    let (kfuncs, status, timeout) = kernel_facts(&KernelBtf::vmlinux()?, conntrack)?;
    let object = with_kfunc_calls(elf, &kfuncs)?;
    let conntrack = u32::from(conntrack);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(GLOBAL_CONNTRACK, &conntrack, true)
        .override_global(GLOBAL_CT_STATUS_OFFSET, &status, true)
        .override_global(GLOBAL_CT_TIMEOUT_OFFSET, &timeout, true);
    let mut pinned = Vec::new();
    if let Some(dir) = pin_dir {
        let maps = aya_obj::Object::parse(elf)?.maps;
        for &name in PINNED_MAPS {
            let Some(map) = maps.get(name) else { continue };
            let path = dir.join(name);
            pinned.push((name, check_pinned(&path, map)?));
            loader.map_pin_path(name, path);
        }
    }
    let ebpf = loader.load(&bytemuck::cast_slice(&object)[..elf.len()])?;
    Ok((ebpf, pinned))
}

/// Whether the map pinned at `path` (if any) can serve as `map`; a different one is
/// unpinned, so the loader makes and pins a new one.
fn check_pinned(path: &std::path::Path, map: &aya_obj::Map) -> Result<PinnedMap, LoaderError> {
    if !path.exists() {
        return Ok(PinnedMap::Created);
    }
    let error = |reason: String| LoaderError::Pin {
        path: path.display().to_string(),
        reason,
    };
    let info = aya::maps::MapData::from_pin(path)
        .and_then(|data| data.info())
        .map_err(|e| error(e.to_string()))?;
    let found = (
        info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    );
    let wanted = (
        map.map_type(),
        map.key_size(),
        map.value_size(),
        map.max_entries(),
        map.map_flags(),
    );
    if found == wanted {
        return Ok(PinnedMap::Reused);
    }
    std::fs::remove_file(path).map_err(|e| error(format!("unpinning it: {e}")))?;
    Ok(PinnedMap::Rebuilt)
}

/// A copy of `elf` (in u64 words: the ELF reader wants it aligned) in which every call
/// to a kfunc in `kfuncs` is a kfunc call to its BTF id, or, for a kfunc this kernel
/// lacks, `r0 = 0`: only code the verifier prunes as dead (`all` mode) calls them then.
fn with_kfunc_calls(elf: &[u8], kfuncs: &[(&str, Option<u32>)]) -> Result<Vec<u64>, LoaderError> {
    let mut patches = Vec::new();
    let file = object::File::parse(elf)?;
    for section in file.sections() {
        let Some((section_start, _)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let name = file.symbol_by_index(index)?.name()?;
            if let Some(&(_, id)) = kfuncs.iter().find(|(kfunc, _)| *kfunc == name) {
                patches.push((name.to_owned(), section_start + offset, id));
            }
        }
    }
    let mut words = vec![0u64; elf.len().div_ceil(8)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    bytes[..elf.len()].copy_from_slice(elf);
    for (name, offset, id) in patches {
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        let insn = bytes
            .get_mut(at..at.saturating_add(INSN_LEN))
            .filter(|insn| insn.len() == INSN_LEN && insn[0] == BPF_JMP_CALL)
            .ok_or(LoaderError::NotACall {
                name: name.clone(),
                offset,
            })?;
        // code, dst/src registers, 16-bit offset (0: vmlinux), 32-bit immediate.
        let (code, src_reg, imm) = match id {
            Some(id) => (BPF_JMP_CALL, BPF_PSEUDO_KFUNC_CALL, id),
            None => (MOV64_R0_IMM, 0, 0),
        };
        insn[0] = code;
        insn[1] = src_reg << 4;
        insn[2..4].copy_from_slice(&0u16.to_le_bytes());
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    Ok(words)
}
