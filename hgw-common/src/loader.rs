//! Loads hgw's eBPF object, doing the one step aya 0.14 cannot: calls to the kernel's
//! conntrack kfuncs. rustc emits no BTF for extern functions, so aya sees each call as
//! a call to an unknown local function. Before aya parses the object, each call whose
//! relocation names a kfunc is rewritten into a kfunc call (src_reg =
//! BPF_PSEUDO_KFUNC_CALL, imm = the function's id in the BTF holding it, off = that
//! BTF's index in the load's `fd_array`: 0 for vmlinux, 1 for the `nf_conntrack`
//! module's, which the patched aya passes), which aya then leaves alone and the verifier
//! resolves. The offsets the programs read from `struct nf_conn`
//! come from the same BTF, as read-only globals (see hgw_common::GLOBAL_*).

use aya::{Ebpf, EbpfLoader};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

use crate::btf::{BtfError, KernelBtf};
use crate::{
    CONNTRACK_MODULE, CT_OPTS_SIZE, GLOBAL_CONNTRACK, GLOBAL_CT_STATUS_OFFSET,
    GLOBAL_CT_TIMEOUT_OFFSET, KFUNCS,
};

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
        "this kernel has no conntrack kfunc {name} (in vmlinux or the nf_conntrack module's BTF; needs Linux 6.1 or later with CONFIG_NF_CONNTRACK and CONFIG_DEBUG_INFO_BTF_MODULES): fast_path = \"established\" cannot run here; use fast_path = \"all\" (only on clusters without NAT on pod traffic and without FORWARD policy) or \"off\""
    )]
    KfuncMissing { name: &'static str },
    #[error(
        "this kernel's conntrack kfunc {name} takes {found} parameters, hgw's programs pass {expected}: fast_path = \"established\" cannot run on this kernel; use \"all\" or \"off\""
    )]
    KfuncSignature {
        name: &'static str,
        expected: u16,
        found: u16,
    },
    #[error(
        "this kernel's struct bpf_ct_opts is {found:?} bytes in its BTF; hgw's programs pass the {CT_OPTS_SIZE}-byte layout: fast_path = \"established\" cannot run on this kernel; use \"all\" or \"off\""
    )]
    CtOptsSize { found: Option<u32> },
    #[error(
        "loading kernel module {module} (fast_path = \"established\" needs conntrack): modprobe {module}: {reason}"
    )]
    Modprobe {
        module: &'static str,
        reason: String,
    },
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

/// Where this kernel keeps what `established` mode needs: the conntrack kfuncs and
/// `struct nf_conn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConntrackHome {
    /// Conntrack built in: vmlinux BTF.
    Vmlinux,
    /// Conntrack a module (`nf_conntrack`): the module's BTF, passed to the programs'
    /// load in `fd_array`.
    Module(&'static str),
}

impl std::fmt::Display for ConntrackHome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConntrackHome::Vmlinux => f.write_str("vmlinux"),
            ConntrackHome::Module(name) => write!(f, "module {name}"),
        }
    }
}

/// What loading needs from the running kernel, found and checked without loading
/// anything (the agent calls it before it changes anything on the node), then handed to
/// [`load_pinned`]. With `conntrack` (`established` mode) it loads the conntrack module
/// when conntrack is not built in and the module is not loaded.
pub fn check_kernel(conntrack: bool) -> Result<KernelFacts, LoaderError> {
    kernel_facts(conntrack)
}

/// A kfunc call's target: the function's BTF id and the `fd_array` index of the BTF
/// holding it (0: vmlinux).
#[derive(Debug, Clone, Copy)]
struct KfuncTarget {
    id: u32,
    btf_index: u16,
}

/// What the programs need from this kernel: where the conntrack kfuncs are (in
/// `established` mode), found once by [`check_kernel`].
pub struct KernelFacts {
    /// `None`: no conntrack (`all` mode).
    home: Option<ConntrackHome>,
    /// Each kfunc's target (`None`: missing, allowed without `conntrack`).
    kfuncs: Vec<(&'static str, Option<KfuncTarget>)>,
    /// The module BTF the targets with `btf_index` 1 refer to.
    module_btf: Option<std::os::fd::OwnedFd>,
    status_offset: u32,
    timeout_offset: u32,
}

/// Finds the conntrack kfuncs (vmlinux first, then the conntrack module's BTF, loading
/// the module if needed) and checks their signatures, `struct bpf_ct_opts` and
/// `struct nf_conn` against what the programs assume. Without `conntrack` (`all` mode)
/// nothing is required and nothing is loaded.
fn kernel_facts(conntrack: bool) -> Result<KernelFacts, LoaderError> {
    if !conntrack {
        // Calls the verifier prunes as dead code: patched to `r0 = 0`.
        return Ok(KernelFacts {
            home: None,
            kfuncs: KFUNCS.iter().map(|&(name, _)| (name, None)).collect(),
            module_btf: None,
            status_offset: 0,
            timeout_offset: 0,
        });
    }
    let vmlinux = KernelBtf::vmlinux()?;
    let module = if vmlinux.function(KFUNCS[0].0).is_some() {
        None
    } else {
        load_module(CONNTRACK_MODULE)?;
        let module = KernelBtf::module(CONNTRACK_MODULE, &vmlinux)?
            .ok_or(LoaderError::KfuncMissing { name: KFUNCS[0].0 })?;
        Some(module)
    };
    let (home, btf, btf_index) = match &module {
        None => (ConntrackHome::Vmlinux, &vmlinux, 0),
        Some(module) => (ConntrackHome::Module(CONNTRACK_MODULE), module, 1),
    };
    let mut kfuncs = Vec::with_capacity(KFUNCS.len());
    for &(name, params) in KFUNCS {
        let function = btf
            .function(name)
            .ok_or(LoaderError::KfuncMissing { name })?;
        if function.params != params {
            return Err(LoaderError::KfuncSignature {
                name,
                expected: params,
                found: function.params,
            });
        }
        kfuncs.push((
            name,
            Some(KfuncTarget {
                id: function.id,
                btf_index,
            }),
        ));
    }
    // Conntrack's own structs are the module's when it is one; look there first.
    let lookup = |name: &str| {
        [btf, &vmlinux]
            .into_iter()
            .find_map(|b| b.struct_size(name).map(|size| (b, size)))
    };
    match lookup("bpf_ct_opts") {
        Some((_, size)) if size >= CT_OPTS_SIZE => {}
        found => {
            return Err(LoaderError::CtOptsSize {
                found: found.map(|(_, size)| size),
            });
        }
    }
    let nf_conn = lookup("nf_conn").map_or(&vmlinux, |(b, _)| b);
    let module_btf = match home {
        ConntrackHome::Vmlinux => None,
        ConntrackHome::Module(name) => Some(crate::btf::module_btf_fd(name)?),
    };
    Ok(KernelFacts {
        home: Some(home),
        kfuncs,
        module_btf,
        status_offset: nf_conn.member_offset("nf_conn", "status")?,
        timeout_offset: nf_conn.member_offset("nf_conn", "timeout")?,
    })
}

/// Loads kernel module `name` unless it is loaded (its /sys/module entry exists) or
/// built in, with modprobe, as the kernel itself would on first use.
fn load_module(name: &'static str) -> Result<(), LoaderError> {
    if std::path::Path::new("/sys/module").join(name).exists() {
        return Ok(());
    }
    let status = std::process::Command::new("modprobe")
        .arg(name)
        .status()
        .map_err(|e| LoaderError::Modprobe {
            module: name,
            reason: e.to_string(),
        })?;
    if !status.success() {
        return Err(LoaderError::Modprobe {
            module: name,
            reason: status.to_string(),
        });
    }
    Ok(())
}

impl KernelFacts {
    /// Where the conntrack kfuncs are; `None` without conntrack.
    pub fn home(&self) -> Option<ConntrackHome> {
        self.home
    }
}

/// Loads hgw's eBPF object `elf` (as built from hgw-ebpf); with `conntrack`
/// (`established` mode) its programs look up each packet's conntrack entry, which needs
/// the kernel's conntrack kfuncs.
pub fn load(elf: &[u8], conntrack: bool) -> Result<Ebpf, LoaderError> {
    Ok(load_pinned(elf, check_kernel(conntrack)?, None)?.0)
}

/// [`load`], with the maps of [`PINNED_MAPS`] pinned in `pin_dir` (a directory on a
/// bpffs): a map already pinned there is reused when its layout (type, key and value
/// size, max entries, flags) is the object's, and replaced otherwise.
pub fn load_pinned(
    elf: &[u8],
    facts: KernelFacts,
    pin_dir: Option<&std::path::Path>,
) -> Result<(Ebpf, PinnedMaps), LoaderError> {
    let object = with_kfunc_calls(elf, &facts.kfuncs)?;
    let conntrack = u32::from(facts.home.is_some());
    let mut loader = EbpfLoader::new();
    loader
        .override_global(GLOBAL_CONNTRACK, &conntrack, true)
        .override_global(GLOBAL_CT_STATUS_OFFSET, &facts.status_offset, true)
        .override_global(GLOBAL_CT_TIMEOUT_OFFSET, &facts.timeout_offset, true);
    if let Some(fd) = facts.module_btf {
        loader.kfunc_btf_fds(vec![fd]);
    }
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
fn with_kfunc_calls(
    elf: &[u8],
    kfuncs: &[(&str, Option<KfuncTarget>)],
) -> Result<Vec<u64>, LoaderError> {
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
        // code, dst/src registers, 16-bit offset (the fd_array index of the BTF
        // holding the function, 0: vmlinux), 32-bit immediate (its id there).
        let (code, src_reg, off, imm) = match id {
            Some(target) => (
                BPF_JMP_CALL,
                BPF_PSEUDO_KFUNC_CALL,
                target.btf_index,
                target.id,
            ),
            None => (MOV64_R0_IMM, 0, 0, 0),
        };
        insn[0] = code;
        insn[1] = src_reg << 4;
        insn[2..4].copy_from_slice(&off.to_le_bytes());
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    Ok(words)
}
