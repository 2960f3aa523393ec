//! Connecting to etcd, and the start: the network config read and checked, this
//! node's subnet claimed, the lease keeper and the watch started.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions};
use ipnet::IpNet;
use log::info;
use tokio::sync::{mpsc, watch};

use super::{
    EtcdError, EtcdSource,
    claim::acquire,
    lease::{Lease, keep_alive},
    network::SubnetSpace,
    watch::run,
};
use crate::agent::sources::peer_channel;
use crate::config::EtcdConfig;

pub(super) struct Shared {
    pub(super) config: EtcdConfig,
    pub(super) public_ip: Ipv4Addr,
    pub(super) public_ipv6: Option<Ipv6Addr>,
    pub(super) uplink: Vec<IpNet>,
    pub(super) endpoints: String,
}

impl Shared {
    pub(super) fn error(
        &self,
        operation: &'static str,
    ) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        move |source| {
            crate::serve::metrics::count_etcd_error();
            EtcdError::Client {
                operation,
                endpoints: self.endpoints.clone(),
                source,
            }
        }
    }

    pub(super) fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.config.prefix)
    }
}

/// The uplink's first global IPv6 address (not link-local), as flanneld picks it.
fn first_global_ipv6(uplink: &[IpNet]) -> Option<Ipv6Addr> {
    uplink.iter().find_map(|net| match net.addr() {
        IpAddr::V6(a) if !a.is_loopback() && !a.is_multicast() && !a.is_unicast_link_local() => {
            Some(a)
        }
        _ => None,
    })
}

/// Connects, reads and checks the network config, acquires this node's subnet (both
/// families with `EnableIPv6`), and starts the lease keeper, the watch and the
/// forwarder to the agent. Fails (before the agent changes anything on the node) if
/// etcd cannot be reached or holds no usable config. `uplink_networks` are the uplink's
/// addresses with their prefixes: no subnet may cover them.
pub async fn start(
    config: EtcdConfig,
    public_ip: Ipv4Addr,
    uplink_networks: &[IpNet],
) -> Result<EtcdSource, EtcdError> {
    let mut shared = Shared {
        endpoints: config.endpoints.join(","),
        config,
        public_ip,
        public_ipv6: None,
        uplink: uplink_networks.to_vec(),
    };
    let mut client = connect(&shared).await?;
    let config_key = format!("{}/config", shared.config.prefix);
    let response = client
        .get(config_key.as_str(), None)
        .await
        .map_err(shared.error("reading the network config"))?;
    let text = match response.kvs().first() {
        Some(kv) => kv
            .value_str()
            .map_err(shared.error("reading the network config"))?
            .to_owned(),
        None => {
            return Err(EtcdError::BadConfig {
                key: config_key,
                reason: "missing: write flannel's network config there".into(),
            });
        }
    };
    let space = SubnetSpace::parse(&config_key, &text)?;
    space.check_uplink(&config_key, uplink_networks)?;
    if space.v6.is_some() {
        // The configured address first, else the uplink's first global one.
        shared.public_ipv6 = Some(
            shared
                .config
                .public_ipv6
                .or_else(|| first_global_ipv6(uplink_networks))
                .ok_or(EtcdError::NoPublicIpv6 {
                    key: config_key.clone(),
                })?,
        );
    }

    let lease = client
        .lease_grant(shared.config.lease_ttl, None)
        .await
        .map_err(shared.error("granting a lease"))?
        .id();
    let (own, listed) = acquire(&mut client, &shared, &space, lease, None).await?;
    info!(
        "etcd: this node holds {} (lease {lease:x}, TTL {} s)",
        own.key(&shared.config.prefix),
        shared.config.lease_ttl
    );

    let network = space.network(own);
    let (lease_tx, lease_rx) = watch::channel(lease);
    let (lost_tx, lost_rx) = mpsc::channel(1);
    tokio::spawn(keep_alive(
        client.lease_client(),
        shared.endpoints.clone(),
        shared.config.lease_ttl,
        lease_rx,
        lost_tx,
    ));
    let (tx, rx) = peer_channel();
    let lease = Lease {
        id: lease,
        renewed: lease_tx,
        lost: lost_rx,
    };
    let public_ips = std::iter::once(IpAddr::V4(shared.public_ip))
        .chain(shared.public_ipv6.map(IpAddr::V6))
        .collect();
    tokio::spawn(run(client, shared, space, (own, listed), lease, tx));
    Ok(EtcdSource {
        network,
        public_ips,
        peers: rx,
    })
}

async fn connect(shared: &Shared) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let (Some(user), Some(password)) = (&shared.config.username, &shared.config.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if shared.config.ca_file.is_some() || shared.config.cert_file.is_some() {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| EtcdError::ReadFile {
                path: path.display().to_string(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &shared.config.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&shared.config.cert_file, &shared.config.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Client::connect(&shared.config.endpoints, Some(options))
        .await
        .map_err(shared.error("connecting"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_ipv6_is_the_first_global_one() {
        let up: Vec<IpNet> = vec![
            "fe80::1/64".parse().expect("net"),
            "172.31.0.1/24".parse().expect("net"),
            "fd00:172:31::1/64".parse().expect("net"),
        ];
        assert_eq!(
            first_global_ipv6(&up),
            Some("fd00:172:31::1".parse().expect("ip"))
        );
        assert_eq!(first_global_ipv6(&up[..2]), None);
    }
}
