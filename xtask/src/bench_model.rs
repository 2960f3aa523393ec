//! What the traffic bench measures and records, shared by the runner (bench.rs) and
//! the report (bench_report.rs): modes, metrics, samples, refusals, the machine.

use serde::Serialize;

/// What a mode's traffic goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Agents with --no-fast-path: kernel routes only.
    Kernel,
    /// Agents with the fast path (and the mode's extra agent arguments).
    Hgw,
    /// Agents with --no-fast-path, the floor programs attached, forwarding off.
    Floor,
    /// One veth pair.
    Direct,
}

/// A mode: `kernel`, `hgw`, `hgw-all`, `hgw-bridge`, any `--variant`, `floor`, `direct`,
/// in that order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mode {
    pub name: String,
    pub kind: Kind,
    /// The `fast_path` the mode's agents run with: for an hgw mode the value of its
    /// `--fast-path` argument, else the default, `established`; `off` for kernel and
    /// floor; none for the direct pair (no agents).
    pub fast_path: Option<String>,
    /// Extra agent arguments (hgw variants).
    pub agent_args: Vec<String>,
    /// Another agent binary than the built one (a variant given as `NAME=@PATH ARGS`):
    /// two builds compared in one run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_bin: Option<std::path::PathBuf>,
    /// The nodes carry kube-proxy's iptables rules (no Services) for both families, as
    /// a Kubernetes node does: conntrack tracks every forwarded packet whatever the mode.
    pub kube_proxy: bool,
}

impl Mode {
    pub fn new(name: &str, kind: Kind, agent_args: Vec<String>) -> Mode {
        let fast_path = match kind {
            Kind::Hgw => Some(
                agent_args
                    .iter()
                    .position(|a| a == "--fast-path")
                    .and_then(|i| agent_args.get(i + 1))
                    .map_or("established", String::as_str)
                    .to_owned(),
            ),
            Kind::Kernel | Kind::Floor => Some("off".to_owned()),
            Kind::Direct => None,
        };
        Mode {
            name: name.to_owned(),
            kind,
            fast_path,
            agent_args,
            agent_bin: None,
            kube_proxy: false,
        }
    }

    /// The `fast_path` the mode's agents must report ("" for the direct pair).
    pub fn fast_path(&self) -> &str {
        self.fast_path.as_deref().unwrap_or_default()
    }
}

/// A metric the report shows.
#[derive(Debug, Serialize)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

pub const METRICS: &[Metric] = &[
    Metric {
        key: "udp_mpps",
        label: "UDP 64 B received",
        unit: "Mpps",
        higher_is_better: true,
    },
    Metric {
        key: "udp_cpu_ns",
        label: "sender CPU per UDP packet",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "udp_softirq_ns",
        label: "softirq per UDP packet",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "udp_prog_ns",
        label: "BPF programs per UDP packet (--prog-stats)",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "flows_mpps",
        label: "UDP 64 B received, 1,000 flows",
        unit: "Mpps",
        higher_is_better: true,
    },
    Metric {
        key: "flows_softirq_ns",
        label: "softirq per UDP packet, 1,000 flows",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "flows_prog_ns",
        label: "BPF programs per UDP packet, 1,000 flows (--prog-stats)",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "rr_same_p50",
        label: "TCP RR p50, same CPU",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr_same_p99",
        label: "TCP RR p99, same CPU",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr_diff_p50",
        label: "TCP RR p50, other CPU",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "rr_diff_p99",
        label: "TCP RR p99, other CPU",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "crr_cps",
        label: "TCP connections (connect, RR, close)",
        unit: "1/s",
        higher_is_better: true,
    },
    Metric {
        key: "crr_prog_ns",
        label: "BPF programs per TCP connection (--prog-stats)",
        unit: "ns",
        higher_is_better: false,
    },
    Metric {
        key: "tcp1_gbps",
        label: "TCP, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Metric {
        key: "tcp4_gbps",
        label: "TCP, 4 streams",
        unit: "Gbit/s",
        higher_is_better: true,
    },
];

/// One measured value.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// 1-based, as the run prints it.
    pub round: usize,
    /// The mode's name.
    pub mode: String,
    pub metric: &'static str,
    pub value: f64,
}

/// A measurement whose path check failed: its numbers are not reported.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    /// 1-based, as the run prints it.
    pub round: usize,
    /// The mode's name.
    pub mode: String,
    pub test: String,
    pub reason: String,
}

/// The family the traffic used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficFamily {
    Ipv4,
    Ipv6,
}

/// The machine, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Kernel release.
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// TCP congestion control the labs inherit (one-stream results differ up to 3x
    /// between BBR and cubic on the Intel VM).
    pub congestion_control: String,
    /// `haltpoll.guest_halt_poll_ns`, where the guest has it: 0 halts an idle vCPU at
    /// once, which makes waking a reader on the other CPU dear (single-stream.md).
    pub halt_poll_ns: Option<String>,
}

impl Machine {
    pub fn this() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_default();
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|s| s.trim().to_owned())
        };
        Machine {
            kernel,
            cpus,
            cpu_model,
            congestion_control: read("/proc/sys/net/ipv4/tcp_congestion_control")
                .unwrap_or_default(),
            halt_poll_ns: read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        }
    }
}

/// Median, min, max.
pub fn summary(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}
