//! Configs for the tests of the config's modules.

use clap::Parser as _;

use super::{Config, ConfigError, RawConfig, RawPeer, Source, check_peers};

pub(super) fn raw(peers: &[(&str, &str, &str)]) -> RawConfig {
    RawConfig {
        node_name: Some("n1".into()),
        uplink: Some("eth0".into()),
        pod_cidr: Some("10.244.1.0/24".into()),
        cluster_cidr: Some("10.244.0.0/16".into()),
        peers: peers
            .iter()
            .map(|(name, ip, cidr)| RawPeer {
                name: (*name).into(),
                node_ip: (*ip).into(),
                pod_cidr: (*cidr).into(),
                node_ip_v6: None,
                pod_cidr_v6: None,
            })
            .collect(),
        ..RawConfig::default()
    }
}

/// The config and its static peers' checks, as the agent's start runs them.
pub(super) fn checked(raw: RawConfig) -> Result<Config, ConfigError> {
    let config = Config::from_raw(raw)?;
    if let Source::Static { network, peers } = &config.source {
        check_peers(network, peers.clone(), None)?;
    }
    Ok(config)
}

pub(super) fn error(peers: &[(&str, &str, &str)]) -> String {
    error_of(raw(peers))
}

/// A dual-stack node n1 (fd00:244:1::/64) with the given peers, each with both
/// families: (name, IPv4, CIDR, IPv6, CIDR).
pub(super) fn raw_v6(peers: &[(&str, &str, &str, &str, &str)]) -> RawConfig {
    let mut r = raw(&[]);
    r.pod_cidr_v6 = Some("fd00:244:1::/64".into());
    r.cluster_cidr_v6 = Some("fd00:244::/32".into());
    r.peers = peers
        .iter()
        .map(|(name, ip, cidr, ip6, cidr6)| RawPeer {
            name: (*name).into(),
            node_ip: (*ip).into(),
            pod_cidr: (*cidr).into(),
            node_ip_v6: Some((*ip6).into()),
            pod_cidr_v6: Some((*cidr6).into()),
        })
        .collect();
    r
}

pub(super) fn error_of(r: RawConfig) -> String {
    match checked(r) {
        Ok(config) => panic!("accepted {config:?}"),
        Err(err) => err.to_string(),
    }
}

/// `hgw-agent run`'s flags, without the file.
#[derive(clap::Parser)]
pub(super) struct Flags {
    #[command(flatten)]
    flags: RawConfig,
}

pub(super) fn flags(args: &[&str]) -> RawConfig {
    Flags::try_parse_from(std::iter::once("hgw-agent").chain(args.iter().copied()))
        .expect("flags parse")
        .flags
}

pub(super) fn file(text: &str) -> RawConfig {
    toml::from_str(text).expect("file parses")
}

pub(super) const FILE: &str = r#"
node_name = "n1"
uplink = "eth0"
pod_cidr = "10.244.1.0/24"
cluster_cidr = "10.244.0.0/16"
setup_node = true
fast_path = "all"

[[peers]]
name = "n2"
node_ip = "172.31.0.2"
pod_cidr = "10.244.2.0/24"
"#;

pub(super) fn static_peers(config: &Config) -> Vec<&str> {
    let Source::Static { peers, .. } = &config.source else {
        panic!("static config expected: {config:?}")
    };
    peers.iter().map(|p| p.name.as_str()).collect()
}
