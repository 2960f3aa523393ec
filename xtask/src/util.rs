//! Running the tools xtask drives.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo` (the one running us, when there is one) in the workspace root, without the
/// variables `cargo run` set for xtask itself: build scripts that watch them (ring's
/// watches CARGO_MANIFEST_DIR and CARGO_PKG_*) would otherwise see another environment
/// than a plain `cargo build` has, and rebuild, with all that depends on them (rustls,
/// kube: minutes), at every switch between the two.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Whether cargo sets `key` for the package's binary it runs (not for cargo to read).
fn set_by_cargo_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let what = describe(cmd);
    let status = cmd.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` capturing its output; a failure to start is an error, a non-zero exit is not.
pub fn capture(cmd: &mut Command) -> anyhow::Result<Output> {
    let what = describe(cmd);
    cmd.output().with_context(|| format!("starting `{what}`"))
}

/// Set by the SIGINT/SIGTERM handler: the demo and the bench check it between steps and
/// unwind, so that the labs' Drop stops the agents and deletes the namespaces.
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Installs the handler (once per process); it prints `what` when Ctrl-C comes.
    pub fn install(what: &'static str) -> anyhow::Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = Arc::clone(&flag);
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: {what}");
            handler_flag.store(true, Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Interrupt(flag))
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Fails with [`Interrupted`] once Ctrl-C was pressed.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}

/// The error a task unwinds with after Ctrl-C; `main` maps it to exit code 130.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted (lab removed)")
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::set_by_cargo_run;

    #[test]
    fn only_what_cargo_run_sets_for_xtask_is_dropped() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "OUT_DIR",
        ] {
            assert!(set_by_cargo_run(key), "{key}");
        }
        // What the nested cargo reads itself, or passes on to the tools it runs.
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "RUSTFLAGS",
        ] {
            assert!(!set_by_cargo_run(key), "{key}");
        }
    }
}
