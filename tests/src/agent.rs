//! A running `hgw-agent` inside one of the lab's node namespaces.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cmd::{describe, kill_and_reap, output_with_timeout, wait_timeout};

/// The agent's own status type: what `hgw-agent status --json` prints.
pub use hgw_common::status::{PeerStatus, Status};

/// How long `hgw-agent status` may take: the agent answers from memory.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent gets to exit after SIGTERM before it counts as hung.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `cargo build --release -p hgw-agent` (so `cargo xtask build`) puts the agent:
/// `release/hgw-agent` in `$CARGO_TARGET_DIR` (relative to the workspace, as cargo takes
/// it) or in `<workspace>/target`.
pub fn built_agent_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    // join keeps an absolute CARGO_TARGET_DIR as it is.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |d| workspace.join(d));
    target.join("release/hgw-agent")
}

/// The agent the lab runs: `$HGW_AGENT_BIN`, else [`built_agent_bin`].
pub fn agent_bin() -> PathBuf {
    std::env::var_os("HGW_AGENT_BIN").map_or_else(built_agent_bin, PathBuf::from)
}

/// Runs `hgw-agent uninstall --pin-dir PINS --status-socket SOCKET` in `ns`, failing if
/// it fails.
pub fn uninstall(ns: &str, pins: &Path, socket: &Path) -> anyhow::Result<std::process::Output> {
    crate::run_in_ok(
        ns,
        &agent_bin().to_string_lossy(),
        &[
            "uninstall",
            "--pin-dir",
            &pins.to_string_lossy(),
            "--status-socket",
            &socket.to_string_lossy(),
        ],
    )
}

/// `hgw-agent status --json --status-socket SOCKET`, parsed: the status of the agent
/// listening there, whoever started it.
pub fn status_at(socket: &Path) -> anyhow::Result<Status> {
    let bin = check_agent_bin()?;
    let mut cmd = Command::new(&bin);
    cmd.args(["status", "--json", "--status-socket"])
        .arg(socket);
    let what = describe(&cmd);
    let out = output_with_timeout(&mut cmd, STATUS_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`{what}` printed no status JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Polls [`status_at`] until the agent at `socket` is ready, for an agent a test started
/// as `child` (not through the lab); fails at once when `child` exits, and on timeout,
/// with `log()`.
pub fn wait_ready_at(
    socket: &Path,
    child: &mut Child,
    timeout: Duration,
    log: impl Fn() -> String,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = status_at(socket)
            && status.ready
        {
            return Ok(status);
        }
        if let Some(exit) = child.try_wait()? {
            bail!("the agent exited ({exit}):\n{}", log());
        }
        if Instant::now() >= deadline {
            bail!("not ready within {timeout:?}:\n{}", log());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A process's credentials, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The effective uid.
    pub uid: u32,
    /// Capability sets, as bit masks.
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
    pub inheritable: u64,
    pub ambient: u64,
    pub no_new_privs: bool,
}

/// The credentials of process `pid`.
pub fn credentials(pid: u32) -> anyhow::Result<Credentials> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let mask = |name: &str| -> anyhow::Result<u64> { Ok(u64::from_str_radix(field(name)?, 16)?) };
    Ok(Credentials {
        uid: field("Uid:")?
            .split_whitespace()
            .nth(1)
            .context("no effective uid")?
            .parse()?,
        effective: mask("CapEff:")?,
        permitted: mask("CapPrm:")?,
        bounding: mask("CapBnd:")?,
        inheritable: mask("CapInh:")?,
        ambient: mask("CapAmb:")?,
        no_new_privs: field("NoNewPrivs:")? == "1",
    })
}

/// Fails with a hint when the agent binary has not been built.
pub(crate) fn check_agent_bin() -> anyhow::Result<PathBuf> {
    let bin = agent_bin();
    if !bin.is_file() {
        bail!(
            "agent binary {} not found: run `cargo xtask build` or set HGW_AGENT_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// One agent process started by [`crate::Lab::start_agent`].
#[derive(Debug)]
pub struct Agent {
    /// Index of the lab node it runs on.
    pub node: usize,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Agent {
    /// Starts `ip netns exec NS BIN ARGS` with stdout and stderr appended to `log`; `BIN`
    /// is `bin`, else [`agent_bin`].
    pub(crate) fn spawn(
        node: usize,
        ns: &str,
        bin: Option<&Path>,
        args: &[&str],
        socket: PathBuf,
        log: PathBuf,
    ) -> anyhow::Result<Agent> {
        let bin = match bin {
            Some(bin) => bin.to_owned(),
            None => check_agent_bin()?,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening agent log {}", log.display()))?;
        let err = out
            .try_clone()
            .context("duplicating the agent log handle")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // `ip netns exec` execs the agent in place, so the child's pid is the agent's.
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", describe(&cmd)))?;
        Ok(Agent {
            node,
            child,
            socket,
            log,
            exit: None,
        })
    }

    /// Its status socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `hgw-agent status --json --status-socket S`, parsed.
    pub fn status(&self) -> anyhow::Result<Status> {
        status_at(&self.socket)
    }

    /// Polls [`Agent::status`] until it reports ready.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<Status> {
        self.wait_for(timeout, |s| s.ready)
    }

    /// Polls [`Agent::status`] until `pred` holds. Fails at once if the agent exits, and
    /// on timeout; both errors include the last status (or its error) and the agent's log.
    /// Takes `&self`: it only reads the process state, so an exit seen here is not
    /// remembered (call [`Agent::stop`] to reap).
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status() {
                Ok(status) if pred(&status) => return Ok(status),
                // The JSON, as `hgw-agent status --json` printed it: every field.
                Ok(status) => serde_json::to_string(&status).unwrap_or_default(),
                Err(e) => format!("{e:#}"),
            };
            if !self.is_running() {
                bail!(
                    "agent on node {} exited while waiting; last status: {last}\n--- agent log ---\n{}",
                    self.node,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on node {}: condition not met within {timeout:?}; last status: {last}\n--- agent log ---\n{}",
                    self.node,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process is still running (a process that exited but was not reaped
    /// yet counts as gone).
    pub fn is_running(&self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        // Signal 0 only checks the pid; a zombie still has it, so also look at its state.
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state is the first field after the `(comm)`.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        !matches!(state, None | Some(None) | Some(Some('Z' | 'X')))
    }

    /// SIGTERM, then waits up to 10 s for the exit. Calling it again returns the same
    /// status. On timeout the agent is killed and an error (with its log) returned.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        match wait_timeout(&mut self.child, STOP_TIMEOUT)? {
            Some(status) => {
                self.exit = Some(status);
                Ok(status)
            }
            None => {
                kill_and_reap(&mut self.child);
                bail!(
                    "agent on node {} did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed)\n--- agent log ---\n{}",
                    self.node,
                    self.log()
                );
            }
        }
    }

    /// SIGKILL and reap: a crash, as far as the kernel is concerned.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.child.kill().context("killing the agent")?;
        let status = self.child.wait().context("reaping the agent")?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Cleanup path for Drop: SIGTERM, a short grace period, then SIGKILL. Never fails.
    pub(crate) fn terminate(&mut self) {
        if self.exit.is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        match wait_timeout(&mut self.child, Duration::from_secs(5)) {
            Ok(Some(status)) => self.exit = Some(status),
            _ => kill_and_reap(&mut self.child),
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
        // not yet reaped (exit is None), so it cannot have been reused.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A counter from one agent status, as `FAMILY.NAME` (`ipv4.fwd_to_peer`,
/// `ipv6.pass_ttl`, `other.pass_not_ip`), 0 if absent.
pub fn counter(status: &Status, name: &str) -> u64 {
    let (family, name) = name
        .split_once('.')
        .unwrap_or_else(|| panic!("counter {name:?}: expected FAMILY.NAME"));
    status.counter(family, name)
}

/// A counter summed over several agents' statuses.
pub fn counter_sum(statuses: &[Status], name: &str) -> u64 {
    statuses.iter().map(|s| counter(s, name)).sum()
}

/// The peer entry for `pod_cidr`; panics (with the status) when there is none.
pub fn peer<'a>(status: &'a Status, pod_cidr: &str) -> &'a PeerStatus {
    status
        .peer(pod_cidr)
        .unwrap_or_else(|| panic!("no peer entry for {pod_cidr} in:\n{status}"))
}
