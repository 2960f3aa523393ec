//! The lab: nodes and pods built from network namespaces, in flannel host-gw's shape.
//!
//! ```text
//!  ns <id>-n<i>p<j>                ns <id>-n<i>                            ns <id>-sw
//!  eth0 10.244.i.(10+j)/24 ─ veth<j> ─ cni0 10.244.i.1/24   eth0 172.31.0.i/24 ─ n<i> ─ br0
//!  default via 10.244.i.1          (bridge: the CNI's part)  (uplink)              (the L2 segment)
//! ```
//!
//! [`Lab::up_pair`] builds the other wiring, two nodes and no switch: n1's eth0 and n2's
//! eth0 are the two ends of one veth pair (same addresses), as seed 000 had it. The
//! benchmark uses it, so a routed path crosses the pod veths and that one pair only.
//!
//! Dual stack: every address above has an IPv6 twin (pods fd00:244:i::(10+j)/64 via
//! fd00:244:i::1, uplinks fd00:172:31::i/64), and the agent configs carry both families.
//! Duplicate address detection is off in every lab namespace, so addresses work at once.
//!
//! Everything lives in namespaces named `<id>-...` (id = `hgw` + hex), deleted by name when
//! the [`Lab`] is dropped, also when a test fails or panics.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};

use crate::agent::{Agent, Status};
use crate::cmd::{ip, kill_and_reap, netns_command, wait_timeout};
use crate::netns::{delete_namespace_quietly, in_netns, list_namespaces};

/// The cluster CIDR that every node's pod CIDR is cut from.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The IPv6 cluster CIDR; node i has fd00:244:i::/64 (i in hex).
pub const CLUSTER_CIDR_V6: &str = "fd00:244::/32";
/// The lab's network as flannel's net-conf.json (kube-flannel's ConfigMap): both
/// cluster CIDRs, host-gw.
pub fn net_conf_json() -> String {
    serde_json::json!({
        "Network": CLUSTER_CIDR,
        "EnableIPv6": true,
        "IPv6Network": CLUSTER_CIDR_V6,
        "Backend": {"Type": "host-gw"},
    })
    .to_string()
}

/// How long [`Lab::run_agent_to_exit`] lets an agent run before calling it hung.
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// One node: a namespace with an uplink on the shared segment and a pod bridge.
#[derive(Debug, Clone)]
pub struct Node {
    /// `n1`, `n2`, ...: also the agent's `node_name`.
    pub name: String,
    /// Its namespace, `<id>-n<i>`.
    pub ns: String,
    /// Address of its uplink `eth0`, 172.31.0.i.
    pub uplink_ip: Ipv4Addr,
    /// Its pod CIDR, `10.244.i.0/24`.
    pub pod_cidr: String,
    /// The pods' gateway: cni0's address, 10.244.i.1.
    pub gateway: Ipv4Addr,
    /// Its uplink's IPv6 address, fd00:172:31::i.
    pub uplink_ip6: Ipv6Addr,
    /// Its IPv6 pod CIDR, `fd00:244:i::/64`.
    pub pod_cidr6: String,
    /// The pods' IPv6 gateway, fd00:244:i::1.
    pub gateway6: Ipv6Addr,
    /// Its pods.
    pub pods: Vec<Pod>,
}

/// One pod: a namespace with `eth0` on its node's cni0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Its namespace, `<id>-n<i>p<j>`.
    pub ns: String,
    /// Its address, 10.244.i.(10+j).
    pub ip: Ipv4Addr,
    /// Its IPv6 address, fd00:244:i::(10+j).
    pub ip6: Ipv6Addr,
}

/// A running lab. Dropping it stops its agents and deletes its namespaces and temp dir.
#[derive(Debug)]
pub struct Lab {
    /// `hgw` + hex digits; every namespace of the lab is named `<id>-...`.
    pub id: String,
    /// The nodes, n1 first.
    pub nodes: Vec<Node>,
    /// Agents in the order they were first started (one slot per node at most).
    agents: Vec<Agent>,
    /// Holds agent configs, status sockets and logs.
    dir: PathBuf,
    /// Every namespace created, in creation order, so cleanup needs no listing.
    namespaces: Vec<String>,
    /// Set by [`Lab::keep`]: Drop then leaves everything in place.
    kept: bool,
    /// The agent binary this lab's agents run, if not [`crate::agent::agent_bin`]'s
    /// (the bench compares two builds with it).
    agent_bin: Option<PathBuf>,
}

impl Lab {
    /// Builds `nodes` nodes with `pods` pods each under a fresh id. On error, what was
    /// already made is removed again.
    pub fn up(nodes: usize, pods: usize) -> anyhow::Result<Lab> {
        ensure!(
            (1..=250).contains(&nodes),
            "nodes must be 1..=250, got {nodes}"
        );
        Lab::up_wired(nodes, pods, Wiring::Switch)
    }

    /// Two nodes with `pods` pods each whose uplinks are the two ends of one veth pair
    /// (n1 eth0 <-> n2 eth0, the same addresses as [`Lab::up`]), no switch namespace.
    pub fn up_pair(pods: usize) -> anyhow::Result<Lab> {
        Lab::up_wired(2, pods, Wiring::Pair)
    }

    fn up_wired(nodes: usize, pods: usize, wiring: Wiring) -> anyhow::Result<Lab> {
        ensure!(pods <= 200, "pods per node must be at most 200, got {pods}");
        let id = fresh_id()?;
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on `lab` owns everything made, so an early `?` cleans up via Drop.
        let mut lab = Lab {
            id,
            nodes: Vec::new(),
            agents: Vec::new(),
            dir,
            namespaces: Vec::new(),
            kept: false,
            agent_bin: None,
        };
        lab.build(nodes, pods, wiring)
            .with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    /// Keeps the lab after this value is gone (for `xtask lab up`) and returns its id;
    /// [`Lab::down`] removes it later. Agents started by this lab are left running.
    pub fn keep(mut self) -> String {
        self.kept = true;
        self.id.clone()
    }

    /// Deletes every namespace named `<id>-...` and the lab's temp dir. `id` must look
    /// like one of ours (`hgw` + at least 4 hex digits), so nothing else can match.
    pub fn down(id: &str) -> anyhow::Result<()> {
        ensure!(
            is_lab_id(id),
            "{id:?} is not a lab id (hgw followed by hex digits)"
        );
        let prefix = format!("{id}-");
        for ns in list_namespaces()?
            .iter()
            .filter(|ns| ns.starts_with(&prefix))
        {
            ip(&["netns", "delete", ns])?;
        }
        let dir = std::env::temp_dir().join(id);
        unmount_bpffs(&dir.join("bpf"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Ids of all labs that have namespaces now (`hgw<hex>-...`), e.g. left by a killed run.
    pub fn list() -> anyhow::Result<Vec<String>> {
        let mut ids: Vec<String> = list_namespaces()?
            .iter()
            .filter_map(|ns| ns.split_once('-').map(|(id, _)| id))
            .filter(|id| is_lab_id(id))
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every namespace of this lab, switch (if any) first.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The lab's temp dir (agent configs, sockets, logs).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Where the agent on node index `node` writes flannel's subnet.env (the lab's
    /// agents are always given a path in the lab's temp dir).
    /// Node index `node`'s pin directory (the agent's `--pin-dir`), on the lab's own
    /// bpffs: pins outlive an agent (a restart adopts them) and go with the lab.
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.dir.join("bpf").join(&self.nodes[node].name)
    }

    /// Node index `node`'s pin directory, made, on the lab's bpffs.
    pub fn prepare_pin_dir(&self, node: usize) -> anyhow::Result<PathBuf> {
        self.ensure_bpffs()?;
        let dir = self.pin_dir(node);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Mounts the lab's bpffs (once) for the agents' pins. It is mounted in the host's
    /// mount namespace, which `ip netns exec` copies, so every agent of the lab, and
    /// the next agent of a node, sees the same pins.
    fn ensure_bpffs(&self) -> anyhow::Result<()> {
        let dir = self.dir.join("bpf");
        if bpffs_mounted(&dir) {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::cmd::run_checked(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir),
        )?;
        Ok(())
    }

    pub fn subnet_env_path(&self, node: usize) -> PathBuf {
        self.dir
            .join(format!("{}-subnet.env", self.nodes[node].name))
    }

    /// A path in the lab's temp dir for node index `node`'s CNI config list (for the
    /// agent's `--cni-conf`).
    pub fn cni_conf_path(&self, node: usize) -> PathBuf {
        self.dir
            .join(format!("{}-10-hgw.conflist", self.nodes[node].name))
    }

    /// host-local's data dir for node index `node`'s pods: in the lab's temp dir, so
    /// labs never share allocations.
    pub fn cni_data_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}-cni-ipam", self.nodes[node].name))
    }

    /// A pod on node index `node` made by the CNI plugins of the list at `conflist`
    /// (the agent's `cni_conf`), as a runtime makes one: a new namespace
    /// `<id>-n<i>c<k>`, then ADD (with `port_mappings` for portmap). Its namespace is
    /// the lab's (deleted with it); DEL is the caller's, or the pod's drop.
    pub fn add_cni_pod(
        &mut self,
        node: usize,
        conflist: &std::path::Path,
        port_mappings: &[crate::cni::PortMapping],
    ) -> anyhow::Result<crate::cni::CniPod> {
        ensure!(
            node < self.nodes.len(),
            "no node index {node} in lab {}",
            self.id
        );
        let list = crate::cni::read_conflist(conflist, &self.cni_data_dir(node))?;
        let prefix = format!("{}-n{}c", self.id, node + 1);
        let k = self
            .namespaces
            .iter()
            .filter(|ns| ns.starts_with(&prefix))
            .count()
            + 1;
        let ns = self.add_namespace(&format!("n{}c{k}", node + 1))?;
        crate::cni::CniPod::add(&self.nodes[node].ns, &ns, list, port_mappings)
    }

    /// The agent config (TOML) for node index `node` (0-based), dual stack: static peers
    /// are all the other nodes.
    pub fn agent_config(&self, node: usize) -> String {
        let me = &self.nodes[node];
        let mut toml = format!(
            "node_name = \"{}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\npod_cidr = \"{}\"\ncluster_cidr = \"{CLUSTER_CIDR}\"\npod_cidr_v6 = \"{}\"\ncluster_cidr_v6 = \"{CLUSTER_CIDR_V6}\"\n",
            me.name, me.pod_cidr, me.pod_cidr6
        );
        for peer in (0..self.nodes.len()).filter(|&i| i != node) {
            toml.push_str(&self.peer_entry(peer));
        }
        toml
    }

    /// The `[[peers]]` entry (TOML, both families) that names node index `node`.
    pub fn peer_entry(&self, node: usize) -> String {
        let peer = &self.nodes[node];
        format!(
            "\n[[peers]]\nname = \"{}\"\nnode_ip = \"{}\"\npod_cidr = \"{}\"\nnode_ip_v6 = \"{}\"\npod_cidr_v6 = \"{}\"\n",
            peer.name, peer.uplink_ip, peer.pod_cidr, peer.uplink_ip6, peer.pod_cidr6
        )
    }

    /// A lab with an agent on every node, each ready (routes in, next hops resolved).
    pub fn up_with_agents(nodes: usize, pods: usize) -> anyhow::Result<Lab> {
        let mut lab = Lab::up(nodes, pods)?;
        lab.start_agents(&[], Duration::from_secs(15))?;
        Ok(lab)
    }

    /// Starts the agent on node index `node` with [`Lab::agent_config`]:
    /// `ip netns exec NS <agent-bin> run --config F --setup-node --status-socket S EXTRA`.
    /// A node's earlier agent, if any, is stopped first and replaced in its slot.
    pub fn start_agent(&mut self, node: usize, extra_args: &[&str]) -> anyhow::Result<&mut Agent> {
        let config = self.agent_config(node);
        self.spawn_agent(node, &config, extra_args)
    }

    /// Like [`Lab::start_agent`] but with the given config text.
    pub fn start_agent_with_config(
        &mut self,
        node: usize,
        config: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<&mut Agent> {
        self.spawn_agent(node, config, extra_args)
    }

    /// Runs an agent on node `node` with `config` and waits (up to 20 s) for it to exit,
    /// for configs that must be rejected. Returns its exit status, its stderr and the
    /// status socket path it was given (which should then not exist).
    pub fn run_agent_to_exit(
        &self,
        node: usize,
        config: &str,
    ) -> anyhow::Result<(ExitStatus, String, PathBuf)> {
        let bin = crate::agent::check_agent_bin()?;
        let name = &self.nodes[node].name;
        let path = self.write_config(&format!("{name}-once"), config)?;
        let socket = self.dir.join(format!("{name}-once.sock"));
        let mut cmd = netns_command(&self.nodes[node].ns, &bin.to_string_lossy(), &[]);
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--setup-node")
            .arg("--status-socket")
            .arg(&socket)
            .arg("--subnet-env")
            .arg(self.dir.join(format!("{name}-once-subnet.env")))
            .arg("--pin-dir")
            .arg("none");
        let what = crate::cmd::describe(&cmd);
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{what}`"))?;
        let stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = stderr {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
            }
            text
        });
        let Some(status) = wait_timeout(&mut child, AGENT_EXIT_TIMEOUT)? else {
            kill_and_reap(&mut child);
            bail!("`{what}` still ran after {AGENT_EXIT_TIMEOUT:?}: the config was accepted?");
        };
        Ok((status, reader.join().unwrap_or_default(), socket))
    }

    /// Runs this lab's agents (those started from now on) from `bin` instead of the
    /// built agent; `status` still asks with the built one.
    pub fn set_agent_bin(&mut self, bin: PathBuf) {
        self.agent_bin = Some(bin);
    }

    /// The agents, in the order they were first started.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The agents, mutably (to stop or kill them).
    pub fn agents_mut(&mut self) -> &mut [Agent] {
        &mut self.agents
    }

    /// The agent running on node index `node`, if one was started.
    pub fn agent(&self, node: usize) -> Option<&Agent> {
        self.agents.iter().find(|a| a.node == node)
    }

    /// The agent on node index `node`, mutably.
    pub fn agent_mut(&mut self, node: usize) -> Option<&mut Agent> {
        self.agents.iter_mut().find(|a| a.node == node)
    }

    /// (Re)starts every node's agent with `extra_args` and waits (up to `ready`) until
    /// each is ready.
    pub fn start_agents(&mut self, extra_args: &[&str], ready: Duration) -> anyhow::Result<()> {
        for node in 0..self.nodes.len() {
            self.start_agent(node, extra_args)?;
        }
        for agent in &self.agents {
            agent.wait_ready(ready)?;
        }
        Ok(())
    }

    /// Every agent's status, in [`Lab::agents`] order.
    pub fn statuses(&self) -> anyhow::Result<Vec<Status>> {
        self.agents.iter().map(Agent::status).collect()
    }

    /// Every ordered pair (from, to) of pods on different nodes.
    pub fn cross_node_pod_pairs(&self) -> Vec<(Pod, Pod)> {
        let mut pairs = Vec::new();
        for (a, from_node) in self.nodes.iter().enumerate() {
            for (b, to_node) in self.nodes.iter().enumerate() {
                if a == b {
                    continue;
                }
                for from in &from_node.pods {
                    for to in &to_node.pods {
                        pairs.push((from.clone(), to.clone()));
                    }
                }
            }
        }
        pairs
    }

    fn spawn_agent(
        &mut self,
        node: usize,
        config: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<&mut Agent> {
        ensure!(
            node < self.nodes.len(),
            "no node index {node} in lab {}",
            self.id
        );
        let name = self.nodes[node].name.clone();
        let config_path = self.write_config(&name, config)?;
        let socket = self.dir.join(format!("{name}.sock"));
        let log = self.dir.join(format!("{name}.log"));
        let slot = self.agents.iter().position(|a| a.node == node);
        if let Some(i) = slot {
            // A restart: the old process must be gone before the new one takes its socket.
            self.agents[i].terminate();
        }
        let config_arg = config_path.to_string_lossy().into_owned();
        let socket_arg = socket.to_string_lossy().into_owned();
        // Never the host's /run/flannel/subnet.env, nor its /sys/fs/bpf.
        let subnet_env_arg = self.subnet_env_path(node).to_string_lossy().into_owned();
        self.ensure_bpffs()?;
        let pin_dir_arg = self.pin_dir(node).to_string_lossy().into_owned();
        let mut args = vec![
            "run",
            "--config",
            &config_arg,
            "--setup-node",
            "--status-socket",
            &socket_arg,
            "--subnet-env",
            &subnet_env_arg,
        ];
        if !extra_args.contains(&"--pin-dir") {
            args.extend(["--pin-dir", &pin_dir_arg]);
        }
        args.extend_from_slice(extra_args);
        let agent = Agent::spawn(
            node,
            &self.nodes[node].ns,
            self.agent_bin.as_deref(),
            &args,
            socket,
            log,
        )?;
        let i = match slot {
            Some(i) => {
                self.agents[i] = agent;
                i
            }
            None => {
                self.agents.push(agent);
                self.agents.len() - 1
            }
        };
        Ok(&mut self.agents[i])
    }

    fn write_config(&self, stem: &str, config: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{stem}.toml"));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn build(&mut self, nodes: usize, pods: usize, wiring: Wiring) -> anyhow::Result<()> {
        let sw = match wiring {
            Wiring::Switch => {
                let sw = self.add_namespace("sw")?;
                ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
                ip(&["-n", &sw, "link", "set", "br0", "up"])?;
                Some(sw)
            }
            Wiring::Pair => None,
        };
        for i in 1..=nodes {
            let node = self.build_node(sw.as_deref(), i)?;
            self.nodes.push(node);
            for j in 1..=pods {
                let pod = self.build_pod(i, j)?;
                self.nodes[i - 1].pods.push(pod);
            }
        }
        if wiring == Wiring::Pair {
            let (a, b) = (&self.nodes[0], &self.nodes[1]);
            // Made in n2 with its peer moved straight into n1, as the switch ports are.
            ip(&[
                "-n", &b.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                "netns", &a.ns,
            ])?;
            for node in &self.nodes {
                add_uplink_addresses(node)?;
            }
        }
        Ok(())
    }

    /// Node `i`: uplink eth0 on the switch's br0 (with `sw`; without, the caller wires
    /// the uplink), and the pods' bridge cni0.
    fn build_node(&mut self, sw: Option<&str>, i: usize) -> anyhow::Result<Node> {
        let name = format!("n{i}");
        let ns = self.add_namespace(&name)?;
        let n = octet(i)?;
        let uplink_ip = Ipv4Addr::new(172, 31, 0, n);
        let gateway = Ipv4Addr::new(10, 244, n, 1);
        let uplink_ip6 = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, n.into());
        let gateway6 = Ipv6Addr::new(0xfd00, 0x244, n.into(), 0, 0, 0, 0, 1);
        let node = Node {
            name,
            ns,
            uplink_ip,
            pod_cidr: format!("10.244.{i}.0/24"),
            gateway,
            uplink_ip6,
            pod_cidr6: format!("fd00:244:{i:x}::/64"),
            gateway6,
            pods: Vec::new(),
        };
        let (name, ns) = (&node.name, &node.ns);
        if let Some(sw) = sw {
            // The veth is created inside the node ns with its peer moved straight into the
            // switch ns: nothing ever appears in the root namespace.
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", name, "netns", sw,
            ])?;
            add_uplink_addresses(&node)?;
            ip(&["-n", sw, "link", "set", name, "master", "br0", "up"])?;
        }
        ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
        add_addresses(
            ns,
            "cni0",
            &[&format!("{gateway}/24"), &format!("{gateway6}/64")],
        )?;
        ip(&["-n", ns, "link", "set", "cni0", "up"])?;
        Ok(node)
    }

    /// Pod `j` of node `i`: eth0 in the pod ns, veth<j> on the node's cni0.
    /// One more pod on node index `node`, attached to its bridge now (as a CNI ADD would
    /// while the agent runs).
    pub fn add_pod(&mut self, node: usize) -> anyhow::Result<Pod> {
        ensure!(
            node < self.nodes.len(),
            "no node index {node} in lab {}",
            self.id
        );
        let j = self.nodes[node].pods.len() + 1;
        let pod = self.build_pod(node + 1, j)?;
        self.nodes[node].pods.push(pod.clone());
        Ok(pod)
    }

    fn build_pod(&mut self, i: usize, j: usize) -> anyhow::Result<Pod> {
        let node_ns = format!("{}-n{i}", self.id);
        let ns = self.add_namespace(&format!("n{i}p{j}"))?;
        let (n, host) = (octet(i)?, octet(10 + j)?);
        let pod_ip = Ipv4Addr::new(10, 244, n, host);
        let gateway = Ipv4Addr::new(10, 244, n, 1);
        let pod_ip6 = Ipv6Addr::new(0xfd00, 0x244, n.into(), 0, 0, 0, 0, host.into());
        let gateway6 = Ipv6Addr::new(0xfd00, 0x244, n.into(), 0, 0, 0, 0, 1);
        let host_end = format!("veth{j}");
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_end, "netns",
            &node_ns,
        ])?;
        add_addresses(
            &ns,
            "eth0",
            &[&format!("{pod_ip}/24"), &format!("{pod_ip6}/64")],
        )?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        ip(&[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6.to_string(),
        ])?;
        ip(&[
            "-n", &node_ns, "link", "set", &host_end, "master", "cni0", "up",
        ])?;
        Ok(Pod {
            ns,
            ip: pod_ip,
            ip6: pod_ip6,
        })
    }

    /// Two more namespaces, `<id>-d1` and `<id>-d2`, joined by a single veth pair (`eth0`
    /// in each, 10.99.0.1/24 and 10.99.0.2/24): two pods with nothing between them, the
    /// practical limit a benchmark compares the routed paths with. They belong to the
    /// lab and are deleted with it.
    pub fn add_direct_pair(&mut self) -> anyhow::Result<(Pod, Pod)> {
        let a = self.add_namespace("d1")?;
        let b = self.add_namespace("d2")?;
        ip(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ])?;
        let ips = [Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2)];
        let ips6 = [
            Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1),
            Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2),
        ];
        for (ns, addr, addr6) in [(&a, ips[0], ips6[0]), (&b, ips[1], ips6[1])] {
            add_addresses(ns, "eth0", &[&format!("{addr}/24"), &format!("{addr6}/64")])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok((
            Pod {
                ns: a,
                ip: ips[0],
                ip6: ips6[0],
            },
            Pod {
                ns: b,
                ip: ips[1],
                ip6: ips6[1],
            },
        ))
    }

    /// One more namespace of the lab, `<id>-<suffix>`, empty but for lo (e.g. a router
    /// a test wires to the nodes itself); deleted with the lab.
    pub fn add_extra_namespace(&mut self, suffix: &str) -> anyhow::Result<String> {
        self.add_namespace(suffix)
    }

    /// Wires namespace `ns` to the lab's switch: its `eth0` with `cidr` (an address on
    /// the nodes' segment, `A.B.C.D/24`), the switch's end named `port` in `br0`.
    pub fn attach_to_switch(&self, ns: &str, port: &str, cidr: &str) -> anyhow::Result<()> {
        let sw = format!("{}-sw", self.id);
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", cidr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).map(drop)
    }

    /// `ip netns add <id>-<suffix>` with lo up and IPv6 duplicate address detection off
    /// (for interfaces made later); recorded for cleanup as soon as it exists.
    fn add_namespace(&mut self, suffix: &str) -> anyhow::Result<String> {
        let ns = format!("{}-{suffix}", self.id);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        in_netns(&ns, || -> anyhow::Result<()> {
            // The kernel skips DAD only when both `all` and the device's value are 0.
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
                std::fs::write(&path, "0").with_context(|| format!("writing {path}"))?;
            }
            Ok(())
        })??;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for agent in &mut self.agents {
            agent.terminate();
        }
        // Pods and nodes first: deleting a namespace deletes its veth ends, so the switch
        // ns, which holds the other ends, goes last.
        for ns in self.namespaces.iter().rev() {
            delete_namespace_quietly(ns);
        }
        unmount_bpffs(&self.dir.join("bpf"));
        if std::env::var_os("HGW_LAB_KEEP_LOGS").is_some() {
            eprintln!(
                "lab {}: agent configs and logs kept in {}",
                self.id,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether a bpffs is mounted at `dir`.
fn bpffs_mounted(dir: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let mut fields = l.split_whitespace();
            let (_, point, kind) = (fields.next(), fields.next(), fields.next());
            kind == Some("bpf") && point.is_some_and(|p| std::path::Path::new(p) == dir)
        })
    })
}

/// Unmounts the lab's bpffs: its pins, and with them any link or map left, go.
fn unmount_bpffs(dir: &std::path::Path) {
    while bpffs_mounted(dir) {
        let status = std::process::Command::new("umount").arg(dir).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status();
            break;
        }
    }
}

/// Whether `id` has the shape of a lab id: `hgw` then at least 4 lowercase hex digits.
pub fn is_lab_id(id: &str) -> bool {
    id.strip_prefix("hgw").is_some_and(|hex| {
        hex.len() >= 4
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A lab id no existing namespace or temp dir uses: `hgw` + 6 hex digits from a
/// randomly keyed hash of pid, time and a per-process counter.
fn fresh_id() -> anyhow::Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let taken = Lab::list()?;
    let started = Instant::now();
    loop {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let id = format!("hgw{:06x}", h.finish() & 0xff_ffff);
        if !taken.contains(&id) && !std::env::temp_dir().join(&id).exists() {
            return Ok(id);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1),
            "no free lab id found"
        );
    }
}

/// How the nodes' uplinks are joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wiring {
    /// Each uplink is a veth whose other end is a port of br0 in `<id>-sw`.
    Switch,
    /// Two nodes only: their uplinks are the two ends of one veth pair.
    Pair,
}

/// The node's uplink addresses on its `eth0`, which is then set up.
fn add_uplink_addresses(node: &Node) -> anyhow::Result<()> {
    add_addresses(
        &node.ns,
        "eth0",
        &[
            &format!("{}/24", node.uplink_ip),
            &format!("{}/64", node.uplink_ip6),
        ],
    )?;
    ip(&["-n", &node.ns, "link", "set", "eth0", "up"]).map(drop)
}

/// `ip -n NS addr add ADDR dev DEV` for each address.
fn add_addresses(ns: &str, dev: &str, addrs: &[&str]) -> anyhow::Result<()> {
    for addr in addrs {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
    }
    Ok(())
}

/// `n` as an address octet, for node and pod numbers.
fn octet(n: usize) -> anyhow::Result<u8> {
    u8::try_from(n).with_context(|| format!("{n} does not fit an address octet"))
}
