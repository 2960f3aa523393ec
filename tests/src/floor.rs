//! The bench's floor programs (hgw-ebpf/src/bin/floor.rs: fixed MACs and a redirect,
//! nothing parsed past the ethertype, and an empty program as the reference), loaded
//! with their globals set. `cargo xtask bench` builds the object, attaches the programs
//! in its `floor` mode, and measures their cost with [`crate::cost`].

use anyhow::Context as _;
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};

pub const PROG_TO_UPLINK: &str = "floor_to_uplink";
pub const PROG_TO_POD: &str = "floor_to_pod";
/// `return TC_ACT_OK`: what running any program costs.
pub const PROG_EMPTY: &str = "floor_empty";
const GLOBAL_TO_UPLINK: &str = "FLOOR_TO_UPLINK";
const GLOBAL_TO_POD: &str = "FLOOR_TO_POD";

/// An ELF object, 8-byte aligned as aya's ELF parser wants it.
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    pub fn read(path: &std::path::Path) -> anyhow::Result<Object> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` owns at least bytes.len() bytes; any byte pattern is a valid
        // u64.
        let dst: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), bytes.len()) };
        dst.copy_from_slice(&bytes);
        Ok(Object {
            words,
            len: bytes.len(),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` owns at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
}

/// A program's global: the ifindex, then destination and source MAC (frame order) as
/// native-endian words, the layout floor.rs reads.
pub fn hop(ifindex: u32, dst: [u8; 6], src: [u8; 6]) -> [u32; 4] {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst);
    macs[6..].copy_from_slice(&src);
    let word = |i: usize| u32::from_ne_bytes([macs[i], macs[i + 1], macs[i + 2], macs[i + 3]]);
    [ifindex, word(0), word(4), word(8)]
}

/// Loads the object with both forwarding programs' globals set; every program is
/// loaded too.
pub fn load(object: &[u8], to_uplink: [u32; 4], to_pod: [u32; 4]) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_TO_UPLINK, &to_uplink, true)
        .override_global(GLOBAL_TO_POD, &to_pod, true)
        .load(object)
        .context("loading the floor object")?;
    for name in [PROG_TO_UPLINK, PROG_TO_POD, PROG_EMPTY] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}
