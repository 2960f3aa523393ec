//! Where the network and the peers come from: the static config, etcd or the
//! Kubernetes API, and the checks of the etcd and kube sections.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use super::{ConfigError, Network, Peer, RawConfig, RawEtcd, RawKube, fields::file_path};

/// Where the network and the peers come from.
#[derive(Debug, Clone)]
pub enum Source {
    Static { network: Network, peers: Vec<Peer> },
    Etcd(EtcdConfig),
    Kube(KubeConfig),
}

/// The Kubernetes API as the source: where it is, and flannel's network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// None: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub net_conf: PathBuf,
}

pub const DEFAULT_NET_CONF: &str = "/etc/kube-flannel/net-conf.json";

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl: i64,
    pub public_ip: Option<Ipv4Addr>,
    /// For a dual-stack network (none: the uplink's first global IPv6 address).
    pub public_ipv6: Option<Ipv6Addr>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_LEASE_TTL: i64 = 60;

/// With etcd or the Kubernetes API, this node's network and the peers come from there.
pub(super) fn reject_given(raw: &RawConfig, from: &str) -> Result<(), ConfigError> {
    for (given, field) in [
        (raw.pod_cidr.is_some(), "pod_cidr"),
        (raw.cluster_cidr.is_some(), "cluster_cidr"),
        (raw.pod_cidr_v6.is_some(), "pod_cidr_v6"),
        (raw.cluster_cidr_v6.is_some(), "cluster_cidr_v6"),
        (!raw.peers.is_empty(), "peers"),
    ] {
        if given {
            return Err(ConfigError::invalid(
                field,
                "(set)",
                format!("comes from {from}; remove it"),
            ));
        }
    }
    Ok(())
}

pub(super) fn kube_config(raw: RawKube) -> Result<KubeConfig, ConfigError> {
    let absolute = |path: PathBuf, field: &str| {
        if !path.is_absolute() {
            return Err(ConfigError::invalid(
                field,
                path.display(),
                "expected an absolute file path",
            ));
        }
        file_path(path, field, None)
    };
    Ok(KubeConfig {
        kubeconfig: raw
            .kubeconfig
            .map(|p| absolute(p, "kube.kubeconfig"))
            .transpose()?,
        net_conf: absolute(
            raw.net_conf.unwrap_or_else(|| DEFAULT_NET_CONF.into()),
            "kube.net_conf",
        )?,
    })
}

pub(super) fn etcd_config(raw: RawEtcd) -> Result<EtcdConfig, ConfigError> {
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        return Err(ConfigError::Missing {
            field: "etcd.endpoints",
            flag: "etcd-endpoints",
        });
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ConfigError::invalid(
                format!("etcd.endpoints[{i}]"),
                endpoint,
                "expected http://HOST:PORT or https://HOST:PORT",
            ));
        }
    }
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(ConfigError::invalid(
            "etcd.prefix",
            &prefix,
            "must start with / and not end with /",
        ));
    }
    let lease_ttl = raw.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
    if !(5..=86_400).contains(&lease_ttl) {
        return Err(ConfigError::invalid(
            "etcd.lease_ttl",
            lease_ttl,
            "must be 5 to 86400 seconds",
        ));
    }
    let public_ip = raw
        .public_ip
        .map(|ip| {
            ip.parse::<Ipv4Addr>()
                .map_err(|_| ConfigError::invalid("etcd.public_ip", &ip, "not an IPv4 address"))
        })
        .transpose()?;
    let public_ipv6 = raw
        .public_ipv6
        .map(|ip| {
            ip.parse::<Ipv6Addr>()
                .map_err(|_| ConfigError::invalid("etcd.public_ipv6", &ip, "not an IPv6 address"))
        })
        .transpose()?;
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        return Err(ConfigError::invalid(
            "etcd.key_file",
            "",
            "cert_file and key_file go together",
        ));
    }
    if raw.username.is_some() != raw.password.is_some() {
        return Err(ConfigError::invalid(
            "etcd.password",
            "",
            "username and password go together",
        ));
    }
    Ok(EtcdConfig {
        endpoints,
        prefix,
        lease_ttl,
        public_ip,
        public_ipv6,
        ca_file: raw.ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        username: raw.username,
        password: raw.password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::test_support::{error_of, file, flags, raw};

    #[test]
    fn etcd_excludes_static_network_fields() {
        let mut r = raw(&[]);
        r.etcd = Some(RawEtcd {
            endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
            ..RawEtcd::default()
        });
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("pod_cidr with etcd");
        assert!(
            e.to_string().contains("pod_cidr") && e.to_string().contains("comes from etcd"),
            "{e}"
        );
        let mut r = raw(&[]);
        r.pod_cidr = None;
        r.cluster_cidr = None;
        r.etcd = Some(RawEtcd {
            endpoints: Some(vec!["127.0.0.1:2379".into()]),
            ..RawEtcd::default()
        });
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("endpoint without scheme");
        assert!(e.to_string().contains("etcd.endpoints[0]"), "{e}");
    }

    #[test]
    fn an_etcd_flag_overrides_one_field_of_the_files_etcd() {
        let text = "node_name = \"n1\"\nuplink = \"eth0\"\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"/a\"\nusername = \"u\"\n";
        let raw = file(text).with_flags(flags(&[
            "--etcd-prefix=/b",
            "--public-ipv6=fd00:172:31::1",
            "--etcd-password=p",
        ]));
        let config = Config::from_raw(raw).expect("valid");
        let Source::Etcd(etcd) = &config.source else {
            panic!("etcd config expected")
        };
        assert_eq!(etcd.endpoints, ["http://10.0.0.5:2379"]);
        assert_eq!(etcd.prefix, "/b");
        assert_eq!(
            etcd.public_ipv6,
            Some("fd00:172:31::1".parse().expect("ip"))
        );
        assert_eq!(etcd.password.as_deref(), Some("p"));
    }

    #[test]
    fn rejects_a_bad_public_ipv6() {
        let raw = file(
            "node_name = \"n1\"\nuplink = \"eth0\"\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\npublic_ipv6 = \"172.31.0.1\"\n",
        );
        let e = error_of(raw);
        assert!(
            e.contains("etcd.public_ipv6") && e.contains("not an IPv6 address"),
            "{e}"
        );
    }

    #[test]
    fn kube_from_the_file_or_the_flags() {
        let kube = |raw: RawConfig| match Config::from_raw(raw).expect("valid").source {
            Source::Kube(kube) => kube,
            other => panic!("kube expected, got {other:?}"),
        };
        let base = "node_name = \"n1\"\nuplink = \"eth0\"\n";
        let got = kube(file(&format!("{base}[kube]\n")));
        assert_eq!(got.kubeconfig, None, "in-cluster by default");
        assert_eq!(got.net_conf, PathBuf::from(DEFAULT_NET_CONF));
        let got = kube(file(base).with_flags(flags(&[
            "--kube-subnet-mgr",
            "--kubeconfig=/etc/hgw/kubeconfig",
            "--kube-net-conf=/n.json",
        ])));
        assert_eq!(got.kubeconfig, Some(PathBuf::from("/etc/hgw/kubeconfig")));
        assert_eq!(got.net_conf, PathBuf::from("/n.json"));
    }

    #[test]
    fn kube_config_errors_name_the_field() {
        let error = |text: &str| {
            Config::from_raw(file(text))
                .expect_err("refused")
                .to_string()
        };
        let base = "node_name = \"n1\"\nuplink = \"eth0\"\n";
        let e = error(&format!("{base}[kube]\nkubeconfig = \"rel/k\"\n"));
        assert!(e.contains("kube.kubeconfig") && e.contains("rel/k"), "{e}");
        let e = error(&format!("{base}[kube]\nnet_conf = \"/etc/\"\n"));
        assert!(e.contains("kube.net_conf"), "{e}");
        let e = error(&format!("{base}pod_cidr = \"10.244.1.0/24\"\n[kube]\n"));
        assert!(
            e.contains("pod_cidr") && e.contains("Kubernetes API"),
            "{e}"
        );
        let e = error(&format!(
            "{base}[kube]\n[etcd]\nendpoints = [\"http://10.0.0.5:2379\"]\n"
        ));
        assert!(e.contains("kube") && e.contains("keep one"), "{e}");
    }
}
