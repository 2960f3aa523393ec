//! `cargo xtask bench --control-plane`: how fast the agent applies many peers from its
//! static file and from etcd, against `ip -batch` installing the same routes, how fast
//! it applies one changed peer, and its peak memory.
//!
//! One lab node with an extra /16 on its uplink, so thousands of peers are on-link; the
//! peers do not exist (their next hops stay unresolved), which costs the agent the same
//! route and map work as real ones.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hgw_tests::{Etcd, HGW_ROUTE_PROTOCOL, Lab, hgw_routes, run_in_ok};

const SIZES: [usize; 2] = [1_000, 5_000];
const TIMEOUT: Duration = Duration::from_secs(120);

struct Sample {
    source: &'static str,
    peers: usize,
    ip_batch: Duration,
    agent: Duration,
    change: Duration,
    /// `hgw-agent status --json` with every peer in place, median of [`STATUS_SAMPLES`].
    status: Duration,
    peak_rss_kib: u64,
}

const STATUS_SAMPLES: usize = 5;

/// How long `hgw-agent status --json` takes, the command as a user runs it.
fn status_time(agent: &hgw_tests::Agent) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(STATUS_SAMPLES);
    for _ in 0..STATUS_SAMPLES {
        let start = Instant::now();
        agent.status()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[STATUS_SAMPLES / 2])
}

/// Peer `i`: node IP 172.30.a.b (on the node's extra /16), pod CIDR 10.a.b.0/24.
fn peer(i: usize) -> (String, String) {
    let (a, b) = (1 + i / 250, 1 + i % 250);
    (format!("172.30.{a}.{b}"), format!("10.{a}.{b}.0/24"))
}

fn config(peers: usize, changed: Option<usize>) -> String {
    let mut toml = String::from(
        "node_name = \"n1\"\nuplink = \"eth0\"\nbridge = \"cni0\"\npod_cidr = \"10.0.0.0/24\"\ncluster_cidr = \"10.0.0.0/8\"\n",
    );
    for i in 0..peers {
        let (mut ip, cidr) = peer(i);
        if changed == Some(i) {
            ip = MOVED_TO.into();
        }
        let _ = write!(
            toml,
            "\n[[peers]]\nname = \"p{i}\"\nnode_ip = \"{ip}\"\npod_cidr = \"{cidr}\"\n"
        );
    }
    toml
}

/// The node IP the changed peer moves to.
const MOVED_TO: &str = "172.30.255.254";

/// How long until the route to `cidr` goes via [`MOVED_TO`].
fn wait_moved(ns: &str, cidr: &str) -> anyhow::Result<Duration> {
    wait("the changed peer's route", || {
        let out = run_in_ok(ns, "ip", &["route", "show", cidr])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("via {MOVED_TO}")))
    })
}

fn hgw_route_count(ns: &str) -> anyhow::Result<usize> {
    Ok(hgw_routes(ns)?.len())
}

fn wait(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > TIMEOUT {
            bail!("{what}: not done after {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(start.elapsed())
}

fn measure(peers: usize) -> anyhow::Result<Sample> {
    let mut lab = Lab::up(1, 0)?;
    let ns = lab.nodes[0].ns.clone();
    run_in_ok(&ns, "ip", &["addr", "add", "172.30.0.1/16", "dev", "eth0"])?;
    run_in_ok(&ns, "ip", &["addr", "add", "10.0.0.1/24", "dev", "cni0"])?;

    // The same routes with ip -batch: the floor for putting them into the kernel.
    let batch = lab.dir().join("routes.batch");
    let lines: String = (0..peers)
        .map(|i| {
            let (ip, cidr) = peer(i);
            format!("route replace {cidr} via {ip} dev eth0 onlink proto {HGW_ROUTE_PROTOCOL}\n")
        })
        .collect();
    std::fs::write(&batch, lines).context("writing the ip batch file")?;
    let start = Instant::now();
    run_in_ok(&ns, "ip", &["-batch", &batch.to_string_lossy()])?;
    let ip_batch = start.elapsed();
    anyhow::ensure!(
        hgw_route_count(&ns)? == peers,
        "ip -batch did not install {peers} routes"
    );
    run_in_ok(
        &ns,
        "ip",
        &["route", "flush", "proto", &HGW_ROUTE_PROTOCOL.to_string()],
    )?;

    let start = Instant::now();
    let agent = lab.start_agent_with_config(0, &config(peers, None), &[])?;
    agent.wait_for(TIMEOUT, |s| s.map_entries == peers)?;
    wait("agent routes", || Ok(hgw_route_count(&ns)? == peers))?;
    let applied = start.elapsed();

    // One peer moves to another node IP: edit the file, wait for its route to follow.
    let path = lab.dir().join("n1.toml");
    let changed = peers / 2;
    let (_, cidr) = peer(changed);
    std::fs::write(&path, config(peers, Some(changed))).context("rewriting the config")?;
    let change = wait_moved(&ns, &cidr)?;

    let agent = lab.agent(0).context("agent")?;
    let status = status_time(agent)?;
    let peak_rss_kib = peak_rss(agent.pid())?;
    Ok(Sample {
        source: "static file",
        peers,
        ip_batch,
        agent: applied,
        change,
        status,
        peak_rss_kib,
    })
}

/// The agent's peak resident set (VmHWM), in KiB.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("agent's /proc status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// The same peers as flannel-style subnet entries in a real etcd; the agent lists them
/// at start, and a changed entry reaches it through its watch.
fn measure_etcd(peers: usize, ip_batch: Duration) -> anyhow::Result<Sample> {
    let mut lab = Lab::up(1, 0)?;
    let etcd = Etcd::start(&lab)?;
    let ns = lab.nodes[0].ns.clone();
    run_in_ok(&ns, "ip", &["addr", "add", "172.30.0.1/16", "dev", "eth0"])?;
    etcd.put(
        "/coreos.com/network/config",
        r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#,
    )?;
    let entry = |i: usize, ip: &str| {
        let (_, cidr) = peer(i);
        (
            format!("/coreos.com/network/subnets/{}", cidr.replace('/', "-")),
            format!(r#"{{"PublicIP":"{ip}","BackendType":"host-gw"}}"#),
        )
    };
    let entries: Vec<(String, String)> = (0..peers).map(|i| entry(i, &peer(i).0)).collect();
    etcd.put_many(&entries)?;

    let start = Instant::now();
    let config = etcd.agent_config(&lab, 0, "");
    let agent = lab.start_agent_with_config(0, &config, &[])?;
    agent.wait_for(TIMEOUT, |s| s.map_entries == peers)?;
    wait("agent routes", || Ok(hgw_route_count(&ns)? == peers))?;
    let applied = start.elapsed();

    let changed = peers / 2;
    let (_, cidr) = peer(changed);
    let (key, value) = entry(changed, MOVED_TO);
    etcd.put(&key, &value)?;
    let change = wait_moved(&ns, &cidr)?;
    let agent = lab.agent(0).context("agent")?;
    let status = status_time(agent)?;
    let peak_rss_kib = peak_rss(agent.pid())?;
    Ok(Sample {
        source: "etcd",
        peers,
        ip_batch,
        agent: applied,
        change,
        status,
        peak_rss_kib,
    })
}

fn report(sample: &Sample) {
    println!(
        "  ip -batch {:?}, agent {:?} ({:.1}x), one change {:?}, status {:?}, peak RSS {} KiB",
        sample.ip_batch,
        sample.agent,
        sample.agent.as_secs_f64() / sample.ip_batch.as_secs_f64(),
        sample.change,
        sample.status,
        sample.peak_rss_kib
    );
}

pub fn control_plane(out: &Path) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for peers in SIZES {
        println!("control plane: {peers} static peers ...");
        let sample = measure(peers)?;
        let ip_batch = sample.ip_batch;
        report(&sample);
        samples.push(sample);
        println!("control plane: {peers} peers from etcd ...");
        let sample = measure_etcd(peers, ip_batch)?;
        report(&sample);
        samples.push(sample);
    }
    let mut md = String::from(
        "# hgw control-plane bench\n\nOne lab node; its peers are on-link but do not exist (their next hops stay unresolved, costing the agent the same route and map work). Sources: a static peer file, or flannel-style subnet entries in a real etcd (Debian's etcd-server in the lab). `agent` = agent start until every route and fast-path entry is in place; `ip -batch` = the same routes installed by `ip -batch`; `one change` = a peer's node IP changed (file edit: seen through inotify on the file's directory; etcd: one put, seen through the watch) until its kernel route follows; `status` = `hgw-agent status --json` as a user runs it (the process included), median of 5.\n\n| source | peers | ip -batch | agent | agent / ip -batch | one change | status | peak RSS |\n|---|---|---|---|---|---|---|---|\n",
    );
    for s in &samples {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.1}x | {:.0} ms | {:.0} ms | {:.1} MiB |",
            s.source,
            s.peers,
            s.ip_batch.as_secs_f64() * 1e3,
            s.agent.as_secs_f64() * 1e3,
            s.agent.as_secs_f64() / s.ip_batch.as_secs_f64(),
            s.change.as_secs_f64() * 1e3,
            s.status.as_secs_f64() * 1e3,
            s.peak_rss_kib as f64 / 1024.0
        );
    }
    let dir = crate::util::root().join(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = String::from_utf8(
        std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d-%H%M%S"])
            .output()?
            .stdout,
    )?;
    let path = dir.join(format!("{}-control-plane.md", stamp.trim()));
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    print!("{md}");
    println!("wrote {}", path.display());
    Ok(())
}
