//! `cargo xtask image`: the agent's OCI image, made from this host's files, with no base
//! image to pull (no image registry is reachable from the machines that build it).
//!
//! One layer: `/usr/local/bin/hgw-agent`, what the agent runs (`nft`; `iptables` and
//! `ip6tables` as iptables-nft, for `setup_node` and `uninstall`, with xtables' extension
//! modules, which it loads by name at run time), the shared libraries those need as
//! `ldd` names them, the ELF interpreter included, each at the path the host has it,
//! symlinks and all (Debian's merged /usr: `/lib64` -> `usr/lib64` ->
//! `../lib/x86_64-linux-gnu/...`). Written as an OCI image layout, a directory and the
//! same as a tar (an `oci-archive`), byte for byte the same for the same inputs: sorted
//! entries, uid 0, fixed mtimes, gzip without a name or time.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_json::json;

/// The image's name and tag: the DaemonSets' `image:` (deploy/).
pub const NAME: &str = "hgw-agent";
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// Where the agent sits in the image: the DaemonSets' `command:`.
pub const AGENT_PATH: &str = "/usr/local/bin/hgw-agent";
/// The agent runs tools by name; this PATH finds them.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The tools the agent runs (hgw-agent/src: `Command::new`), as found on this host's PATH.
const TOOLS: &[&str] = &["nft", "xtables-nft-multi"];
/// iptables-nft answers to these names (`xtables-nft-multi` dispatches on argv[0]).
const TOOL_LINKS: &[(&str, &str)] = &[
    ("usr/sbin/iptables", "xtables-nft-multi"),
    ("usr/sbin/ip6tables", "xtables-nft-multi"),
];
/// xtables' extensions (`-m comment`, `-j ACCEPT` ...): dlopen'ed by name, unseen by ldd.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
/// Every file's mtime (the epoch: nothing in the image depends on when it was built).
const MTIME: u64 = 0;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What [`build`] wrote.
#[derive(Debug)]
pub struct Image {
    /// The OCI image layout directory (`skopeo copy oci:DIR:TAG ...`).
    pub dir: PathBuf,
    /// The same layout as one tar (`podman load -i`, `skopeo copy oci-archive:...`).
    pub archive: PathBuf,
    /// `sha256:...` of the manifest: the image's digest.
    pub digest: String,
    /// The layer, compressed (what a node pulls).
    pub layer_bytes: u64,
    /// The root filesystem, uncompressed.
    pub rootfs_bytes: u64,
}

/// One path of the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    /// A copy of the host's file, with its mode.
    File(PathBuf),
    Symlink(PathBuf),
}

/// Builds the image of `agent` into `out` (`out/NAME/` and `out/NAME.tar`), replacing
/// what is there.
pub fn build(agent: &Path, out: &Path) -> anyhow::Result<Image> {
    let mut root = Rootfs::default();
    root.copy_to(agent, Path::new(AGENT_PATH))?;
    let mut elves = vec![agent.to_owned()];
    for tool in TOOLS {
        let path = on_host_path(tool)?;
        root.copy(&path)?;
        elves.push(path);
    }
    for (link, target) in TOOL_LINKS {
        root.insert(PathBuf::from(link), Entry::Symlink(target.into()));
    }
    let modules = std::fs::read_dir(XTABLES_DIR)
        .with_context(|| format!("reading {XTABLES_DIR} (iptables' extensions)"))?;
    for module in modules {
        let path = module?.path();
        root.copy(&path)?;
        elves.push(path);
    }
    for elf in &elves {
        for lib in needed_libraries(elf)? {
            root.copy(&lib)?;
        }
    }
    // Mount points and scratch space a runtime expects to find.
    for dir in ["etc", "proc", "sys", "dev", "run", "tmp", "var"] {
        root.insert(PathBuf::from(dir), Entry::Dir);
    }

    let layer_tar = root.tar()?;
    let rootfs_bytes = layer_tar.len() as u64;
    let layer = gzip(&layer_tar)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [AGENT_PATH],
            "Cmd": ["run", "--config", "/etc/hgw/hgw.toml"],
            "Env": [format!("PATH={PATH}")],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer_tar)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config),
        "layers": [descriptor(MEDIA_LAYER, &layer)],
    }))?;
    let mut index_entry = descriptor(MEDIA_MANIFEST, &manifest);
    index_entry["annotations"] = json!({"org.opencontainers.image.ref.name": TAG});
    index_entry["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [index_entry],
    }))?;

    // The layout: every file, by its path in the layout.
    let mut layout: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    layout.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    layout.insert("index.json".into(), index);
    let digest = sha256(&manifest);
    for blob in [manifest, config, layer.clone()] {
        let hex = sha256(&blob).trim_start_matches("sha256:").to_owned();
        layout.insert(Path::new("blobs/sha256").join(hex), blob);
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let dir = out.join(NAME);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut archive = Tar::default();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, bytes) in &layout {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
        for ancestor in path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
        {
            dirs.insert(ancestor.to_owned());
        }
    }
    for (path, entry) in dirs
        .into_iter()
        .map(|d| (d, None))
        .chain(layout.iter().map(|(p, b)| (p.clone(), Some(b))))
        .collect::<BTreeMap<_, _>>()
    {
        match entry {
            None => archive.dir(&path)?,
            Some(bytes) => archive.file(&path, 0o644, bytes)?,
        }
    }
    let archive_path = out.join(format!("{NAME}.tar"));
    std::fs::write(&archive_path, archive.finish())
        .with_context(|| format!("writing {}", archive_path.display()))?;
    Ok(Image {
        dir,
        archive: archive_path,
        digest,
        layer_bytes: layer.len() as u64,
        rootfs_bytes,
    })
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": sha256(blob), "size": blob.len()})
}

fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    // No file name and mtime 0 in the header: the same tar gives the same blob.
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// `name` in the directories of this host's PATH where Debian installs system tools.
fn on_host_path(name: &str) -> anyhow::Result<PathBuf> {
    PATH.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found in {PATH} (cargo xtask setup installs nftables and iptables)")
        })
}

/// The shared objects `elf` loads, the ELF interpreter included, as `ldd` finds them on
/// this host; none for a static executable.
fn needed_libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .with_context(|| format!("running ldd {}", elf.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}{}",
            elf.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        ensure!(!line.contains("not found"), "ldd {}: {line}", elf.display());
        // `libc.so.6 => /lib/.../libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`;
        // linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The root filesystem being assembled: image paths (relative, no leading `/`).
#[derive(Default)]
struct Rootfs {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Rootfs {
    fn insert(&mut self, path: PathBuf, entry: Entry) {
        for parent in path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
        {
            self.entries.entry(parent.to_owned()).or_insert(Entry::Dir);
        }
        self.entries.insert(path, entry);
    }

    /// The host file `src` at `dest` in the image.
    fn copy_to(&mut self, src: &Path, dest: &Path) -> anyhow::Result<()> {
        ensure!(src.is_file(), "{} is not a file", src.display());
        let dest = dest.strip_prefix("/").unwrap_or(dest).to_owned();
        self.insert(dest, Entry::File(src.to_owned()));
        Ok(())
    }

    /// The host path `path` at the same path in the image, and every symlink on the way
    /// to the file it names, as symlinks, so each name a binary or ld.so uses resolves.
    fn copy(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut path = path.to_owned();
        // A cycle of symlinks would never end; the kernel gives up after 40.
        for _ in 0..40 {
            ensure!(path.is_absolute(), "{}: not absolute", path.display());
            let mut walked = PathBuf::from("/");
            let mut components = path.components().skip(1);
            let mut next = None;
            for component in components.by_ref() {
                walked.push(component);
                let meta = std::fs::symlink_metadata(&walked)
                    .with_context(|| format!("reading {}", walked.display()))?;
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&walked)?;
                    let parent = walked.parent().unwrap_or(Path::new("/"));
                    let resolved = normalize(&parent.join(&target));
                    self.insert(relative(&walked), Entry::Symlink(target));
                    next = Some(components.fold(resolved, |p, c| p.join(c)));
                    break;
                }
            }
            match next {
                Some(resolved) => path = resolved,
                None => return self.copy_to(&walked, &walked),
            }
        }
        bail!("{}: too many levels of symbolic links", path.display())
    }

    /// The layer: a ustar archive of every entry, in path order.
    fn tar(&self) -> anyhow::Result<Vec<u8>> {
        let mut tar = Tar::default();
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir => tar.dir(path)?,
                Entry::Symlink(target) => tar.symlink(path, target)?,
                Entry::File(src) => {
                    let bytes =
                        std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    let mode = std::fs::metadata(src)?.permissions().mode();
                    // Only the permission bits: no set-id bit travels into the image.
                    tar.file(path, mode & 0o777, &bytes)?;
                }
            }
        }
        Ok(tar.finish())
    }
}

fn relative(path: &Path) -> PathBuf {
    path.strip_prefix("/").unwrap_or(path).to_owned()
}

/// `a/b/../c` -> `a/c`, without the file system: the directories before a symlink were
/// walked already, so `..` means their parent.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A ustar writer: what image layers and layouts need (directories, files, symlinks),
/// owned by root, at [`MTIME`].
#[derive(Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    fn dir(&mut self, path: &Path) -> anyhow::Result<()> {
        self.header(path, 0o755, 0, b'5', Path::new(""))
    }

    fn file(&mut self, path: &Path, mode: u32, bytes: &[u8]) -> anyhow::Result<()> {
        self.header(path, mode, bytes.len() as u64, b'0', Path::new(""))?;
        self.bytes.extend_from_slice(bytes);
        self.pad();
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &Path) -> anyhow::Result<()> {
        self.header(path, 0o777, 0, b'2', target)
    }

    fn header(
        &mut self,
        path: &Path,
        mode: u32,
        size: u64,
        kind: u8,
        link: &Path,
    ) -> anyhow::Result<()> {
        let mut name = path.to_str().context("a non-UTF-8 path")?.to_owned();
        if kind == b'5' {
            name.push('/');
        }
        let link = link.to_str().context("a non-UTF-8 link")?;
        let mut h = [0u8; 512];
        // Names over 100 bytes go into the prefix field, split at a '/'.
        let (prefix, name) = if name.len() <= 100 {
            ("", name.as_str())
        } else {
            let split = name[..name.len().min(156)]
                .rfind('/')
                .filter(|&i| name.len() - i - 1 <= 100)
                .with_context(|| format!("{name}: too long for ustar"))?;
            (&name[..split], &name[split + 1..])
        };
        ensure!(link.len() <= 100, "{link}: link target too long for ustar");
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], MTIME);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[329..337].copy_from_slice(b"0000000\0");
        h[337..345].copy_from_slice(b"0000000\0");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        // The checksum is taken with its own field as spaces.
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        self.bytes.extend_from_slice(&h);
        Ok(())
    }

    fn pad(&mut self) {
        let rest = self.bytes.len() % 512;
        if rest != 0 {
            self.bytes.resize(self.bytes.len() + 512 - rest, 0);
        }
    }

    /// The archive, with its end: two zero blocks.
    fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 1024, 0);
        self.bytes
    }
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    field[..width].copy_from_slice(&text.as_bytes()[text.len() - width..]);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_parent_components() {
        assert_eq!(
            normalize(Path::new("/usr/lib64/../lib/x86_64-linux-gnu/ld.so")),
            Path::new("/usr/lib/x86_64-linux-gnu/ld.so")
        );
    }

    #[test]
    fn tar_headers_read_back_with_gnu_tar() -> anyhow::Result<()> {
        let mut tar = Tar::default();
        tar.dir(Path::new("usr"))?;
        tar.file(Path::new("usr/a"), 0o755, b"hello")?;
        tar.symlink(Path::new("lib"), Path::new("usr/lib"))?;
        let long = format!("{}/f", "d".repeat(120));
        tar.file(Path::new(&long), 0o644, b"x")?;
        let bytes = tar.finish();
        let file = std::env::temp_dir().join(format!("xtask-tar-{}.tar", std::process::id()));
        std::fs::write(&file, &bytes)?;
        let out = Command::new("tar")
            .arg("-tvf")
            .arg(&file)
            .arg("--numeric-owner")
            .output()?;
        let _ = std::fs::remove_file(&file);
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            listing.lines().any(
                |l| l.starts_with("-rwxr-xr-x 0/0") && l.ends_with(" 5 1970-01-01 00:00 usr/a")
            ),
            "{listing}"
        );
        assert!(listing.contains("lib -> usr/lib"), "{listing}");
        assert!(listing.contains(&long), "{listing}");
        Ok(())
    }
}
