//! The in-kernel cost of hgw's programs per packet, without a lab: BPF_PROG_TEST_RUN
//! runs a program on one crafted frame `repeat` times in a kernel loop. Compared with an
//! empty SchedClassifier program (`r0 = 0; exit`) run the same way, and with the
//! bench's floor programs (hgw-ebpf/src/bin/floor.rs: fixed MACs and a redirect, nothing
//! parsed past the ethertype), so the table shows what hgw's parsing, checks, route
//! lookup and conntrack lookup add to the least a forwarding program does.
//!
//! The programs measured are the ones the built agent ships: the eBPF ELF object is
//! taken out of `target/release/hgw-agent`, which embeds it.
//!
//! How a run is timed: the wall-clock time of one BPF_PROG_TEST_RUN call with repeat R
//! is the fixed cost (copying the frame in, building the skb, syscall) plus R times the
//! per-run cost (the program and the kernel's loop around it). The per-run cost is
//! (median time at R = 250 - median time at R = 1) / 249, which cancels the fixed cost
//! and has sub-nanosecond resolution (the kernel's own `duration` is whole
//! nanoseconds). R is 250 because the skb is reused between runs: a hit decrements the
//! TTL each time, so a frame starting at TTL 255 stays a hit for 250 runs. Every hit and
//! miss is checked with the programs' own counters (each run must count as a hit, or as
//! the miss reason).
//!
//! The cases without a mode in their name are `all` mode (no conntrack lookup). The
//! `established` cases run the same hit frames with the conntrack lookup, which finds
//! an accepted entry (a UDP flow with a reply seen) that the bench puts into a network
//! namespace of its own; everything is measured from inside that namespace, since the
//! lookup looks in the caller's (BPF_PROG_TEST_RUN's skb is on its loopback).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::programs::SchedClassifier;
use hgw_common::{
    Counter, CtTimeouts, Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS_V4,
    MAP_ROUTES_V4, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig, PROG_TO_PEER, PROG_TO_POD,
    ROUTES_V4_MAX_ENTRIES, counter_index,
};

const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe1, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x0b];
const REPEAT: u32 = 250;
/// A local pod with an endpoint entry (delivered with bpf_redirect_peer).
const ENDPOINT_IP: [u8; 4] = [10, 244, 1, 11];
/// The sender on the bridge side (a local pod) and on the uplink side (a peer's pod).
const POD_IP: [u8; 4] = [10, 244, 1, 11];
const PEER_POD_IP: [u8; 4] = [10, 244, 2, 11];
/// Bridge-side destinations (in the 10.0.0.0/24 route, there with every size) with and
/// without an accepted conntrack entry.
const CT_PEER_IP: [u8; 4] = [10, 0, 0, 11];
const NO_CT_PEER_IP: [u8; 4] = [10, 0, 0, 12];
/// The frames' UDP ports.
const SPORT: u16 = 12345;
const DPORT: u16 = 53;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// Map sizes measured. The issue asks for 100,000, but the routes map holds at most
/// ROUTES_V4_MAX_ENTRIES (16,384), so the largest size is 16,000.
pub const ENTRIES: [u32; 3] = [10, 1_000, 16_000];
const _: () = assert!(ENTRIES[2] <= ROUTES_V4_MAX_ENTRIES);

/// One measured case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgCost {
    pub program: &'static str,
    pub case: String,
    /// Routes in the LPM map (0 for the empty program).
    pub entries: u32,
    pub ns_per_run: f64,
    /// `ns_per_run` / the empty program's.
    pub vs_empty: f64,
}

struct Case {
    program: &'static str,
    case: String,
    entries: u32,
    fd: RawFd,
    frame: Vec<u8>,
    expect_verdict: u32,
    /// (instance index, counter): must grow by exactly the number of runs.
    counter: Option<(usize, Counter)>,
    t1: Vec<u64>,
    tr: Vec<u64>,
}

/// Measures every case, `trials` calls at each repeat count per case, interleaved.
pub fn program_costs(
    agent_bin: &Path,
    floor_object: &Path,
    trials: usize,
) -> anyhow::Result<Vec<ProgCost>> {
    let ns = CtNamespace::new()?;
    hgw_tests::in_netns(&ns.0, || {
        costs_in_namespace(agent_bin, floor_object, trials)
    })?
}

/// A network namespace whose conntrack table holds accepted entries for the
/// established-mode hit frames; deleted on drop.
struct CtNamespace(String);

impl CtNamespace {
    fn new() -> anyhow::Result<CtNamespace> {
        // Named like a lab's namespaces (`hgw<hex>-...`), so that `cargo xtask lab down`
        // finds it should a killed run leave it behind.
        let ns = CtNamespace(format!(
            "hgw{:06x}-bench-ct",
            std::process::id() & 0xff_ffff
        ));
        let status = std::process::Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .context("running ip netns add")?;
        ensure!(status.success(), "ip netns add {} failed", ns.0);
        for (src, dst) in [(POD_IP, CT_PEER_IP), (PEER_POD_IP, ENDPOINT_IP)] {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            // A reply seen: what conntrack accepts of a UDP flow. An hour: no expiry or
            // refresh within the run.
            let args = format!(
                "-I -p udp -s {src} -d {dst} --sport {SPORT} --dport {DPORT} -u SEEN_REPLY -t 3600"
            );
            let args: Vec<&str> = args.split(' ').collect();
            hgw_tests::run_in_ok(&ns.0, "conntrack", &args)?;
        }
        Ok(ns)
    }
}

impl Drop for CtNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn costs_in_namespace(
    agent_bin: &Path,
    floor_object: &Path,
    trials: usize,
) -> anyhow::Result<Vec<ProgCost>> {
    let binary = std::fs::read(agent_bin)
        .with_context(|| format!("reading {} (run `cargo xtask build`)", agent_bin.display()))?;
    let elf = bpf_object(&binary)
        .with_context(|| format!("no eBPF object found inside {}", agent_bin.display()))?;
    // The ELF parser wants the object 8-byte aligned, as include_bytes_aligned! gives it.
    let mut aligned = vec![0u64; elf.len().div_ceil(8)];
    // SAFETY: `aligned` owns at least elf.len() bytes; u64 has no invalid bit patterns
    // and any byte view of it is valid.
    let bytes: &mut [u8] =
        unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast(), elf.len()) };
    bytes.copy_from_slice(elf);

    // Everything runs on one CPU, so per-CPU state and caches stay put.
    crate::bench_traffic::pin_to_cpu(0)?;
    let empty = load_empty_program()?;
    let mut instances = Vec::new();
    let mut cases = vec![Case {
        program: "empty (r0 = 0; exit)",
        case: "-".into(),
        entries: 0,
        fd: empty.as_raw_fd(),
        frame: to_peer_frame(CT_PEER_IP),
        expect_verdict: TC_ACT_OK,
        counter: None,
        t1: Vec::new(),
        tr: Vec::new(),
    }];
    // The floor: its MACs written, then the redirect (in a test run: the verdict only).
    let floor = crate::bench_floor::load(
        crate::bench_floor::Object::read(floor_object)?.bytes(),
        crate::bench_floor::hop(1, BRIDGE_MAC, UPLINK_MAC),
        crate::bench_floor::hop(1, UPLINK_MAC, BRIDGE_MAC),
    )?;
    for (program, case, frame) in [
        (
            crate::bench_floor::PROG_TO_UPLINK,
            "floor: MACs, bpf_redirect",
            to_peer_frame(CT_PEER_IP),
        ),
        (
            crate::bench_floor::PROG_TO_POD,
            "floor: MACs, bpf_redirect_peer",
            to_pod_frame(ENDPOINT_IP),
        ),
    ] {
        let prog: &SchedClassifier = floor
            .program(program)
            .with_context(|| format!("program {program}"))?
            .try_into()?;
        cases.push(Case {
            program,
            case: case.to_owned(),
            entries: 0,
            fd: prog.fd()?.as_fd().as_raw_fd(),
            frame,
            expect_verdict: TC_ACT_REDIRECT,
            counter: None,
            t1: Vec::new(),
            tr: Vec::new(),
        });
    }
    // (A hash table keyed by /24 next to the LPM trie was tried and measured no cheaper
    // below 16,000 routes; see the git history.)
    for entries in ENTRIES {
        instances.push(load_hgw(bytes, entries, false)?);
    }
    // Established mode, after the `all` instances (index ENTRIES.len()).
    instances.push(load_hgw(bytes, ENTRIES[0], true)?);
    for (i, entries) in ENTRIES.into_iter().enumerate() {
        let fd = |name: &str| -> anyhow::Result<RawFd> {
            let prog: &SchedClassifier = instances[i]
                .0
                .program(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            Ok(prog.fd()?.as_fd().as_raw_fd())
        };
        let last = entries - 1;
        let hit = [10, (last >> 8) as u8, (last & 0xff) as u8, 11];
        let mut list = vec![
            (
                PROG_TO_PEER,
                "hit".to_owned(),
                to_peer_frame(hit),
                TC_ACT_REDIRECT,
                Counter::FwdToPeer,
            ),
            (
                PROG_TO_PEER,
                "miss".to_owned(),
                to_peer_frame([10, 250, 0, 11]),
                TC_ACT_OK,
                Counter::PassNoRoute,
            ),
        ];
        // The uplink side does no route lookup: measured once.
        if i == 0 {
            list.extend([
                (
                    PROG_TO_POD,
                    "hit, known pod (redirect_peer)".to_owned(),
                    to_pod_frame(ENDPOINT_IP),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPodDirect,
                ),
                (
                    PROG_TO_POD,
                    "hit, unknown pod (redirect_neigh)".to_owned(),
                    to_pod_frame([10, 244, 1, 99]),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPod,
                ),
                (
                    PROG_TO_POD,
                    "miss (not a local pod)".to_owned(),
                    to_pod_frame([10, 244, 2, 11]),
                    TC_ACT_OK,
                    Counter::PassNotPod,
                ),
            ]);
        }
        for (program, case, frame, verdict, counter) in list {
            cases.push(Case {
                program,
                case,
                entries: if program == PROG_TO_POD { 0 } else { entries },
                fd: fd(program)?,
                frame,
                expect_verdict: verdict,
                counter: Some((i, counter)),
                t1: Vec::new(),
                tr: Vec::new(),
            });
        }
    }
    let established = ENTRIES.len();
    for (program, case, frame, verdict, counter) in [
        (
            PROG_TO_PEER,
            "hit, established (ct lookup hit)",
            to_peer_frame(CT_PEER_IP),
            TC_ACT_REDIRECT,
            Counter::FwdToPeer,
        ),
        (
            PROG_TO_PEER,
            "miss, established (no ct entry)",
            to_peer_frame(NO_CT_PEER_IP),
            TC_ACT_OK,
            Counter::PassCtNew,
        ),
        (
            PROG_TO_POD,
            "hit, redirect_peer, established",
            to_pod_frame(ENDPOINT_IP),
            TC_ACT_REDIRECT,
            Counter::FwdToPodDirect,
        ),
    ] {
        let prog: &SchedClassifier = instances[established]
            .0
            .program(program)
            .with_context(|| format!("program {program}"))?
            .try_into()?;
        cases.push(Case {
            program,
            case: case.to_owned(),
            entries: if program == PROG_TO_POD {
                0
            } else {
                ENTRIES[0]
            },
            fd: prog.fd()?.as_fd().as_raw_fd(),
            frame,
            expect_verdict: verdict,
            counter: Some((established, counter)),
            t1: Vec::new(),
            tr: Vec::new(),
        });
    }

    // A first pass checks verdicts and counters (and warms caches).
    for c in &cases {
        let before = c
            .counter
            .map(|(i, k)| instances[i].counter(k))
            .transpose()?;
        let (verdict, _) = test_run(c.fd, &c.frame, REPEAT)?;
        ensure!(
            verdict == c.expect_verdict,
            "{} {} ({} entries): verdict {verdict}, expected {}",
            c.program,
            c.case,
            c.entries,
            c.expect_verdict
        );
        if let (Some((i, k)), Some(before)) = (c.counter, before) {
            let grown = instances[i].counter(k)? - before;
            ensure!(
                grown == u64::from(REPEAT),
                "{} {} ({} entries): counter {} grew by {grown} in {REPEAT} runs: not every run took the measured branch",
                c.program,
                c.case,
                c.entries,
                k.name()
            );
        }
    }
    for _ in 0..trials {
        for c in &mut cases {
            c.t1.push(test_run(c.fd, &c.frame, 1)?.1);
            c.tr.push(test_run(c.fd, &c.frame, REPEAT)?.1);
        }
    }
    let per_run = |c: &mut Case| {
        let d = median(&mut c.tr) - median(&mut c.t1);
        d / f64::from(REPEAT - 1)
    };
    let base = per_run(&mut cases[0]);
    Ok(cases
        .iter_mut()
        .map(|c| {
            let ns = per_run(c);
            ProgCost {
                program: c.program,
                case: c.case.clone(),
                entries: c.entries,
                ns_per_run: ns,
                vs_empty: ns / base,
            }
        })
        .collect())
}

fn median(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2] as f64
}

struct Hgw(Ebpf, PerCpuArray<MapData, u64>);

impl Hgw {
    fn counter(&self, c: Counter) -> anyhow::Result<u64> {
        Ok(self.1.get(&counter_index(Family::Ipv4, c), 0)?.iter().sum())
    }
}

/// Node n1 (10.244.1.0/24) with `entries` peer routes 10.X.Y.0/24 (X.Y = 0.0, 0.1, ...).
/// Each next hop's MAC is the bridge's own: the frame is reused between runs, and the
/// program only takes frames sent to the bridge, so this keeps a hit a hit. The work
/// done (both MACs written, TTL and checksum updated) is the same as with a real peer.
/// `conntrack`: `established` mode, else `all` (no conntrack lookup).
fn load_hgw(object: &[u8], entries: u32, conntrack: bool) -> anyhow::Result<Hgw> {
    let mut ebpf =
        hgw_common::loader::load(object, conntrack).context("loading the eBPF object")?;
    let mut config: Array<MapData, NodeConfig> = ebpf
        .take_map(MAP_CONFIG)
        .context("config map")?
        .try_into()?;
    config.set(
        0,
        NodeConfig {
            pod_net_v4: [10, 244, 1, 0],
            pod_mask_v4: [255, 255, 255, 0],
            // IPv4 frames only here.
            pod_net_v6: [0; 16],
            pod_mask_v6: [0; 16],
            bridge_ifindex: 1,
            bridge_mtu: 1500,
            bridge_mac: BRIDGE_MAC,
            uplink_mac: UPLINK_MAC,
            gateway_v4: [10, 244, 1, 1],
            gateway_v6: [0; 16],
            cluster_net_v4: [10, 0, 0, 0],
            cluster_mask_v4: [255, 0, 0, 0],
            cluster_net_v6: [0; 16],
            cluster_mask_v6: [0; 16],
            // Never refreshed (nothing is below 0 left), never closing: each run of an
            // established hit is the lookup and the forward, no timeout change.
            ct: CtTimeouts {
                tcp_ms: 3_600_000,
                udp_ms: 3_600_000,
                ..CtTimeouts::default()
            },
        },
        0,
    )?;
    let mut routes: LpmTrie<MapData, [u8; 4], NextHop> = ebpf
        .take_map(MAP_ROUTES_V4)
        .context("routes map")?
        .try_into()?;
    let hop = NextHop {
        ifindex: 1,
        mtu: 1500,
        dst_mac: BRIDGE_MAC,
        src_mac: UPLINK_MAC,
        flags: NEXT_HOP_MAC_KNOWN,
    };
    for k in 0..entries {
        let addr = [10, (k >> 8) as u8, (k & 0xff) as u8, 0];
        routes
            .insert(&Key::new(24, addr), hop, 0)
            .with_context(|| format!("inserting route {k} of {entries}"))?;
    }
    let mut endpoints: HashMap<MapData, [u8; 4], Endpoint> = ebpf
        .take_map(MAP_ENDPOINTS_V4)
        .context("endpoints map")?
        .try_into()?;
    endpoints.insert(
        ENDPOINT_IP,
        // The uplink's MAC as the pod's, for the same reason as the next hops' MACs.
        Endpoint {
            ifindex: 1,
            mac: UPLINK_MAC,
            _pad: [0; 2],
        },
        0,
    )?;
    let counters = ebpf
        .take_map(MAP_COUNTERS)
        .context("counters map")?
        .try_into()?;
    for name in [PROG_TO_PEER, PROG_TO_POD] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    // The maps taken out must outlive the programs' use of them: the kernel holds its
    // own references once the programs are loaded, so dropping these is fine.
    drop((config, routes, endpoints));
    Ok(Hgw(ebpf, counters))
}

fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let payload = [0x42u8; UDP_PAYLOAD_LEN];
    let total = 20 + 8 + payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0]);
    f.extend_from_slice(&[255, 17, 0, 0]); // TTL 255: stays a hit for REPEAT runs
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&SPORT.to_be_bytes());
    f.extend_from_slice(&DPORT.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    let mut sum: u32 = f[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}
const UDP_PAYLOAD_LEN: usize = crate::bench_traffic::UDP_PAYLOAD;

fn to_peer_frame(dst: [u8; 4]) -> Vec<u8> {
    frame(BRIDGE_MAC, POD_IP, dst)
}

fn to_pod_frame(dst: [u8; 4]) -> Vec<u8> {
    frame(UPLINK_MAC, PEER_POD_IP, dst)
}

/// Finds the eBPF ELF object (64-bit little-endian, e_machine EM_BPF) inside `binary`
/// and returns exactly its bytes (up to the end of its last section or section header).
fn bpf_object(binary: &[u8]) -> anyhow::Result<&[u8]> {
    const EM_BPF: u16 = 247;
    const SHT_NOBITS: u32 = 8;
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let mut start = 0;
    while let Some(pos) = binary[start..]
        .windows(4)
        .position(|w| w == b"\x7fELF")
        .map(|p| p + start)
    {
        start = pos + 1;
        let b = &binary[pos..];
        if b.get(4..6) != Some(&[2, 1]) || u16_at(b, 18) != Some(EM_BPF) {
            continue;
        }
        let (Some(shoff), Some(shentsize), Some(shnum)) =
            (u64_at(b, 0x28), u16_at(b, 0x3a), u16_at(b, 0x3c))
        else {
            continue;
        };
        let shoff = usize::try_from(shoff)?;
        let mut end = shoff + usize::from(shentsize) * usize::from(shnum);
        for i in 0..usize::from(shnum) {
            let h = shoff + i * usize::from(shentsize);
            let (Some(kind), Some(off), Some(size)) =
                (u32_at(b, h + 4), u64_at(b, h + 0x18), u64_at(b, h + 0x20))
            else {
                bail!("section header {i} of the eBPF object is cut off");
            };
            if kind != SHT_NOBITS {
                end = end.max(usize::try_from(off + size)?);
            }
        }
        ensure!(end <= b.len(), "the eBPF object runs past the binary's end");
        return Ok(&b[..end]);
    }
    bail!("no ELF object with e_machine EM_BPF")
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `r0 = 0; exit` as a SCHED_CLS program, loaded with the bpf() syscall directly (it
/// cannot come from the agent's object, which holds only hgw's programs).
fn load_empty_program() -> anyhow::Result<OwnedFd> {
    // mov64 r0, 0 (opcode 0xb7); exit (0x95): each instruction is 8 bytes, opcode first.
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"hgw_empty");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_PROG_LOAD) reads `attr` (size passed) and the instruction and
    // license buffers it points at, all alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const attr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_LOAD of the empty program");
    }
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
}

/// One BPF_PROG_TEST_RUN call: the verdict and the call's wall-clock time in ns.
fn test_run(fd: RawFd, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u64)> {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd)?,
        data_size_in: u32::try_from(frame.len())?,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    let t0 = Instant::now();
    // SAFETY: bpf(BPF_PROG_TEST_RUN) reads the frame (length given) and writes only
    // into `attr` (no output buffer is passed).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>(),
        )
    };
    let elapsed = t0.elapsed();
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    Ok((attr.retval, u64::try_from(elapsed.as_nanos())?))
}
