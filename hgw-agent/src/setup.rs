//! Node set-up that flannel users do by hand (see the seeds): the bridge with the
//! gateway address, IPv4 forwarding, and FORWARD accept for the cluster CIDR.
//! Only with `setup_node`; every step is idempotent.

use std::process::Command;

use ipnet::Ipv4Net;
use log::info;

use crate::{
    config::{Config, Network},
    kernel::{Kernel, KernelError, Link},
};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("enabling IPv4 forwarding ({IP_FORWARD}): {0}")]
    IpForward(#[source] std::io::Error),
    #[error("running iptables {args}: {reason}")]
    Iptables { args: String, reason: String },
}

/// Brings the node to what host-gw needs; returns the bridge.
pub async fn apply(
    kernel: &Kernel,
    config: &Config,
    network: &Network,
) -> Result<Link, SetupError> {
    let bridge = kernel.ensure_bridge(&config.bridge).await?;
    let gateway = Ipv4Net::new(network.gateway(), network.pod_cidr.prefix_len())
        .expect("the prefix comes from a valid CIDR");
    kernel.ensure_address(bridge.index, gateway).await?;
    if std::fs::read_to_string(IP_FORWARD)
        .map_err(SetupError::IpForward)?
        .trim()
        != "1"
    {
        std::fs::write(IP_FORWARD, "1").map_err(SetupError::IpForward)?;
        info!("enabled IPv4 forwarding");
    }
    let cluster = network.cluster_cidr.to_string();
    for direction in ["-s", "-d"] {
        ensure_forward_accept(direction, &cluster)?;
    }
    info!(
        "node set up: bridge {} with {gateway}, forwarding on, FORWARD accepts {cluster}",
        config.bridge
    );
    Ok(bridge)
}

/// Appends `-A FORWARD <direction> <cidr> -j ACCEPT` unless the rule is there.
fn ensure_forward_accept(direction: &str, cidr: &str) -> Result<(), SetupError> {
    let rule = [
        direction,
        cidr,
        "-m",
        "comment",
        "--comment",
        "hgw",
        "-j",
        "ACCEPT",
    ];
    if iptables(&[&["-w", "-C", "FORWARD"], &rule[..]].concat()).is_ok() {
        return Ok(());
    }
    iptables(&[&["-w", "-A", "FORWARD"], &rule[..]].concat())
}

fn iptables(args: &[&str]) -> Result<(), SetupError> {
    let error = |reason: String| SetupError::Iptables {
        args: args.join(" "),
        reason,
    };
    let output = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| error(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(error(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}
