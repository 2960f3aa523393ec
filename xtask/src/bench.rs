//! `cargo xtask bench`: pod-to-pod traffic across two lab nodes in several modes, side
//! by side, and the in-kernel cost of the programs.
//!
//! The labs are wired as seed 000 was: two nodes whose uplinks are the two ends of one
//! veth pair ([`Lab::up_pair`]), no switch. Modes: `kernel` (agents with
//! --no-fast-path: flannel's host-gw, kernel routes only), `hgw` (agents with the fast
//! path in its default `established` mode: flows conntrack accepted), `hgw-all`
//! (`--fast-path all`: no conntrack lookup), `hgw-bridge` (the bridge-side program on
//! cni0), `floor` (kernel routes, plus the cheapest TC programs that can forward on
//! this wiring: the practical limit of any program here, see bench_floor.rs), `direct`
//! (two namespaces joined by one veth pair: a reference, fewer wires than any routed
//! path). One lab exists per routed mode at once, plus the direct pair, so the modes
//! can be interleaved without restarting agents: every round runs each test in each
//! mode, the modes in a rotated order, and ratios are taken within a round. A mode
//! whose path check fails is not reported.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::ValueEnum as _;
use hgw_tests::cost::ProgCost;
use hgw_tests::floor::Object;
use hgw_tests::{Lab, Pod, counter_sum, tcx_programs};

use crate::bench_floor::Floor;
use crate::bench_model::{Kind, METRICS, Machine, Mode, Refusal, Sample, TrafficFamily};
use crate::bench_report::{Report, write_report};
use crate::bench_traffic::{
    Ends, Window, other_cpu, tcp_crr, tcp_rr, tcp_streams, udp_flood, udp_flows,
};
use crate::util::{Interrupt, Interrupted};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const WARMUP: Duration = Duration::from_millis(300);

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds; every round runs each test in each mode.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds measured per test and mode (after a 0.3 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// CI variant: 1 round, 1 s per test, fewer program-cost trials.
    #[arg(long)]
    smoke: bool,
    /// Run only these tests.
    #[arg(long, value_delimiter = ',')]
    tests: Vec<Test>,
    /// An extra hgw mode, NAME=AGENT ARGS (e.g. `hgw-bridge=--attach bridge`): its own
    /// lab with agents started with those arguments. `NAME=@PATH ARGS` runs the agent
    /// binary at PATH instead of the built one (another build of hgw, compared in the
    /// same run). Repeatable.
    #[arg(long = "variant", value_name = "NAME=ARGS")]
    variants: Vec<String>,
    /// Two more modes whose nodes carry kube-proxy's iptables rules (no Services), as a
    /// Kubernetes node does: `kernel-kp` (kernel routes) and `hgw-kp` (the default
    /// mode). There conntrack tracks every forwarded packet in both, as it does on a
    /// node, where the bench's `kernel` mode tracks nothing.
    #[arg(long)]
    kube_proxy: bool,
    /// Instead of the traffic tests: the agent applying 1,000 and 5,000 static peers,
    /// against `ip -batch` installing the same routes; one peer change; peak RSS.
    #[arg(long)]
    control_plane: bool,
    /// Where the results go (relative to the workspace root).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// All traffic over IPv6 (the labs are dual stack) instead of IPv4.
    #[arg(long)]
    ipv6: bool,
    /// Records a system-wide profile of each measurement (`perf record -a -g`, needs
    /// perf) into DIR/ROUND-TEST-MODE.data, to see where a mode's time goes.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Also records the BPF programs' time per UDP packet sent and per TCP connection
    /// in the modes with programs (the kernel's run-time statistics of the labs' tcx
    /// programs, on for the run and off again when it ends). Every program run then
    /// pays for two clock reads: hgw and floor modes measure a little slower against
    /// kernel and direct.
    #[arg(long)]
    prog_stats: bool,
}

/// Names `--variant` may not take.
const BUILT_IN: &[&str] = &[
    "kernel",
    "hgw",
    "hgw-all",
    "hgw-bridge",
    "kernel-kp",
    "hgw-kp",
    "floor",
    "direct",
];

/// The modes for `variants` (`NAME=AGENT ARGS`): kernel, hgw, hgw-all, hgw-bridge,
/// with `kube_proxy` kernel-kp and hgw-kp, the variants, floor, direct.
pub fn modes(variants: &[String], kube_proxy: bool) -> anyhow::Result<Vec<Mode>> {
    let mode = |name: &str, kind, agent_args: &[&str]| {
        Mode::new(
            name,
            kind,
            agent_args.iter().map(|&a| a.to_owned()).collect(),
        )
    };
    let mut modes = vec![
        mode("kernel", Kind::Kernel, &["--no-fast-path"]),
        // The default: only flows conntrack accepted.
        mode("hgw", Kind::Hgw, &["--attach", "ports"]),
        // Every flow, no conntrack lookup: what the lookup costs.
        mode(
            "hgw-all",
            Kind::Hgw,
            &["--fast-path", "all", "--attach", "ports"],
        ),
        // The agent's other attachment: the bridge-side program on cni0.
        mode("hgw-bridge", Kind::Hgw, &["--attach", "bridge"]),
    ];
    if kube_proxy {
        for (name, kind, args) in [
            ("kernel-kp", Kind::Kernel, &["--no-fast-path"][..]),
            ("hgw-kp", Kind::Hgw, &["--attach", "ports"][..]),
        ] {
            let mut m = mode(name, kind, args);
            m.kube_proxy = true;
            modes.push(m);
        }
    }
    for v in variants {
        let (name, args) = v
            .split_once('=')
            .with_context(|| format!("--variant {v:?}: expected NAME=AGENT ARGS"))?;
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !BUILT_IN.contains(&name)
                && !modes.iter().any(|m| m.name == name),
            "--variant {v:?}: the name must be new and made of letters, digits, - and _"
        );
        let mut args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        let bin = match args.first().and_then(|a| a.strip_prefix('@')) {
            Some(path) => {
                let bin = PathBuf::from(path);
                anyhow::ensure!(
                    bin.is_file(),
                    "--variant {v:?}: no agent binary at {}",
                    bin.display()
                );
                args.remove(0);
                Some(bin)
            }
            None => None,
        };
        let mut mode = Mode::new(name, Kind::Hgw, args);
        mode.agent_bin = bin;
        modes.push(mode);
    }
    modes.push(mode("floor", Kind::Floor, &["--no-fast-path"]));
    modes.push(mode("direct", Kind::Direct, &[]));
    Ok(modes)
}

/// The traffic tests, in the order a round runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Test {
    /// UDP 64 B packet rate, one flow.
    #[value(name = "udp64")]
    Udp,
    /// UDP 64 B packet rate, 1,000 flows.
    #[value(name = "udp64-flows")]
    UdpFlows,
    /// TCP request/response latency, client and server on one CPU.
    #[value(name = "rr-same-cpu")]
    RrSame,
    /// TCP request/response latency, client and server on different CPUs.
    #[value(name = "rr-diff-cpu")]
    RrDiff,
    /// TCP connections per second (connect, request/response, close).
    #[value(name = "crr")]
    Crr,
    /// TCP throughput, one stream.
    #[value(name = "tcp-1")]
    Tcp1,
    /// TCP throughput, four streams.
    #[value(name = "tcp-4")]
    Tcp4,
}

/// Concurrent flows of the udp64-flows test.
pub const FLOWS: usize = 1000;

impl Test {
    /// The name `--tests` takes.
    fn name(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }
}

/// One lab per routed mode (same index as the modes), the floor programs attached to
/// the floor mode's lab, and the direct pair (inside the first lab, so it is deleted
/// with it).
struct Setup {
    /// Before the labs: detached first.
    _floor: Option<Floor>,
    labs: Vec<Lab>,
    direct: (Pod, Pod),
    ipv6: bool,
    /// Holds the programs' run-time statistics on (`--prog-stats`).
    prog_stats: Option<std::os::fd::OwnedFd>,
}

impl Setup {
    /// The family the traffic uses, as the agents' counters name it.
    fn family(&self) -> &'static str {
        if self.ipv6 { "ipv6" } else { "ipv4" }
    }

    fn ends(&self, mode: usize, kind: Kind) -> Ends {
        let (from, to) = match kind {
            Kind::Direct => (&self.direct.0, &self.direct.1),
            Kind::Kernel | Kind::Hgw | Kind::Floor => (
                &self.labs[mode].nodes[0].pods[0],
                &self.labs[mode].nodes[1].pods[0],
            ),
        };
        Ends {
            client_ns: from.ns.clone(),
            server_ns: to.ns.clone(),
            server_ip: if self.ipv6 {
                to.ip6.into()
            } else {
                to.ip.into()
            },
        }
    }
}

pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.control_plane {
        crate::build()?;
        crate::bench_cp::control_plane(&args.out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let interrupt = Interrupt::install("stopping the current measurement and removing the labs")?;
    let check = || interrupt.check();
    let (rounds, duration, trials) = if args.smoke {
        (1, Duration::from_secs(1), 300)
    } else {
        anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
        anyhow::ensure!(
            args.duration >= 0.1,
            "--duration must be at least 0.1 seconds"
        );
        (args.rounds, Duration::from_secs_f64(args.duration), 3000)
    };

    let modes = modes(&args.variants, args.kube_proxy)?;
    crate::build()?;
    let floor_path = crate::bench_floor::build()?;
    let floor_object = Object::read(&floor_path)?;
    check()?;

    println!("bench: in-kernel program cost (BPF_PROG_TEST_RUN, {trials} trials per case)");
    let costs = program_costs(&floor_path, trials)?;
    for c in &costs {
        println!(
            "  {:<22} {:<34} {:>6} entries  {:>6.1} ns/run  {:>5.2}x empty",
            c.program, c.case, c.entries, c.ns_per_run, c.vs_empty
        );
    }
    check()?;

    let mut setup = set_up(&modes, args.ipv6, &floor_object, &check)?;
    if args.prog_stats {
        setup.prog_stats = Some(hgw_tests::enable_run_time_stats()?);
    }
    for (mode, lab) in modes.iter().zip(&setup.labs) {
        println!("bench: {}: lab {}", mode.name, lab.id);
    }
    println!(
        "bench: direct: {} <-> {}",
        setup.direct.0.ns, setup.direct.1.ns
    );
    let mut samples = Vec::new();
    let mut refusals = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..modes.len()).collect();
        order.rotate_left(round % modes.len());
        let order_names: Vec<_> = order.iter().map(|&m| modes[m].name.as_str()).collect();
        println!(
            "round {}/{rounds}: order {}",
            round + 1,
            order_names.join(", ")
        );
        for &test in Test::value_variants() {
            if !args.tests.is_empty() && !args.tests.contains(&test) {
                continue;
            }
            for &mode in &order {
                check()?;
                let window = Window {
                    warmup: WARMUP,
                    duration,
                    interrupt: &interrupt,
                };
                let profile = args
                    .perf
                    .as_deref()
                    .map(|dir| {
                        Profile::start(&dir.join(format!(
                            "{}-{}-{}.data",
                            round + 1,
                            test.name(),
                            modes[mode].name
                        )))
                    })
                    .transpose()?;
                let measured = measure(&setup, &modes, mode, test, window);
                drop(profile);
                match measured {
                    Ok((values, path)) => {
                        let shown: Vec<String> = values
                            .iter()
                            .map(|(k, v)| format!("{k} {}", fmt_value(*v)))
                            .collect();
                        println!(
                            "  {:<12} {:<7} {}  [{path}]",
                            test.name(),
                            modes[mode].name,
                            shown.join("  ")
                        );
                        samples.extend(values.into_iter().map(|(metric, value)| Sample {
                            round: round + 1,
                            mode: modes[mode].name.clone(),
                            metric,
                            value,
                        }));
                    }
                    Err(e) if e.is::<Interrupted>() => return Err(e),
                    Err(e) => {
                        println!(
                            "  {:<12} {:<7} REFUSED: {e:#}",
                            test.name(),
                            modes[mode].name
                        );
                        refusals.push(Refusal {
                            round: round + 1,
                            mode: modes[mode].name.clone(),
                            test: test.name(),
                            reason: format!("{e:#}"),
                        });
                    }
                }
            }
        }
    }
    drop(setup);
    println!("bench: labs removed");

    let report = Report {
        machine: Machine::this(),
        modes,
        rounds,
        duration_s: duration.as_secs_f64(),
        smoke: args.smoke,
        prog_stats: args.prog_stats,
        family: if args.ipv6 {
            TrafficFamily::Ipv6
        } else {
            TrafficFamily::Ipv4
        },
        metrics: METRICS,
        samples,
        refusals,
        costs,
    };
    let out = crate::util::root().join(&args.out);
    let written = write_report(&report, &out)?;
    println!();
    println!("{}", report.markdown_tables());
    for path in written {
        println!("wrote {}", path.display());
    }
    if !report.refusals.is_empty() {
        println!(
            "bench: {} measurement(s) refused (path check failed): see above",
            report.refusals.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The programs' in-kernel cost ([`hgw_tests::cost`]), measured by the tests crate's
/// `prog_cost` example: it holds the agent's embedded object, which xtask cannot
/// depend on (xtask builds before the eBPF toolchain is set up).
fn program_costs(floor_object: &Path, trials: usize) -> anyhow::Result<Vec<ProgCost>> {
    let mut cmd = crate::util::cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "hgw-tests",
        "--example",
        "prog_cost",
        "--",
    ])
    .arg(floor_object)
    .arg(trials.to_string())
    .stderr(std::process::Stdio::inherit());
    let out = crate::util::capture(&mut cmd)?;
    if !out.status.success() {
        bail!("`{}` failed ({})", crate::util::describe(&cmd), out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`{}` printed no program costs: {}",
            crate::util::describe(&cmd),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A lab per routed mode with its agents ready, and the direct pair.
fn set_up(
    modes: &[Mode],
    ipv6: bool,
    floor_object: &Object,
    check: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Setup> {
    let mut labs: Vec<Lab> = Vec::new();
    let mut direct = None;
    for mode in modes.iter().filter(|m| m.kind != Kind::Direct) {
        check()?;
        let mut lab = Lab::up_pair(1)?;
        if direct.is_none() {
            direct = Some(lab.add_direct_pair()?);
        }
        if let Some(bin) = &mode.agent_bin {
            lab.set_agent_bin(bin.clone());
        }
        if mode.kube_proxy {
            let rules = hgw_tests::kube_proxy_iptables(&[], hgw_tests::CLUSTER_CIDR);
            for node in &lab.nodes {
                hgw_tests::iptables_restore(&node.ns, &rules)?;
                hgw_tests::ip6tables_restore(&node.ns, &rules)?;
            }
        }
        let args: Vec<&str> = mode.agent_args.iter().map(String::as_str).collect();
        for node in 0..2 {
            lab.start_agent(node, &args)?;
        }
        labs.push(lab);
    }
    for agent in labs.iter().flat_map(Lab::agents) {
        check()?;
        agent.wait_ready(READY_TIMEOUT)?;
    }
    for lab in &labs {
        crate::bench_floor::pin_gateways(lab)?;
    }
    let direct = direct.context("no routed mode to build the direct pair in")?;
    // Once the agents are ready (next hops resolved): the floor turns forwarding off.
    let floor = match modes.iter().position(|m| m.kind == Kind::Floor) {
        Some(m) => Some(crate::bench_floor::attach(&labs[m], floor_object.bytes())?),
        None => None,
    };
    Ok(Setup {
        _floor: floor,
        labs,
        direct,
        ipv6,
        prog_stats: None,
    })
}

/// Runs `test` in `mode` with its path check; returns (metric, value) pairs and a note
/// on the check.
fn measure(
    setup: &Setup,
    modes: &[Mode],
    mode: usize,
    test: Test,
    w: Window<'_>,
) -> anyhow::Result<(Vec<(&'static str, f64)>, String)> {
    let kind = modes[mode].kind;
    let ends = setup.ends(mode, kind);
    if kind == Kind::Kernel {
        // Plain host-gw: no program may sit on any interface of either node.
        for node in &setup.labs[mode].nodes {
            let progs = tcx_programs(&node.ns)?;
            if !progs.is_empty() {
                bail!(
                    "kernel mode, but programs are attached in {}: {}",
                    node.ns,
                    progs.join("; ")
                );
            }
        }
    }
    let floor_note = if kind == Kind::Floor {
        Some(crate::bench_floor::check(&setup.labs[mode])?)
    } else {
        None
    };
    let before = if kind == Kind::Hgw {
        Some(setup.labs[mode].statuses()?)
    } else {
        None
    };
    let programs_before = match kind {
        Kind::Hgw | Kind::Floor if setup.prog_stats.is_some() => {
            Some(lab_programs(&setup.labs[mode])?)
        }
        _ => None,
    };
    // `min_fwd`: how many packets must have taken the fast path in each direction's
    // program for the numbers to be hgw's.
    let mut udp_loss = None;
    // What the programs' time is given per, counted over the whole test (warm-up and
    // the flows' opening included, as the programs' statistics are): UDP packets sent,
    // TCP connections made (TCP's packets coalesce).
    let mut prog_unit = None;
    let (mut values, min_fwd) = match test {
        Test::Udp => {
            let r = udp_flood(&ends, w)?;
            prog_unit = Some(("udp_prog_ns", r.sent_total));
            udp_loss = Some(
                100.0 * r.sent_total.saturating_sub(r.received_total) as f64
                    / r.sent_total.max(1) as f64,
            );
            (
                vec![
                    ("udp_mpps", r.pps / 1e6),
                    ("udp_cpu_ns", r.cpu_ns_per_pkt),
                    ("udp_softirq_ns", r.softirq_ns_per_pkt),
                ],
                r.received_total,
            )
        }
        Test::UdpFlows => {
            let r = udp_flows(&ends, FLOWS, w)?;
            prog_unit = Some(("flows_prog_ns", r.sent_total));
            udp_loss = Some(
                100.0 * r.sent_total.saturating_sub(r.received_total) as f64
                    / r.sent_total.max(1) as f64,
            );
            (
                vec![
                    ("flows_mpps", r.pps / 1e6),
                    ("flows_softirq_ns", r.softirq_ns_per_pkt),
                ],
                r.received_total,
            )
        }
        Test::Crr => {
            let r = tcp_crr(&ends, w)?;
            prog_unit = Some(("crr_prog_ns", r.total));
            // Each connection's request one way and response the other ride the fast
            // path once its handshake is through.
            (vec![("crr_cps", r.per_s)], r.total)
        }
        Test::RrSame | Test::RrDiff => {
            let server_cpu = if test == Test::RrSame { 0 } else { other_cpu() };
            let r = tcp_rr(&ends, 0, server_cpu, w)?;
            let (p50, p99) = if test == Test::RrSame {
                ("rr_same_p50", "rr_same_p99")
            } else {
                ("rr_diff_p50", "rr_diff_p99")
            };
            // Each transaction is a request one way and a response the other.
            (vec![(p50, r.p50_us), (p99, r.p99_us)], r.transactions)
        }
        Test::Tcp1 | Test::Tcp4 => {
            let streams = if test == Test::Tcp1 { 1 } else { 4 };
            let r = tcp_streams(&ends, streams, w)?;
            let key = if streams == 1 {
                "tcp1_gbps"
            } else {
                "tcp4_gbps"
            };
            // Segments are coalesced (GSO), so only "many" can be asked for: at least
            // one packet per 64 KiB that arrived.
            (vec![(key, r.gbit_s)], r.bytes_total / 65536)
        }
    };
    let mut note = match (kind, before) {
        (Kind::Hgw, Some(before)) => {
            let after = setup.labs[mode].statuses()?;
            let name = &modes[mode].name;
            let want = modes[mode].fast_path();
            for status in &after {
                if status.fast_path != want {
                    bail!(
                        "{name} mode, but an agent runs with fast_path {} (expected {want})",
                        status.fast_path
                    );
                }
            }
            let family = setup.family();
            let grown = |name: &str| {
                let name = format!("{family}.{name}");
                counter_sum(&after, &name) - counter_sum(&before, &name)
            };
            let (peer, pod) = (grown("fwd_to_peer"), grown("fwd_to_pod"));
            if peer < min_fwd.max(1) || pod < min_fwd.max(1) {
                bail!(
                    "{name} mode, but the fast path did not carry the traffic: fwd_to_peer +{peer}, fwd_to_pod +{pod}, expected at least {min_fwd} each",
                );
            }
            // Every test opens its flows while measured (a TCP handshake, the UDP
            // exchange's answer): in `established` mode those packets must have gone to
            // the kernel, on both nodes; in `all` mode no packet meets a conntrack rule.
            let to_kernel = [
                "pass_tcp_syn",
                "pass_ct_new",
                "pass_ct_proto",
                "pass_ct_nat",
            ]
            .map(|c| (c, grown(c)));
            let opened: u64 = to_kernel.iter().map(|(_, n)| n).sum();
            let opened_note = to_kernel
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| format!("{c} +{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            match want {
                "established" if opened < 2 => bail!(
                    "{name} mode (established), but the flows' opening packets did not go to the kernel: {}",
                    if opened_note.is_empty() {
                        "no conntrack counter moved"
                    } else {
                        &opened_note
                    }
                ),
                "all" if opened > 0 => {
                    bail!("{name} mode (all), but packets met the conntrack rules: {opened_note}")
                }
                _ => {}
            }
            let direct = grown("fwd_to_pod_direct");
            let direct = if direct > 0 {
                format!(" (of which straight into the pod +{direct})")
            } else {
                String::new()
            };
            let opened_note = if opened_note.is_empty() {
                String::new()
            } else {
                format!("; to the kernel: {opened_note}")
            };
            format!(
                "fast path ({want}): fwd_to_peer +{peer}, fwd_to_pod +{pod}{direct}{opened_note}"
            )
        }
        (Kind::Kernel, _) => "no programs attached".to_owned(),
        (Kind::Floor, _) => {
            // The kernel cannot forward here: whatever arrived, the floor carried.
            if min_fwd == 0 {
                bail!("floor mode, but nothing arrived");
            }
            floor_note.unwrap_or_default()
        }
        _ => "one veth pair".to_owned(),
    };
    if let Some(loss) = udp_loss {
        note.push_str(&format!("; {loss:.1}% of datagrams lost"));
    }
    if let Some(before) = programs_before {
        let runs = program_runs(&before, &lab_programs(&setup.labs[mode])?);
        // Each direction's program ran for every packet it carried (the counters above
        // held it to `min_fwd`), so each program's count must have grown as much.
        if runs.is_empty() {
            bail!("--prog-stats, but no program of the lab ran in both snapshots");
        }
        if let Some(r) = runs.iter().find(|r| r.count < min_fwd.max(1)) {
            bail!(
                "--prog-stats, but {}'s run count grew by {}, fewer than the {min_fwd} packets it carried (are run-time statistics on?)",
                r.name,
                r.count
            );
        }
        let shown: Vec<String> = runs
            .iter()
            .map(|r| format!("{} {:.0} ns x {}", r.name, r.ns_per_run(), r.count))
            .collect();
        note.push_str(&format!("; programs per run: {}", shown.join(", ")));
        if let Some((key, units)) = prog_unit.filter(|&(_, units)| units > 0) {
            let ns: u64 = runs.iter().map(|r| r.time_ns).sum();
            values.push((key, ns as f64 / units as f64));
        }
    }
    Ok((values, note))
}

/// Every tcx program attached on the lab's nodes (not in its pods).
fn lab_programs(lab: &Lab) -> anyhow::Result<Vec<hgw_tests::AttachedProgram>> {
    let mut all = Vec::new();
    for node in &lab.nodes {
        all.extend(hgw_tests::tcx_attached(&node.ns)?);
    }
    Ok(all)
}

/// What one program (by name, over every attachment) ran between two snapshots.
#[derive(Debug, PartialEq)]
struct ProgramRuns {
    name: String,
    time_ns: u64,
    count: u64,
}

impl ProgramRuns {
    fn ns_per_run(&self) -> f64 {
        self.time_ns as f64 / self.count.max(1) as f64
    }
}

/// The runs between `before` and `after`, per program name, of the programs in both
/// (matched by id: a program replaced meanwhile is left out), in name order.
fn program_runs(
    before: &[hgw_tests::AttachedProgram],
    after: &[hgw_tests::AttachedProgram],
) -> Vec<ProgramRuns> {
    let mut runs: std::collections::BTreeMap<&str, ProgramRuns> = Default::default();
    // One program may be attached to several hooks: count it once.
    let mut seen = std::collections::HashSet::new();
    for a in after {
        let Some(b) = before.iter().find(|b| b.id == a.id) else {
            continue;
        };
        if !seen.insert(a.id) {
            continue;
        }
        let entry = runs.entry(&a.name).or_insert_with(|| ProgramRuns {
            name: a.name.clone(),
            time_ns: 0,
            count: 0,
        });
        entry.time_ns += a.run_time_ns.saturating_sub(b.run_time_ns);
        entry.count += a.run_count.saturating_sub(b.run_count);
    }
    runs.into_values().collect()
}

/// A `perf record -a -g` running until dropped.
struct Profile(std::process::Child);

impl Profile {
    fn start(out: &Path) -> anyhow::Result<Profile> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-q", "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting perf record (is perf installed?)")?;
        // perf takes a moment to open its events on every CPU.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Profile(child))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        // SIGINT makes perf write its file and exit.
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: a plain syscall on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use hgw_tests::AttachedProgram;

    use super::{ProgramRuns, program_runs};

    fn program(dev: &str, name: &str, id: u32, time: u64, count: u64) -> AttachedProgram {
        AttachedProgram {
            dev: dev.to_owned(),
            hook: "ingress",
            name: name.to_owned(),
            id,
            run_time_ns: time,
            run_count: count,
        }
    }

    #[test]
    fn program_runs_add_up_per_name_and_count_a_program_on_two_hooks_once() {
        let before = [
            program("veth1", "hgw_to_peer", 7, 1_000, 10),
            program("veth2", "hgw_to_peer", 7, 1_000, 10),
            program("eth0", "hgw_to_pod", 8, 500, 5),
            program("eth0", "hgw_to_pod", 9, 0, 0),
            program("eth0", "gone", 10, 0, 0),
        ];
        let after = [
            program("veth1", "hgw_to_peer", 7, 3_000, 30),
            program("veth2", "hgw_to_peer", 7, 3_000, 30),
            program("eth0", "hgw_to_pod", 8, 1_500, 15),
            program("eth0", "hgw_to_pod", 9, 400, 2),
            // Attached after the first snapshot: its runs are not all in the window.
            program("eth0", "new", 11, 900, 9),
        ];
        let runs = program_runs(&before, &after);
        assert_eq!(
            runs,
            [
                ProgramRuns {
                    name: "hgw_to_peer".into(),
                    time_ns: 2_000,
                    count: 20
                },
                ProgramRuns {
                    name: "hgw_to_pod".into(),
                    time_ns: 1_400,
                    count: 12
                },
            ]
        );
        assert_eq!(runs[0].ns_per_run(), 100.0);
    }
}
