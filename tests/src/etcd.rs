//! A real etcd server (Debian's etcd-server) for a lab: it runs in a namespace of its
//! own on the lab's L2 segment, so the nodes reach it over the lab network as they
//! would reach a cluster's etcd.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{ip, kill_and_reap, netns_command, output_with_timeout, wait_timeout},
    lab::Lab,
    netns::delete_namespace_quietly,
};

/// Where etcd listens on the lab segment (the nodes are .1 to .N).
pub const ETCD_IP: &str = "172.31.0.250";
const CLIENT_PORT: u16 = 2379;
const TIMEOUT: Duration = Duration::from_secs(10);
/// The IPv6 subnet length of [`Etcd::put_network_config_dual_stack`]: /48s of the lab's
/// fd00:244::/32, so node nK gets fd00:244:K::/48, around the lab's fd00:244:K::/64 pods.
const IPV6_SUBNET_LEN: u8 = 48;

pub struct Etcd {
    pub ns: String,
    pub endpoint: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Creates `<lab id>-etcd` on the lab's switch and starts etcd in it.
    pub fn start(lab: &Lab) -> anyhow::Result<Etcd> {
        let ns = format!("{}-etcd", lab.id);
        let dir = lab.dir().join("etcd");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut etcd = Etcd {
            ns: ns.clone(),
            endpoint: format!("http://{ETCD_IP}:{CLIENT_PORT}"),
            dir,
            child: None,
        };
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        lab.attach_to_switch(&ns, "etcd", &format!("{ETCD_IP}/24"))?;
        etcd.resume()?;
        Ok(etcd)
    }

    /// Starts the server (again), on the same data, and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("etcd.log")).context("creating etcd.log")?;
        let data = self.dir.join("data");
        let client_url = self.endpoint.clone();
        let child = netns_command(&self.ns, "etcd", &[])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("etcd.log")?)
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed? `cargo xtask setup`)")?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < TIMEOUT {
            if self.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd did not become healthy in {TIMEOUT:?}:\n{}",
            self.log()
        )
    }

    /// Stops the server (SIGTERM), keeping its data.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_timeout(&mut child, TIMEOUT)?.is_none() {
                kill_and_reap(&mut child);
            }
        }
        Ok(())
    }

    /// `etcdctl --endpoints E ARGS` from inside the etcd namespace; its stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd: Command = netns_command(&self.ns, "etcdctl", &["--endpoints", &self.endpoint]);
        cmd.args(args);
        let out = output_with_timeout(&mut cmd, TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes many keys, in transactions of 100 (etcd's default limit is 128 ops).
    pub fn put_many(&self, entries: &[(String, String)]) -> anyhow::Result<()> {
        for chunk in entries.chunks(100) {
            let mut script = String::from("\n");
            for (key, value) in chunk {
                let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
                script.push_str(&format!("put {key} \"{quoted}\"\n"));
            }
            script.push_str("\n\n");
            let mut child =
                netns_command(&self.ns, "etcdctl", &["--endpoints", &self.endpoint, "txn"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting etcdctl txn")?;
            let mut stdin = child.stdin.take().context("etcdctl stdin")?;
            std::io::Write::write_all(&mut stdin, script.as_bytes())
                .context("writing the transaction")?;
            drop(stdin);
            let out = child.wait_with_output().context("etcdctl txn")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !stdout.starts_with("SUCCESS") {
                bail!(
                    "etcdctl txn: {}{}",
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.ctl(&["put", key, value]).map(drop)
    }

    /// `etcdctl put KEY` with the value on stdin: one argument holds at most 128 KiB.
    pub fn put_large(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let mut child = netns_command(&self.ns, "etcdctl", &["--endpoints", &self.endpoint])
            .args(["put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting etcdctl put")?;
        let mut stdin = child.stdin.take().context("etcdctl stdin")?;
        std::io::Write::write_all(&mut stdin, value.as_bytes()).context("writing the value")?;
        drop(stdin);
        let out = child.wait_with_output().context("etcdctl put")?;
        if !out.status.success() {
            bail!(
                "etcdctl put {key}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Writes flannel's network config for the lab's cluster CIDR (host-gw, /24 subnets).
    pub fn put_network_config(&self) -> anyhow::Result<()> {
        self.put(
            "/coreos.com/network/config",
            &format!(
                r#"{{"Network":"{}","SubnetLen":24,"Backend":{{"Type":"host-gw"}}}}"#,
                crate::lab::CLUSTER_CIDR
            ),
        )
    }

    /// Flannel's dual-stack network config for the lab's two cluster CIDRs (host-gw, /24
    /// and /48 subnets), as flannel documents it.
    pub fn put_network_config_dual_stack(&self) -> anyhow::Result<()> {
        self.put(
            "/coreos.com/network/config",
            &format!(
                r#"{{"EnableIPv6":true,"Network":"{}","SubnetLen":24,"IPv6Network":"{}","IPv6SubnetLen":{IPV6_SUBNET_LEN},"Backend":{{"Type":"host-gw"}}}}"#,
                crate::lab::CLUSTER_CIDR,
                crate::lab::CLUSTER_CIDR_V6,
            ),
        )
    }

    /// The IPv6 subnet node index `node` acquires under
    /// [`Etcd::put_network_config_dual_stack`]: `fd00:244:K::/48` for nK.
    pub fn pod_cidr6(node: usize) -> String {
        format!("fd00:244:{:x}::/{IPV6_SUBNET_LEN}", node + 1)
    }

    /// The agent config for node `node` in etcd mode (`extra` is appended to `[etcd]`).
    pub fn agent_config(&self, lab: &Lab, node: usize, extra: &str) -> String {
        format!(
            "node_name = \"{}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\n\n[etcd]\nendpoints = [\"{}\"]\nlease_ttl = 10\n{extra}",
            lab.nodes[node].name, self.endpoint
        )
    }

    /// A lab of `nodes` x `pods` with etcd holding flannel's network config, and ready
    /// etcd-mode agents on the first `agents` nodes.
    pub fn lab_with_agents(
        nodes: usize,
        pods: usize,
        agents: usize,
    ) -> anyhow::Result<(Lab, Etcd)> {
        Self::lab_with(nodes, pods, agents, Etcd::put_network_config)
    }

    /// [`Etcd::lab_with_agents`] with flannel's dual-stack config: each agent holds
    /// both `10.244.K.0/24` and [`Etcd::pod_cidr6`].
    pub fn lab_with_agents_dual_stack(
        nodes: usize,
        pods: usize,
        agents: usize,
    ) -> anyhow::Result<(Lab, Etcd)> {
        Self::lab_with(nodes, pods, agents, Etcd::put_network_config_dual_stack)
    }

    /// A lab, etcd with the network config `put` writes, ready agents on `0..agents`.
    fn lab_with(
        nodes: usize,
        pods: usize,
        agents: usize,
        put: fn(&Etcd) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Lab, Etcd)> {
        let mut lab = Lab::up(nodes, pods)?;
        let etcd = Etcd::start(&lab)?;
        put(&etcd)?;
        etcd.start_agents(&mut lab, 0..agents)?;
        for agent in lab.agents() {
            agent.wait_ready(TIMEOUT)?;
        }
        Ok((lab, etcd))
    }

    /// Starts etcd-mode agents on `nodes`, one after the other, each waiting until it
    /// holds its subnet, so node nK gets 10.244.K.0/24: the addresses the lab gave its
    /// pods (the lab plays the CNI plugin, which would read the subnet from the agent).
    pub fn start_agents(
        &self,
        lab: &mut Lab,
        nodes: impl IntoIterator<Item = usize>,
    ) -> anyhow::Result<()> {
        for node in nodes {
            let config = self.agent_config(lab, node, "");
            let want = lab.nodes[node].pod_cidr.clone();
            let agent = lab.start_agent_with_config(node, &config, &[])?;
            // While it waits for etcd, status has no pod_cidr.
            let status = agent.wait_for(TIMEOUT, |s| {
                s.pod_cidr.as_deref().is_some_and(|c| !c.is_empty())
            })?;
            if status.pod_cidr.as_deref() != Some(want.as_str()) {
                bail!(
                    "node {node} acquired {:?} instead of {want}",
                    status.pod_cidr
                );
            }
            // With flannel's EnableIPv6, the IPv6 subnet in the same claim.
            if let Some(v6) = status.pod_cidr_v6.as_deref()
                && v6 != Etcd::pod_cidr6(node)
            {
                bail!(
                    "node {node} acquired {v6} instead of {}",
                    Etcd::pod_cidr6(node)
                );
            }
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

/// One line of an agent's log: env_logger's `[TIME LEVEL TARGET] MESSAGE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub level: &'a str,
    pub message: &'a str,
}

/// The lines of `log` in env_logger's format (others, such as a panic, are left out).
pub fn log_lines(log: &str) -> impl Iterator<Item = LogLine<'_>> {
    log.lines().filter_map(|line| {
        let (header, message) = line.strip_prefix('[')?.split_once("] ")?;
        let level = header.split_whitespace().nth(1)?;
        Some(LogLine { level, message })
    })
}

/// Checks that an agent's `log` rejected the etcd key `key`: a WARN line names the key
/// and says `reason`, and no INFO `peer ...` line took the key as a peer. Any line that
/// merely mentions the key (the info line of an accepted peer) is not enough.
pub fn check_key_rejected(log: &str, key: &str, reason: &str) -> anyhow::Result<()> {
    // The agent names a peer's source in parentheses: `peer NAME (KEY): ...`.
    let as_source = format!("({key})");
    if let Some(accepted) = log_lines(log).find(|l| {
        l.level == "INFO" && l.message.starts_with("peer ") && l.message.contains(&as_source)
    }) {
        bail!("{key} was accepted as a peer: {}", accepted.message);
    }
    let named = |l: &LogLine| {
        l.level == "WARN"
            && (l.message.contains(&format!("{key}:")) || l.message.contains(&as_source))
    };
    if !log_lines(log).any(|l| named(&l) && l.message.contains(reason)) {
        let warnings: Vec<&str> = log_lines(log).filter(named).map(|l| l.message).collect();
        bail!("no WARN line names {key} and says {reason:?}; its warnings: {warnings:#?}");
    }
    Ok(())
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        delete_namespace_quietly(&self.ns);
    }
}
