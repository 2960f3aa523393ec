//! hgw-agent: host-gw pod networking with an eBPF fast path.
//!
//! On each node it installs `peer-pod-CIDR via peer-node-IP dev uplink` kernel routes
//! (what flannel's host-gw backend does) and attaches TC programs that forward the same
//! traffic without the kernel's routing and netfilter path.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use hgw_agent::{
    agent,
    config::{Config, ConfigError, DEFAULT_STATUS_SOCKET, RawConfig, RawPeer},
    status,
};

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent until SIGTERM/SIGINT (kernel routes stay installed on exit).
    ///
    /// Example: hgw-agent run --config /etc/hgw/node.toml
    ///
    /// Example: hgw-agent run --node-name n1 --uplink eth0 --pod-cidr 10.244.1.0/24
    /// --cluster-cidr 10.244.0.0/16 --peer n2=172.31.0.2,10.244.2.0/24
    Run(Box<RunArgs>),
    /// Show a running agent's peers, next hops and fast-path counters.
    Status {
        /// The agent's status socket.
        #[arg(long, default_value = DEFAULT_STATUS_SOCKET)]
        status_socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Every config file field has a flag; a flag overrides the file.
#[derive(Args, Clone)]
struct RunArgs {
    /// TOML config file (fields: node_name, uplink, bridge, pod_cidr, cluster_cidr,
    /// pod_cidr_v6, cluster_cidr_v6, setup_node, fast_path, attach, status_socket,
    /// [[peers]] name/node_ip/pod_cidr/node_ip_v6/pod_cidr_v6, [etcd]).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long)]
    node_name: Option<String>,
    /// Interface facing the other nodes (they must share its L2 segment).
    #[arg(long)]
    uplink: Option<String>,
    /// Bridge the local pods are attached to [default: cni0].
    #[arg(long)]
    bridge: Option<String>,
    /// This node's pod CIDR, e.g. 10.244.1.0/24.
    #[arg(long)]
    pod_cidr: Option<String>,
    /// The whole cluster's pod CIDR, e.g. 10.244.0.0/16.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Dual stack: this node's IPv6 pod CIDR, e.g. fd00:244:1::/64.
    #[arg(long)]
    pod_cidr_v6: Option<String>,
    /// Dual stack: the whole cluster's IPv6 pod CIDR, e.g. fd00:244::/32.
    #[arg(long)]
    cluster_cidr_v6: Option<String>,
    /// A peer node as NAME=NODE_IP,POD_CIDR, dual stack NAME=NODE_IP,POD_CIDR,NODE_IPV6,
    /// POD_CIDR_V6 (repeatable; added to the file's peers).
    #[arg(
        long = "peer",
        value_name = "NAME=NODE_IP,POD_CIDR[,NODE_IPV6,POD_CIDR_V6]"
    )]
    peers: Vec<String>,
    /// Set the node up: bridge with the gateway address, ip_forward, FORWARD accept
    /// for the cluster CIDR. Off by default.
    #[arg(long)]
    setup_node: bool,
    /// Which packets the fast path carries: established (flows conntrack accepted,
    /// without NAT), all (every pod-to-pod packet: no NAT or FORWARD policy on pod
    /// traffic), off (kernel routes only) [default: established].
    #[arg(long, value_enum, conflicts_with = "no_fast_path")]
    fast_path: Option<hgw_agent::datapath::FastPath>,
    /// Same as --fast-path off: kernel routes only, no eBPF programs.
    #[arg(long)]
    no_fast_path: bool,
    /// Where the bridge-side program runs: on the bridge, or on each of its ports
    /// (the pods' veths, skipping the bridge) [default: ports].
    #[arg(long, value_enum)]
    attach: Option<hgw_agent::datapath::Attach>,
    /// Where `hgw-agent status` reaches this agent [default: /run/hgw/hgw.sock].
    #[arg(long)]
    status_socket: Option<PathBuf>,
    /// Learn the network, this node's subnet and the peers from etcd (flannel's
    /// schema), e.g. http://10.0.0.5:2379 (comma-separated for several).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix [default: /coreos.com/network].
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// TTL of this node's subnet lease, in seconds [default: 60].
    #[arg(long)]
    etcd_lease_ttl: Option<i64>,
    /// This node's PublicIP in etcd [default: the uplink's first IPv4 address].
    #[arg(long)]
    public_ip: Option<String>,
    /// CA certificate (PEM) for etcd over TLS.
    #[arg(long)]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long)]
    etcd_cert_file: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long)]
    etcd_key_file: Option<PathBuf>,
    /// etcd user name.
    #[arg(long)]
    etcd_username: Option<String>,
    /// etcd password (better: the HGW_ETCD_PASSWORD environment variable).
    #[arg(long, env = "HGW_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
}

impl RunArgs {
    fn into_config(self) -> Result<Config, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        macro_rules! flag_overrides {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { raw.$field = Some(v); })* };
        }
        flag_overrides!(
            node_name,
            uplink,
            bridge,
            pod_cidr,
            cluster_cidr,
            pod_cidr_v6,
            cluster_cidr_v6,
            status_socket
        );
        if self.setup_node {
            raw.setup_node = Some(true);
        }
        if self.no_fast_path {
            raw.fast_path = Some(hgw_agent::datapath::FastPath::Off);
        }
        if self.fast_path.is_some() {
            raw.fast_path = self.fast_path;
        }
        if self.attach.is_some() {
            raw.attach = self.attach;
        }
        let etcd_flags = !self.etcd_endpoints.is_empty()
            || self.etcd_prefix.is_some()
            || self.etcd_lease_ttl.is_some()
            || self.public_ip.is_some()
            || self.etcd_ca_file.is_some()
            || self.etcd_cert_file.is_some()
            || self.etcd_key_file.is_some()
            || self.etcd_username.is_some();
        if etcd_flags {
            let etcd = raw.etcd.get_or_insert_with(Default::default);
            if !self.etcd_endpoints.is_empty() {
                etcd.endpoints = self.etcd_endpoints;
            }
            macro_rules! etcd_overrides {
                ($($flag:ident => $field:ident),*) => { $(if let Some(v) = self.$flag { etcd.$field = Some(v); })* };
            }
            etcd_overrides!(etcd_prefix => prefix, etcd_lease_ttl => lease_ttl, public_ip => public_ip,
                etcd_ca_file => ca_file, etcd_cert_file => cert_file, etcd_key_file => key_file,
                etcd_username => username);
        }
        if let (Some(password), Some(etcd)) = (self.etcd_password, raw.etcd.as_mut()) {
            etcd.password = Some(password);
        }
        for (i, spec) in self.peers.iter().enumerate() {
            raw.peers.push(parse_peer_flag(spec).ok_or_else(|| {
                ConfigError::invalid(
                    format!("--peer #{}", i + 1),
                    spec,
                    "expected NAME=NODE_IP,POD_CIDR or NAME=NODE_IP,POD_CIDR,NODE_IPV6,POD_CIDR_V6",
                )
            })?);
        }
        Config::from_raw(raw)
    }
}

fn parse_peer_flag(spec: &str) -> Option<RawPeer> {
    let (name, rest) = spec.split_once('=')?;
    let fields: Vec<&str> = rest.split(',').collect();
    let (v4, v6) = match fields.as_slice() {
        [ip, cidr] => ((ip, cidr), None),
        [ip, cidr, ip6, cidr6] => ((ip, cidr), Some((ip6, cidr6))),
        _ => return None,
    };
    Some(RawPeer {
        name: name.into(),
        node_ip: v4.0.to_string(),
        pod_cidr: v4.1.to_string(),
        node_ip_v6: v6.map(|v6| v6.0.to_string()),
        pod_cidr_v6: v6.map(|v6| v6.1.to_string()),
    })
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Run(args) => {
            // The same file and flags, read again when the file changes.
            let file = args.config.clone();
            let reread = args.clone();
            let config = args
                .into_config()
                .context("invalid configuration; nothing was changed")?;
            let reload = file.map(|path| -> (PathBuf, agent::Reload) {
                (path, Box::new(move || reread.clone().into_config()))
            });
            log::info!(
                "hgw-agent {} starting on node {}",
                env!("CARGO_PKG_VERSION"),
                config.node_name
            );
            runtime
                .block_on(agent::run(config, reload))
                .context("hgw-agent run")
        }
        Command::Status {
            status_socket,
            json,
        } => {
            let status = runtime.block_on(status::fetch(&status_socket))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("encoding status")?
                );
            } else {
                print!("{status}");
            }
            Ok(())
        }
    }
}
