//! The node's own tc, beside hgw's programs: a probe program that counts (and may drop)
//! the packets of one flow, attached as a tcx program after hgw's or as a legacy tc
//! filter; the CNI `bandwidth` plugin's limits; qdiscs; iperf3 between pods.
//!
//! The probe is a handful of eBPF instructions loaded with the `bpf` syscall (no object
//! file, no toolchain at test time): the kernel the lab runs on has neither `gact`
//! (`action drop` / `action pass`) nor `matchall`, and Debian's bpftool (7.1) cannot
//! attach tcx programs, so one program serves as both: a tcx link made with
//! `BPF_LINK_CREATE` (`BPF_F_AFTER`: last on the hook, after hgw's program), and a
//! direct-action `cls_bpf` filter of a `clsact` qdisc, as tc attached BPF before tcx.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::cmd::{kill_and_reap, netns_command};
use crate::netns::{in_netns, run_in, run_in_ok};

/// Which side of an interface a probe sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn tc_name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// What the probe does with a packet it matched (counted first in either case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it on: `TCX_NEXT` (tcx) / `TC_ACT_UNSPEC` (cls_bpf), both -1: the next
    /// program or filter runs, then the kernel's path.
    Next,
    /// Drop it: `TCX_DROP` / `TC_ACT_SHOT`, both 2.
    Drop,
}

/// The packets a probe counts: IPv4 (on an Ethernet frame) to `dst` of protocol
/// `proto`, and, with `dport` (TCP or UDP), to that port (assumes no IP options); with
/// `priority`, only those whose `skb->priority` it is.
#[derive(Clone, Copy, Debug)]
pub struct PacketMatch {
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub dport: Option<u16>,
    pub priority: Option<u32>,
}

impl PacketMatch {
    /// ICMP to `dst`.
    pub fn icmp_to(dst: Ipv4Addr) -> PacketMatch {
        PacketMatch {
            dst,
            proto: libc::IPPROTO_ICMP as u8,
            dport: None,
            priority: None,
        }
    }

    /// UDP to `dst`:`port`.
    pub fn udp_to(dst: Ipv4Addr, port: u16) -> PacketMatch {
        PacketMatch {
            dst,
            proto: libc::IPPROTO_UDP as u8,
            dport: Some(port),
            priority: None,
        }
    }

    /// The same, only packets whose `skb->priority` is `priority`.
    pub fn with_priority(self, priority: u32) -> PacketMatch {
        PacketMatch {
            priority: Some(priority),
            ..self
        }
    }
}

// The bpf(2) commands, map and program types, attach types and flags used here
// (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
/// Generic XDP (on the skb, in `netif_receive_skb`), which any interface takes.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// Native XDP, in the driver (a veth runs it on what its peer transmits).
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// With no relative program: attach after every program already on the hook.
const BPF_F_AFTER: u32 = 1 << 4;
/// `bpf_attr` is a union of per-command structs; this is larger than each one used.
const ATTR_SIZE: usize = 128;

/// A loaded probe: its program and its one-slot counter map (a u64 at key 0).
#[derive(Debug)]
pub struct Probe {
    prog: OwnedFd,
    map: OwnedFd,
    what: String,
}

impl Probe {
    /// Loads a probe counting the packets `m` matches and giving them `verdict`; every
    /// other packet is handed on (-1) untouched and uncounted.
    pub fn load(m: PacketMatch, verdict: Verdict) -> anyhow::Result<Probe> {
        Self::load_as(BPF_PROG_TYPE_SCHED_CLS, m, verdict)
    }

    /// The same as an XDP program: `Verdict::Drop` is `XDP_DROP`, `Verdict::Next`
    /// `XDP_PASS`.
    pub fn load_xdp(m: PacketMatch, verdict: Verdict) -> anyhow::Result<Probe> {
        Self::load_as(BPF_PROG_TYPE_XDP, m, verdict)
    }

    fn load_as(prog_type: u32, m: PacketMatch, verdict: Verdict) -> anyhow::Result<Probe> {
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_ARRAY);
        put_u32(&mut attr, 4, 4); // key: u32
        put_u32(&mut attr, 8, 8); // value: u64
        put_u32(&mut attr, 12, 1); // one entry
        let map = bpf_fd(BPF_MAP_CREATE, &mut attr).context("creating the probe's counter map")?;
        let insns = if prog_type == BPF_PROG_TYPE_XDP {
            xdp_probe_insns(m, verdict, map.as_raw_fd())
        } else {
            probe_insns(m, verdict, map.as_raw_fd())
        };
        let license = CString::new("GPL").context("license")?;
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, prog_type);
        put_u32(&mut attr, 4, u32::try_from(insns.len() / 8)?);
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        put_u32(&mut attr, 24, 1); // log_level
        put_u32(&mut attr, 28, u32::try_from(log.len())?);
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
        attr[48..48 + 9].copy_from_slice(b"lab_probe"); // prog_name
        let prog = bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            anyhow::anyhow!(
                "loading the probe program: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        Ok(Probe {
            prog,
            map,
            what: format!("{m:?} -> {verdict:?}"),
        })
    }

    /// Packets matched so far.
    pub fn count(&self) -> anyhow::Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, u32::try_from(self.map.as_raw_fd())?);
        put_u64(&mut attr, 8, std::ptr::from_ref(&key) as u64);
        put_u64(&mut attr, 16, std::ptr::from_mut(&mut value) as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the probe's counter")?;
        Ok(value)
    }

    /// Attaches the program as a tcx program on `dev`'s `hook` in `ns`, after every
    /// program already there (hgw's). Detached when the returned link is dropped.
    pub fn attach_tcx(&self, ns: &str, dev: &str, hook: Hook) -> anyhow::Result<ProbeLink> {
        let ifindex = ifindex(ns, dev)?;
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, u32::try_from(self.prog.as_raw_fd())?);
        put_u32(&mut attr, 4, ifindex);
        put_u32(
            &mut attr,
            8,
            match hook {
                Hook::Ingress => BPF_TCX_INGRESS,
                Hook::Egress => BPF_TCX_EGRESS,
            },
        );
        put_u32(&mut attr, 12, BPF_F_AFTER);
        // tcx.relative_fd (16) and tcx.expected_revision (24) stay 0: last, any revision.
        let link = in_netns(ns, || bpf_fd(BPF_LINK_CREATE, &mut attr))?.with_context(|| {
            format!(
                "attaching the probe ({}) to tcx {hook:?} of {dev} in {ns}",
                self.what
            )
        })?;
        Ok(ProbeLink { _link: link })
    }

    /// Attaches an XDP probe ([`Probe::load_xdp`]) to `dev` in `ns`, native (in the
    /// driver) or generic, through a BPF link (which, unlike `ip link set ... xdp`,
    /// sends no netlink event). Detached when the returned link is dropped.
    pub fn attach_xdp(&self, ns: &str, dev: &str, native: bool) -> anyhow::Result<ProbeLink> {
        let ifindex = ifindex(ns, dev)?;
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, u32::try_from(self.prog.as_raw_fd())?);
        put_u32(&mut attr, 4, ifindex);
        put_u32(&mut attr, 8, BPF_XDP);
        let flags = if native {
            XDP_FLAGS_DRV_MODE
        } else {
            XDP_FLAGS_SKB_MODE
        };
        put_u32(&mut attr, 12, flags);
        let link = in_netns(ns, || bpf_fd(BPF_LINK_CREATE, &mut attr))?.with_context(|| {
            format!(
                "attaching the probe ({}) as XDP (native: {native}) to {dev} in {ns}",
                self.what
            )
        })?;
        Ok(ProbeLink { _link: link })
    }

    /// Adds the program as a legacy tc filter (`clsact` qdisc, made if missing, then
    /// `tc filter add dev DEV HOOK pref PREF bpf da object-pinned PIN`), pinned for tc
    /// under `pin_dir` (a bpffs directory) and unpinned again once tc holds it. Removed
    /// when the returned filter is dropped.
    pub fn attach_legacy(
        &self,
        ns: &str,
        dev: &str,
        hook: Hook,
        pref: u16,
        pin_dir: &Path,
    ) -> anyhow::Result<LegacyFilter> {
        ensure_clsact(ns, dev)?;
        let pin = pin_dir.join(format!("probe-{ns}-{dev}-{}-{pref}", hook.tc_name()));
        let path = CString::new(pin.to_string_lossy().as_bytes()).context("pin path")?;
        let mut attr = [0u8; ATTR_SIZE];
        put_u64(&mut attr, 0, path.as_ptr() as u64);
        put_u32(&mut attr, 8, u32::try_from(self.prog.as_raw_fd())?);
        bpf(BPF_OBJ_PIN, &mut attr)
            .with_context(|| format!("pinning the probe at {}", pin.display()))?;
        let pref_s = pref.to_string();
        let added = run_in_ok(
            ns,
            "tc",
            &[
                "filter",
                "add",
                "dev",
                dev,
                hook.tc_name(),
                "pref",
                &pref_s,
                "bpf",
                "da",
                "object-pinned",
                &pin.to_string_lossy(),
            ],
        );
        let _ = std::fs::remove_file(&pin);
        added?;
        Ok(LegacyFilter {
            ns: ns.to_owned(),
            dev: dev.to_owned(),
            hook,
            pref,
        })
    }
}

/// A BPF link of a [`Probe`] (tcx, or XDP); dropping it detaches the program.
#[derive(Debug)]
pub struct ProbeLink {
    _link: OwnedFd,
}

/// A legacy tc filter of a [`Probe`]; dropping it deletes the filter (the `clsact`
/// qdisc stays: see [`delete_qdisc`]).
#[derive(Debug)]
pub struct LegacyFilter {
    ns: String,
    dev: String,
    hook: Hook,
    pref: u16,
}

impl LegacyFilter {
    /// Deletes the filter now, failing if tc does.
    pub fn remove(mut self) -> anyhow::Result<()> {
        let result = self.delete();
        // Already done (or failed loudly): nothing left for Drop.
        self.pref = 0;
        result
    }

    fn delete(&self) -> anyhow::Result<()> {
        let pref = self.pref.to_string();
        run_in_ok(
            &self.ns,
            "tc",
            &[
                "filter",
                "del",
                "dev",
                &self.dev,
                self.hook.tc_name(),
                "pref",
                &pref,
            ],
        )
        .map(drop)
    }
}

impl Drop for LegacyFilter {
    fn drop(&mut self) {
        if self.pref != 0 {
            let _ = self.delete();
        }
    }
}

/// Adds a `clsact` qdisc to `dev` in `ns` unless it has one.
pub fn ensure_clsact(ns: &str, dev: &str) -> anyhow::Result<()> {
    if qdiscs(ns, dev)?.iter().any(|q| q["kind"] == "clsact") {
        return Ok(());
    }
    run_in_ok(ns, "tc", &["qdisc", "add", "dev", dev, "clsact"]).map(drop)
}

/// Every program-holding filter on `dev`'s ingress in `ns` (`tc -j filter show`):
/// (priority, program name, program id). None without an `ingress`/`clsact` qdisc (tc
/// refuses to list a hook that does not exist); any other tc failure is an error.
pub fn ingress_filters(ns: &str, dev: &str) -> anyhow::Result<Vec<(u64, String, u64)>> {
    if !qdiscs(ns, dev)?
        .iter()
        .any(|q| q["kind"] == "clsact" || q["kind"] == "ingress")
    {
        return Ok(Vec::new());
    }
    let out = run_in_ok(ns, "tc", &["-j", "filter", "show", "dev", dev, "ingress"])?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("tc filter JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            let options = f.get("options")?;
            Some((
                f["pref"].as_u64()?,
                options["bpf_name"].as_str()?.to_owned(),
                options["prog"]["id"].as_u64()?,
            ))
        })
        .collect())
}

/// hgw's filters on `dev`'s ingress in `ns`, as [`ingress_filters`] lists them.
pub fn hgw_filters(ns: &str, dev: &str) -> anyhow::Result<Vec<(u64, String, u64)>> {
    Ok(ingress_filters(ns, dev)?
        .into_iter()
        .filter(|(_, name, _)| name.starts_with("hgw_"))
        .collect())
}

/// `tc qdisc del dev DEV PARENT` (`root`, `ingress`, `clsact`) in `ns`.
pub fn delete_qdisc(ns: &str, dev: &str, parent: &str) -> anyhow::Result<()> {
    run_in_ok(ns, "tc", &["qdisc", "del", "dev", dev, parent]).map(drop)
}

/// `tc -j qdisc show dev DEV` in `ns`: one JSON object per qdisc (`kind`, `handle`,
/// `root` / `parent`, ...).
pub fn qdiscs(ns: &str, dev: &str) -> anyhow::Result<Vec<Value>> {
    let out = run_in_ok(ns, "tc", &["-j", "qdisc", "show", "dev", dev])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("tc qdisc JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The limits of one pod set by Debian's CNI `bandwidth` plugin, called as a container
/// runtime calls it: chained after the bridge plugin, whose result (the host veth and
/// the pod's interface with its sandbox) it gets as `prevResult`, with
/// `runtimeConfig.bandwidth` (kubelet's `kubernetes.io/ingress-bandwidth` and
/// `egress-bandwidth` annotations, in bits per second; bursts in bits). What ADD makes
/// (plugin 1.1.1): ingress (traffic to the pod): a `tbf` root qdisc on the host veth;
/// egress (from the pod): an `ingress` qdisc on the host veth whose u32 filter redirects
/// (mirred) every packet to an ifb device `bwp<hash>`, which has the `tbf`.
#[derive(Debug)]
pub struct PodBandwidth {
    node_ns: String,
    pod_ns: String,
    container_id: String,
    config: String,
    added: bool,
}

impl PodBandwidth {
    /// `bandwidth` ADD in `node_ns` for the pod in `pod_ns` (address `pod_ip`/24 on
    /// `eth0`, gateway `gateway`) whose host end is `host_veth`: both directions limited
    /// to `rate` bit/s with bursts of `burst` bits.
    pub fn add(
        node_ns: &str,
        pod_ns: &str,
        host_veth: &str,
        pod_ip: Ipv4Addr,
        gateway: Ipv4Addr,
        rate: u64,
        burst: u64,
    ) -> anyhow::Result<PodBandwidth> {
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "hgw-lab",
            "type": "bandwidth",
            "capabilities": { "bandwidth": true },
            "runtimeConfig": {
                "bandwidth": {
                    "ingressRate": rate, "ingressBurst": burst,
                    "egressRate": rate, "egressBurst": burst,
                }
            },
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    { "name": "cni0" },
                    // The plugin finds the host veth here: the interface without a
                    // sandbox whose index is the pod eth0's peer.
                    { "name": host_veth },
                    { "name": "eth0", "sandbox": format!("/run/netns/{pod_ns}") }
                ],
                "ips": [
                    { "address": format!("{pod_ip}/24"), "gateway": gateway.to_string(), "interface": 2 }
                ]
            }
        })
        .to_string();
        let mut bw = PodBandwidth {
            node_ns: node_ns.to_owned(),
            pod_ns: pod_ns.to_owned(),
            container_id: format!("{pod_ns}-sandbox"),
            config,
            added: false,
        };
        // A failed ADD is cleaned up with DEL, as a runtime does.
        bw.added = true;
        bw.call("ADD")?;
        Ok(bw)
    }

    /// `bandwidth` DEL. Plugin 1.1.1's DEL deletes its ifb device and nothing else: the
    /// `tbf` root qdisc and the `ingress` qdisc (with its filter, now redirecting to a
    /// device that is gone) stay on the host veth. A runtime's DEL never leaves them
    /// behind on a live pod: the bridge plugin's DEL and the sandbox's end delete the
    /// veth, and the qdiscs with it.
    pub fn del(&mut self) -> anyhow::Result<()> {
        if self.added {
            self.added = false;
            self.call("DEL")?;
        }
        Ok(())
    }

    fn call(&self, command: &str) -> anyhow::Result<std::process::Output> {
        crate::cni::exec_plugin(
            &self.node_ns,
            "bandwidth",
            command,
            &self.container_id,
            &self.pod_ns,
            &self.config,
        )
    }
}

impl Drop for PodBandwidth {
    fn drop(&mut self) {
        let _ = self.del();
    }
}

/// One iperf3 TCP test from `client_ns` to a server on `server_ip`:`port` in
/// `server_ns` (`-R`: the server sends), `seconds` long after one omitted second (slow
/// start, and a shaper's initial burst); returns the receiver's bits per second.
pub fn iperf3_rate(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    port: u16,
    reverse: bool,
    seconds: u32,
) -> anyhow::Result<f64> {
    let server_ip = server_ip.into().to_string();
    let port_s = port.to_string();
    let server = IperfServer::start(server_ns, &server_ip, &port_s)?;
    let secs = seconds.to_string();
    let mut args = vec![
        "-c",
        &server_ip,
        "-p",
        &port_s,
        "-t",
        &secs,
        "-O",
        "1",
        "-J",
        "--connect-timeout",
        "3000",
    ];
    if reverse {
        args.push("-R");
    }
    let out = run_in(client_ns, "iperf3", &args)?;
    drop(server);
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = report["error"].as_str() {
        bail!("iperf3 {client_ns} -> {server_ip}:{port}: {err}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 report without end.sum_received: {report}"))
}

/// `iperf3 -s -1` (one test, then exit) in a pod; killed on drop.
struct IperfServer {
    child: Child,
}

impl IperfServer {
    fn start(ns: &str, ip: &str, port: &str) -> anyhow::Result<IperfServer> {
        let child = netns_command(ns, "iperf3", &["-s", "-1", "-B", ip, "-p", port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        let server = IperfServer { child };
        // Listening once `ss` shows the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        let filter = format!("sport = :{port}");
        loop {
            let out = run_in_ok(ns, "ss", &["-Hltn", &filter])?;
            if !out.stdout.is_empty() {
                return Ok(server);
            }
            ensure!(
                Instant::now() < deadline,
                "iperf3 -s in {ns} never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// `dev`'s interface index in `ns`.
pub fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let name = CString::new(dev).context("interface name")?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = in_netns(ns, || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
    ensure!(index != 0, "no interface {dev} in {ns}");
    Ok(index)
}

/// The lab's bpffs directory for probes pinned on their way to tc: beside the agents'
/// pin directories, on the lab's own bpffs (unmounted with the lab).
pub fn probe_pin_dir(lab: &crate::Lab) -> anyhow::Result<PathBuf> {
    // Mounts the lab's bpffs if no agent did yet.
    let agent_dir = lab.prepare_pin_dir(0)?;
    let dir = agent_dir
        .parent()
        .context("pin dir without a parent")?
        .join("probes");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// An XDP probe's instructions: the same match as [`probe_insns`], read from the
/// packet (`xdp_md.data`, bounds checked against `data_end`; XDP has no LD_ABS).
fn xdp_probe_insns(m: PacketMatch, verdict: Verdict, map_fd: i32) -> Vec<u8> {
    // Loads from the packet are in network order; compared as the CPU reads them.
    let be16 = |v: u16| u32::from(u16::from_ne_bytes(v.to_be_bytes()));
    let mut p = Asm::default();
    p.insn(0x61, 2, 1, 0, 0); // r2 = xdp_md.data
    p.insn(0x61, 3, 1, 4, 0); // r3 = xdp_md.data_end
    p.insn(0xbf, 4, 2, 0, 0); // r4 = r2
    p.insn(0x07, 4, 0, 0, 38); // r4 += 38 (Ethernet, IPv4 without options, ports)
    p.jgt_reg(4, 3); // if r4 > r3 goto no_match
    p.insn(0x69, 0, 2, 12, 0); // r0 = ethertype (ldxh)
    p.jne32(be16(0x0800));
    p.insn(0x71, 0, 2, 23, 0); // r0 = protocol (ldxb)
    p.jne32(u32::from(m.proto));
    p.insn(0x61, 0, 2, 30, 0); // r0 = destination (ldxw)
    p.jne32(u32::from_ne_bytes(m.dst.octets()));
    if let Some(port) = m.dport {
        p.insn(0x69, 0, 2, 36, 0); // r0 = destination port (ldxh)
        p.jne32(be16(port));
    }
    let (hit, miss) = match verdict {
        Verdict::Next => (XDP_PASS, XDP_PASS),
        Verdict::Drop => (XDP_DROP, XDP_PASS),
    };
    count_then_return(&mut p, map_fd, hit, miss)
}

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// The probe's instructions (8 bytes each): match, count, verdict.
fn probe_insns(m: PacketMatch, verdict: Verdict, map_fd: i32) -> Vec<u8> {
    let mut p = Asm::default();
    // LD_ABS loads from the frame (at tc ingress and egress alike, skb->data is the
    // Ethernet header) in host byte order, and needs the context in r6.
    p.insn(0xbf, 6, 1, 0, 0); // r6 = r1
    p.insn(0x28, 0, 0, 0, 12); // r0 = ethertype (ld_abs h)
    p.jne32(0x0800);
    p.insn(0x30, 0, 0, 0, 23); // r0 = protocol (ld_abs b)
    p.jne32(u32::from(m.proto));
    p.insn(0x20, 0, 0, 0, 30); // r0 = destination (ld_abs w)
    p.jne32(u32::from(m.dst));
    if let Some(port) = m.dport {
        p.insn(0x28, 0, 0, 0, 36); // r0 = destination port (ld_abs h, IHL 5)
        p.jne32(u32::from(port));
    }
    if let Some(priority) = m.priority {
        p.insn(0x61, 0, 6, 32, 0); // r0 = *(u32 *)(r6 + 32): __sk_buff.priority
        p.jne32(priority);
    }
    let code = match verdict {
        Verdict::Next => -1,
        Verdict::Drop => 2,
    };
    // Anything else is handed on (-1).
    count_then_return(&mut p, map_fd, code, -1)
}

/// The end of a probe: on a match (falling through), the counter at key 0 += 1 and
/// return `hit`; the "no match" jumps return `miss`.
fn count_then_return(p: &mut Asm, map_fd: i32, hit: i32, miss: i32) -> Vec<u8> {
    p.insn(0x62, 10, 0, -4, 0); // *(u32 *)(r10 - 4) = 0
    p.insn(0x18, 1, 1, 0, map_fd); // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
    p.insn(0, 0, 0, 0, 0);
    p.insn(0xbf, 2, 10, 0, 0); // r2 = r10
    p.insn(0x07, 2, 0, 0, -4); // r2 += -4
    p.insn(0x85, 0, 0, 0, 1); // call bpf_map_lookup_elem
    p.insn(0x15, 0, 0, 2, 0); // if r0 == 0 goto +2
    p.insn(0xb7, 1, 0, 0, 1); // r1 = 1
    p.insn(0xdb, 0, 1, 0, 0); // lock *(u64 *)(r0 + 0) += r1
    p.insn(0xb7, 0, 0, 0, hit); // r0 = verdict
    p.insn(0x95, 0, 0, 0, 0); // exit
    let no_match = p.len();
    p.insn(0xb7, 0, 0, 0, miss); // r0 = miss
    p.insn(0x95, 0, 0, 0, 0); // exit
    std::mem::take(p).finish(no_match)
}

/// A tiny eBPF assembler: instructions, and the "no match" jumps patched at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<[u8; 8]>,
    no_match_jumps: Vec<usize>,
}

impl Asm {
    fn insn(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let mut i = [0u8; 8];
        i[0] = code;
        i[1] = (src << 4) | (dst & 0xf);
        i[2..4].copy_from_slice(&off.to_le_bytes());
        i[4..8].copy_from_slice(&imm.to_le_bytes());
        self.insns.push(i);
    }

    /// `if rDST > rSRC goto no_match` (unsigned, 64-bit).
    fn jgt_reg(&mut self, dst: u8, src: u8) {
        self.no_match_jumps.push(self.insns.len());
        self.insn(0x2d, dst, src, 0, 0);
    }

    /// `if (u32)r0 != value goto no_match` (JMP32: no sign extension of the immediate).
    fn jne32(&mut self, value: u32) {
        self.no_match_jumps.push(self.insns.len());
        self.insn(0x56, 0, 0, 0, i32::from_ne_bytes(value.to_ne_bytes()));
    }

    fn len(&self) -> usize {
        self.insns.len()
    }

    fn finish(mut self, target: usize) -> Vec<u8> {
        for &at in &self.no_match_jumps {
            // Relative to the instruction after the jump; the program is tiny.
            let off = i16::try_from(target - at - 1).unwrap_or(i16::MAX);
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        self.insns.concat()
    }
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// bpf(2): its non-negative return value.
fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> anyhow::Result<i64> {
    // SAFETY: attr is a zeroed bpf_attr of ATTR_SIZE bytes, filled for `cmd`; every
    // pointer in it (instructions, license, log, key, value, path) outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            ATTR_SIZE as libc::c_uint,
        )
    };
    if rc < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// bpf(2) for a command that returns a new file descriptor (map, program, link).
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> anyhow::Result<OwnedFd> {
    let fd = i32::try_from(bpf(cmd, attr)?).context("bpf returned no fd")?;
    // SAFETY: a successful bpf() of these commands returns a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
