//! `ip_masq`: flannel's masquerade rules (its nftables traffic manager's `postrtg`
//! chain), for each family the node has, in an nftables table of hgw's own. Pod
//! traffic leaving the cluster CIDR takes the node's address; pod-to-pod traffic, and
//! multicast, never does. The table is replaced as a whole in one `nft -f`
//! transaction, so applying it again (a restart) is idempotent.

use ipnet::IpNet;
use log::{info, warn};

use crate::config::Network;

/// hgw's masquerade table (both families: one `inet` table).
pub const TABLE: &str = "hgw-masq";
/// kube-proxy's masquerade mark: what it marked it masquerades itself.
const KUBE_PROXY_MARK: u32 = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("{action} nftables table inet {TABLE}: running nft: {source} (install nftables)")]
    NoNft {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} nftables table inet {TABLE} (nft -f -): {reason}")]
    Nft {
        action: &'static str,
        reason: String,
    },
}

/// The whole table for `network`, as one `nft -f` transaction that replaces any table
/// of the name.
pub fn ruleset(network: &Network) -> String {
    let mut rules = vec![
        // flannel matches `meta mark 0x4000`; the mask is what its iptables rule
        // (`--mark 0x4000/0x4000`) and kube-proxy mean: the bit, whatever else is set.
        format!(
            "meta mark & {KUBE_PROXY_MARK:#x} == {KUBE_PROXY_MARK:#x} return comment \"kube-proxy masquerades what it marked\""
        ),
    ];
    for (pod, cluster) in network.pod_cidrs().zip(network.cluster_cidrs()) {
        let (ip, multicast) = match pod {
            IpNet::V4(_) => ("ip", "224.0.0.0/4"),
            IpNet::V6(_) => ("ip6", "ff00::/8"),
        };
        rules.extend([
            format!("{ip} saddr {pod} {ip} daddr {cluster} return comment \"pod to pod\""),
            format!("{ip} saddr {cluster} {ip} daddr {pod} return comment \"pod to pod\""),
            format!(
                "{ip} saddr != {pod} {ip} daddr {cluster} return comment \"into the cluster from elsewhere\""
            ),
            format!(
                "{ip} saddr {cluster} {ip} daddr != {multicast} masquerade fully-random comment \"pods out of the cluster\""
            ),
            // Shadowed by the third rule, as in flannel's nftables manager; kept so the
            // table is flannel's rule for rule.
            format!(
                "{ip} saddr != {cluster} {ip} daddr {cluster} masquerade fully-random comment \"the host to pods\""
            ),
        ]);
    }
    let mut script = format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain postrtg {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n"
    );
    for rule in rules {
        script.push_str(&format!("\t\t{rule}\n"));
    }
    script.push_str("\t}\n}\n");
    script
}

/// Installs (or replaces) the table for `network`.
pub fn apply(network: &Network) -> Result<(), MasqError> {
    nft(&ruleset(network), "installing")?;
    let cidrs: Vec<String> = network.cluster_cidrs().map(|c| c.to_string()).collect();
    info!(
        "ip_masq: pod traffic leaving {} is masqueraded (nftables table inet {TABLE})",
        cidrs.join(" and ")
    );
    Ok(())
}

/// The table as `ip_masq` says: installed for `network`, or gone (a table left from
/// an earlier run with it on). A removal that fails only warns, and without nft there
/// is no table of hgw's to remove.
pub fn set(ip_masq: bool, network: &Network) -> Result<(), MasqError> {
    if ip_masq {
        return apply(network);
    }
    match remove() {
        Ok(()) | Err(MasqError::NoNft { .. }) => {}
        Err(e) => warn!("{e}"),
    }
    Ok(())
}

/// Removes the table; nothing to do when it is not there.
pub fn remove() -> Result<(), MasqError> {
    nft(
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
        "removing",
    )
}

fn nft(script: &str, action: &'static str) -> Result<(), MasqError> {
    super::nft::apply(script).map_err(|e| match e {
        super::nft::NftError::Spawn(source) => MasqError::NoNft { action, source },
        super::nft::NftError::Failed(reason) => MasqError::Nft { action, reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkV6;

    #[test]
    fn ruleset_is_flannels_for_each_family() {
        let network = Network {
            pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            v6: Some(NetworkV6 {
                pod_cidr: "fd00:244:1::/64".parse().expect("cidr"),
                cluster_cidr: "fd00:244::/32".parse().expect("cidr"),
            }),
        };
        let script = ruleset(&network);
        // Replaced as a whole, in one transaction.
        assert!(script.starts_with(
            "table inet hgw-masq\ndelete table inet hgw-masq\ntable inet hgw-masq {\n\tchain postrtg {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        ));
        let rules: Vec<&str> = script
            .lines()
            .filter_map(|l| l.strip_prefix("\t\t"))
            .skip(1)
            .map(|l| l.split(" comment ").next().expect("rule"))
            .collect();
        assert_eq!(
            rules,
            [
                "meta mark & 0x4000 == 0x4000 return",
                "ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
                "ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return",
                "ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
                "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
                "ip6 saddr fd00:244:1::/64 ip6 daddr fd00:244::/32 return",
                "ip6 saddr fd00:244::/32 ip6 daddr fd00:244:1::/64 return",
                "ip6 saddr != fd00:244:1::/64 ip6 daddr fd00:244::/32 return",
                "ip6 saddr fd00:244::/32 ip6 daddr != ff00::/8 masquerade fully-random",
                "ip6 saddr != fd00:244::/32 ip6 daddr fd00:244::/32 masquerade fully-random",
            ]
        );
        let v4_only = ruleset(&Network {
            v6: None,
            ..network
        });
        assert!(!v4_only.contains("ip6 "), "{v4_only}");
    }
}
