//! hgw-agent: host-gw pod networking with an eBPF fast path.
//!
//! On each node it installs `peer-pod-CIDR via peer-node-IP dev uplink` kernel routes
//! (what flannel's host-gw backend does) and attaches TC programs that forward the same
//! traffic without the kernel's routing and netfilter path.

use std::{path::PathBuf, sync::PoisonError};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use hgw_agent::{
    agent,
    config::{Config, ConfigError, DEFAULT_PIN_DIR, DEFAULT_STATUS_SOCKET, FastPath, RawConfig},
    serve::status,
    source::peer_blocks::PeerBlocks,
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
    /// Take hgw off this node on purpose (stopping the agent never does): the pinned
    /// programs and maps, hgw's routes (proto 104), its nftables tables and FORWARD
    /// rules. Refuses while an agent answers on the status socket.
    Uninstall {
        /// The agent's pin directory; "none" if it ran without pinning.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's status socket (to refuse while it runs).
        #[arg(long, default_value = DEFAULT_STATUS_SOCKET)]
        status_socket: PathBuf,
    },
}

/// Every config file field is also a flag; a flag overrides the file.
#[derive(Args, Clone)]
struct RunArgs {
    /// TOML config file: the flags' fields, named in snake_case (--pod-cidr is
    /// pod_cidr), peers as [[peers]] with name, node_ip, pod_cidr, node_ip_v6 and
    /// pod_cidr_v6, and the etcd flags in [etcd] (--etcd-lease-ttl is lease_ttl,
    /// --public-ip public_ip).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: RawConfig,
    /// Same as --fast-path off: kernel routes only, no eBPF programs.
    #[arg(long, conflicts_with = "fast_path")]
    no_fast_path: bool,
}

impl RunArgs {
    /// The config from the file and flags; `blocks` keeps the file's peers for the
    /// next read.
    fn config(&self, blocks: &mut PeerBlocks) -> Result<Config, ConfigError> {
        let mut flags = self.flags.clone();
        if self.no_fast_path {
            flags.fast_path = Some(FastPath::Off);
        }
        Config::load_with(self.config.as_deref(), flags, blocks)
    }
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
            let mut blocks = PeerBlocks::default();
            let config = args
                .config(&mut blocks)
                .context("invalid configuration; nothing was changed")?;
            let blocks = std::sync::Mutex::new(blocks);
            let reload = file.map(|path| -> (PathBuf, agent::Reload) {
                (
                    path,
                    Box::new(move || {
                        let mut blocks = blocks.lock().unwrap_or_else(PoisonError::into_inner);
                        args.config(&mut blocks)
                    }),
                )
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
        Command::Uninstall {
            pin_dir,
            status_socket,
        } => {
            let pin_dir = (pin_dir != std::path::Path::new("none")).then_some(pin_dir);
            runtime
                .block_on(hgw_agent::node::uninstall::uninstall(
                    pin_dir.as_deref(),
                    &status_socket,
                ))
                .context("hgw-agent uninstall")?;
            Ok(())
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
