//! The benchmark's outputs: a Markdown table, the raw numbers as JSON, an SVG chart (one
//! panel per metric, a bar per mode at the median, whiskers from min to max).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use crate::bench_model::{Kind, Machine, Metric, Mode, Refusal, Sample, TrafficFamily, summary};
use hgw_tests::cost::{CASE_CACHED_HIT, CASE_HIT, ENTRIES, ProgCost};

/// Median, min, max.
type Stats = (f64, f64, f64);

/// Everything a run measured; serialized as the run's JSON file.
#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    /// kernel, hgw, hgw-all, hgw-bridge, variants, floor, direct.
    pub modes: Vec<Mode>,
    pub rounds: usize,
    /// Seconds measured per test and mode.
    pub duration_s: f64,
    pub smoke: bool,
    /// `--prog-stats`: the programs' run-time statistics were on (their clock reads
    /// slow every program run a little).
    pub prog_stats: bool,
    pub family: TrafficFamily,
    /// What the samples' metric keys mean.
    pub metrics: &'static [Metric],
    pub samples: Vec<Sample>,
    pub refusals: Vec<Refusal>,
    #[serde(rename = "program_cost")]
    pub costs: Vec<ProgCost>,
}

impl Report {
    fn values(&self, mode: usize, metric: &str) -> Vec<f64> {
        let mode = &self.modes[mode].name;
        self.samples
            .iter()
            .filter(|s| &s.mode == mode && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    /// `a / b` per round, for the rounds where both were measured.
    fn ratios(&self, a: usize, b: usize, metric: &str) -> Vec<f64> {
        let get = |mode: usize, round: usize| {
            self.samples
                .iter()
                .find(|s| s.mode == self.modes[mode].name && s.metric == metric && s.round == round)
                .map(|s| s.value)
        };
        (1..=self.rounds)
            .filter_map(|r| Some(get(a, r)? / get(b, r)?))
            .filter(|r| r.is_finite())
            .collect()
    }

    /// Whether every measurement of `mode` passed its path check: a mode with a failed
    /// check is not reported at all.
    fn refused(&self, mode: usize) -> bool {
        self.refusals
            .iter()
            .any(|r| r.mode == self.modes[mode].name)
    }

    fn cell(&self, mode: usize, metric: &str) -> String {
        if self.refused(mode) {
            return "refused".into();
        }
        match summary(&self.values(mode, metric)) {
            Some((med, min, max)) => format!("{} ({}–{})", num(med), num(min), num(max)),
            None => "–".into(),
        }
    }

    fn ratio_cell(&self, a: usize, b: usize, metric: &str) -> String {
        if self.refused(a) || self.refused(b) {
            return "refused".into();
        }
        match summary(&self.ratios(a, b, metric)) {
            Some((med, min, max)) => format!("{med:.2}x ({min:.2}–{max:.2})"),
            None => "–".into(),
        }
    }

    fn kernel(&self) -> usize {
        0
    }

    fn direct(&self) -> usize {
        self.modes.len() - 1
    }

    fn floor(&self) -> usize {
        self.modes.len() - 2
    }

    /// The default mode, `hgw`, if measured.
    fn named(&self, name: &str) -> Option<usize> {
        self.modes.iter().position(|m| m.name == name)
    }

    /// The fast-path modes: hgw and its variants.
    fn hgw_modes(&self) -> Vec<usize> {
        (0..self.modes.len())
            .filter(|&m| self.modes[m].kind == Kind::Hgw)
            .collect()
    }

    /// (numerator, denominator) of every ratio column: each fast-path mode against
    /// kernel routing and against the floor, kernel against the floor, then the
    /// references: what the floor's wires cost against one veth pair, and what
    /// established mode's conntrack lookup costs against no lookup.
    fn ratio_columns(&self) -> Vec<(usize, usize)> {
        let (k, f, d) = (self.kernel(), self.floor(), self.direct());
        let mut cols = Vec::new();
        for h in self.hgw_modes() {
            cols.push((h, k));
            cols.push((h, f));
        }
        cols.push((k, f));
        cols.push((f, d));
        if let (Some(e), Some(a)) = (self.named("hgw"), self.named("hgw-all")) {
            cols.push((e, a));
        }
        if let (Some(h), Some(k)) = (self.named("hgw-kp"), self.named("kernel-kp")) {
            cols.push((h, k));
            cols.push((k, self.kernel()));
        }
        cols
    }

    pub fn markdown_tables(&self) -> String {
        let mut s = String::new();
        let cols = self.ratio_columns();
        let _ = write!(s, "| metric |");
        for m in &self.modes {
            let _ = write!(s, " {} |", m.name);
        }
        for &(a, b) in &cols {
            let _ = write!(s, " {}/{} |", self.modes[a].name, self.modes[b].name);
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(self.modes.len() + cols.len()));
        for m in self.metrics {
            let better = if m.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            let _ = write!(s, "| {} ({}, {better}) |", m.label, m.unit);
            for mode in 0..self.modes.len() {
                let _ = write!(s, " {} |", self.cell(mode, m.key));
            }
            for &(a, b) in &cols {
                let _ = write!(s, " {} |", self.ratio_cell(a, b, m.key));
            }
            let _ = writeln!(s);
        }
        for m in self
            .modes
            .iter()
            .filter(|m| m.kind == Kind::Hgw && (!m.agent_args.is_empty() || m.agent_bin.is_some()))
        {
            let bin = m
                .agent_bin
                .as_ref()
                .map(|b| format!(" (agent binary {})", b.display()))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "\n`{}`: agents run with `{}`{bin}.",
                m.name,
                m.agent_args.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "\nValues: median (min–max) over {} round(s) of {:.1} s each; ratios are taken within a round, then summarised the same way.",
            self.rounds, self.duration_s
        );
        let _ = writeln!(
            s,
            "\nIn-kernel cost per packet (BPF_PROG_TEST_RUN, median of interleaved trials):\n"
        );
        let _ = writeln!(
            s,
            "| program | case | LPM entries | ns per run | vs empty |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for c in &self.costs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.2}x |",
                c.program, c.case, c.entries, c.ns_per_run, c.vs_empty
            );
        }
        let _ = writeln!(s, "\n{}", self.targets());
        if !self.refusals.is_empty() {
            let _ = writeln!(s, "\nRefused (path check failed, numbers not reported):\n");
            for r in &self.refusals {
                let _ = writeln!(
                    s,
                    "- round {}, {} in {}: {}",
                    r.round, r.test, r.mode, r.reason
                );
            }
        }
        s
    }

    /// The targets, each with the measured median and whether it is met.
    fn targets(&self) -> String {
        let med = |a: usize, b: usize, key: &str| {
            if self.refused(a) || self.refused(b) {
                None
            } else {
                summary(&self.ratios(a, b, key)).map(|(m, _, _)| m)
            }
        };
        let (k, f) = (self.kernel(), self.floor());
        let mut rows = Vec::new();
        for h in self.hgw_modes() {
            let name = &self.modes[h].name;
            // A mode on nodes with kube-proxy's rules against kernel routing on such nodes.
            let k = match self.named("kernel-kp") {
                Some(kp) if self.modes[h].kube_proxy => kp,
                _ => k,
            };
            let kernel = &self.modes[k].name;
            rows.extend([
                (
                    format!("{name}: 64 B pps >= 0.95x floor"),
                    med(h, f, "udp_mpps"),
                    0.95,
                    true,
                ),
                (
                    format!("{name}: softirq per 64 B packet <= 1.05x floor"),
                    med(h, f, "udp_softirq_ns"),
                    1.05,
                    false,
                ),
                (
                    format!("{name}: 64 B pps >= 1.6x {kernel}"),
                    med(h, k, "udp_mpps"),
                    1.6,
                    true,
                ),
                (
                    format!("{name}: RR p50 (same CPU) <= 1.05x floor"),
                    med(h, f, "rr_same_p50"),
                    1.05,
                    false,
                ),
                (
                    format!("{name}: TCP connections/s >= 1.00x {kernel}"),
                    med(h, k, "crr_cps"),
                    1.0,
                    true,
                ),
                (
                    format!("{name}: TCP 1 stream >= 1.00x {kernel}"),
                    med(h, k, "tcp1_gbps"),
                    1.0,
                    true,
                ),
                (
                    format!("{name}: TCP 4 streams >= 1.00x {kernel}"),
                    med(h, k, "tcp4_gbps"),
                    1.0,
                    true,
                ),
            ]);
        }
        let worst_hit = self
            .costs
            .iter()
            .filter(|c| c.case.starts_with("hit"))
            .map(|c| c.vs_empty)
            .max_by(f64::total_cmp);
        rows.push((
            "in-kernel hit cost <= 1.5x empty (worst case)".to_owned(),
            worst_hit,
            1.5,
            false,
        ));
        // hgw_to_peer's hit at the largest table against the smallest: the default
        // (established, a cached flow), then all mode (a route lookup per packet).
        let hit_at = |case: &str, entries: u32| {
            self.costs
                .iter()
                .find(|c| {
                    c.program == hgw_common::PROG_TO_PEER && c.case == case && c.entries == entries
                })
                .map(|c| c.ns_per_run)
        };
        let (small, large) = (ENTRIES[0], ENTRIES[ENTRIES.len() - 1]);
        for (mode, case) in [("established", CASE_CACHED_HIT), ("all", CASE_HIT)] {
            rows.push((
                format!(
                    "in-kernel {} hit at {large} routes <= 1.1x at {small} ({mode})",
                    hgw_common::PROG_TO_PEER
                ),
                hit_at(case, large)
                    .zip(hit_at(case, small))
                    .map(|(l, s)| l / s),
                1.1,
                false,
            ));
        }
        let mut s = String::from("| target | measured (median) | met? |\n|---|---|---|\n");
        for (what, value, bound, at_least) in rows {
            let (shown, met) = match value {
                Some(v) => (
                    format!("{v:.2}x"),
                    if (at_least && v >= bound) || (!at_least && v <= bound) {
                        "yes"
                    } else {
                        "no"
                    },
                ),
                None => ("–".into(), "not measured"),
            };
            let _ = writeln!(s, "| {what} | {shown} | {met} |");
        }
        s
    }

    /// The SVG chart: a title and a legend, then one panel per metric, three to a row.
    fn chart(&self, title: &str) -> anyhow::Result<String> {
        const COLS: usize = 3;
        const PANEL_W: u32 = 300;
        const TOP: u32 = 50;
        let colors = self.colors();
        // Room for the axes (170) and one ratio line per fast-path mode.
        let panel_h = 215 + 12 * self.hgw_modes().len() as u32;
        let rows = self.metrics.len().div_ceil(COLS);
        let size = (PANEL_W * COLS as u32, TOP + panel_h * rows as u32);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            root.fill(&WHITE)?;
            let (header, body) = root.split_vertically(TOP);
            header.draw(&Text::new(
                title.to_owned(),
                (10, 6),
                font(14.0).style(FontStyle::Bold),
            ))?;
            let mut x = 10;
            for (mode, color) in self.modes.iter().zip(&colors) {
                header.draw(&Rectangle::new([(x, 30), (x + 10, 40)], color.filled()))?;
                header.draw(&Text::new(mode.name.clone(), (x + 14, 29), font(11.0)))?;
                x += 30 + 7 * mode.name.len() as i32;
            }
            header.draw(&Text::new(
                "bar: median, whisker: min–max",
                (x + 10, 29),
                font(11.0).color(&RGBColor(0x55, 0x55, 0x55)),
            ))?;
            let panels = body.split_evenly((rows, COLS));
            for (m, area) in self.metrics.iter().zip(&panels) {
                self.panel(area, m, &colors)?;
            }
            root.present()?;
        }
        Ok(svg)
    }

    /// A color per mode: grey for kernel, green for direct, cyan for the floor, and the
    /// fast-path modes in turn from four more.
    fn colors(&self) -> Vec<RGBColor> {
        const HGW: [RGBColor; 4] = [
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xff, 0x7f, 0x0e),
            RGBColor(0x94, 0x67, 0xbd),
            RGBColor(0xd6, 0x27, 0x28),
        ];
        (0..self.modes.len())
            .map(|i| match self.modes[i].kind {
                Kind::Kernel => RGBColor(0x9e, 0x9e, 0x9e),
                Kind::Direct => RGBColor(0x2c, 0xa0, 0x2c),
                Kind::Floor => RGBColor(0x17, 0xbe, 0xcf),
                Kind::Hgw => HGW[(i - 1) % HGW.len()],
            })
            .collect()
    }

    /// One metric: a bar per mode at the median, a whisker from min to max, the median
    /// above it; under the axes, each fast-path mode against kernel and floor.
    fn panel(
        &self,
        area: &DrawingArea<SVGBackend<'_>, Shift>,
        m: &Metric,
        colors: &[RGBColor],
    ) -> anyhow::Result<()> {
        let hgw = self.hgw_modes();
        let ratio_h = 16 + 12 * hgw.len() as u32;
        let (plot, ratios) = area.split_vertically(area.dim_in_pixel().1 - ratio_h);
        let stats: Vec<Option<Stats>> = (0..self.modes.len())
            .map(|mode| {
                if self.refused(mode) {
                    None
                } else {
                    summary(&self.values(mode, m.key))
                }
            })
            .collect();
        let top = stats
            .iter()
            .filter_map(|st| st.map(|(_, _, max)| max))
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.15;
        // x in hundredths of a mode's slot: a bar is 55% of it, a whisker's caps 20%.
        const SLOT: i32 = 100;
        const BAR: i32 = 55;
        const CAP: i32 = 20;
        let n = self.modes.len();
        let better = if m.higher_is_better { "↑" } else { "↓" };
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                format!("{} ({}) {better}", m.label, m.unit),
                font(11.0).style(FontStyle::Bold),
            )
            .margin_left(5)
            .margin_right(15)
            .x_label_area_size(18)
            .y_label_area_size(38)
            .build_cartesian_2d(
                // A slot of SLOT units per mode, a tick at its middle for the mode's name.
                (0..n as i32 * SLOT)
                    .with_key_points((0..n as i32).map(|i| i * SLOT + SLOT / 2).collect()),
                0.0..top,
            )?;
        let name_at = |x: &i32| {
            self.modes
                .get(usize::try_from(x / SLOT).unwrap_or(usize::MAX))
                .map_or_else(String::new, |mode| mode.name.clone())
        };
        let grey = RGBColor(0x55, 0x55, 0x55);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_labels(5)
            .x_label_formatter(&name_at)
            .y_label_formatter(&|v| num(*v))
            .x_label_style(font(11.0))
            .y_label_style(font(9.0).color(&grey))
            .bold_line_style(RGBColor(0xee, 0xee, 0xee))
            .light_line_style(TRANSPARENT)
            .axis_style(RGBColor(0x33, 0x33, 0x33))
            .draw()?;
        for (i, (st, color)) in stats.iter().zip(colors).enumerate() {
            let x = i as i32 * SLOT + SLOT / 2;
            match st {
                Some((med, min, max)) => {
                    chart.draw_series([Rectangle::new(
                        [(x - BAR / 2, 0.0), (x + BAR / 2, *med)],
                        color.filled(),
                    )])?;
                    let whisker =
                        |y: f64| PathElement::new([(x - CAP / 2, y), (x + CAP / 2, y)], BLACK);
                    chart.draw_series([
                        PathElement::new([(x, *min), (x, *max)], BLACK),
                        whisker(*min),
                        whisker(*max),
                    ])?;
                    chart.draw_series([EmptyElement::at((x, *max))
                        + Text::new(
                            num(*med),
                            (0, -4),
                            font(10.0)
                                .color(&BLACK)
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )])?;
                }
                None => {
                    let why = if self.refused(i) { "refused" } else { "n/a" };
                    chart.draw_series([EmptyElement::at((x, 0.0))
                        + Text::new(
                            why,
                            (0, -10),
                            font(10.0)
                                .color(&RGBColor(0xaa, 0, 0))
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )])?;
                }
            }
        }
        let ratio = |a: usize, b: usize| {
            summary(&self.ratios(a, b, m.key))
                .filter(|_| !self.refused(a) && !self.refused(b))
                .map_or("–".to_owned(), |(med, _, _)| format!("{med:.2}x"))
        };
        for (line, h) in hgw.into_iter().enumerate() {
            let name = &self.modes[h].name;
            ratios.draw(&Text::new(
                format!(
                    "{name}/kernel {}   {name}/floor {}",
                    ratio(h, self.kernel()),
                    ratio(h, self.floor())
                ),
                (40, 4 + 12 * line as i32),
                font(10.0).color(&RGBColor(0x33, 0x33, 0x33)),
            ))?;
        }
        Ok(())
    }
}

/// Writes `<stamp>[-smoke].{md,json,svg}` into `dir`; returns the paths.
pub fn write_report(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = Command::new("date")
        .args(["-u", "+%Y-%m-%d-%H%M%S"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "undated".into());
    let stem = if report.smoke {
        format!("{stamp}-smoke")
    } else {
        stamp.clone()
    };
    let machine = &report.machine;
    let mut machine_line = format!(
        "Linux {}, {} CPUs, {}, TCP congestion control {}",
        machine.kernel, machine.cpus, machine.cpu_model, machine.congestion_control
    );
    if let Some(ns) = &machine.halt_poll_ns {
        machine_line += &format!(", haltpoll.guest_halt_poll_ns {ns}");
    }
    let mut command = if report.smoke {
        "cargo xtask bench --smoke".to_owned()
    } else {
        format!(
            "cargo xtask bench --rounds {} --duration {}",
            report.rounds, report.duration_s
        )
    };
    // Variants show as modes of their own; the flag that adds the kube-proxy pair does not.
    if report.modes.iter().any(|m| m.kube_proxy) {
        command.push_str(" --kube-proxy");
    }
    let prog_stats = if report.prog_stats {
        command.push_str(" --prog-stats");
        " With `--prog-stats` the kernel kept run-time statistics of every BPF program for the whole run (BPF_ENABLE_STATS): the programs' rows are the time the lab's tcx programs ran, over both nodes, per UDP packet sent or TCP connection made, and every program run paid for two clock reads, so the modes with programs (hgw's and the floor) measured a little slower against kernel and direct than without the flag."
    } else {
        ""
    };
    let family = match report.family {
        TrafficFamily::Ipv6 => {
            command.push_str(" --ipv6");
            "IPv6"
        }
        TrafficFamily::Ipv4 => "IPv4",
    };
    let md = format!(
        "# hgw bench {stamp} UTC\n\nMachine: {machine_line}. Command: `{command}`.\n\n{family} pod to pod across two nodes of the (dual-stack) namespace lab, wired as seed 000: the nodes' uplinks are the two ends of one veth pair, no switch; a routed path crosses the client pod's veth, that pair and the server pod's veth. Modes: `kernel` = plain host-gw routing (agents with `--no-fast-path`, no programs attached); `hgw` = the agents' fast path in its default mode, `established` (only flows conntrack accepted: each TCP connection's handshake and the UDP flow's opening go through the kernel); `hgw-all` = `--fast-path all` (no conntrack lookup); `hgw-bridge` = established mode with the bridge-side program on cni0; `kernel-kp` and `hgw-kp` (with `--kube-proxy`) = `kernel` and `hgw` on nodes that carry kube-proxy's iptables rules with no Services (its FORWARD chain's conntrack matches, its nat chains), as a Kubernetes node does: conntrack tracks every forwarded packet there, where `kernel` mode's nodes track none; `floor` = kernel mode's agents plus the cheapest TC programs that can forward on this wiring (fixed MACs and `bpf_redirect` to the uplink on the pod's host veth, fixed MACs and `bpf_redirect_peer` into the pod on the uplink, no parsing past the ethertype, no lookup, no checks): the practical limit of any program here; `direct` = two namespaces joined by one veth pair, a reference with fewer wires than any routed path. The UDP packet-rate test is a flow conntrack sees as established in every mode: the server answers one datagram before the stream starts; the receiver polls (non-blocking recvmmsg on the other CPU), so the sender's CPU never pays for waking it. The 1,000-flow UDP test does the same for 1,000 flows at once, which differ in source port only (each node's conntrack table holds 1,000 entries; the route lookup sees one destination), the sender taking them in turn, 8 datagrams each. The connection-rate test opens TCP connections one after another (connect, a 64 B request and its response, the client closes), client and server on one CPU: every SYN and FIN goes through the kernel in established mode. A measurement counts only if its traffic took the mode's path: the agents report the mode, the fast-path counters carried at least the packets that arrived, and in established mode the flows' opening packets went to the kernel (in all mode none met a conntrack rule); in floor mode only the floor programs are attached and forwarding is off in both nodes, so the kernel could not have carried what arrived; every routed mode's pods have permanent gateway neighbour entries (the floor needs them, since it redirects neighbour discovery too; the other modes get them so that none pays for a gateway entry gone stale in a one-way flood).{prog_stats}\n\n![chart]({stem}.svg)\n\n{}",
        report.markdown_tables()
    );
    let paths = [
        dir.join(format!("{stem}.md")),
        dir.join(format!("{stem}.json")),
        dir.join(format!("{stem}.svg")),
    ];
    let json = serde_json::to_string_pretty(report)?;
    let svg = report.chart(&format!("hgw bench {stamp} UTC — {machine_line}"))?;
    for (path, text) in paths.iter().zip([md, json + "\n", svg]) {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(paths.to_vec())
}

/// plotters draws a font of size S at S / 1.24 pixels: the font for `px` pixels.
fn font(px: f64) -> FontDesc<'static> {
    ("sans-serif", px * 1.24).into_font()
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_model::METRICS;

    /// Two rounds of made-up numbers for every mode and metric, one refused mode.
    fn report() -> Report {
        let modes =
            crate::bench::modes(&["mine=--fast-path all".to_owned()], false).expect("modes");
        let mut samples = Vec::new();
        for round in 1..=2 {
            for (i, mode) in modes.iter().enumerate() {
                for m in METRICS {
                    samples.push(Sample {
                        round,
                        mode: mode.name.clone(),
                        metric: m.key,
                        value: (i + round) as f64 * 1.5,
                    });
                }
            }
        }
        Report {
            machine: Machine {
                kernel: "6.12.0".into(),
                cpus: 2,
                cpu_model: "a CPU".into(),
                congestion_control: "cubic".into(),
                halt_poll_ns: None,
            },
            refusals: vec![Refusal {
                round: 2,
                mode: "hgw-bridge".into(),
                test: "udp64".into(),
                reason: "the fast path did not carry the traffic".into(),
            }],
            modes,
            rounds: 2,
            duration_s: 1.0,
            prog_stats: false,
            smoke: true,
            family: TrafficFamily::Ipv6,
            metrics: METRICS,
            samples,
            costs: Vec::new(),
        }
    }

    #[test]
    fn json_names_modes_and_rounds_as_the_run_prints_them() {
        let json = serde_json::to_value(report()).expect("serialize");
        assert_eq!(json["family"], "ipv6");
        assert_eq!(json["modes"][0]["name"], "kernel");
        assert_eq!(json["modes"][0]["kind"], "kernel");
        assert_eq!(json["modes"][0]["fast_path"], "off");
        assert_eq!(json["modes"][2]["fast_path"], "all");
        assert_eq!(
            json["modes"][4]["fast_path"], "all",
            "the variant's own argument"
        );
        assert_eq!(json["modes"].as_array().map(Vec::len), Some(7));
        assert!(
            json["modes"][6]["fast_path"].is_null(),
            "direct has no agents"
        );
        assert_eq!(json["samples"][0]["round"], 1);
        assert_eq!(json["samples"][0]["mode"], "kernel");
        assert_eq!(json["refusals"][0]["mode"], "hgw-bridge");
        assert_eq!(json["metrics"][0]["key"], "udp_mpps");
        assert!(json["program_cost"].is_array());
    }

    #[test]
    fn the_report_gives_the_command_with_the_flags_that_chose_its_modes() {
        let mut report = report();
        report.smoke = false;
        report.modes = crate::bench::modes(&[], true).expect("modes");
        report.prog_stats = true;
        let dir = std::env::temp_dir().join(format!("hgw-report-test-{}", std::process::id()));
        let written = write_report(&report, &dir).expect("write");
        let md = written
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "md"))
            .map(|p| std::fs::read_to_string(p).expect("read"));
        std::fs::remove_dir_all(&dir).expect("clean up");
        let md = md.expect("a markdown file");
        assert!(
            md.contains("Command: `cargo xtask bench --rounds 2 --duration 1 --kube-proxy --prog-stats --ipv6`"),
            "{}",
            md.lines().nth(2).unwrap_or_default()
        );
        assert!(
            md.contains("run-time statistics of every BPF program"),
            "--prog-stats is said to slow the modes with programs"
        );
    }

    #[test]
    fn chart_has_a_panel_per_metric_and_a_bar_per_measured_mode() {
        let report = report();
        let svg = report.chart("title").expect("chart");
        if let Some(path) = std::env::var_os("HGW_CHART_OUT") {
            std::fs::write(path, &svg).expect("write the chart");
        }
        assert!(svg.starts_with("<svg"), "{svg}");
        for m in METRICS {
            assert!(svg.contains(m.label), "no panel for {}", m.key);
        }
        for mode in &report.modes {
            assert!(svg.contains(&mode.name), "no {} in the chart", mode.name);
        }
        // hgw-bridge is refused: every panel says so instead of drawing its bar.
        assert_eq!(svg.matches("refused").count(), METRICS.len());
    }

    #[test]
    fn ratios_pair_rounds_by_number() {
        let report = report();
        // kernel is mode 0 (values 1.5 (r+0)), hgw mode 1: (1 + r) / r per round.
        let r = report.ratios(1, 0, "udp_mpps");
        assert_eq!(r, vec![2.0, 1.5]);
        assert!(report.refused(3));
        assert!(report.markdown_tables().contains("| refused |"));
    }
}
