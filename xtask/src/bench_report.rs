//! The benchmark's outputs: a Markdown table, the raw numbers as JSON, an SVG chart (one
//! panel per metric, a bar per mode at the median, whiskers from min to max).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::bench::{Kind, METRICS, Metric, Mode, Refusal, Sample, machine, summary};
use crate::bench_prog::ProgCost;

/// Median, min, max.
type Stats = (f64, f64, f64);

pub struct Report {
    /// kernel, hgw, hgw-all, hgw-bridge, variants, floor, direct.
    pub modes: Vec<Mode>,
    pub rounds: usize,
    pub duration: Duration,
    pub smoke: bool,
    /// Traffic over IPv6 rather than IPv4.
    pub ipv6: bool,
    pub samples: Vec<Sample>,
    pub refusals: Vec<Refusal>,
    pub costs: Vec<ProgCost>,
}

impl Report {
    fn values(&self, mode: usize, metric: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.mode == mode && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    /// `a / b` per round, for the rounds where both were measured.
    fn ratios(&self, a: usize, b: usize, metric: &str) -> Vec<f64> {
        let get = |mode: usize, round: usize| {
            self.samples
                .iter()
                .find(|s| s.mode == mode && s.metric == metric && s.round == round)
                .map(|s| s.value)
        };
        (0..self.rounds)
            .filter_map(|r| Some(get(a, r)? / get(b, r)?))
            .filter(|r| r.is_finite())
            .collect()
    }

    /// Whether every measurement of `mode` passed its path check: a mode with a failed
    /// check is not reported at all.
    fn refused(&self, mode: usize) -> bool {
        self.refusals.iter().any(|r| r.mode == mode)
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
        for m in METRICS {
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
            .filter(|m| m.kind == Kind::Hgw && !m.agent_args.is_empty())
        {
            let _ = writeln!(
                s,
                "\n`{}`: agents run with `{}`.",
                m.name,
                m.agent_args.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "\nValues: median (min–max) over {} round(s) of {:.1} s each; ratios are taken within a round, then summarised the same way.",
            self.rounds,
            self.duration.as_secs_f64()
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
                    r.round + 1,
                    r.test,
                    self.modes[r.mode].name,
                    r.reason
                );
            }
        }
        s
    }

    /// The issue's targets, each with the measured median and whether it is met.
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
                    format!("{name}: 64 B pps >= 1.6x kernel"),
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
                    format!("{name}: TCP connections/s >= 1.00x kernel"),
                    med(h, k, "crr_cps"),
                    1.0,
                    true,
                ),
                (
                    format!("{name}: TCP 1 stream >= 1.00x kernel"),
                    med(h, k, "tcp1_gbps"),
                    1.0,
                    true,
                ),
                (
                    format!("{name}: TCP 4 streams >= 1.00x kernel"),
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
        // hgw_to_peer's hit at the largest table against the smallest (all mode).
        let hit_at = |entries: u32| {
            self.costs
                .iter()
                .find(|c| {
                    c.program == hgw_common::PROG_TO_PEER && c.case == "hit" && c.entries == entries
                })
                .map(|c| c.ns_per_run)
        };
        let (small, large) = (
            crate::bench_prog::ENTRIES[0],
            crate::bench_prog::ENTRIES[crate::bench_prog::ENTRIES.len() - 1],
        );
        rows.push((
            format!(
                "in-kernel {} hit at {large} routes <= 1.1x at {small}",
                hgw_common::PROG_TO_PEER
            ),
            hit_at(large).zip(hit_at(small)).map(|(l, s)| l / s),
            1.1,
            false,
        ));
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

    fn json(&self, machine: &Value) -> Value {
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({ "round": s.round + 1, "mode": self.modes[s.mode].name, "metric": s.metric, "value": s.value })
            })
            .collect();
        let refusals: Vec<Value> = self
            .refusals
            .iter()
            .map(|r| json!({ "round": r.round + 1, "mode": self.modes[r.mode].name, "test": r.test, "reason": r.reason }))
            .collect();
        let costs: Vec<Value> = self
            .costs
            .iter()
            .map(|c| {
                json!({ "program": c.program, "case": c.case, "entries": c.entries, "ns_per_run": c.ns_per_run, "vs_empty": c.vs_empty })
            })
            .collect();
        let metrics: Vec<Value> = METRICS
            .iter()
            .map(|m| json!({ "key": m.key, "label": m.label, "unit": m.unit, "higher_is_better": m.higher_is_better }))
            .collect();
        let modes: Vec<Value> = self
            .modes
            .iter()
            .map(|m| {
                let fast_path = match m.kind {
                    Kind::Hgw => Value::from(m.fast_path()),
                    Kind::Kernel | Kind::Floor => Value::from("off"),
                    Kind::Direct => Value::Null,
                };
                json!({ "name": m.name, "kind": format!("{:?}", m.kind).to_lowercase(), "fast_path": fast_path, "agent_args": m.agent_args })
            })
            .collect();
        json!({
            "machine": machine,
            "modes": modes,
            "rounds": self.rounds,
            "duration_s": self.duration.as_secs_f64(),
            "smoke": self.smoke,
            "family": if self.ipv6 { "ipv6" } else { "ipv4" },
            "metrics": metrics,
            "samples": samples,
            "refusals": refusals,
            "program_cost": costs,
        })
    }

    fn svg(&self, title: &str) -> String {
        const COLS: usize = 3;
        const PW: f64 = 300.0;
        const TOP: f64 = 50.0;
        const HGW_COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#9467bd", "#d62728"];
        let colors: Vec<(usize, &str)> = self
            .modes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let color = match m.kind {
                    Kind::Kernel => "#9e9e9e",
                    Kind::Direct => "#2ca02c",
                    Kind::Floor => "#17becf",
                    Kind::Hgw => HGW_COLORS[(i - 1) % HGW_COLORS.len()],
                };
                (i, color)
            })
            .collect();
        // Room for the axes (170) and one ratio line per fast-path mode.
        let ph = 215.0 + 12.0 * self.hgw_modes().len() as f64;
        let rows = METRICS.len().div_ceil(COLS);
        let (w, h) = (PW * COLS as f64, TOP + ph * rows as f64);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
            xml(title)
        );
        let mut x = 10.0;
        for &(mode, color) in &colors {
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="30" width="10" height="10" fill="{color}"/><text x="{}" y="39">{}</text>"#,
                x + 14.0,
                xml(&self.modes[mode].name)
            );
            x += 30.0 + 7.0 * self.modes[mode].name.len() as f64;
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="39" fill="#555">bar: median, whisker: min–max</text>"##,
            x + 10.0
        );
        for (i, m) in METRICS.iter().enumerate() {
            let (px, py) = ((i % COLS) as f64 * PW, TOP + (i / COLS) as f64 * ph);
            self.panel(&mut s, m, px, py, PW, &colors);
        }
        s.push_str("</svg>\n");
        s
    }

    #[allow(clippy::too_many_arguments)]
    fn panel(
        &self,
        s: &mut String,
        m: &Metric,
        px: f64,
        py: f64,
        pw: f64,
        colors: &[(usize, &str)],
    ) {
        let better = if m.higher_is_better { "↑" } else { "↓" };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{} ({}) {better}</text>"#,
            px + 15.0,
            py + 18.0,
            xml(m.label),
            xml(m.unit)
        );
        let stats: Vec<(usize, &str, Option<Stats>)> = colors
            .iter()
            .map(|&(mode, color)| {
                let st = if self.refused(mode) {
                    None
                } else {
                    summary(&self.values(mode, m.key))
                };
                (mode, color, st)
            })
            .collect();
        let top = stats
            .iter()
            .filter_map(|(_, _, st)| st.map(|(_, _, max)| max))
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.15;
        let (ax, ay, aw, ah) = (px + 40.0, py + 30.0, pw - 60.0, 140.0);
        let base = ay + ah;
        let _ = writeln!(
            s,
            "<line x1=\"{ax}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"#333\"/>",
            ax + aw
        );
        let _ = writeln!(
            s,
            "<line x1=\"{ax}\" y1=\"{ay}\" x2=\"{ax}\" y2=\"{base}\" stroke=\"#333\"/>"
        );
        for k in 0..=4 {
            let v = top * f64::from(k) / 4.0;
            let y = base - ah * f64::from(k) / 4.0;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#555\" font-size=\"9\">{}</text>",
                ax - 3.0,
                y + 3.0,
                num(v)
            );
            if k > 0 {
                let _ = writeln!(
                    s,
                    "<line x1=\"{ax}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>",
                    ax + aw
                );
            }
        }
        let slot = aw / stats.len() as f64;
        for (i, (mode, color, st)) in stats.iter().enumerate() {
            let cx = ax + slot * (i as f64 + 0.5);
            let bw = slot * 0.55;
            let y_of = |v: f64| base - ah * (v / top);
            match st {
                Some((med, min, max)) => {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{}" y="{}" width="{bw}" height="{}" fill="{color}"/>"#,
                        cx - bw / 2.0,
                        y_of(*med),
                        base - y_of(*med)
                    );
                    let (y0, y1) = (y_of(*min), y_of(*max));
                    let _ = writeln!(
                        s,
                        "<path d=\"M{cx} {y0}V{y1}M{} {y0}H{}M{} {y1}H{}\" stroke=\"#000\" fill=\"none\"/>",
                        cx - 6.0,
                        cx + 6.0,
                        cx - 6.0,
                        cx + 6.0
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{cx}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
                        y1 - 4.0,
                        num(*med)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" fill=\"#a00\" font-size=\"10\">{}</text>",
                        base - 10.0,
                        if self.refused(*mode) {
                            "refused"
                        } else {
                            "n/a"
                        }
                    );
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{cx}" y="{}" text-anchor="middle">{}</text>"#,
                base + 14.0,
                xml(&self.modes[*mode].name)
            );
        }
        let ratio = |a: usize, b: usize| {
            summary(&self.ratios(a, b, m.key))
                .filter(|_| !self.refused(a) && !self.refused(b))
                .map_or("–".to_owned(), |(med, _, _)| format!("{med:.2}x"))
        };
        for (line, h) in self.hgw_modes().into_iter().enumerate() {
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"#333\" font-size=\"10\">{n}/kernel {}   {n}/floor {}</text>",
                ax,
                base + 28.0 + 12.0 * line as f64,
                ratio(h, self.kernel()),
                ratio(h, self.floor()),
                n = xml(&self.modes[h].name),
            );
        }
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
    let machine = machine();
    let machine_line = format!(
        "Linux {}, {} CPUs, {}",
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?")
    );
    let mut command = if report.smoke {
        "cargo xtask bench --smoke".to_owned()
    } else {
        format!(
            "cargo xtask bench --rounds {} --duration {}",
            report.rounds,
            report.duration.as_secs_f64()
        )
    };
    let family = if report.ipv6 {
        command.push_str(" --ipv6");
        "IPv6"
    } else {
        "IPv4"
    };
    let md = format!(
        "# hgw bench {stamp} UTC\n\nMachine: {machine_line}. Command: `{command}`.\n\n{family} pod to pod across two nodes of the (dual-stack) namespace lab, wired as seed 000: the nodes' uplinks are the two ends of one veth pair, no switch; a routed path crosses the client pod's veth, that pair and the server pod's veth. Modes: `kernel` = plain host-gw routing (agents with `--no-fast-path`, no programs attached); `hgw` = the agents' fast path in its default mode, `established` (only flows conntrack accepted: each TCP connection's handshake and the UDP flow's opening go through the kernel); `hgw-all` = `--fast-path all` (no conntrack lookup); `hgw-bridge` = established mode with the bridge-side program on cni0; `floor` = kernel mode's agents plus the cheapest TC programs that can forward on this wiring (fixed MACs and `bpf_redirect` to the uplink on the pod's host veth, fixed MACs and `bpf_redirect_peer` into the pod on the uplink, no parsing past the ethertype, no lookup, no checks): the practical limit of any program here; `direct` = two namespaces joined by one veth pair, a reference with fewer wires than any routed path. The UDP packet-rate test is a flow conntrack sees as established in every mode: the server answers one datagram before the stream starts. The 1,000-flow UDP test does the same for 1,000 flows at once, which differ in source port only (each node's conntrack table holds 1,000 entries; the route lookup sees one destination), the sender taking them in turn, 8 datagrams each. The connection-rate test opens TCP connections one after another (connect, a 64 B request and its response, the client closes), client and server on one CPU: every SYN and FIN goes through the kernel in established mode. A measurement counts only if its traffic took the mode's path: the agents report the mode, the fast-path counters carried at least the packets that arrived, and in established mode the flows' opening packets went to the kernel (in all mode none met a conntrack rule); in floor mode only the floor programs are attached and forwarding is off in both nodes, so the kernel could not have carried what arrived (the floor's pods have permanent gateway neighbour entries, since the floor redirects IPv6 neighbour discovery too).\n\n![chart]({stem}.svg)\n\n{}",
        report.markdown_tables()
    );
    let paths = [
        dir.join(format!("{stem}.md")),
        dir.join(format!("{stem}.json")),
        dir.join(format!("{stem}.svg")),
    ];
    let json = serde_json::to_string_pretty(&report.json(&machine))?;
    let svg = report.svg(&format!("hgw bench {stamp} UTC — {machine_line}"));
    for (path, text) in paths.iter().zip([md, json + "\n", svg]) {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(paths.to_vec())
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

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
