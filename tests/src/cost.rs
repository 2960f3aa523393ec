//! The in-kernel cost of hgw's programs per packet, without a lab: BPF_PROG_TEST_RUN
//! runs a program on one crafted frame `repeat` times in a kernel loop. Compared with an
//! empty SchedClassifier program (`return TC_ACT_OK`, the floor object's `floor_empty`)
//! run the same way, and with the
//! bench's floor programs (hgw-ebpf/src/bin/floor.rs: fixed MACs and a redirect, nothing
//! parsed past the ethertype), so the table shows what hgw's parsing, checks, route
//! lookup and conntrack lookup add to the least a forwarding program does.
//!
//! The programs measured are the ones the agent ships (the object it embeds,
//! `hgw_agent::datapath::PROGRAMS`), loaded and run with aya as the program tests do:
//! examples/prog_cost.rs hands them in, and prints the result as JSON for
//! `cargo xtask bench`.
//! With `HGW_COST_OBJECT=PATH` another build of hgw-ebpf is measured instead (its
//! `hgw` binary, as aya-build leaves it): two builds compared in one sitting.
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
//! lookup looks in the caller's (BPF_PROG_TEST_RUN's skb is on its loopback). They run
//! twice: with the flow cache off (every packet looks conntrack up), and with it on, as
//! the agent runs them, where a warm-up run fills the cache and every measured run is a
//! cached hit (`ct_cached`), at each table size.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use hgw_common::{
    Counter, CtTimeouts, Endpoint, Family, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS_V4,
    MAP_ENDPOINTS_V6, MAP_ROUTES_V4, MAP_ROUTES_V6, NEXT_HOP_MAC_KNOWN, NextHop, NodeConfig,
    PROG_TO_PEER, PROG_TO_POD, ROUTES_V4_MAX_ENTRIES, RP_FILTER_OFF, counter_index,
};
use serde::{Deserialize, Serialize};

use crate::floor;
use crate::frames::{
    BRIDGE_MAC, IPPROTO_TCP, IPPROTO_UDP, UPLINK_MAC, ipv4, ipv6, tcp_segment, udp_segment,
};

/// The bench's UDP payload: 64 B datagrams.
pub const UDP_PAYLOAD: usize = 64;
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
/// A destination in a peer's route that the kernel's table blackholes.
const BLACKHOLED_PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
/// IPv6: a local pod (also the endpoint on the uplink side), a peer's pod (the
/// uplink side's sender) and a bridge-side destination, with accepted entries.
const POD_IP6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const PEER_POD_IP6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const PEER_IP6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
/// The frames' UDP ports.
const SPORT: u16 = 12345;
const DPORT: u16 = 53;
const TC_ACT_OK: u32 = 0;
/// hgw's verdict for a packet it does not take: TC_ACT_UNSPEC (TCX_NEXT), as the u32
/// BPF_PROG_TEST_RUN reports.
const HAND_ON: u32 = u32::MAX;
/// The interfaces of the namespace the costs are measured in: the bridge (the FIB
/// lookup's input for pod traffic, and the egress of the local pod CIDR) and the uplink
/// (the egress of every peer route). Both are veths, with their peers up in the same
/// namespace so that they have a carrier.
const BRIDGE_IFINDEX: u32 = 3;
const UPLINK_IFINDEX: u32 = 7;
/// The peers' next hop on the uplink, with the next hops' MAC as a permanent neighbour.
const PEER_NODE_IP: &str = "10.255.0.2";
const PEER_NODE_IP6: &str = "fd00:ff::2";
const TC_ACT_REDIRECT: u32 = 7;

/// `hgw_to_peer`'s hit in `all` mode (a route lookup per packet).
pub const CASE_HIT: &str = "hit";
/// `hgw_to_peer`'s hit in `established` mode with the flow cache (the default).
pub const CASE_CACHED_HIT: &str = "hit, established, flow cached";

/// Map sizes measured. The issue asks for 100,000, but the routes map holds at most
/// ROUTES_V4_MAX_ENTRIES (16,384), so the largest size is 16,000.
pub const ENTRIES: [u32; 3] = [10, 1_000, 16_000];
const _: () = assert!(ENTRIES[2] <= ROUTES_V4_MAX_ENTRIES);

/// One measured case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgCost {
    pub program: String,
    pub case: String,
    /// Routes in the LPM map (0 for the empty program).
    pub entries: u32,
    pub ns_per_run: f64,
    /// `ns_per_run` / the empty program's.
    pub vs_empty: f64,
}

struct Case<'a> {
    program: &'static str,
    case: String,
    entries: u32,
    prog: &'a SchedClassifier,
    frame: Vec<u8>,
    expect_verdict: u32,
    /// (instance index, counter): must grow by exactly the number of runs.
    counter: Option<(usize, Counter)>,
    t1: Vec<u64>,
    tr: Vec<u64>,
}

/// Measures every case, `trials` calls at each repeat count per case, interleaved:
/// hgw's programs from `hgw_object` (the agent's embedded object), the floor's from
/// `floor_object`. Needs root.
pub fn program_costs(
    hgw_object: &[u8],
    floor_object: &[u8],
    trials: usize,
) -> anyhow::Result<Vec<ProgCost>> {
    // Another build of hgw-ebpf instead of the agent's, to compare two builds in one
    // sitting (the bench's own object must match the agent it runs).
    let other = std::env::var_os("HGW_COST_OBJECT")
        .map(|path| floor::Object::read(path.as_ref()))
        .transpose()?;
    let hgw_object = other.as_ref().map_or(hgw_object, floor::Object::bytes);
    let ns = CtNamespace::new()?;
    crate::in_netns(&ns.0, || {
        costs_in_namespace(hgw_object, floor_object, trials)
    })?
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; CPU_SET ignores a cpu beyond its size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!(
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A network namespace whose conntrack table holds accepted entries for the
/// established-mode hit frames, and whose routing agrees with hgw's maps (the programs
/// ask the kernel's FIB on every full decision): the peer routes of the largest table
/// via one next hop on the uplink, the pod CIDRs on the bridge; deleted on drop.
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
        let v4 = [(POD_IP, CT_PEER_IP), (PEER_POD_IP, ENDPOINT_IP)]
            .map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
        let v6 = [(POD_IP6, PEER_IP6), (PEER_POD_IP6, POD_IP6)]
            .map(|(s, d)| (IpAddr::from(s), IpAddr::from(d)));
        for (src, dst) in v4.into_iter().chain(v6) {
            // A reply seen: what conntrack accepts of a UDP flow. An hour: no expiry or
            // refresh within the run.
            let args = format!(
                "-I -p udp -s {src} -d {dst} --sport {SPORT} --dport {DPORT} -u SEEN_REPLY -t 3600"
            );
            let args: Vec<&str> = args.split(' ').collect();
            crate::run_in_ok(&ns.0, "conntrack", &args)?;
        }
        // An assured TCP connection, for the cost of a FIN the fast path carries.
        let args = format!(
            "-I -p tcp -s {} -d {} --sport {SPORT} --dport {DPORT} --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600",
            IpAddr::from(POD_IP),
            IpAddr::from(CT_PEER_IP)
        );
        let args: Vec<&str> = args.split(' ').collect();
        crate::run_in_ok(&ns.0, "conntrack", &args)?;
        ns.route_like_the_maps()?;
        Ok(ns)
    }
}

impl CtNamespace {
    /// What the kernel holds on a node whose maps are `load_hgw`'s: forwarding on, the
    /// bridge owning the pod CIDRs, every peer route of the largest table (the FIB's
    /// cost then is that of a node with 16,000 peers) via the uplink, whose next hop's
    /// neighbour entry has the maps' MAC.
    fn route_like_the_maps(&self) -> anyhow::Result<()> {
        let mac = BRIDGE_MAC.map(|b| format!("{b:02x}")).join(":");
        let mut batch = format!(
            "link add name hgwbr index {BRIDGE_IFINDEX} type veth peer name hgwbr-p\n\
             link add name hgwup index {UPLINK_IFINDEX} type veth peer name hgwup-p\n\
             link set hgwbr up\nlink set hgwbr-p up\nlink set hgwup up\nlink set hgwup-p up\n\
             address add 10.244.1.1/24 dev hgwbr\n\
             address add fd00:244:1::1/64 dev hgwbr nodad\n\
             address add 10.255.0.1/24 dev hgwup\n\
             address add fd00:ff::1/64 dev hgwup nodad\n\
             neighbour add {PEER_NODE_IP} lladdr {mac} dev hgwup nud permanent\n\
             neighbour add {PEER_NODE_IP6} lladdr {mac} dev hgwup nud permanent\n\
             route add fd00:244:3::/64 via {PEER_NODE_IP6} dev hgwup\n\
             route add blackhole {BLACKHOLED_PEER_IP}/32\n"
        );
        let largest = ENTRIES[ENTRIES.len() - 1];
        for k in 0..largest {
            batch += &format!(
                "route add 10.{}.{}.0/24 via {PEER_NODE_IP} dev hgwup\n",
                k >> 8,
                k & 0xff
            );
        }
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            crate::run_in_ok(&self.0, "sysctl", &["-qw", sysctl])?;
        }
        let mut child = std::process::Command::new("ip")
            .args(["-n", &self.0, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running ip -batch")?;
        std::io::Write::write_all(
            &mut child.stdin.take().context("ip -batch's stdin")?,
            batch.as_bytes(),
        )?;
        ensure!(
            child.wait()?.success(),
            "ip -batch in {} failed (see above)",
            self.0
        );
        Ok(())
    }
}

impl Drop for CtNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a SchedClassifier> {
    Ok(ebpf
        .program(name)
        .with_context(|| format!("program {name}"))?
        .try_into()?)
}

fn costs_in_namespace(
    hgw_object: &[u8],
    floor_object: &[u8],
    trials: usize,
) -> anyhow::Result<Vec<ProgCost>> {
    // Everything runs on one CPU, so per-CPU state and caches stay put.
    pin_to_cpu(0)?;
    // The floor: its MACs written, then the redirect (in a test run: the verdict only).
    let floor = floor::load(
        floor_object,
        floor::hop(1, BRIDGE_MAC, UPLINK_MAC),
        floor::hop(1, UPLINK_MAC, BRIDGE_MAC),
    )?;
    // (A hash table keyed by /24 next to the LPM trie was tried and measured no cheaper
    // below 16,000 routes; see the git history.)
    let mut instances = Vec::new();
    for entries in ENTRIES {
        instances.push(load_hgw(hgw_object, entries, Mode::All)?);
    }
    // Established mode, after the `all` instances (index ENTRIES.len()): looking
    // conntrack up for every packet, then with the flow cache, at every size.
    instances.push(load_hgw(hgw_object, ENTRIES[0], Mode::EveryPacket)?);
    for entries in ENTRIES {
        instances.push(load_hgw(hgw_object, entries, Mode::Cached)?);
    }
    // `all` mode as the agent runs it: route verdicts cached per flow too.
    let all_cached = instances.len();
    instances.push(load_hgw(hgw_object, ENTRIES[0], Mode::AllCached)?);

    let case = |program, case: &str, entries, prog, frame, expect_verdict, counter| Case {
        program,
        case: case.to_owned(),
        entries,
        prog,
        frame,
        expect_verdict,
        counter,
        t1: Vec::new(),
        tr: Vec::new(),
    };
    let mut cases = vec![case(
        "empty (r0 = 0; exit)",
        "-",
        0,
        classifier(&floor, floor::PROG_EMPTY)?,
        to_peer_frame(CT_PEER_IP),
        TC_ACT_OK,
        None,
    )];
    for (program, name, frame) in [
        (
            floor::PROG_TO_UPLINK,
            "floor: MACs, bpf_redirect",
            to_peer_frame(CT_PEER_IP),
        ),
        (
            floor::PROG_TO_POD,
            "floor: MACs, bpf_redirect_peer",
            to_pod_frame(ENDPOINT_IP),
        ),
    ] {
        let prog = classifier(&floor, program)?;
        cases.push(case(program, name, 0, prog, frame, TC_ACT_REDIRECT, None));
    }
    for (i, entries) in ENTRIES.into_iter().enumerate() {
        let last = entries - 1;
        let hit = [10, (last >> 8) as u8, (last & 0xff) as u8, 11];
        let mut list = vec![
            (
                PROG_TO_PEER,
                CASE_HIT,
                to_peer_frame(hit),
                TC_ACT_REDIRECT,
                Counter::FwdToPeer,
            ),
            (
                PROG_TO_PEER,
                "miss",
                to_peer_frame([10, 250, 0, 11]),
                HAND_ON,
                Counter::PassNoRoute,
            ),
        ];
        // Every step of the full path, the FIB lookup last: its cost is this row's
        // over the hit's, less the redirect.
        if i == 0 {
            list.push((
                PROG_TO_PEER,
                "miss, the kernel's route a blackhole (pass_route)",
                to_peer_frame(BLACKHOLED_PEER_IP.octets()),
                HAND_ON,
                Counter::PassRoute,
            ));
        }
        // The uplink side does no route lookup: measured once.
        if i == 0 {
            list.extend([
                (
                    PROG_TO_POD,
                    "hit, known pod (redirect_peer)",
                    to_pod_frame(ENDPOINT_IP),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPodDirect,
                ),
                (
                    PROG_TO_POD,
                    "hit, unknown pod (redirect_neigh)",
                    to_pod_frame([10, 244, 1, 99]),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPod,
                ),
                (
                    PROG_TO_POD,
                    "miss (not a local pod)",
                    to_pod_frame([10, 244, 2, 11]),
                    HAND_ON,
                    Counter::PassNotPod,
                ),
                (
                    PROG_TO_PEER,
                    "IPv6 hit",
                    to_peer_frame6(),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPeer,
                ),
                (
                    PROG_TO_POD,
                    "IPv6 hit, known pod (redirect_peer)",
                    to_pod_frame6(),
                    TC_ACT_REDIRECT,
                    Counter::FwdToPodDirect,
                ),
            ]);
        }
        for (program, name, frame, verdict, counter) in list {
            let entries = if program == PROG_TO_POD { 0 } else { entries };
            let prog = classifier(&instances[i].0, program)?;
            cases.push(case(
                program,
                name,
                entries,
                prog,
                frame,
                verdict,
                Some((i, counter)),
            ));
        }
    }
    let established = ENTRIES.len();
    for (program, name, frame, verdict, counter) in [
        (
            PROG_TO_PEER,
            "hit, established, every packet looks up (ct lookup hit)",
            to_peer_frame(CT_PEER_IP),
            TC_ACT_REDIRECT,
            Counter::FwdToPeer,
        ),
        (
            PROG_TO_PEER,
            "miss, established (no ct entry)",
            to_peer_frame(NO_CT_PEER_IP),
            HAND_ON,
            Counter::PassCtNew,
        ),
        // A connection's own packets, which never use the flow cache.
        (
            PROG_TO_PEER,
            "TCP SYN, established (looked up for a reopen)",
            tcp_frame(NO_CT_PEER_IP, TCP_SYN),
            HAND_ON,
            Counter::PassTcpSyn,
        ),
        (
            PROG_TO_PEER,
            "TCP SYN-ACK, established (never looked up)",
            tcp_frame(NO_CT_PEER_IP, TCP_SYN | TCP_ACK),
            HAND_ON,
            Counter::PassTcpSyn,
        ),
        (
            PROG_TO_PEER,
            "TCP FIN, established (looked up, timeout shortened)",
            tcp_frame(CT_PEER_IP, TCP_FIN | TCP_ACK),
            TC_ACT_REDIRECT,
            Counter::CtClose,
        ),
        (
            PROG_TO_POD,
            "hit, redirect_peer, established, every packet looks up",
            to_pod_frame(ENDPOINT_IP),
            TC_ACT_REDIRECT,
            Counter::FwdToPodDirect,
        ),
    ] {
        let entries = if program == PROG_TO_POD {
            0
        } else {
            ENTRIES[0]
        };
        let prog = classifier(&instances[established].0, program)?;
        cases.push(case(
            program,
            name,
            entries,
            prog,
            frame,
            verdict,
            Some((established, counter)),
        ));
    }

    // The default: the flow cache, which the first run of each frame fills.
    for (i, entries) in ENTRIES.into_iter().enumerate() {
        let instance = established + 1 + i;
        let mut list = vec![(
            PROG_TO_PEER,
            CASE_CACHED_HIT,
            to_peer_frame(CT_PEER_IP),
            entries,
        )];
        if i == 0 {
            list.extend([
                (
                    PROG_TO_POD,
                    "hit, redirect_peer, established, flow cached",
                    to_pod_frame(ENDPOINT_IP),
                    0,
                ),
                (
                    PROG_TO_PEER,
                    "IPv6 hit, established, flow cached",
                    to_peer_frame6(),
                    entries,
                ),
                (
                    PROG_TO_POD,
                    "IPv6 hit, redirect_peer, established, flow cached",
                    to_pod_frame6(),
                    0,
                ),
            ]);
        }
        for (program, name, frame, entries) in list {
            let prog = classifier(&instances[instance].0, program)?;
            cases.push(case(
                program,
                name,
                entries,
                prog,
                frame,
                TC_ACT_REDIRECT,
                Some((instance, Counter::CtCached)),
            ));
        }
    }

    // A connection's own packets in the default mode: the full path, and the flow
    // cache asked whether it has the flow to forget.
    let cached = established + 1;
    for (name, frame, verdict, counter) in [
        (
            "TCP SYN, established, flow cache on",
            tcp_frame(NO_CT_PEER_IP, TCP_SYN),
            HAND_ON,
            Counter::PassTcpSyn,
        ),
        (
            "TCP FIN, established, flow cache on",
            tcp_frame(CT_PEER_IP, TCP_FIN | TCP_ACK),
            TC_ACT_REDIRECT,
            Counter::CtClose,
        ),
    ] {
        cases.push(case(
            PROG_TO_PEER,
            name,
            ENTRIES[0],
            classifier(&instances[cached].0, PROG_TO_PEER)?,
            frame,
            verdict,
            Some((cached, counter)),
        ));
    }

    // A Service address (before the kernel's DNAT) from a pod, in the default mode:
    // outside the cluster CIDR, so no route and no flow-cache lookup.
    cases.push(case(
        PROG_TO_PEER,
        "miss, established, a Service address (no route)",
        ENTRIES[0],
        classifier(&instances[cached].0, PROG_TO_PEER)?,
        to_peer_frame([172, 16, 0, 10]),
        HAND_ON,
        Some((cached, Counter::PassNoRoute)),
    ));
    cases.push(case(
        PROG_TO_PEER,
        "hit, all, flow cached",
        ENTRIES[0],
        classifier(&instances[all_cached].0, PROG_TO_PEER)?,
        to_peer_frame(CT_PEER_IP),
        TC_ACT_REDIRECT,
        Some((all_cached, Counter::CtCached)),
    ));

    // A first pass checks verdicts and counters (and warms caches, the flow cache
    // with a run of its own).
    for c in &cases {
        test_run(c.prog, &c.frame, 1)?;
        let before = c
            .counter
            .map(|(i, k)| instances[i].counter(k))
            .transpose()?;
        let (verdict, _) = test_run(c.prog, &c.frame, REPEAT)?;
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
            c.t1.push(test_run(c.prog, &c.frame, 1)?.1);
            c.tr.push(test_run(c.prog, &c.frame, REPEAT)?.1);
        }
    }
    let per_run = |c: &mut Case<'_>| {
        let d = median(&mut c.tr) - median(&mut c.t1);
        d / f64::from(REPEAT - 1)
    };
    let base = per_run(&mut cases[0]);
    Ok(cases
        .iter_mut()
        .map(|c| {
            let ns = per_run(c);
            ProgCost {
                program: c.program.to_owned(),
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

/// One BPF_PROG_TEST_RUN call: the verdict and the call's wall-clock time in ns.
fn test_run(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u64)> {
    let t0 = Instant::now();
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    let elapsed = t0.elapsed();
    Ok((result.return_value, u64::try_from(elapsed.as_nanos())?))
}

struct Hgw(Ebpf, PerCpuArray<MapData, u64>);

/// How an instance runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No conntrack lookup.
    All,
    /// `established`, without the flow cache: a conntrack lookup per packet.
    EveryPacket,
    /// `established` with the flow cache (the default).
    Cached,
    /// No conntrack lookup, with the flow cache (`all` mode as the agent runs it): the
    /// kernel's route is asked once per flow and recheck time.
    AllCached,
}

impl Hgw {
    /// `c` of both families (each case sends one family).
    fn counter(&self, c: Counter) -> anyhow::Result<u64> {
        let mut sum = 0;
        for family in Family::ALL {
            sum += self
                .1
                .get(&counter_index(*family, c), 0)?
                .iter()
                .sum::<u64>();
        }
        Ok(sum)
    }
}

/// Node n1 (10.244.1.0/24) with `entries` peer routes 10.X.Y.0/24 (X.Y = 0.0, 0.1, ...),
/// and dual stack: its IPv6 pod CIDR fd00:244:1::/64 and one IPv6 peer route.
/// Each next hop's MAC is the bridge's own: the frame is reused between runs, and the
/// program only takes frames sent to the bridge, so this keeps a hit a hit. The work
/// done (both MACs written, TTL and checksum updated) is the same as with a real peer.
fn load_hgw(object: &[u8], entries: u32, mode: Mode) -> anyhow::Result<Hgw> {
    let mut ebpf =
        hgw_common::loader::load(object, matches!(mode, Mode::EveryPacket | Mode::Cached))
            .context("loading the eBPF object")?;
    let mut config: Array<MapData, NodeConfig> = ebpf
        .take_map(MAP_CONFIG)
        .context("config map")?
        .try_into()?;
    config.set(
        0,
        NodeConfig {
            pod_net_v4: [10, 244, 1, 0],
            pod_mask_v4: [255, 255, 255, 0],
            pod_net_v6: net6(2, 0),
            pod_mask_v6: mask6(64),
            bridge_ifindex: BRIDGE_IFINDEX,
            bridge_mtu: 1500,
            bridge_mac: BRIDGE_MAC,
            uplink_mac: UPLINK_MAC,
            gateway_v4: [10, 244, 1, 1],
            gateway_v6: net6(2, 1),
            cluster_net_v4: [10, 0, 0, 0],
            cluster_mask_v4: [255, 0, 0, 0],
            cluster_net_v6: net6(0, 0),
            cluster_mask_v6: mask6(16),
            // Never refreshed (nothing is below 0 left), never closing: each run of an
            // established hit is the lookup and the forward, no timeout change.
            ct: CtTimeouts {
                tcp_ms: 3_600_000,
                udp_ms: 3_600_000,
                // A carried FIN sets this: kept long, so every run finds the entry.
                fin_ms: 3_600_000,
                // Cached: trusted for the whole run (jiffies).
                recheck: if matches!(mode, Mode::Cached | Mode::AllCached) {
                    1_000_000
                } else {
                    0
                },
                ..CtTimeouts::default()
            },
            rp_filter_uplink: RP_FILTER_OFF,
            rp_filter_bridge: RP_FILTER_OFF,
            update_priority: 1,
            _pad: 0,
        },
        0,
    )?;
    let mut routes: LpmTrie<MapData, [u8; 4], NextHop> = ebpf
        .take_map(MAP_ROUTES_V4)
        .context("routes map")?
        .try_into()?;
    let hop = NextHop {
        ifindex: UPLINK_IFINDEX,
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
    // One IPv6 peer: measured at one table size.
    let mut routes6: LpmTrie<MapData, [u8; 16], NextHop> = ebpf
        .take_map(MAP_ROUTES_V6)
        .context("IPv6 routes map")?
        .try_into()?;
    routes6.insert(&Key::new(64, net6(4, 0)), hop, 0)?;
    let mut endpoints6: HashMap<MapData, [u8; 16], Endpoint> = ebpf
        .take_map(MAP_ENDPOINTS_V6)
        .context("IPv6 endpoints map")?
        .try_into()?;
    endpoints6.insert(
        POD_IP6,
        Endpoint {
            ifindex: 1,
            mac: UPLINK_MAC,
            _pad: [0; 2],
        },
        0,
    )?;
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
    drop((config, routes, endpoints, routes6, endpoints6));
    Ok(Hgw(ebpf, counters))
}

/// A 64 B UDP datagram (TTL 255: it stays a hit for REPEAT runs) from a local pod.
fn to_peer_frame(dst: [u8; 4]) -> Vec<u8> {
    frame(BRIDGE_MAC, POD_IP, dst)
}

/// The same from a peer's pod, as the uplink receives it.
fn to_pod_frame(dst: [u8; 4]) -> Vec<u8> {
    frame(UPLINK_MAC, PEER_POD_IP, dst)
}

/// fd00:244:`node`::`host`: this node's pods are node 2 (POD_IP6's /64).
fn net6(node: u8, host: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfd, 0]);
    if node != 0 {
        a[2..6].copy_from_slice(&[2, 0x44, 0, node - 1]);
    }
    a[15] = host;
    a
}

fn mask6(bits: usize) -> [u8; 16] {
    std::array::from_fn(|i| (0xff00u16 >> bits.saturating_sub(i * 8).min(8)) as u8)
}

fn to_peer_frame6() -> Vec<u8> {
    let udp = udp_segment(SPORT, DPORT, &[0x42; UDP_PAYLOAD]);
    ipv6(BRIDGE_MAC, POD_IP6, PEER_IP6, 255, IPPROTO_UDP, &udp)
}

fn to_pod_frame6() -> Vec<u8> {
    let udp = udp_segment(SPORT, DPORT, &[0x42; UDP_PAYLOAD]);
    ipv6(UPLINK_MAC, PEER_POD_IP6, POD_IP6, 255, IPPROTO_UDP, &udp)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP segment with `flags` and no payload from a local pod (TTL 255).
fn tcp_frame(dst: [u8; 4], flags: u8) -> Vec<u8> {
    let tcp = tcp_segment(SPORT, DPORT, flags, 20, &[]);
    ipv4(BRIDGE_MAC, POD_IP, dst, 255, IPPROTO_TCP, &tcp)
}

fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let udp = udp_segment(SPORT, DPORT, &[0x42; UDP_PAYLOAD]);
    ipv4(dst_mac, src, dst, 255, IPPROTO_UDP, &udp)
}
