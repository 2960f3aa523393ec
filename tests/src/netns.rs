//! Entering the lab's network namespaces from Rust code and from commands.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::process::Output;
use std::thread;

use anyhow::{Context as _, bail};

use crate::cmd::{COMMAND_TIMEOUT, netns_command, output_with_timeout};

/// Runs `f` on a thread that has joined network namespace `ns` (`/run/netns/<ns>`).
///
/// Only that thread switches namespace (setns affects the calling thread), so the caller
/// stays where it is. Sockets created inside `f` keep living in `ns` after it returns,
/// which is how a test binds a listener in one namespace and serves it from anywhere.
/// A panic in `f` is propagated to the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::scope(|scope| {
        let handle = scope.spawn(move || -> anyhow::Result<T> {
            // SAFETY: setns only reads the fd, which `file` keeps open for this call; it
            // changes the namespace of this (scoped, short-lived) thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `ip netns exec NS CMD ARGS`, with output captured. A non-zero exit is returned, not
/// an error (callers often expect failure, e.g. a ping that must not get through).
pub fn run_in(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    output_with_timeout(&mut netns_command(ns, cmd, args), COMMAND_TIMEOUT)
}

/// Like [`run_in`], but a non-zero exit is an error carrying the command and its stderr.
pub fn run_in_ok(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    crate::cmd::run_checked(&mut netns_command(ns, cmd, args))
}

/// Names of the network namespaces that `ip netns list` shows.
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = crate::cmd::ip(&["netns", "list"])?;
    // Lines look like `hgw3fa2-n1 (id: 3)` or just `hgw3fa2-n1`.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespace `ns`, ignoring errors: used in cleanup, where it may already be gone.
pub fn delete_namespace_quietly(ns: &str) {
    let _ = crate::cmd::output_with_timeout(
        std::process::Command::new("ip").args(["netns", "delete", ns]),
        COMMAND_TIMEOUT,
    );
}
