//! `cargo xtask bench --control-plane`: how fast the agent applies many peers from its
//! static file, from etcd and from the Kubernetes API, against `ip -batch` installing the
//! same routes, how fast it applies one changed peer, and its peak memory.
//!
//! One lab node with an extra /16 on its uplink, so thousands of peers are on-link; the
//! peers do not exist (their next hops stay unresolved), which costs the agent the same
//! route and map work as real ones. The agent's fixed start (checks, loading and
//! attaching the programs, the source's first answer) is measured on its own, with no
//! peers, right before each run with peers, and taken off: `peers applied` is what the
//! peers add, and its ratio to `ip -batch` is taken per run (a start's time moves by
//! ±15% between starts on two cores; pairs taken together share the machine's state).

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use hgw_tests::{Etcd, FLANNEL_GRANTS, HGW_ROUTE_PROTOCOL, KubeApi, Lab, hgw_routes, run_in_ok};
use serde_json::json;

const SIZES: [usize; 2] = [1_000, 5_000];
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    File,
    Etcd,
    Kube,
}

impl Source {
    const ALL: [Source; 3] = [Source::File, Source::Etcd, Source::Kube];

    fn name(self) -> &'static str {
        match self {
            Source::File => "static file",
            Source::Etcd => "etcd",
            Source::Kube => "kube",
        }
    }
}

struct Sample {
    source: Source,
    peers: usize,
    ip_batch: Duration,
    /// The same routes on nexthop objects of their own, as the agent installs them.
    ip_batch_nexthops: Duration,
    /// A start of the same source with no peers, just before this run.
    fixed: Duration,
    /// Agent start until every route and map entry is in place, by the agent's clock.
    agent: Duration,
    /// The agent's own account of applying the peer set (`last_change.took_us`): from
    /// taking the set to its routes and map entries in place.
    own_apply: Duration,
    /// The same, as polling saw it.
    agent_polled: Duration,
    change: Duration,
    /// `hgw-agent status --json` with every peer in place, median of [`STATUS_SAMPLES`].
    status: Duration,
    peak_rss_kib: u64,
}

const STATUS_SAMPLES: usize = 5;
/// Runs per source and size: one start's share of noise is ±15% on two cores.
const RUNS: usize = 5;

impl Sample {
    /// What the peers added to this run's start (0: less than the start without them
    /// took, so below the noise between starts).
    fn applied(&self) -> Duration {
        self.agent.saturating_sub(self.fixed)
    }

    /// `peers applied / ip -batch` of this run, signed: a start with peers that took
    /// less than the start without them is noise below 0, kept as such (clamped to 0
    /// it would pull the median up).
    fn ratio(&self) -> f64 {
        (self.agent.as_secs_f64() - self.fixed.as_secs_f64()) / self.ip_batch.as_secs_f64()
    }

    /// Each measure's median over `runs` (each run a fresh lab), with `ip -batch`'s own.
    fn median(runs: &[Sample]) -> Sample {
        let of = |f: fn(&Sample) -> Duration| median(runs.iter().map(f).collect());
        Sample {
            source: runs[0].source,
            peers: runs[0].peers,
            ip_batch: of(|s| s.ip_batch),
            ip_batch_nexthops: of(|s| s.ip_batch_nexthops),
            fixed: of(|s| s.fixed),
            agent: of(|s| s.agent),
            own_apply: of(|s| s.own_apply),
            agent_polled: of(|s| s.agent_polled),
            change: of(|s| s.change),
            status: of(|s| s.status),
            peak_rss_kib: runs.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0),
        }
    }
}

/// The middle of `v` (the upper one of an even count).
fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// How long `hgw-agent status --json` takes, the command as a user runs it.
fn status_time(agent: &hgw_tests::Agent) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(STATUS_SAMPLES);
    for _ in 0..STATUS_SAMPLES {
        let start = Instant::now();
        agent.status()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

/// Peer `i`: node IP 172.30.a.b (on the node's extra /16), pod CIDR 10.a.b.0/24.
fn peer(i: usize) -> (String, String) {
    let (a, b) = (1 + i / 250, 1 + i % 250);
    (format!("172.30.{a}.{b}"), format!("10.{a}.{b}.0/24"))
}

fn file_config(peers: usize, changed: Option<usize>) -> String {
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

/// Route changes in a namespace as `ip monitor route` prints them, each line with the
/// moment it was read: a change is timed to the kernel's notification, not to the next
/// poll of a command that is slow to start on a busy machine.
struct RouteMonitor {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl RouteMonitor {
    fn start(ns: &str) -> anyhow::Result<RouteMonitor> {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting ip monitor route")?;
        let stdout = child.stdout.take().context("ip monitor's stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        // ip monitor subscribes as it starts: give it that moment before any change.
        std::thread::sleep(Duration::from_millis(300));
        Ok(RouteMonitor { child, lines })
    }

    /// How long from `since` until a route to `cidr` via [`MOVED_TO`] was announced
    /// (on a nexthop object, `CIDR nhid N via ...`).
    fn wait_moved(&self, cidr: &str, since: Instant) -> anyhow::Result<Duration> {
        let via = format!(" via {MOVED_TO} ");
        loop {
            let (at, line) = self
                .lines
                .recv_timeout(TIMEOUT)
                .context("no route change announced")?;
            if line.starts_with(&format!("{cidr} ")) && line.contains(&via) {
                return Ok(at.duration_since(since));
            }
        }
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        // The agent's own account ends its time: polling only confirms it, and less
        // often takes less CPU from the agent on two cores.
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

/// Until the agent holds `peers` routes and map entries (with none: until it is
/// ready), polled tightly: the kernel's routes first (cheap), then the agent's status.
fn wait_applied(lab: &Lab, ns: &str, peers: usize) -> anyhow::Result<()> {
    let agent = lab.agent(0).context("agent")?;
    wait("agent routes and map entries", || {
        if !agent.is_running() {
            bail!("the agent exited:\n{}", agent.log());
        }
        if hgw_route_count(ns)? != peers {
            return Ok(false);
        }
        Ok(agent
            .status()
            .is_ok_and(|s| s.map_entries == peers && (peers > 0 || s.ready)))
    })?;
    Ok(())
}

/// A lab with `peers` peers in `source` and the config the agent starts from; the
/// servers it needs go with it.
struct Prepared {
    lab: Lab,
    ns: String,
    config: String,
    etcd: Option<Etcd>,
    kube: Option<KubeApi>,
}

/// Where the lab's API server listens (the lab node is .1, etcd .250).
const TOKEN: &str = "hgw-node-token";
const FLANNEL: &str = "flannel.alpha.coreos.com/";

fn etcd_entry(i: usize, ip: &str) -> (String, String) {
    let (_, cidr) = peer(i);
    (
        format!("/coreos.com/network/subnets/{}", cidr.replace('/', "-")),
        format!(r#"{{"PublicIP":"{ip}","BackendType":"host-gw"}}"#),
    )
}

/// Node `p{i}` as flanneld announces a host-gw node.
fn kube_node(i: usize) -> serde_json::Value {
    let (ip, cidr) = peer(i);
    json!({
        "metadata": {
            "name": format!("p{i}"),
            "annotations": {
                format!("{FLANNEL}backend-type"): "host-gw",
                format!("{FLANNEL}backend-data"): "null",
                format!("{FLANNEL}kube-subnet-manager"): "true",
                format!("{FLANNEL}public-ip"): ip,
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    })
}

fn prepare(source: Source, peers: usize) -> anyhow::Result<Prepared> {
    let mut lab = Lab::up(1, 0)?;
    if let Some(bin) = std::env::var_os("HGW_CP_AGENT") {
        lab.set_agent_bin(bin.into());
    }
    let ns = lab.nodes[0].ns.clone();
    run_in_ok(&ns, "ip", &["addr", "add", "172.30.0.1/16", "dev", "eth0"])?;
    let (mut etcd, mut kube) = (None, None);
    let config = match source {
        Source::File => {
            run_in_ok(&ns, "ip", &["addr", "add", "10.0.0.1/24", "dev", "cni0"])?;
            file_config(peers, None)
        }
        Source::Etcd => {
            let server = Etcd::start(&lab)?;
            server.put(
                "/coreos.com/network/config",
                r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#,
            )?;
            let entries: Vec<(String, String)> =
                (0..peers).map(|i| etcd_entry(i, &peer(i).0)).collect();
            server.put_many(&entries)?;
            let config = server.agent_config(&lab, 0, "");
            etcd = Some(server);
            config
        }
        Source::Kube => {
            let api = KubeApi::start_on_lab(&mut lab)?;
            api.add_token(
                TOKEN,
                "system:serviceaccount:kube-flannel:hgw",
                FLANNEL_GRANTS,
            );
            let kubeconfig = api.write_kubeconfig(TOKEN)?;
            let net_conf = lab.dir().join("net-conf.json");
            std::fs::write(
                &net_conf,
                json!({"Network": "10.0.0.0/8", "Backend": {"Type": "host-gw"}}).to_string(),
            )
            .context("writing net-conf.json")?;
            let name = lab.nodes[0].name.clone();
            api.add_node(json!({
                "metadata": {"name": name},
                "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.0.0.0/24"]},
            }))?;
            for i in 0..peers {
                api.add_node(kube_node(i))?;
            }
            kube = Some(api);
            format!(
                "node_name = \"{name}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\n\n[kube]\nkubeconfig = \"{}\"\nnet_conf = \"{}\"\n",
                kubeconfig.display(),
                net_conf.display()
            )
        }
    };
    Ok(Prepared {
        lab,
        ns,
        config,
        etcd,
        kube,
    })
}

/// Agent start until ready with no peers: what every start costs whatever the peers.
fn fixed_start(source: Source) -> anyhow::Result<Duration> {
    let mut p = prepare(source, 0)?;
    Ok(start_applied(&mut p, 0)?.own)
}

/// The same routes with ip -batch: what flannel's routes take to put into the kernel,
/// each `via` its peer (`nexthops` false); or, as the agent installs them, each on a
/// nexthop object of its own (`ip nexthop add id N via ...`, `ip route add ... nhid N`),
/// which the kernel files by id rather than all in one chain per device.
fn ip_batch(lab: &Lab, ns: &str, peers: usize, nexthops: bool) -> anyhow::Result<Duration> {
    let batch = lab.dir().join("routes.batch");
    let lines: String = (0..peers)
        .map(|i| {
            let (ip, cidr) = peer(i);
            if nexthops {
                let id = 1_000 + i;
                format!(
                    "nexthop add id {id} via {ip} dev eth0 onlink proto {HGW_ROUTE_PROTOCOL}\n\
                     route add {cidr} nhid {id} proto {HGW_ROUTE_PROTOCOL}\n"
                )
            } else {
                format!(
                    "route replace {cidr} via {ip} dev eth0 onlink proto {HGW_ROUTE_PROTOCOL}\n"
                )
            }
        })
        .collect();
    std::fs::write(&batch, lines).context("writing the ip batch file")?;
    // `ip -n`, not `ip netns exec`: only ip's own start is timed with the routes, as
    // only the agent's start goes into its fixed start.
    let start = Instant::now();
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-batch"])
        .arg(&batch)
        .output()
        .context("running ip -batch")?;
    let took = start.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "ip -batch: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    anyhow::ensure!(
        hgw_route_count(ns)? == peers,
        "ip -batch did not install {peers} routes"
    );
    let proto = HGW_ROUTE_PROTOCOL.to_string();
    if nexthops {
        // Deleting a nexthop takes the routes on it along (`ip route flush` cannot: it
        // sends each route back with both its nexthop id and its gateway, refused).
        run_in_ok(ns, "ip", &["nexthop", "flush", "protocol", &proto])?;
    } else {
        run_in_ok(ns, "ip", &["route", "flush", "proto", &proto])?;
    }
    Ok(took)
}

/// Agent start until `peers` are in place: by the agent's own clock, and as polling saw it.
struct Applied {
    own: Duration,
    polled: Duration,
    /// The agent's own time for applying its last peer change.
    apply: Duration,
}

/// Starts the lab's agent and waits until its `peers` routes and map entries are in
/// place. `own` ends when the agent says they were (its last applied change, on the
/// wall clock both share): polling adds its own delay and, on two cores, takes CPU from
/// the agent, which `ip -batch`, timed by its exit, does not pay.
fn start_applied(p: &mut Prepared, peers: usize) -> anyhow::Result<Applied> {
    let wall = SystemTime::now();
    let start = Instant::now();
    p.lab.start_agent_with_config(0, &p.config, &[])?;
    wait_applied(&p.lab, &p.ns, peers)?;
    let polled = start.elapsed();
    let status = p.lab.agent(0).context("agent")?.status()?;
    let change = status
        .last_change
        .context("the agent's status names no applied peer change")?;
    let done = UNIX_EPOCH + Duration::from_micros(change.done_unix_us);
    let own = done
        .duration_since(wall)
        .context("the agent's change was done before it started")?;
    anyhow::ensure!(
        own <= polled,
        "the agent says its peers were in place {own:?} after its start, later than polling saw them ({polled:?})"
    );
    Ok(Applied {
        own,
        polled,
        apply: Duration::from_micros(change.took_us),
    })
}

fn measure(source: Source, peers: usize) -> anyhow::Result<Sample> {
    let fixed = fixed_start(source)?;
    let mut p = prepare(source, peers)?;
    let ns = p.ns.clone();
    let ip_batch_nexthops = ip_batch(&p.lab, &ns, peers, true)?;
    let ip_batch = ip_batch(&p.lab, &ns, peers, false)?;

    let Applied {
        own: agent,
        polled: agent_polled,
        apply: own_apply,
    } = start_applied(&mut p, peers)?;

    // One peer moves to another node IP, its route follows.
    let changed = peers / 2;
    let (_, cidr) = peer(changed);
    let monitor = RouteMonitor::start(&ns)?;
    let mut since = Instant::now();
    match source {
        Source::File => {
            let path = p.lab.dir().join("n1.toml");
            std::fs::write(&path, file_config(peers, Some(changed)))
                .context("rewriting the config")?;
        }
        Source::Etcd => {
            let (key, value) = etcd_entry(changed, MOVED_TO);
            since = etcd_put_timed(p.etcd.as_ref().context("etcd")?, &key, &value)?;
        }
        Source::Kube => {
            p.kube
                .as_ref()
                .context("kube")?
                .modify_node(&format!("p{changed}"), |node| {
                    node["metadata"]["annotations"][format!("{FLANNEL}public-ip")] =
                        json!(MOVED_TO);
                })?;
        }
    }
    let change = monitor.wait_moved(&cidr, since)?;

    let agent_proc = p.lab.agent(0).context("agent")?;
    let status = status_time(agent_proc)?;
    let peak_rss_kib = peak_rss(agent_proc.pid())?;
    Ok(Sample {
        source,
        peers,
        ip_batch,
        ip_batch_nexthops,
        fixed,
        agent,
        own_apply,
        agent_polled,
        change,
        status,
        peak_rss_kib,
    })
}

/// Puts one key with an `etcdctl txn` that is already running, so that what is timed
/// from the returned moment is etcd and the agent, not etcdctl's start.
fn etcd_put_timed(etcd: &Etcd, key: &str, value: &str) -> anyhow::Result<Instant> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &etcd.ns,
            "etcdctl",
            "--endpoints",
            &etcd.endpoint,
            "txn",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting etcdctl txn")?;
    let mut stdin = child.stdin.take().context("etcdctl's stdin")?;
    // Its start, before the transaction it reads to the end of its input.
    std::thread::sleep(Duration::from_millis(500));
    let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
    let since = Instant::now();
    stdin
        .write_all(format!("\nput {key} \"{quoted}\"\n\n\n").as_bytes())
        .context("writing the transaction")?;
    drop(stdin);
    let out = child.wait_with_output().context("etcdctl txn")?;
    anyhow::ensure!(
        out.status.success(),
        "etcdctl txn: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(since)
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

/// The runs' own `peers applied / ip -batch`: median, lowest, highest.
fn ratios(runs: &[Sample]) -> (f64, f64, f64) {
    let mut r: Vec<f64> = runs.iter().map(Sample::ratio).collect();
    r.sort_by(f64::total_cmp);
    (r[r.len() / 2], r[0], r[r.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `HGW_CP_SIZES=5000` and `HGW_CP_SOURCES=file,kube` narrow a run while profiling;
/// `HGW_CP_AGENT=PATH` runs another build of the agent (two builds compared in turns).
fn narrowed() -> (Vec<usize>, Vec<Source>) {
    let sizes = std::env::var("HGW_CP_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| SIZES.to_vec());
    let sources = std::env::var("HGW_CP_SOURCES").ok().map_or_else(
        || Source::ALL.to_vec(),
        |v| {
            Source::ALL
                .into_iter()
                .filter(|s| v.split(',').any(|n| s.name().contains(n.trim())))
                .collect()
        },
    );
    (sizes, sources)
}

pub fn control_plane(out: &Path) -> anyhow::Result<()> {
    let (sizes, sources) = narrowed();
    let mut results: Vec<(Sample, Vec<Sample>)> = Vec::new();
    for &peers in &sizes {
        for &source in &sources {
            println!(
                "control plane: {peers} peers from {}, {RUNS} runs, each after a start with no peers ...",
                source.name()
            );
            let runs = (0..RUNS)
                .map(|_| measure(source, peers))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let s = Sample::median(&runs);
            let (ratio, low, high) = ratios(&runs);
            println!(
                "  ip -batch {:?} (on nexthops {:?}), agent {:?} = fixed start {:?} + peers; peers / ip -batch {ratio:.2}x ({low:.2}-{high:.2}), the agent's own apply {:?}, one change {:?}, status {:?}, peak RSS {} KiB",
                s.ip_batch,
                s.ip_batch_nexthops,
                s.agent,
                s.fixed,
                s.own_apply,
                s.change,
                s.status,
                s.peak_rss_kib
            );
            results.push((s, runs));
        }
    }
    let mut md = String::from(
        "# hgw control-plane bench\n\nOne lab node; its peers are on-link but do not exist (their next hops stay unresolved, costing the agent the same route and map work). Sources: a static peer file, flannel-style subnet entries in a real etcd (Debian's etcd-server in the lab), or Node objects as flanneld's kube subnet manager announces them, served by the test crate's Kubernetes API server in the lab. Each run: `fixed start` = an agent start until ready with no peers (checks, loading and attaching the programs, the source's first answer), by the agent's account as `agent` below; then a fresh lab with the peers: `ip -batch` = the same routes installed by `ip -batch` (then flushed) as flannel writes them, each `via` its peer's node IP; `ip -batch, nexthops` = the same routes as the agent installs them, each on a nexthop object of its own (`nhid`; the kernel files a plain route's gateway in one hash chain per device, so each plain insert walks all earlier ones); `agent` = agent start until every route and fast-path entry is in place, by the agent's own account (the end of its last applied peer change in `status`, on the wall clock the bench shares; `polled` = when the bench's polling saw them, which adds the polling's delay); `peers applied` = `agent` - `fixed start` of the same run; `own apply` = the agent's own time from taking the peer set to its routes and map entries in place (`status`: `last_change.took_us`); `one change` = a peer's node IP changed (file edit: seen through inotify on the file's directory; etcd: one put; kube: one Node's `public-ip` annotation, both seen through the watch) until its kernel route follows; `status` = `hgw-agent status --json` as a user runs it (the process included), median of 5. Every figure per source and size is the median of the runs' own (peak RSS: the highest); `peers applied / ip -batch` is the median of the runs' own ratios, with their range.\n\n",
    );
    for source in &sources {
        let fixed: Vec<Duration> = results
            .iter()
            .flat_map(|(_, runs)| runs)
            .filter(|s| s.source == *source)
            .map(|s| s.fixed)
            .collect();
        if !fixed.is_empty() {
            let _ = writeln!(
                md,
                "Fixed start, {}: {:.0} ms (median of {} starts)  ",
                source.name(),
                ms(median(fixed.clone())),
                fixed.len()
            );
        }
    }
    if let Some(bin) = std::env::var_os("HGW_CP_AGENT") {
        let _ = writeln!(md, "\nAgent: {} (HGW_CP_AGENT)", bin.to_string_lossy());
    }
    let _ = writeln!(md, "\n{RUNS} runs per row.");
    md.push_str("\n| source | peers | ip -batch | ip -batch, nexthops | fixed start | agent | polled | peers applied | peers applied / ip -batch | own apply | own apply / ip -batch | one change | status | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (s, runs) in &results {
        let (ratio, low, high) = ratios(runs);
        let applied = match median(runs.iter().map(Sample::applied).collect()) {
            Duration::ZERO => "< start noise".to_owned(),
            a => format!("{:.0} ms", ms(a)),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {applied} | {ratio:.2}x ({low:.2}-{high:.2}) | {:.0} ms | {:.2}x | {:.0} ms | {:.0} ms | {:.1} MiB |",
            s.source.name(),
            s.peers,
            ms(s.ip_batch),
            ms(s.ip_batch_nexthops),
            ms(s.fixed),
            ms(s.agent),
            ms(s.agent_polled),
            ms(s.own_apply),
            s.own_apply.as_secs_f64() / s.ip_batch.as_secs_f64(),
            ms(s.change),
            ms(s.status),
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
