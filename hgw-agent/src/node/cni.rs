//! The files a node's CNI plugins read: flannel's `subnet.env` (so a node's flannel CNI
//! config keeps working with hgw in flanneld's place) and, on request, a network config
//! list of its own for the standard plugins (bridge, host-local, portmap). Both are
//! written atomically: a temp file in the same directory, fsynced, then renamed over
//! the old one, so a runtime never reads half a file.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use log::{info, warn};
use serde_json::{Value, json};

use crate::config::{Config, Network};

/// The CNI spec version of the list: the newest Debian's containernetworking-plugins
/// (1.1) support.
pub const CNI_VERSION: &str = "1.0.0";
/// The network's name in the list (what runtimes key their cached results on).
pub const NETWORK_NAME: &str = "hgw";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// flannel's subnet file, as its `WriteSubnetFile` writes it: the cluster CIDR, the
/// gateway with the pod CIDR's prefix length, per family, then the MTU and whether
/// the node masquerades.
pub fn subnet_env(network: &Network, mtu: u32, ip_masq: bool) -> String {
    let mut text = format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\n",
        network.cluster_cidr,
        network.gateway(),
        network.pod_cidr.prefix_len()
    );
    if let (Some(v6), Some(gateway)) = (network.v6, network.gateway_v6()) {
        text.push_str(&format!(
            "FLANNEL_IPV6_NETWORK={}\nFLANNEL_IPV6_SUBNET={gateway}/{}\n",
            v6.cluster_cidr,
            v6.pod_cidr.prefix_len()
        ));
    }
    text.push_str(&format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n"));
    text
}

/// The CNI network config list: `bridge` on the node's bridge as the pods' default
/// gateway, `host-local` handing out the pod CIDR(s), `portmap` for hostPorts.
/// Masquerade is left to `ip_masq` (the bridge plugin's own would also masquerade
/// pod-to-pod traffic to other nodes).
pub fn conflist(network: &Network, bridge: &str, mtu: u32) -> Value {
    let mut ranges = vec![json!([{
        "subnet": network.pod_cidr.to_string(),
        "gateway": network.gateway().to_string(),
    }])];
    if let (Some(v6), Some(gateway)) = (network.v6, network.gateway_v6()) {
        ranges.push(json!([{
            "subnet": v6.pod_cidr.to_string(),
            "gateway": gateway.to_string(),
        }]));
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "isDefaultGateway": true,
                "mtu": mtu,
                "hairpinMode": true,
                "ipam": { "type": "host-local", "ranges": ranges },
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
            },
        ],
    })
}

/// The files as written, to write them again when the uplink's MTU changes.
#[derive(Debug)]
pub struct NodeFiles {
    subnet_env: PathBuf,
    cni_conf: Option<PathBuf>,
    bridge: String,
    ip_masq: bool,
    network: Network,
    mtu: u32,
}

impl NodeFiles {
    /// Writes `subnet.env`, and the CNI config list if one is configured.
    pub fn write(config: &Config, network: &Network, mtu: u32) -> Result<Self, CniError> {
        let files = Self {
            subnet_env: config.subnet_env.clone(),
            cni_conf: config.cni_conf.clone(),
            bridge: config.bridge.clone(),
            ip_masq: config.ip_masq,
            network: *network,
            mtu,
        };
        files.write_all()?;
        Ok(files)
    }

    /// Writes the files again if the uplink's MTU is not the one they carry; an error
    /// is logged (the old files stay, whole).
    pub fn uplink_mtu(&mut self, mtu: u32) {
        if mtu == self.mtu {
            return;
        }
        self.mtu = mtu;
        if let Err(e) = self.write_all() {
            warn!("{e}");
        }
    }

    fn write_all(&self) -> Result<(), CniError> {
        let env = subnet_env(&self.network, self.mtu, self.ip_masq);
        write_atomic(&self.subnet_env, env.as_bytes())?;
        let mut written = self.subnet_env.display().to_string();
        if let Some(path) = &self.cni_conf {
            let list = conflist(&self.network, &self.bridge, self.mtu);
            let mut text = serde_json::to_string_pretty(&list).unwrap_or_default();
            text.push('\n');
            write_atomic(path, text.as_bytes())?;
            written.push_str(&format!(" and {}", path.display()));
        }
        info!("wrote {written} (MTU {})", self.mtu);
        Ok(())
    }
}

/// Writes `contents` to `path` through a temp file in the same directory (created if
/// missing), fsynced before it is renamed into place; mode 0644, as flannel's.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), CniError> {
    let error = |source| CniError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // A dot name: runtimes skip it while it is being written.
    let temp = dir.join(format!(".{name}.hgw-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(contents)?;
        // Whatever the umask: CNI plugins may run as another user.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        // The rename itself reaches the disk with the directory.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkV6;

    fn network(v6: bool) -> Network {
        Network {
            pod_cidr: "10.244.1.0/24".parse().expect("cidr"),
            cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
            v6: v6.then(|| NetworkV6 {
                pod_cidr: "fd00:244:1::/64".parse().expect("cidr"),
                cluster_cidr: "fd00:244::/32".parse().expect("cidr"),
            }),
        }
    }

    #[test]
    fn subnet_env_is_flannels_format() {
        assert_eq!(
            subnet_env(&network(false), 1500, true),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(
            subnet_env(&network(true), 9000, false),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:244::/32\nFLANNEL_IPV6_SUBNET=fd00:244:1::1/64\n\
             FLANNEL_MTU=9000\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn conflist_names_bridge_ranges_and_portmap() {
        let list = conflist(&network(true), "cni0", 1450);
        assert_eq!(list["cniVersion"], CNI_VERSION);
        assert_eq!(list["name"], NETWORK_NAME);
        let plugins = list["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 2);
        let bridge = &plugins[0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "cni0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["isDefaultGateway"], true);
        assert_eq!(bridge["hairpinMode"], true);
        assert_eq!(bridge["mtu"], 1450);
        assert!(
            bridge.get("ipMasq").is_none(),
            "the bridge must not masquerade"
        );
        assert_eq!(
            bridge["ipam"],
            json!({
                "type": "host-local",
                "ranges": [
                    [{ "subnet": "10.244.1.0/24", "gateway": "10.244.1.1" }],
                    [{ "subnet": "fd00:244:1::/64", "gateway": "fd00:244:1::1" }],
                ],
            })
        );
        assert_eq!(
            plugins[1],
            json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true })
        );
        let v4_only = conflist(&network(false), "br-pods", 1500);
        assert_eq!(v4_only["plugins"][0]["bridge"], "br-pods");
        assert_eq!(
            v4_only["plugins"][0]["ipam"]["ranges"],
            json!([[{ "subnet": "10.244.1.0/24", "gateway": "10.244.1.1" }]])
        );
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("hgw-cni-test-{}", std::process::id()));
        let path = dir.join("sub/subnet.env");
        write_atomic(&path, b"one\n").expect("first write");
        write_atomic(&path, b"two\n").expect("second write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "two\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("metadata").permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["subnet.env"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
