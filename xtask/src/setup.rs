//! `cargo xtask setup`: the eBPF toolchain and the lab's tools, from rustup components,
//! Debian packages and crates only. Each step checks first, so a second run is quick.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

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
    // ipvs.rs adds a virtual service as kube-proxy's ipvs mode does.
    "ipvsadm",
    // The CNI plugins kubelet calls (bridge, host-local, portmap) for hostPort tests.
    "containernetworking-plugins",
    // tcp_reopen.rs binds a TCP client to a fixed port, which std cannot.
    "python3",
    // deploy_files.rs checks deploy/hgw.service with systemd-analyze verify.
    "systemd",
    // The lab's Kubernetes API server makes its TLS certificates with openssl.
    "openssl",
    // oci_image.rs enters the image's root with capsh --chroot, then cuts the bounding
    // set to the DaemonSet's capabilities (setpriv, once it has, cannot chroot).
    "libcap2-bin",
];
/// Commands and the Debian package bringing each, installed only where the command is
/// missing: kube_api_server.rs runs kubectl against the lab's API server, and a machine
/// may have it from another package (`kubectl` of Google Cloud's apt repository, as this
/// machine image has), which owns /usr/bin/kubectl too: installing Debian's would fail.
const COMMAND_PACKAGES: &[(&str, &str)] = &[("kubectl", "kubernetes-client")];
/// The kernel matrix's tools (xtask/src/matrix_vm.rs): QEMU, and for the guests'
/// initramfs and modules busybox (static), cpio, kmod's depmod and modprobe, and the
/// decompressors of Debian's kernels and modules. Without recommends: QEMU's would pull
/// in a desktop's worth of packages.
const MATRIX_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
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
    let mut missing = not_installed(DEBIAN_PACKAGES)?;
    missing.extend(
        COMMAND_PACKAGES
            .iter()
            .filter(|(command, _)| !on_path(command))
            .map(|(_, pkg)| *pkg),
    );
    let lean = not_installed(MATRIX_PACKAGES)?;
    if missing.is_empty() && lean.is_empty() {
        println!(
            "setup: Debian packages: installed ({} {})",
            DEBIAN_PACKAGES.join(" "),
            MATRIX_PACKAGES.join(" ")
        );
        return Ok(());
    }
    install(&Host::system(), &missing, &lean)
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

fn not_installed<'a>(packages: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let mut missing = Vec::new();
    for pkg in packages {
        let out = capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(*pkg);
        }
    }
    Ok(missing)
}

/// The host's tools and files setup's install uses; tests point them at fakes.
struct Host {
    apt_get: PathBuf,
    systemctl: PathBuf,
    policy_rc_d: PathBuf,
    systemd_run_dir: PathBuf,
}

impl Host {
    fn system() -> Host {
        Host {
            apt_get: "apt-get".into(),
            systemctl: "systemctl".into(),
            policy_rc_d: "/usr/sbin/policy-rc.d".into(),
            systemd_run_dir: "/run/systemd/system".into(),
        }
    }
}

/// Packages whose postinst enables and starts a service setup must not leave behind:
/// Debian's etcd-server serves an unauthenticated etcd on localhost:2379, and the tests
/// start their own etcd anyway.
const NO_SERVICE: &[(&str, &str)] = &[("etcd-server", "etcd.service")];

/// Installs `missing`, and `lean` without their recommended packages.
fn install(host: &Host, missing: &[&str], lean: &[&str]) -> anyhow::Result<()> {
    println!(
        "setup: Debian packages: installing {}",
        [missing, lean].concat().join(" ")
    );
    run(Command::new(&host.apt_get)
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    {
        let _no_starts = NoStarts::write(&host.policy_rc_d)?;
        for (packages, flags) in [(missing, &[][..]), (lean, &["--no-install-recommends"][..])] {
            if packages.is_empty() {
                continue;
            }
            run(Command::new(&host.apt_get)
                .args(["install", "-y"])
                .args(flags)
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    // Only what setup itself just installed: an etcd the admin had before stays as it was.
    for (pkg, unit) in NO_SERVICE.iter().filter(|(p, _)| missing.contains(p)) {
        // The postinst enabled the unit for the next boot; disabling works offline too.
        run(Command::new(&host.systemctl).args(["disable", unit]))?;
        // An admin's own policy-rc.d may have let it start.
        if host.systemd_run_dir.is_dir() {
            run(Command::new(&host.systemctl).args(["stop", unit]))?;
        }
        println!("setup: {pkg}: installed with {unit} disabled and stopped");
    }
    Ok(())
}

/// A policy-rc.d that denies every service start while apt-get installs (what Debian's
/// chroots and images do), removed when dropped. An existing one is the admin's: kept.
struct NoStarts(Option<PathBuf>);

impl NoStarts {
    fn write(path: &Path) -> anyhow::Result<NoStarts> {
        if path.symlink_metadata().is_ok() {
            println!("setup: keeping the existing {}", path.display());
            return Ok(NoStarts(None));
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Whatever happens next, the drop removes it.
        let guard = NoStarts(Some(path.to_owned()));
        file.write_all(
            b"#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages.\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(guard)
    }
}

impl Drop for NoStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0
            && let Err(e) = std::fs::remove_file(path)
        {
            eprintln!("setup: removing {}: {e}; remove it by hand", path.display());
        }
    }
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    use super::{Host, install};

    /// A temporary directory with fake `apt-get` and `systemctl` that log what they were
    /// asked, and what the policy-rc.d in place says about starting etcd during install.
    struct Fake {
        dir: PathBuf,
        host: Host,
    }

    impl Fake {
        fn new(name: &str, systemd_running: bool) -> Fake {
            let dir = std::env::temp_dir().join(format!("hgw-setup-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("creating the test directory");
            let host = Host {
                apt_get: dir.join("apt-get"),
                systemctl: dir.join("systemctl"),
                policy_rc_d: dir.join("policy-rc.d"),
                systemd_run_dir: dir.join("run-systemd-system"),
            };
            let log = dir.join("log");
            let policy = &host.policy_rc_d;
            script(
                &host.apt_get,
                &format!(
                    "echo \"apt-get $*\" >> {log:?}\n\
                     if [ \"$1\" = install ]; then\n\
                     if [ -x {policy:?} ]; then {policy:?} etcd.service start; \
                     echo \"policy etcd.service start: $?\" >> {log:?};\n\
                     else echo 'policy: none' >> {log:?}; fi\nfi\n"
                ),
            );
            script(
                &host.systemctl,
                &format!("echo \"systemctl $*\" >> {log:?}\n"),
            );
            if systemd_running {
                fs::create_dir_all(&host.systemd_run_dir)
                    .expect("creating the fake /run/systemd/system");
            }
            Fake { dir, host }
        }

        fn log(&self) -> Vec<String> {
            fs::read_to_string(self.dir.join("log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn script(path: &Path, body: &str) {
        fs::write(path, format!("#!/bin/sh\n{body}")).expect("writing a fake tool");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod a fake tool");
    }

    #[test]
    fn etcd_server_is_installed_neither_started_nor_enabled() {
        let fake = Fake::new("etcd", true);
        install(&fake.host, &["etcd-server", "iperf3"], &[]).expect("install");
        assert_eq!(
            fake.log(),
            [
                "apt-get update",
                "apt-get install -y etcd-server iperf3",
                "policy etcd.service start: 101",
                "systemctl disable etcd.service",
                "systemctl stop etcd.service",
            ]
        );
        assert!(
            !fake.host.policy_rc_d.exists(),
            "setup's policy-rc.d left behind"
        );
    }

    #[test]
    fn without_a_running_systemd_nothing_is_stopped() {
        let fake = Fake::new("offline", false);
        install(&fake.host, &["etcd-server"], &[]).expect("install");
        assert_eq!(
            fake.log(),
            [
                "apt-get update",
                "apt-get install -y etcd-server",
                "policy etcd.service start: 101",
                "systemctl disable etcd.service",
            ]
        );
    }

    #[test]
    fn an_etcd_installed_before_and_an_admins_policy_are_left_alone() {
        let fake = Fake::new("admin", true);
        script(&fake.host.policy_rc_d, "exit 0\n");
        install(&fake.host, &["iperf3"], &[]).expect("install");
        assert_eq!(
            fake.log(),
            [
                "apt-get update",
                "apt-get install -y iperf3",
                "policy etcd.service start: 0",
            ]
        );
        assert_eq!(
            fs::read_to_string(&fake.host.policy_rc_d).expect("the admin's policy-rc.d"),
            "#!/bin/sh\nexit 0\n"
        );
    }

    #[test]
    fn the_matrix_tools_come_without_recommends_and_without_service_starts() {
        let fake = Fake::new("lean", true);
        install(&fake.host, &[], &["qemu-system-x86", "cpio"]).expect("install");
        assert_eq!(
            fake.log(),
            [
                "apt-get update",
                "apt-get install -y --no-install-recommends qemu-system-x86 cpio",
                "policy etcd.service start: 101",
            ]
        );
    }
}
