//! Running commands: in a namespace, with a time limit, with errors that name the command.

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long any single helper command may run before it is killed. Generous: every
/// command the lab runs finishes in well under a second on an idle machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line as a human reads it, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to completion, capturing stdout and stderr; kills it after `timeout`.
/// A non-zero exit is not an error here (see [`run_checked`]).
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{what}`"))?;
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            kill_and_reap(&mut child);
            bail!("`{what}` did not finish within {timeout:?}");
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and fails unless it exits 0; the error carries the command and its stderr.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run_checked(Command::new("ip").args(args))
}

/// `ip netns exec NS CMD ARGS`: the command as a [`Command`], not yet run.
pub fn netns_command(ns: &str, cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, cmd]).args(args);
    c
}

/// Waits for `child` up to `timeout`; `None` if it is still running then.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL and reap, ignoring errors: used on paths that are already failing or cleaning up.
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}
