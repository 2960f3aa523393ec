//! flannel's network config as the kube-flannel ConfigMap mounts it
//! (`/etc/kube-flannel/net-conf.json`): the same fields and checks as etcd's
//! `<prefix>/config`, and a host-gw backend, since hgw announces itself as one.

use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

use super::KubeError;
use crate::source::etcd::SubnetSpace;

#[derive(Deserialize)]
struct Backend {
    #[serde(rename = "Backend", default)]
    backend: Option<BackendType>,
}

#[derive(Deserialize)]
struct BackendType {
    #[serde(rename = "Type", default)]
    kind: Option<String>,
}

/// Reads and checks `path`; errors name the file and the field.
pub fn read(path: &Path, uplink: &[IpNet]) -> Result<SubnetSpace, KubeError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeError::ReadNetConf {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &text, uplink)
}

pub fn parse(path: &Path, text: &str, uplink: &[IpNet]) -> Result<SubnetSpace, KubeError> {
    let shown = path.display().to_string();
    let bad = |reason: String| KubeError::NetConf {
        path: shown.clone(),
        reason,
    };
    let backend: Backend = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    match backend.backend.and_then(|b| b.kind) {
        Some(kind) if kind == "host-gw" => {}
        other => {
            return Err(bad(format!(
                "Backend.Type is {other:?}: hgw replaces flannel's host-gw backend only (other nodes would send it {} packets)",
                other.as_deref().unwrap_or("vxlan")
            )));
        }
    }
    // etcd's checks, as flanneld applies the same ones to either source.
    let checked = SubnetSpace::parse(&shown, text).and_then(|space| {
        space.check_uplink(&shown, uplink)?;
        Ok(space)
    });
    checked.map_err(|e| match e {
        crate::source::etcd::EtcdError::BadConfig { reason, .. } => bad(reason),
        other => bad(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str, why: &str) {
        let uplink = ["172.31.0.1/24".parse().expect("net")];
        match parse(Path::new("/n.json"), text, &uplink) {
            Ok(space) => panic!("{text} accepted as {space:?}"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("/n.json") && e.contains(why), "{text}: {e}");
            }
        }
    }

    #[test]
    fn kube_flannels_config_with_host_gw_is_read() {
        let text = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{"Type":"host-gw"}}"#;
        let space = parse(Path::new("/n.json"), text, &[]).expect("valid");
        assert_eq!(space.v4.network.to_string(), "10.244.0.0/16");
        assert_eq!(
            space.v6.map(|p| p.network.to_string()).as_deref(),
            Some("fd00:244::/56")
        );
    }

    #[test]
    fn bad_network_configs_are_refused_naming_the_field() {
        refused(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
            "Backend.Type",
        );
        refused(r#"{"Network":"10.244.0.0/16"}"#, "Backend.Type");
        // etcd's checks (tested there), with the file named.
        refused(r#"{"Backend":{"Type":"host-gw"}}"#, "Network is missing");
        refused(
            r#"{"Network":"172.31.0.0/16","Backend":{"Type":"host-gw"}}"#,
            "Network 172.31.0.0/16 overlaps the uplink's network 172.31.0.0/24",
        );
        refused("{", "EOF");
    }
}
