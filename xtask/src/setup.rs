//! `cargo xtask setup`: the eBPF toolchain and the lab's tools, from rustup components,
//! Debian packages and crates only. Each step checks first, so a second run is quick.

use std::process::Command;

use crate::util::{capture, cargo, run};

/// Debian packages: LLVM 22 for bpf-linker (matches nightly's LLVM), the lab's tools.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "iputils-ping",
    "iptables",
    "nftables",
    "iperf3",
    // The control-plane tests run a real etcd; the etcd-client crate needs protoc.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "bpftool",
    // Conntrack: inspect and seed entries (program tests, netfilter lab tests).
    "conntrack",
    // The CNI plugins kubelet calls (bridge, host-local, portmap) for hostPort tests.
    "containernetworking-plugins",
    // tcp_reopen.rs binds a TCP client to a fixed port, which std cannot.
    "python3",
    // deploy_files.rs checks deploy/hgw.service with systemd-analyze verify.
    "systemd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    debian_packages()?;
    bpf_linker()
}

/// `-Z build-std=core` for the bpf target needs nightly's rust-src.
fn rust_src() -> anyhow::Result<()> {
    let out = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    let installed = out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim().starts_with("rust-src"));
    if installed {
        println!("setup: rust-src (nightly): installed");
        return Ok(());
    }
    println!("setup: rust-src (nightly): adding");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn debian_packages() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for pkg in DEBIAN_PACKAGES {
        let out = capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        println!(
            "setup: Debian packages: installed ({})",
            DEBIAN_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: Debian packages: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// bpf-linker built against Debian's LLVM 22: its default feature wants LLVM 23.
fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let wanted_minor = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map_or(BPF_LINKER_VERSION, |(m, _)| m);
    if let Some(v) = &version
        && v.split_whitespace()
            .nth(1)
            .is_some_and(|n| n.starts_with(&format!("{wanted_minor}.")))
    {
        println!("setup: bpf-linker: installed ({v})");
        return Ok(());
    }
    println!(
        "setup: bpf-linker: installing {BPF_LINKER_VERSION} (found {})",
        version.as_deref().unwrap_or("none")
    );
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}
