//! `cargo xtask ...`: set-up of the eBPF toolchain, build, run, namespace lab, demo, tests.

mod bench;
mod bench_cp;
mod bench_floor;
mod bench_model;
mod bench_report;
mod bench_traffic;
mod demo;
mod matrix;
mod matrix_vm;
mod setup;
mod util;

use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hgw_tests::Lab;

use crate::util::{cargo, run};

#[derive(Parser)]
#[command(about = "hgw's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; quick when done).
    Setup,
    /// Set-up, then build the agent (its build.rs builds the eBPF programs).
    Build,
    /// Build, then run `hgw-agent ARGS` on this machine (e.g. a dev VM).
    Run {
        /// Arguments for hgw-agent, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A namespace lab to poke at by hand.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Set-up, build, then the unit and integration tests (what CI runs).
    Test,
    /// The lab's smoke test in each fast-path mode on this kernel and, under QEMU, on
    /// Debian 12's 6.1 and 6.12 kernels; writes target/matrix.md.
    Matrix(matrix::Only),
    /// A 3-node lab with an agent per node: traffic between all pods, counters.
    Demo,
    /// Build the agent, then its OCI image (no base image pulled): target/oci/hgw-agent/
    /// (an OCI image layout) and target/oci/hgw-agent.tar (the same, as one archive).
    Image,
    /// Benchmark: kernel routing vs hgw's fast path vs a direct veth pair, and the
    /// programs' in-kernel cost; writes bench/results/<date>.{md,json,svg}.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum LabAction {
    /// Build a lab and leave it running; prints its id and namespaces.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
    },
    /// Delete lab ID, or without ID every lab (namespaces named `hgw<hex>-...`).
    Down { id: Option<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            // 128 + SIGINT, as a shell reports a command stopped by Ctrl-C.
            if e.is::<util::Interrupted>() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn dispatch(task: Task) -> anyhow::Result<ExitCode> {
    match task {
        Task::Setup => setup::setup()?,
        Task::Build => build()?,
        Task::Run { args } => {
            build()?;
            let agent = hgw_tests::built_agent_bin();
            // exec: the agent takes this process's place, so signals reach it directly.
            let err = std::process::Command::new(&agent).args(&args).exec();
            return Err(err).with_context(|| format!("executing {}", agent.display()));
        }
        Task::Lab { action } => lab(action)?,
        Task::Test => test()?,
        Task::Matrix(only) => {
            build()?;
            matrix::matrix(&hgw_tests::built_agent_bin(), true, &only)?;
        }
        Task::Image => image()?,
        Task::Demo => return demo::demo(),
        Task::Bench(args) => return bench::bench(args),
    }
    Ok(ExitCode::SUCCESS)
}

fn build() -> anyhow::Result<()> {
    setup::setup()?;
    println!("build: cargo build --release -p hgw-agent");
    run(cargo().args(["build", "--release", "-p", "hgw-agent"]))
}

fn image() -> anyhow::Result<()> {
    build()?;
    let image = xtask::image::build(
        &hgw_tests::built_agent_bin(),
        &util::root().join("target/oci"),
    )?;
    println!(
        "image: {} ({}, {}:{}), layer {:.1} MiB ({:.1} MiB unpacked), and {}",
        image.dir.display(),
        image.digest,
        xtask::image::NAME,
        xtask::image::TAG,
        image.layer_bytes as f64 / 1048576.0,
        image.rootfs_bytes as f64 / 1048576.0,
        image.archive.display()
    );
    Ok(())
}

fn test() -> anyhow::Result<()> {
    build()?;
    let agent = hgw_tests::built_agent_bin();
    println!("test: cargo test (HGW_AGENT_BIN={})", agent.display());
    // The lab tests share the machine's netns list and CPU; one at a time keeps them
    // independent and their timing meaningful. Release, as the agent was just built:
    // the tests reuse its dependencies instead of building them all again unoptimized
    // (about two minutes of a fresh run).
    run(cargo()
        .args(["test", "--release", "--", "--test-threads=1"])
        .env("HGW_AGENT_BIN", &agent))?;
    // The same agent and tests on the kernels operators run (Debian's, in QEMU); this
    // kernel's column would run again what `cargo test` just ran.
    matrix::matrix(&agent, false, &matrix::Only::default())?;
    // Lints fail the run: the workspace (agent, common, xtask, tests), then the eBPF
    // crate alone for its own target, as aya-template's test.sh does.
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(std::process::Command::new("rustup")
        .current_dir(util::root().join("hgw-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"]))?;
    // The benchmark's harness and its path checks, briefly: a mode whose traffic did
    // not take the intended path, or whose programs' statistics did not count it,
    // fails the run; no timing is asserted.
    run(cargo().args([
        "xtask",
        "bench",
        "--smoke",
        "--prog-stats",
        "--out",
        "target/bench-smoke",
    ]))?;
    Ok(())
}

fn lab(action: LabAction) -> anyhow::Result<()> {
    match action {
        LabAction::Up { nodes, pods } => {
            let lab = Lab::up(nodes, pods)?;
            println!("lab {}", lab.id);
            for node in &lab.nodes {
                println!(
                    "  {}  uplink {}  pods {}",
                    node.ns, node.uplink_ip, node.pod_cidr
                );
                for pod in &node.pods {
                    println!("    {}  {}", pod.ns, pod.ip);
                }
            }
            println!("  (switch: {}-sw)", lab.id);
            let id = lab.keep();
            println!("remove with: cargo xtask lab down {id}");
        }
        LabAction::Down { id: Some(id) } => {
            Lab::down(&id)?;
            println!("lab {id}: removed");
        }
        LabAction::Down { id: None } => {
            let ids = Lab::list()?;
            if ids.is_empty() {
                println!("no lab namespaces found");
            }
            for id in ids {
                Lab::down(&id)?;
                println!("lab {id}: removed");
            }
        }
    }
    Ok(())
}
