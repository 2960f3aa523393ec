//! Debian's kernels for the matrix, booted under QEMU: fetched with `apt-get download`
//! and unpacked into target/kernels/<version>/ (never installed: this machine's /boot
//! and boot loader stay as they are), and booted with this machine's root filesystem
//! shared read-only over 9p, so the guest runs the freshly built agent and tests as they
//! are. Guests have no network device; their labs live inside them.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::util::{capture, describe, root, run};

/// A kernel package unpacked in the cache, with its ELF vmlinux and initramfs.
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.12.118+deb12-amd64`.
    pub version: String,
    dir: PathBuf,
}

impl Kernel {
    /// The unpacked package: `lib/modules/<version>` with a modules.dep, `boot/`.
    fn tree(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
}

/// The newest package in the archive named `<prefix><digits and dots><suffix>`, e.g.
/// `linux-image-6.1.0-` `57` `-amd64-unsigned`: versions move, so ask apt-cache.
pub fn newest_package(prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let out = capture(Command::new("apt-cache").args(["pkgnames", prefix]))?;
    ensure!(out.status.success(), "`apt-cache pkgnames {prefix}` failed");
    let key = |name: &str| -> Option<Vec<u64>> {
        let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
        middle.split(['.', '-']).map(|n| n.parse().ok()).collect()
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|name| Some((key(name)?, name.to_owned())))
        .max()
        .map(|(_, name)| name)
        .with_context(|| {
            format!("apt-cache knows no {prefix}*{suffix} package (is bookworm in the sources, and `apt-get update` done?)")
        })
}

/// The kernel of package `package` (`linux-image-<version>-unsigned`), unpacked into
/// target/kernels/<version>/ unless it already is.
pub fn fetch(package: &str) -> anyhow::Result<Kernel> {
    let version = package
        .strip_prefix("linux-image-")
        .and_then(|v| v.strip_suffix("-unsigned"))
        .with_context(|| format!("{package}: not a linux-image-*-unsigned package"))?
        .to_owned();
    let dir = cache().join(&version);
    let kernel = Kernel { version, dir };
    // Written last: a cache an interrupted run left half done is redone.
    let ready = kernel.dir.join("ready");
    if ready.exists() {
        println!(
            "matrix: kernel {}: cached in {}",
            kernel.version,
            kernel.dir.display()
        );
        // Made again every run: it holds INIT, which changes with this file, and takes
        // a moment.
        build_initramfs(&kernel)?;
        return Ok(kernel);
    }
    println!("matrix: kernel {}: fetching {package}", kernel.version);
    if kernel.dir.exists() {
        std::fs::remove_dir_all(&kernel.dir)
            .with_context(|| format!("removing {}", kernel.dir.display()))?;
    }
    std::fs::create_dir_all(&kernel.dir)
        .with_context(|| format!("creating {}", kernel.dir.display()))?;
    download(package, &kernel.dir)?;
    let deb = deb_file(&kernel.dir)?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(kernel.tree()))?;
    std::fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    // The packages ship no modules.dep (their postinst runs depmod into /lib/modules).
    run(Command::new("depmod")
        .arg("-b")
        .arg(kernel.tree())
        .arg(&kernel.version))?;
    let bzimage = kernel
        .tree()
        .join(format!("boot/vmlinuz-{}", kernel.version));
    extract_vmlinux(&bzimage, &kernel.vmlinux())?;
    build_initramfs(&kernel)?;
    std::fs::write(&ready, "").with_context(|| format!("writing {}", ready.display()))?;
    Ok(kernel)
}

/// Where the unpacked kernels are kept.
fn cache() -> PathBuf {
    root().join("target/kernels")
}

/// Removes the cached kernels other than `keep`: the ones newer packages replaced
/// (each is a few hundred MB).
pub fn prune(keep: &[String]) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(cache()) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.context("listing the kernel cache")?.path();
        if !keep
            .iter()
            .any(|k| path.file_name().is_some_and(|n| n == k.as_str()))
        {
            println!("matrix: removing {} (superseded)", path.display());
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn download(package: &str, dir: &Path) -> anyhow::Result<()> {
    // As root into a directory _apt cannot write: say so, instead of warning about it.
    let get = || {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(dir)
            .args(["-o", "APT::Sandbox::User=root", "download", package]);
        cmd
    };
    if capture(&mut get())?.status.success() {
        return Ok(());
    }
    // The package lists may point at a file the mirror has dropped since.
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(&mut get())
}

fn deb_file(dir: &Path) -> anyhow::Result<PathBuf> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(path);
        }
    }
    bail!("apt-get download left no .deb in {}", dir.display())
}

/// Writes the ELF vmlinux inside `bzimage` to `out`: QEMU boots it through its PVH entry
/// point, which skips seconds of emulated decompression per boot.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let image = std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let le32 = |at: usize| -> Option<usize> {
        let bytes = image.get(at..at + 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    };
    // The x86 boot protocol's setup header: setup_sects at 0x1f1 (0 means 4), then the
    // payload's offset and length (from the protected-mode code, after the setup sectors).
    let sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => bail!("{}: too short for a bzImage", bzimage.display()),
    };
    let (offset, length) = le32(0x248)
        .zip(le32(0x24c))
        .with_context(|| format!("{}: no payload fields", bzimage.display()))?;
    let start = (sects + 1) * 512 + offset;
    let payload = image
        .get(start..start + length)
        .with_context(|| format!("{}: payload out of bounds", bzimage.display()))?;
    let tool = if payload.starts_with(b"\xfd7zXZ\0") {
        "xz"
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        "zstd"
    } else if payload.starts_with(b"\x1f\x8b") {
        "gzip"
    } else {
        bail!(
            "{}: payload compressed with an unknown format",
            bzimage.display()
        );
    };
    // The build appends the uncompressed size (4 bytes) after the compressed stream.
    let stream = &payload[..payload.len().saturating_sub(4)];
    let elf = filter(tool, &["-dc"], stream)?;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "{}: the payload is no ELF vmlinux",
        bzimage.display()
    );
    std::fs::write(out, elf).with_context(|| format!("writing {}", out.display()))
}

/// Runs `tool args` with `input` on stdin and returns its stdout.
fn filter(tool: &str, args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
    let mut stdin = child.stdin.take().context("stdin pipe")?;
    let input = input.to_vec();
    // From a thread: the tool writes while it reads, and a full pipe would deadlock us.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .with_context(|| format!("running `{what}`"))?;
    let _ = writer.join();
    ensure!(
        out.status.success(),
        "`{what}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// What the initramfs needs to mount the 9p shares; those built in (6.12 has virtio_pci
/// in the kernel, 6.1 as a module) are skipped.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Stage 1 of the guest's boot: load the 9p modules, mount this machine's root read-only,
/// tmpfs on /run and /tmp, the writable results share at its host path (`hgw_out`, from
/// the kernel command line), then hand over to `$hgw_out/run.sh` on the new root. A
/// workspace under /tmp (`hgw_root`; a CI clone) would be hidden by the tmpfs: the
/// host's /tmp is bound under /run first and the workspace bound back over the tmpfs.
/// On any failure it powers off, so the host sees an unfinished boot at once.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
fail() { echo "matrix init: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev || fail "mounting /proc /sys /dev"
for m in $(cat /modules/order); do insmod "/modules/$m" || fail "insmod $m"; done
o=trans=virtio,version=9p2000.L,msize=262144,cache=loose
mount -t 9p -o "$o,ro" hostroot /newroot || fail "mounting the host root"
mount -t tmpfs -o mode=755 tmpfs /newroot/run || fail "mounting tmpfs on /run"
mkdir -p /newroot/run/host-tmp && mount --bind /newroot/tmp /newroot/run/host-tmp || fail "binding the host's /tmp"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fail "mounting tmpfs on /tmp"
case "$hgw_root" in /tmp/?*)
  rel=${hgw_root#/tmp/}
  mkdir -p "/newroot/tmp/$rel" && mount --bind "/newroot/run/host-tmp/$rel" "/newroot/tmp/$rel" || fail "binding the workspace $hgw_root"
esac
mount -t 9p -o "$o" results "/newroot$hgw_out" || fail "mounting the results share at $hgw_out"
for d in proc sys dev; do mount --move "/$d" "/newroot/$d" || fail "moving /$d"; done
exec switch_root /newroot /bin/sh "$hgw_out/run.sh"
"#;

/// A cpio archive of busybox (static), the kernel's 9p and virtio modules (decompressed:
/// busybox's insmod reads plain .ko files), their load order and [`INIT`].
fn build_initramfs(kernel: &Kernel) -> anyhow::Result<()> {
    let staging = kernel.dir.join("initramfs");
    for sub in ["bin", "modules", "proc", "sys", "dev", "newroot"] {
        let path = staging.join(sub);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let busybox = staging.join("bin/busybox");
    std::fs::copy("/bin/busybox", &busybox).context("copying /bin/busybox (busybox-static)")?;
    let modules = kernel.tree().join("lib/modules").join(&kernel.version);
    let mut order = String::new();
    for path in module_load_order(&modules, BOOT_MODULES)? {
        let name = module_name(&path);
        let source = modules.join(&path);
        let plain = match path.rsplit_once('.') {
            Some((_, "xz")) => filter("xz", &["-dc"], &read(&source)?)?,
            Some((_, "zst")) => filter("zstd", &["-dc"], &read(&source)?)?,
            _ => read(&source)?,
        };
        let file = format!("{name}.ko");
        let dest = staging.join("modules").join(&file);
        std::fs::write(&dest, plain).with_context(|| format!("writing {}", dest.display()))?;
        order.push_str(&file);
        order.push('\n');
    }
    write(&staging.join("modules/order"), &order, 0o644)?;
    write(&staging.join("init"), INIT, 0o755)?;
    let script = "cd \"$1\" && find . | cpio -o -H newc --quiet > \"$2\"";
    run(Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(&staging)
        .arg(kernel.initramfs()))?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// `kernel/fs/9p/9p.ko.xz` -> `9p`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The module files (relative to `modules`) `wanted` and their dependencies need, in
/// load order, from modules.dep; a wanted module in modules.builtin needs nothing.
fn module_load_order(modules: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep = std::fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules.display()))?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin"))
        .with_context(|| format!("reading {}/modules.builtin", modules.display()))?;
    let mut order: Vec<String> = Vec::new();
    for name in wanted {
        if builtin.lines().any(|l| module_name(l) == *name) {
            continue;
        }
        let (path, deps) = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(path, _)| module_name(path) == *name)
            .with_context(|| format!("module {name}: neither in modules.dep nor built in"))?;
        // modules.dep lists a module's dependencies so that the last loads first.
        for p in deps.split_whitespace().rev().chain([path]) {
            if !order.iter().any(|o| o == p) {
                order.push(p.to_owned());
            }
        }
    }
    Ok(order)
}

/// `text` as one POSIX shell word.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// How one boot ended.
pub struct Boot {
    /// The guest ran its script to the end (and said so through isa-debug-exit).
    pub finished: bool,
    /// The serial console (kernel messages and the script's output).
    pub console: String,
    pub elapsed: Duration,
}

/// Boots `kernel` and runs `script` (POSIX sh, on this machine's root, read-only) in
/// it; `share` is the writable directory the guest sees at the same path. Before the
/// script the guest has a bpffs, and `kernel.modprobe` and the `modprobe` first on the
/// PATH load the package's modules. After `timeout` the guest is killed.
pub fn boot(
    kernel: &Kernel,
    share: &Path,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<Boot> {
    let share = share
        .canonicalize()
        .with_context(|| format!("resolving {}", share.display()))?;
    let out = share.display().to_string();
    // It goes on the kernel command line and into QEMU's comma-separated options.
    ensure!(
        !out.contains(|c: char| c.is_whitespace() || matches!(c, ',' | '\'' | '"')),
        "{out}: the matrix needs a target directory path without spaces, commas or quotes"
    );
    // The guest root has no /lib/modules for this kernel: modprobe reads the cache.
    write(
        &share.join("modprobe"),
        &format!(
            "#!/bin/sh\nexec /sbin/modprobe -d {} \"$@\"\n",
            kernel.tree().display()
        ),
        0o755,
    )?;
    let stage2 = format!(
        "#!/bin/sh\n\
         # Stage 2 of the matrix guest's boot, on this machine's root (read-only).\n\
         echo \"{STAGE2_UP}$(uname -r) up\"\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         echo {out}/modprobe > /proc/sys/kernel/modprobe\n\
         # nf_conntrack is left to the agent (established mode loads it) and the lab's\n\
         # rules; both find the package's modules through the wrapper.\n\
         export PATH={out}:$PATH\n\
         ip link set lo up\n\
         {script}\n\
         sync\n\
         # isa-debug-exit: QEMU exits with 2*0+1, which tells the host the script ran.\n\
         printf '\\000' | dd of=/dev/port bs=1 seek=244 count=1 status=none\n\
         echo o > /proc/sysrq-trigger\n"
    );
    write(&share.join("run.sh"), &stage2, 0o755)?;
    // A guest kernel that dies before the script starts (seen once in ~10 boots: an
    // `int3` Oops in early boot, QEMU's multi-threaded TCG racing the kernel's code
    // patching on the second vCPU) says nothing about hgw: boot once more.
    let first = run_qemu(kernel, &share, &out, timeout)?;
    if first.finished || first.console.contains(STAGE2_UP) {
        return Ok(first);
    }
    println!(
        "matrix: {}: the guest kernel died before the tests started; booting it again",
        kernel.version
    );
    let mut second = run_qemu(kernel, &share, &out, timeout)?;
    second.console = format!(
        "{}\n[matrix: the guest died before the tests; booted again]\n{}",
        first.console, second.console
    );
    second.elapsed += first.elapsed;
    Ok(second)
}

/// What stage 2 prints first: the guest reached this machine's root and the script.
const STAGE2_UP: &str = "matrix: guest ";

/// One QEMU run of the prepared guest.
fn run_qemu(kernel: &Kernel, share: &Path, out: &str, timeout: Duration) -> anyhow::Result<Boot> {
    let console = share.join("console.log");
    let qemu_log = share.join("qemu.log");
    let qemu_stderr = std::fs::File::create(&qemu_log)
        .with_context(|| format!("creating {}", qemu_log.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // TCG, not KVM: this machine's /dev/kvm (kvm-pvm) cannot run Debian's kernels.
    cmd.args([
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2G",
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(kernel.vmlinux())
    .arg("-initrd")
    .arg(kernel.initramfs())
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 quiet hgw_out={out} hgw_root={}",
        crate::util::root().display()
    ))
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ])
    .arg("-virtfs")
    .arg(format!(
        "local,path={out},mount_tag=results,security_model=none,multidevs=remap"
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(qemu_stderr);
    let what = describe(&cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for QEMU")? {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    let mut console = std::fs::read_to_string(&console).unwrap_or_default();
    match status {
        None => console.push_str(&format!("\n[matrix: killed after {timeout:?}]\n")),
        Some(s) if s.code() != Some(1) => {
            console.push_str(&format!(
                "\n[matrix: QEMU exited ({s}): {}]\n",
                stderr.trim()
            ));
        }
        Some(_) => {}
    }
    Ok(Boot {
        finished: status.is_some_and(|s| s.code() == Some(1)),
        console,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::{BOOT_MODULES, module_load_order, sh_quote};

    #[test]
    fn quoted_words_survive_the_shell() {
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
    }

    /// The lines of Debian 6.12's modules.dep and modules.builtin that matter.
    #[test]
    fn dependencies_load_first_and_built_in_modules_not_at_all() {
        let dir = std::env::temp_dir().join(format!("hgw-matrix-mods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/netfs/netfs.ko.xz:\n\
             kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
             kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n\
             kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n",
        )
        .expect("writing modules.dep");
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_pci.ko\n",
        )
        .expect("writing modules.builtin");
        let order = module_load_order(&dir, BOOT_MODULES);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            order.expect("load order"),
            [
                "kernel/fs/netfs/netfs.ko.xz",
                "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/9p/9p.ko.xz",
            ]
        );
    }
}
