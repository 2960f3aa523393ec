//! Network namespaces for the program tests (tests/programs, programs_conntrack.rs).
//!
//! BPF_PROG_TEST_RUN runs a program in the calling thread's network namespace: its
//! `bpf_fib_lookup` sees that namespace's devices, routes, rules and neighbours, its
//! conntrack lookups that namespace's table, and the skb's device (the `__sk_buff`
//! context's `ifindex`) must be one of that namespace's. A [`ProgNetns`] realizes a node
//! for real, with the interface indexes and MACs the tests write into the maps: a bridge
//! with its pods' host veths as ports, an uplink, forwarding on. The tests add the
//! routes and neighbours hgw would have the kernel hold, enter the namespace from the
//! thread that runs the programs ([`ProgNetns::enter`]) and drop it at the end, which
//! brings the thread back and deletes the namespace, also when the test panics.
//!
//! The host's own interfaces, routes and sysctls are never touched: every command runs
//! inside the namespace (`ip -n`, or a thread that joined it).

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

use crate::cmd::ip;

/// What the namespaces' names start with: `hgwprog-<pid>-<n>`.
pub const PREFIX: &str = "hgwprog-";
/// The bridge's name (the pods' gateway, cni0 as flannel names it).
pub const BRIDGE: &str = "cni0";
/// The uplink's name.
pub const UPLINK: &str = "eth0";
/// What is added to a device's index to get its veth peer's: the other ends stay in the
/// namespace (so that each device has a carrier) without addresses (so that no pod
/// address is local), out of the way of the indexes the tests choose.
pub const PEER_INDEX_OFFSET: u32 = 1000;

/// The name of the host veth (a port of the bridge) with interface index `index`.
pub fn port_name(index: u32) -> String {
    format!("veth{index}")
}

/// A device of the node: its interface index, MAC, MTU and addresses (`addr/len`).
pub struct Device<'a> {
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addrs: &'a [&'a str],
}

/// A node's devices as hgw's maps name them.
pub struct Node<'a> {
    /// [`BRIDGE`], a Linux bridge.
    pub bridge: Device<'a>,
    /// [`UPLINK`], a veth.
    pub uplink: Device<'a>,
    /// The interface indexes of the pods' host veths ([`port_name`]), ports of the
    /// bridge.
    pub ports: &'a [u32],
}

/// `ip` batch lines for `link`: `address`, `mtu`.
fn link_attrs(device: &Device) -> String {
    let mac = device.mac.map(|b| format!("{b:02x}")).join(":");
    format!("index {} address {mac} mtu {}", device.index, device.mtu)
}

/// A network namespace of one program test's own, realizing a [`Node`]; deleted on drop.
pub struct ProgNetns {
    name: String,
    /// `/run/netns/<name>`, held open for `setns`.
    file: File,
}

/// The namespace this process's threads start in, opened before any thread leaves it:
/// where [`ProgNetns`]'s drop brings a thread back to.
static HOST: OnceLock<File> = OnceLock::new();

fn host_netns() -> &'static File {
    HOST.get_or_init(|| {
        File::open("/proc/thread-self/ns/net").expect("open this thread's network namespace")
    })
}

impl ProgNetns {
    /// A new namespace holding `node`'s devices, up, with their addresses, and IPv4 and
    /// IPv6 forwarding on (`bpf_fib_lookup` answers only for an ingress device that
    /// forwards).
    pub fn node(node: &Node) -> anyhow::Result<ProgNetns> {
        host_netns();
        remove_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        // From here on the drop deletes it, whatever fails next.
        let file = match File::open(format!("/run/netns/{name}")) {
            Ok(file) => file,
            Err(e) => {
                crate::netns::delete_namespace_quietly(&name);
                return Err(e).context(format!("opening /run/netns/{name}"));
            }
        };
        let ns = ProgNetns { name, file };
        let (bridge, uplink) = (&node.bridge, &node.uplink);
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("link add {BRIDGE} {} type bridge", link_attrs(bridge)),
            format!(
                "link add {UPLINK} {} type veth peer name {UPLINK}p index {} mtu {}",
                link_attrs(uplink),
                uplink.index + PEER_INDEX_OFFSET,
                uplink.mtu
            ),
        ];
        for &port in node.ports {
            let name = port_name(port);
            lines.extend([
                format!(
                    "link add {name} index {port} mtu {} type veth peer name pod{port} index {} mtu {}",
                    bridge.mtu,
                    port + PEER_INDEX_OFFSET,
                    bridge.mtu
                ),
                format!("link set {name} master {BRIDGE}"),
                format!("link set {name} up"),
                format!("link set pod{port} up"),
            ]);
        }
        lines.extend([
            format!("link set {BRIDGE} up"),
            format!("link set {UPLINK} up"),
            format!("link set {UPLINK}p up"),
        ]);
        for (dev, device) in [(BRIDGE, bridge), (UPLINK, uplink)] {
            for addr in device.addrs {
                // No duplicate address detection: the address is usable at once.
                let nodad = if addr.contains(':') { " nodad" } else { "" };
                lines.push(format!("addr add {addr} dev {dev}{nodad}"));
            }
        }
        ns.ip(&lines)?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `lines` as `ip -batch` inside the namespace (each line an `ip` command
    /// without the `ip`; `route`, `neigh` and `addr` take the family from the
    /// addresses). Lines that start with `-6 ` (an `ip rule` for IPv6, which needs the
    /// option) run after the others, in an `ip -6 -batch` of their own. The first line
    /// that fails stops it, and is the error.
    pub fn ip<S: AsRef<str>>(&self, lines: &[S]) -> anyhow::Result<()> {
        let (v6, any): (Vec<&str>, Vec<&str>) = lines
            .iter()
            .map(AsRef::as_ref)
            .partition(|line| line.starts_with("-6 "));
        self.batch(&[], &any)?;
        let v6: Vec<&str> = v6.iter().map(|line| &line[3..]).collect();
        self.batch(&["-6"], &v6)
    }

    fn batch(&self, options: &[&str], lines: &[&str]) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let batch = lines
            .iter()
            .map(|line| format!("{line}\n"))
            .collect::<String>();
        let mut child = Command::new("ip")
            .args(options)
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ip -batch")?;
        child
            .stdin
            .take()
            .context("ip's stdin")?
            .write_all(batch.as_bytes())
            .context("writing to ip -batch")?;
        let out = child.wait_with_output().context("waiting for ip -batch")?;
        if !out.status.success() {
            bail!(
                "ip {} -n {} -batch failed ({}): {}\n{batch}",
                options.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Writes `value` to `/proc/sys/<key>` as seen inside the namespace (from a thread
    /// that joined it: the net sysctls are the opening thread's namespace's).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{key}");
        crate::netns::in_netns(&self.name, || std::fs::write(&path, value))?
            .with_context(|| format!("writing {value} to {path} in {}", self.name))
    }

    /// Moves the calling thread into the namespace (only this thread: setns is per
    /// thread), where it stays until it enters another one or the namespace is dropped.
    pub fn enter(&self) {
        // SAFETY: setns only reads the fd, which `self.file` keeps open; it changes the
        // calling thread's network namespace only.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns({}): {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Whether the calling thread is inside the namespace.
    fn entered(&self) -> bool {
        let here = std::fs::metadata("/proc/thread-self/ns/net");
        let this = self.file.metadata();
        matches!((here, this), (Ok(here), Ok(this)) if here.ino() == this.ino() && here.dev() == this.dev())
    }
}

impl Drop for ProgNetns {
    fn drop(&mut self) {
        // Back to where the thread started, so that it neither keeps the namespace
        // alive nor runs anything more in it.
        if self.entered() {
            // SAFETY: as in enter(), with the host namespace's fd, open for the process's
            // lifetime.
            let rc = unsafe { libc::setns(host_netns().as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                eprintln!(
                    "setns back from {}: {}",
                    self.name,
                    std::io::Error::last_os_error()
                );
            }
        }
        crate::netns::delete_namespace_quietly(&self.name);
    }
}

/// Deletes the namespaces of program tests whose process is gone (killed before its
/// drops ran), once per process; those of live processes are theirs.
fn remove_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                crate::netns::delete_namespace_quietly(&name);
            }
        }
    });
}
