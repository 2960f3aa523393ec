//! What the running kernel offers the fast path, probed once at start, before anything
//! is changed: the agent picks the attach the kernel allows, refuses a mode whose needs
//! are missing (naming the feature and the mode that runs), and `status` and a log line
//! say what it found.

use std::collections::BTreeMap;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};
use hgw_common::status::KernelStatus;
use log::warn;

use super::HookKind;
use crate::config::FastPath;

/// tcx, the link-based tc hooks (Linux 6.6); before it, a clsact qdisc's cls_bpf filter.
const TCX: &str = "tcx";

/// The helpers the programs call, as the verifier knows them, with the first kernel
/// that has each for tc programs.
const HELPERS: &[(&str, BpfHelper, &str)] = &[
    ("bpf_fib_lookup", BpfHelper::BPF_FUNC_fib_lookup, "4.18"),
    (
        "bpf_redirect_neigh",
        BpfHelper::BPF_FUNC_redirect_neigh,
        "5.10",
    ),
    (
        "bpf_redirect_peer",
        BpfHelper::BPF_FUNC_redirect_peer,
        "5.10",
    ),
    ("bpf_jiffies64", BpfHelper::BPF_FUNC_jiffies64, "5.5"),
];

/// The map types the programs use.
const MAPS: &[(&str, MapType, &str)] = &[
    ("lpm_trie", MapType::LpmTrie, "4.11"),
    // The flow caches, mmapable (BPF_F_MMAPABLE, 5.5, as bpf_jiffies64 above).
    ("array", MapType::Array, "3.19"),
    ("percpu_array", MapType::PerCpuArray, "4.6"),
];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this kernel ({release}) lacks {feature} (Linux >= {since}), which fast_path = \"{mode}\" needs; fast_path = \"off\" (kernel routes only) runs here"
    )]
    Missing {
        release: String,
        feature: &'static str,
        since: &'static str,
        mode: &'static str,
    },
}

/// Probes the kernel for what `mode` uses and picks the attach (said in the log); `None`
/// for `off`, which loads no program.
pub fn probe(mode: FastPath) -> Result<Option<(KernelStatus, HookKind)>, ProbeError> {
    if mode == FastPath::Off {
        return Ok(None);
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    let mut features = BTreeMap::new();
    let mut require = |feature: &'static str, since: &'static str, found: bool| {
        features.insert(feature.to_owned(), found);
        if found {
            return Ok(());
        }
        Err(ProbeError::Missing {
            release: release.clone(),
            feature,
            since,
            mode: mode.name(),
        })
    };
    require(
        "btf",
        "5.4 with CONFIG_DEBUG_INFO_BTF",
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    )?;
    for &(name, map, since) in MAPS {
        let found = is_map_supported(map).unwrap_or_else(|e| assume_present(name, &e));
        require(name, since, found)?;
    }
    for &(name, helper, since) in HELPERS {
        let found = is_helper_supported(ProgramType::SchedClassifier, helper)
            .unwrap_or_else(|e| assume_present(name, &e));
        require(name, since, found)?;
    }
    let tcx = crate::tc::tcx_supported();
    features.insert(TCX.to_owned(), tcx);
    let hook = HookKind::choose(tcx);
    let status = KernelStatus {
        release,
        attach: hook.name().to_owned(),
        conntrack_kfuncs: None,
        features,
    };
    Ok(Some((status, hook)))
}

/// A probe that could not tell (not a missing feature: the probe itself failed) does not
/// refuse the mode: the programs' load says precisely what is wrong, if anything.
fn assume_present(feature: &str, error: &dyn std::fmt::Display) -> bool {
    warn!("probing the kernel for {feature}: {error}; assuming it is there");
    true
}
