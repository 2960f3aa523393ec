//! `cargo xtask matrix`: hgw on the kernels operators run. The lab's smoke test
//! (tests/tests/matrix_smoke.rs) runs in each fast-path mode, the ClusterIP and FORWARD
//! policy tests against kernel routes alone, the route, ICMP and tc duties, and what hgw
//! leaves on the node, on this machine's kernel and, under QEMU, on Debian 12's newest
//! 6.1 and 6.12 kernels. Every cell must pass. The table goes to stdout and to
//! target/matrix.md, the logs to target/matrix/<kernel>/<check>.log.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::matrix_vm::{self, Kernel};
use crate::util::{capture, cargo, root};

/// A column of the matrix: lab tests run in one fast-path mode (`off` loads no programs).
#[derive(Clone, Copy)]
struct Check {
    /// The column's name, and its log's (`<name>.log`).
    name: &'static str,
    /// `HGW_MATRIX_MODE` for the smoke test (the other tests pick their modes).
    mode: &'static str,
    /// Test targets of the tests crate, run one after the other.
    tests: &'static [&'static str],
}

const CHECKS: [Check; 5] = [
    Check {
        name: "established",
        mode: "established",
        tests: &["matrix_smoke"],
    },
    Check {
        name: "all",
        mode: "all",
        tests: &["matrix_smoke"],
    },
    // What the first rule asks on every kernel: a NAT'd flow (kube-proxy's ClusterIP
    // DNAT) and FORWARD policy stay the kernel's, with the same answers as kernel
    // routes alone (both tests compare with `off`); IPVS's NAT, which the programs
    // cannot see, takes `established` mode off (this machine's kernel has no IPVS).
    Check {
        name: "nat-forward",
        mode: "established",
        tests: &["service_clusterip", "network_policy", "ipvs"],
    },
    // The routing table and rules (and the reverse-path filter), IPsec policies (with
    // xfrm_user a module, loaded only by the test), ICMP (frag-needed), tc shaping,
    // nftables chains on the interfaces (nf_tables a module), the bridge's port states
    // and VLAN filtering (which this machine's kernel lacks), the frames a bridge refuses
    // for their source MAC, an XDP program on the bridge, and the priority
    // forwarding gives a packet stay the kernel's:
    // each test sends what kernel routes alone would carry and checks it went there.
    Check {
        name: "routes-icmp-tc",
        mode: "established",
        tests: &[
            "route_duties",
            "xfrm",
            "pmtu",
            "tc_bandwidth",
            "forward_priority",
            "netfilter_hooks",
            "bridge_duties",
            "source_mac",
            "xdp_hooks",
        ],
    },
    // What hgw leaves on the node: cls_bpf filters last on their hooks, replaced in
    // place, and gone with `off`, `uninstall`, an unpinned stop or a failed start,
    // with the qdiscs hgw added (the real attach on 6.1, forced on the others); routes
    // and nexthops someone else replaced or an earlier agent left.
    Check {
        name: "leftovers",
        mode: "established",
        tests: &["attach_cls_bpf", "stale_routes"],
    },
];
/// Set in the guests, whose Debian kernels have IPVS: ipvs.rs fails rather than
/// skips where it cannot load the module.
const REQUIRE_IPVS: &str = "HGW_REQUIRE_IPVS";
/// How long one test binary may take (coreutils `timeout`, host and guest alike).
const TEST_TIMEOUT_S: u64 = 300;

/// A Debian kernel: the newest package `<prefix>N<suffix>` in the archive.
struct Guest {
    prefix: &'static str,
    suffix: &'static str,
}

const GUESTS: [Guest; 2] = [
    Guest {
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
    Guest {
        prefix: "linux-image-6.1.0-",
        // No tcx before 6.6: the agent attaches as cls_bpf filters.
        suffix: "-amd64-unsigned",
    },
];

/// What a cell showed.
enum Outcome {
    Pass,
    Fail(String),
}

struct Cell {
    outcome: Outcome,
    secs: u64,
}

struct Column {
    kernel: String,
    cells: Vec<Cell>,
    dir: PathBuf,
}

/// A part of the matrix, for working on one test: `cargo xtask matrix --test NAME
/// --kernel 6.12`.
#[derive(Debug, Default, clap::Args)]
pub struct Only {
    /// Run only these test targets (one `established` column), not the checks.
    #[arg(long = "test")]
    tests: Vec<String>,
    /// Only the guest kernels whose version starts with this (no host column).
    #[arg(long)]
    kernel: Option<String>,
}

impl Only {
    fn checks(&self) -> Vec<Check> {
        if self.tests.is_empty() {
            return CHECKS.to_vec();
        }
        // Leaked: a check names its tests for the process's life, as CHECKS does.
        let tests: Vec<&'static str> = self
            .tests
            .iter()
            .map(|t| &*String::leak(t.clone()))
            .collect();
        vec![Check {
            name: "only",
            mode: "established",
            tests: tests.leak(),
        }]
    }
}

/// Runs the matrix with `agent` (the built release agent) and reports it; with
/// `host`, on this machine's kernel too (`cargo xtask test` leaves it out: its
/// `cargo test` has just run every one of these tests here).
pub fn matrix(agent: &Path, host: bool, only: &Only) -> anyhow::Result<()> {
    let started = Instant::now();
    let checks = only.checks();
    let tests = test_binaries(&checks)?;
    let out = root().join("target/matrix");
    let mut columns = Vec::new();
    if host && only.kernel.is_none() {
        columns.push(host_column(&checks, &tests, agent, &out)?);
    }
    let mut kernels = Vec::new();
    for guest in &GUESTS {
        let package = matrix_vm::newest_package(guest.prefix, guest.suffix)?;
        let kernel = matrix_vm::fetch(&package)?;
        if only
            .kernel
            .as_ref()
            .is_none_or(|k| kernel.version.starts_with(k.as_str()))
        {
            columns.push(guest_column(&checks, &kernel, &tests, agent, &out)?);
        }
        kernels.push(kernel.version);
    }
    matrix_vm::prune(&kernels)?;
    let report = render(&checks, &columns, started.elapsed());
    print!("{report}");
    let path = root().join("target/matrix.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("matrix: written to {}", path.display());
    let failed = columns
        .iter()
        .flat_map(|c| c.cells.iter())
        .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
        .count();
    ensure!(
        failed == 0,
        "matrix: {failed} required cells failed (see above)"
    );
    Ok(())
}

/// Test target -> its binary.
type Binaries = BTreeMap<&'static str, PathBuf>;

/// Every check's test binaries, built by `cargo test --release` (the profile `cargo xtask
/// test` runs them in), found by asking cargo rather than guessing among
/// target/release/deps/<name>-<hash>.
fn test_binaries(checks: &[Check]) -> anyhow::Result<Binaries> {
    let names: BTreeSet<&'static str> = checks.iter().flat_map(|c| c.tests).copied().collect();
    let mut args = vec!["test", "--release", "--no-run", "--message-format=json"];
    for &name in &names {
        args.extend(["--test", name]);
    }
    println!("matrix: cargo {}", args.join(" "));
    let out = capture(cargo().args(args))?;
    ensure!(
        out.status.success(),
        "building the matrix's tests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    names
        .into_iter()
        .map(|name| {
            messages
                .iter()
                .filter(|m| m["target"]["name"] == name)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .map(|path| (name, path))
                .with_context(|| format!("cargo built no {name} executable"))
        })
        .collect()
}

/// The binaries `check` runs (every one was built: `test_binaries` fails otherwise).
fn binaries<'a>(check: &Check, tests: &'a Binaries) -> impl Iterator<Item = &'a Path> {
    check.tests.iter().map(|name| tests[name].as_path())
}

/// A fresh results directory for one kernel.
fn fresh_dir(out: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = out.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Each check on this machine's kernel, as `cargo test` runs the tests.
fn host_column(
    checks: &[Check],
    tests: &Binaries,
    agent: &Path,
    out: &Path,
) -> anyhow::Result<Column> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let dir = fresh_dir(out, "host")?;
    let mut cells = Vec::new();
    for check in checks {
        println!("matrix: this machine ({}): {}", release.trim(), check.name);
        let log = dir.join(format!("{}.log", check.name));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let mut code = Some(0);
        for test in binaries(check, tests) {
            let status = Command::new("timeout")
                .arg(TEST_TIMEOUT_S.to_string())
                .arg(test)
                .arg("--test-threads=1")
                .env("HGW_AGENT_BIN", agent)
                .env("HGW_MATRIX_MODE", check.mode)
                .stdout(file.try_clone().context("duplicating the log file")?)
                .stderr(file.try_clone().context("duplicating the log file")?)
                .status()
                .with_context(|| format!("running {}", test.display()))?;
            if status.code() != Some(0) {
                code = status.code();
            }
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        cells.push(Cell {
            outcome: classify(code, &text, &log),
            secs: started.elapsed().as_secs(),
        });
    }
    Ok(Column {
        kernel: format!("this machine, {}", release.trim()),
        cells,
        dir,
    })
}

/// One boot of `kernel` running each check.
fn guest_column(
    checks: &[Check],
    kernel: &Kernel,
    tests: &Binaries,
    agent: &Path,
    out: &Path,
) -> anyhow::Result<Column> {
    let dir = fresh_dir(out, &kernel.version)?;
    let shared = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let shared = shared.display();
    let agent = matrix_vm::sh_quote(&agent.display().to_string());
    // Each check's exit code (the last failing test's) and seconds land in
    // <name>.rc, its output in <name>.log.
    let mut script = String::new();
    for check in checks {
        let (name, log) = (
            matrix_vm::sh_quote(check.name),
            matrix_vm::sh_quote(&format!("{shared}/{}", check.name)),
        );
        let _ = write!(
            script,
            "echo \"matrix: {version}: \"{name}\n\
             start=$(date +%s); rc=0; : > {log}.log\n",
            version = kernel.version,
        );
        for test in binaries(check, tests) {
            let test = matrix_vm::sh_quote(&test.display().to_string());
            let _ = writeln!(
                script,
                "HGW_AGENT_BIN={agent} HGW_MATRIX_MODE={mode} {REQUIRE_IPVS}=1 timeout {TEST_TIMEOUT_S} {test} --test-threads=1 >> {log}.log 2>&1 || rc=$?",
                mode = check.mode,
            );
        }
        let _ = writeln!(
            script,
            "echo \"$rc $(( $(date +%s) - start ))\" > {log}.rc\n\
             echo \"matrix: {version}: \"{name}\": exit $rc\"",
            version = kernel.version,
        );
    }
    println!("matrix: booting Debian {} under QEMU (TCG)", kernel.version);
    // Boot and set-up take seconds; the rest is the modes' own timeouts.
    let runs: usize = checks.iter().map(|c| c.tests.len()).sum();
    let watchdog = Duration::from_secs(120 + TEST_TIMEOUT_S * runs as u64);
    let boot = matrix_vm::boot(kernel, &dir, &script, watchdog)?;
    println!(
        "matrix: {}: guest {} after {} s",
        kernel.version,
        if boot.finished {
            "finished"
        } else {
            "did NOT finish"
        },
        boot.elapsed.as_secs()
    );
    let mut cells = Vec::new();
    for check in checks {
        let log = dir.join(format!("{}.log", check.name));
        let rc =
            std::fs::read_to_string(dir.join(format!("{}.rc", check.name))).unwrap_or_default();
        let mut fields = rc.split_whitespace().map(|f| f.parse::<i64>().ok());
        let (code, secs) = (fields.next().flatten(), fields.next().flatten());
        let outcome = match code {
            Some(code) => classify(
                i32::try_from(code).ok(),
                &std::fs::read_to_string(&log).unwrap_or_default(),
                &log,
            ),
            None => Outcome::Fail(format!(
                "the guest did not run this check; console (in {}):\n{}",
                dir.join("console.log").display(),
                tail(&boot.console, 15)
            )),
        };
        cells.push(Cell {
            outcome,
            secs: secs.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        });
    }
    Ok(Column {
        kernel: format!("Debian {} (QEMU)", kernel.version),
        cells,
        dir,
    })
}

/// A cell's outcome from its tests' exit code and output.
fn classify(code: Option<i32>, text: &str, log: &Path) -> Outcome {
    let why = match code {
        Some(0) => return Outcome::Pass,
        Some(124) => format!("timed out after {TEST_TIMEOUT_S} s"),
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".to_owned(),
    };
    Outcome::Fail(format!(
        "{why}; log {}:\n{}",
        log.display(),
        first_error(text)
    ))
}

/// The lines of a failed test's output that say why: its error, else the last lines.
fn first_error(text: &str) -> String {
    let start = text
        .lines()
        .position(|l| l.starts_with("Error:") || l.contains("panicked at"));
    match start {
        Some(i) => text.lines().skip(i).take(12).collect::<Vec<_>>().join("\n"),
        None => tail(text, 12),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The table (kernel x check) and, under it, each failure.
fn render(checks: &[Check], columns: &[Column], took: Duration) -> String {
    let mut table = format!(
        "# hgw kernel matrix\n\n| kernel | {} |\n|---|{}\n",
        checks
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(checks.len())
    );
    let mut notes = String::new();
    let mut n = 0;
    for column in columns {
        let mut row = format!("| {} |", column.kernel);
        for (check, cell) in checks.iter().zip(&column.cells) {
            let mode = check.name;
            let text = match &cell.outcome {
                Outcome::Pass => format!("pass ({} s)", cell.secs),
                Outcome::Fail(why) => {
                    n += 1;
                    let _ = writeln!(notes, "{n}. {}, `{mode}`: FAILED: {why}", column.kernel);
                    format!("**FAIL** ({n})")
                }
            };
            let _ = write!(row, " {text} |");
        }
        table.push_str(&row);
        table.push('\n');
    }
    let logs = columns
        .iter()
        .map(|c| c.dir.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let what = match checks {
        [only] if only.name == "only" => format!("`only`: {}.", only.tests.join(", ")),
        _ => "`established` and `all`: the smoke test (tests/tests/matrix_smoke.rs) in that mode; `nat-forward`: tests/tests/service_clusterip.rs and network_policy.rs (each against `off`, kernel routes alone) and ipvs.rs (IPVS takes `established` off); `routes-icmp-tc`: route_duties.rs, xfrm.rs, pmtu.rs, tc_bandwidth.rs, forward_priority.rs, netfilter_hooks.rs, bridge_duties.rs, source_mac.rs and xdp_hooks.rs (where kernel routes, IPsec policies, ICMP, shaping, priorities, nftables chains on the interfaces, the bridge's port states, VLANs, MTUs and source MAC checks and its XDP put the packets); `leftovers`: attach_cls_bpf.rs and stale_routes.rs (the cls_bpf attach, and what hgw leaves on the node).".to_owned(),
    };
    format!(
        "{table}\n{notes}\n{what} Logs in {logs}. Took {} s.\n",
        took.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Outcome, classify};

    #[test]
    fn a_cell_passes_on_exit_0_alone_and_a_failure_quotes_the_error() {
        let log = Path::new("x.log");
        assert!(matches!(classify(Some(0), "", log), Outcome::Pass));
        assert!(matches!(classify(None, "", log), Outcome::Fail(_)));
        let text = "noise\nError: agent on node 0 exited while waiting\nCaused by: x\n";
        match classify(Some(101), text, log) {
            Outcome::Fail(why) => {
                assert!(why.starts_with("exit 101; log x.log:"), "{why}");
                assert!(why.contains("Error: agent on node 0 exited"), "{why}");
                assert!(!why.contains("noise"), "{why}");
            }
            Outcome::Pass => panic!("exit 101 passed"),
        }
    }
}
