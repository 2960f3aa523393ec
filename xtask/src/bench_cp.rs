//! `cargo xtask bench --control-plane`: how fast the agent applies many peers from its
//! static file, against `ip -batch` installing the same routes, how fast it applies one
//! changed peer, and its peak memory.
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
use hgw_tests::{Lab, run_in_ok};

const SIZES: [usize; 2] = [1_000, 5_000];
const TIMEOUT: Duration = Duration::from_secs(120);

struct Sample {
    peers: usize,
    ip_batch: Duration,
    agent: Duration,
    change: Duration,
    peak_rss_kib: u64,
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
            ip = "172.30.255.254".into();
        }
        let _ = write!(
            toml,
            "\n[[peers]]\nname = \"p{i}\"\nnode_ip = \"{ip}\"\npod_cidr = \"{cidr}\"\n"
        );
    }
    toml
}

fn hgw_route_count(ns: &str) -> anyhow::Result<usize> {
    let out = run_in_ok(ns, "ip", &["-4", "route", "show", "proto", "104"])?;
    Ok(out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count())
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
            format!("route replace {cidr} via {ip} dev eth0 onlink proto 104\n")
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
    run_in_ok(&ns, "ip", &["route", "flush", "proto", "104"])?;

    let start = Instant::now();
    let agent = lab.start_agent_with_config(0, &config(peers, None), &[])?;
    agent.wait_for(TIMEOUT, |s| s["map_entries"].as_u64() == Some(peers as u64))?;
    wait("agent routes", || Ok(hgw_route_count(&ns)? == peers))?;
    let applied = start.elapsed();

    // One peer moves to another node IP: edit the file, wait for its route to follow.
    let path = lab.dir().join("n1.toml");
    let changed = peers / 2;
    let (_, cidr) = peer(changed);
    std::fs::write(&path, config(peers, Some(changed))).context("rewriting the config")?;
    let change = wait("the changed peer's route", || {
        let out = run_in_ok(&ns, "ip", &["route", "show", &cidr])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("via 172.30.255.254"))
    })?;

    let agent = lab.agent(0).context("agent")?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .context("agent's /proc status")?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        peers,
        ip_batch,
        agent: applied,
        change,
        peak_rss_kib,
    })
}

pub fn control_plane(out: &Path) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for peers in SIZES {
        println!("control plane: {peers} static peers ...");
        let sample = measure(peers)?;
        println!(
            "  ip -batch {:?}, agent {:?} ({:.1}x), one change {:?}, peak RSS {} KiB",
            sample.ip_batch,
            sample.agent,
            sample.agent.as_secs_f64() / sample.ip_batch.as_secs_f64(),
            sample.change,
            sample.peak_rss_kib
        );
        samples.push(sample);
    }
    let mut md = String::from(
        "# hgw control-plane bench\n\nOne lab node, static peer file (on-link peers that do not answer ARP). `agent` = agent start until every route and fast-path entry is in place; `ip -batch` = the same routes installed by `ip -batch`; `one change` = a peer's node IP edited in the file until its route follows (file checked every second, so up to 1 s of it is the check interval).\n\n| peers | ip -batch | agent | agent / ip -batch | one change | peak RSS |\n|---|---|---|---|---|---|\n",
    );
    for s in &samples {
        let _ = writeln!(
            md,
            "| {} | {:.0} ms | {:.0} ms | {:.1}x | {:.0} ms | {:.1} MiB |",
            s.peers,
            s.ip_batch.as_secs_f64() * 1e3,
            s.agent.as_secs_f64() * 1e3,
            s.agent.as_secs_f64() / s.ip_batch.as_secs_f64(),
            s.change.as_secs_f64() * 1e3,
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
