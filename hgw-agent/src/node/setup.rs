//! Node set-up that flannel users do by hand (see the seeds): the bridge with the
//! gateway address, forwarding, and FORWARD accept for the cluster CIDR, for each family
//! the node has. Only with `setup_node`; every step is idempotent.

use std::process::Command;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use log::info;

use crate::{
    config::{Config, Network},
    kernel::{Kernel, KernelError, Link},
};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("enabling forwarding ({path}): {source}")]
    Forwarding {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("running {tool} {args}: {reason}")]
    Iptables {
        tool: &'static str,
        args: String,
        reason: String,
    },
}

/// Brings the node to what host-gw needs; returns the bridge.
pub async fn apply(
    kernel: &Kernel,
    config: &Config,
    network: &Network,
) -> Result<Link, SetupError> {
    let bridge = kernel.ensure_bridge(&config.bridge).await?;
    let mut gateways = vec![IpNet::V4(
        Ipv4Net::new(network.gateway(), network.pod_cidr.prefix_len())
            .expect("the prefix comes from a valid CIDR"),
    )];
    if let (Some(v6), Some(gateway)) = (network.v6, network.gateway_v6()) {
        gateways.push(IpNet::V6(
            Ipv6Net::new(gateway, v6.pod_cidr.prefix_len())
                .expect("the prefix comes from a valid CIDR"),
        ));
    }
    for gateway in &gateways {
        kernel.ensure_address(bridge.index, *gateway).await?;
    }
    let mut sysctls = vec![IP_FORWARD];
    if network.v6.is_some() {
        sysctls.push(IPV6_FORWARDING);
    }
    for path in sysctls {
        let error = |source| SetupError::Forwarding { path, source };
        if std::fs::read_to_string(path).map_err(error)?.trim() != "1" {
            std::fs::write(path, "1").map_err(error)?;
            info!("enabled forwarding ({path})");
        }
    }
    let clusters: Vec<IpNet> = network.cluster_cidrs().collect();
    for cluster in &clusters {
        let tool = if cluster.addr().is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        for direction in ["-s", "-d"] {
            ensure_forward_accept(tool, direction, &cluster.to_string())?;
        }
    }
    let list = |nets: &[IpNet]| {
        nets.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and ")
    };
    info!(
        "node set up: bridge {} with {}, forwarding on, FORWARD accepts {}",
        config.bridge,
        list(&gateways),
        list(&clusters)
    );
    Ok(bridge)
}

/// Appends `-A FORWARD <direction> <cidr> -j ACCEPT` unless the rule is there.
fn ensure_forward_accept(
    tool: &'static str,
    direction: &str,
    cidr: &str,
) -> Result<(), SetupError> {
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
    if iptables(tool, &[&["-w", "-C", "FORWARD"], &rule[..]].concat()).is_ok() {
        return Ok(());
    }
    iptables(tool, &[&["-w", "-A", "FORWARD"], &rule[..]].concat())
}

/// Deletes every FORWARD rule hgw appended (`-m comment --comment hgw`), in both
/// families (`hgw-agent uninstall`); a tool that is not installed has none.
pub fn remove_forward_accepts() -> Result<(), SetupError> {
    for tool in ["iptables", "ip6tables"] {
        let Ok(output) = Command::new(tool).args(["-w", "-S", "FORWARD"]).output() else {
            continue;
        };
        let rules = String::from_utf8_lossy(&output.stdout).into_owned();
        for rule in rules.lines().filter(|l| l.contains("--comment hgw ")) {
            let Some(spec) = rule.strip_prefix("-A FORWARD ") else {
                continue;
            };
            let mut args = vec!["-w", "-D", "FORWARD"];
            args.extend(spec.split_whitespace());
            iptables(tool, &args)?;
        }
    }
    Ok(())
}

fn iptables(tool: &'static str, args: &[&str]) -> Result<(), SetupError> {
    let error = |reason: String| SetupError::Iptables {
        tool,
        args: args.join(" "),
        reason,
    };
    let output = Command::new(tool)
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
