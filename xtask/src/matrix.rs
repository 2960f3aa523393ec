//! `cargo xtask matrix`: hgw on the kernels operators run. The lab's smoke test
//! (tests/tests/matrix_smoke.rs) runs in each fast-path mode, and the ClusterIP and
//! FORWARD policy tests against kernel routes alone, on this machine's kernel and, under
//! QEMU, on Debian 12's newest 6.1 and 6.12 kernels. Each cell is a required pass or
//! an expected failure that names its reason and must fail with the agent's own words
//! for it; anything else (an unexpected failure, or an expected failure that now passes
//! and should become a required pass) fails the run. The table goes to stdout and to
//! target/matrix.md, the logs to target/matrix/<kernel>/<check>.log.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::matrix_vm::{self, Kernel};
use crate::util::{capture, cargo, root};

/// A column of the matrix: lab tests run in one fast-path mode (`off` loads no programs).
struct Check {
    /// The column's name, and its log's (`<name>.log`).
    name: &'static str,
    /// `HGW_MATRIX_MODE` for the smoke test (the other tests pick their modes).
    mode: &'static str,
    /// Test targets of the tests crate, run one after the other.
    tests: &'static [&'static str],
}

const CHECKS: [Check; 3] = [
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
    // routes alone (both tests compare with `off`).
    Check {
        name: "nat-forward",
        mode: "established",
        tests: &["service_clusterip", "network_policy"],
    },
];
/// The test targets the checks run.
const TESTS: [&str; 3] = ["matrix_smoke", "service_clusterip", "network_policy"];
/// How long one test binary may take (coreutils `timeout`, host and guest alike).
const TEST_TIMEOUT_S: u64 = 300;

/// What a cell must show.
#[derive(Clone, Copy)]
enum Expect {
    Pass,
    /// The test fails, and its output (the agent's log) contains `said`.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "every cell passes today; a kernel that cannot run a mode is listed with one"
        )
    )]
    Fail {
        reason: &'static str,
        said: &'static str,
    },
}

/// A Debian kernel: the newest package `<prefix>N<suffix>` in the archive.
struct Guest {
    prefix: &'static str,
    suffix: &'static str,
    /// One per check, in `CHECKS` order.
    expects: [Expect; 3],
}

const GUESTS: [Guest; 2] = [
    Guest {
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        expects: [Expect::Pass; 3],
    },
    Guest {
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        // No tcx before 6.6: the agent attaches as cls_bpf filters.
        expects: [Expect::Pass; 3],
    },
];

/// This machine's kernel: conntrack built in, tcx; everything must pass.
const HOST: [Expect; 3] = [Expect::Pass; 3];

/// What a cell showed.
enum Outcome {
    Pass,
    Fail(String),
    Expected {
        reason: &'static str,
        said: String,
    },
    /// Expected to fail, but passed: the expectation must become a required pass.
    Passed {
        reason: &'static str,
    },
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

/// Runs the matrix with `agent` (the built release agent) and reports it.
pub fn matrix(agent: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let tests = test_binaries()?;
    let out = root().join("target/matrix");
    let mut columns = vec![host_column(&tests, agent, &out)?];
    let mut kernels = Vec::new();
    for guest in &GUESTS {
        let package = matrix_vm::newest_package(guest.prefix, guest.suffix)?;
        let kernel = matrix_vm::fetch(&package)?;
        columns.push(guest_column(&kernel, guest.expects, &tests, agent, &out)?);
        kernels.push(kernel.version);
    }
    matrix_vm::prune(&kernels)?;
    let report = render(&columns, started.elapsed());
    print!("{report}");
    let path = root().join("target/matrix.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("matrix: written to {}", path.display());
    let failed = columns
        .iter()
        .flat_map(|c| c.cells.iter())
        .filter(|c| matches!(c.outcome, Outcome::Fail(_) | Outcome::Passed { .. }))
        .count();
    ensure!(
        failed == 0,
        "matrix: {failed} required cells failed (see above)"
    );
    Ok(())
}

/// The checks' test binaries (in `TESTS` order), built by `cargo test` (the lab tests'
/// profile), found by asking cargo rather than guessing among target/debug/deps/<name>-<hash>.
fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    println!(
        "matrix: cargo test --no-run --test {}",
        TESTS.join(" --test ")
    );
    let mut args = vec!["test", "--no-run", "--message-format=json"];
    for test in TESTS {
        args.extend(["--test", test]);
    }
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
    TESTS
        .iter()
        .map(|name| {
            messages
                .iter()
                .filter(|m| m["target"]["name"] == *name)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("cargo built no {name} executable"))
        })
        .collect()
}

/// The binaries `check` runs.
fn binaries<'a>(check: &Check, tests: &'a [PathBuf]) -> Vec<&'a Path> {
    check
        .tests
        .iter()
        .filter_map(|name| TESTS.iter().position(|t| t == name))
        .map(|i| tests[i].as_path())
        .collect()
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
fn host_column(tests: &[PathBuf], agent: &Path, out: &Path) -> anyhow::Result<Column> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let dir = fresh_dir(out, "host")?;
    let mut cells = Vec::new();
    for (check, expect) in CHECKS.iter().zip(HOST) {
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
            outcome: classify(expect, code, &text, &log),
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
    kernel: &Kernel,
    expects: [Expect; 3],
    tests: &[PathBuf],
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
    for check in &CHECKS {
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
                "HGW_AGENT_BIN={agent} HGW_MATRIX_MODE={mode} timeout {TEST_TIMEOUT_S} {test} --test-threads=1 >> {log}.log 2>&1 || rc=$?",
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
    let runs: usize = CHECKS.iter().map(|c| c.tests.len()).sum();
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
    for (check, expect) in CHECKS.iter().zip(expects) {
        let log = dir.join(format!("{}.log", check.name));
        let rc =
            std::fs::read_to_string(dir.join(format!("{}.rc", check.name))).unwrap_or_default();
        let mut fields = rc.split_whitespace().map(|f| f.parse::<i64>().ok());
        let (code, secs) = (fields.next().flatten(), fields.next().flatten());
        let outcome = match code {
            Some(code) => classify(
                expect,
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

/// A cell's outcome from the test's exit code and output.
fn classify(expect: Expect, code: Option<i32>, text: &str, log: &Path) -> Outcome {
    match (expect, code) {
        (Expect::Pass, Some(0)) => Outcome::Pass,
        (Expect::Fail { reason, .. }, Some(0)) => Outcome::Passed { reason },
        (Expect::Fail { reason, said }, _) if text.contains(said) => Outcome::Expected {
            reason,
            said: said_line(text, said),
        },
        (expect, code) => {
            let why = match code {
                Some(124) => format!("timed out after {TEST_TIMEOUT_S} s"),
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".to_owned(),
            };
            let wanted = match expect {
                Expect::Pass => String::new(),
                Expect::Fail { said, .. } => format!(" (expected a failure saying \"{said}\")"),
            };
            Outcome::Fail(format!(
                "{why}{wanted}; log {}:\n{}",
                log.display(),
                first_error(text)
            ))
        }
    }
}

/// The agent's own words: the first output line containing `said`, without a log
/// line's `[time LEVEL target]`, an error chain's `N: ` and an `Error: `, at most 300
/// characters.
fn said_line(text: &str, said: &str) -> String {
    let mut line = text
        .lines()
        .find(|l| l.contains(said))
        .unwrap_or(said)
        .trim();
    if line.starts_with('[')
        && let Some((_, rest)) = line.split_once("] ")
    {
        line = rest;
    }
    if let Some((index, rest)) = line.split_once(": ")
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
    {
        line = rest;
    }
    let line = line.strip_prefix("Error: ").unwrap_or(line);
    line.chars().take(300).collect()
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

/// The table (kernel x mode) and, under it, each expected failure's reason and the
/// agent's words, and each required cell's failure.
fn render(columns: &[Column], took: Duration) -> String {
    let mut table = format!(
        "# hgw kernel matrix\n\n| kernel | {} |\n|---|{}\n",
        CHECKS.map(|c| format!("`{}`", c.name)).join(" | "),
        "---|".repeat(CHECKS.len())
    );
    let mut notes = String::new();
    let mut n = 0;
    for column in columns {
        let mut row = format!("| {} |", column.kernel);
        for (check, cell) in CHECKS.iter().zip(&column.cells) {
            let mode = check.name;
            let text = match &cell.outcome {
                Outcome::Pass => format!("pass ({} s)", cell.secs),
                Outcome::Expected { reason, said } => {
                    n += 1;
                    let _ = writeln!(
                        notes,
                        "{n}. {}, `{mode}`: expected failure: {reason}; the agent said: `{said}`",
                        column.kernel
                    );
                    format!("expected failure ({n})")
                }
                Outcome::Passed { reason } => {
                    n += 1;
                    let _ = writeln!(
                        notes,
                        "{n}. {}, `{mode}`: PASSES, but was expected to fail ({reason}): make it a required pass in xtask/src/matrix.rs",
                        column.kernel
                    );
                    format!("**unexpected pass** ({n})")
                }
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
    format!(
        "{table}\n{notes}\n`established` and `all`: the smoke test (tests/tests/matrix_smoke.rs) in that mode; `nat-forward`: tests/tests/service_clusterip.rs and network_policy.rs (each against `off`, kernel routes alone). Logs in {logs}. Took {} s.\n",
        took.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Expect, Outcome, classify, said_line};

    /// What the 6.1 `all` cell expected before the agent attached with cls_bpf.
    const NO_TCX: Expect = Expect::Fail {
        reason: "no tcx before Linux 6.6",
        said: "Parent Qdisc",
    };

    const AGENT_DIED: &str = "Error: agent on node 0 exited while waiting\n\
        --- agent log ---\n\
        [2026-12-05T12:12:05Z INFO  hgw_agent::cni] wrote n1-subnet.env\n\
        Error: hgw-agent run\n\nCaused by:\n    \
        0: attaching program hgw_to_pod: netlink error: [\"Parent Qdisc doesn\\'t exists\"]\n    \
        1: netlink error: [\"Parent Qdisc doesn\\'t exists\"]\n";

    #[test]
    fn an_expected_failure_quotes_the_agent() {
        match classify(NO_TCX, Some(101), AGENT_DIED, Path::new("all.log")) {
            Outcome::Expected { said, .. } => assert_eq!(
                said,
                "attaching program hgw_to_pod: netlink error: [\"Parent Qdisc doesn\\'t exists\"]"
            ),
            _ => panic!("not an expected failure"),
        }
        assert_eq!(
            said_line(
                "[2026-12-05T12:12:05Z ERROR hgw_agent] Error: no conntrack kfunc x",
                "kfunc"
            ),
            "no conntrack kfunc x"
        );
    }

    #[test]
    fn other_failures_and_passes_of_expected_failures_fail_the_cell() {
        let log = Path::new("x.log");
        let other = "Error: `ip link add br0 type bridge` failed: Unknown device type\n";
        assert!(matches!(
            classify(NO_TCX, Some(101), other, log),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            classify(NO_TCX, Some(0), "", log),
            Outcome::Passed { .. }
        ));
        assert!(matches!(
            classify(Expect::Pass, None, "", log),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            classify(Expect::Pass, Some(0), "", log),
            Outcome::Pass
        ));
    }
}
