//! A validated configuration: every field checked, the defaults filled in, the source
//! chosen.

use std::path::PathBuf;

use super::{
    Attach, ConfigError, FastPath, Peer, RawConfig, Source,
    fields::{file_path, interface_name, required},
    source::{etcd_config, kube_config, reject_given},
    static_peers::static_source,
};
use crate::source::peer_blocks::PeerBlocks;

pub const DEFAULT_STATUS_SOCKET: &str = "/run/hgw/hgw.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hgw";

/// `pin_dir`: an absolute directory, or "none" for no pinning.
fn pin_dir(path: &std::path::Path) -> Result<Option<PathBuf>, ConfigError> {
    if path == std::path::Path::new("none") {
        return Ok(None);
    }
    if !path.is_absolute() {
        return Err(ConfigError::invalid(
            "pin_dir",
            path.display(),
            "expected an absolute directory (on a bpffs), or \"none\"",
        ));
    }
    Ok(Some(path.to_owned()))
}
pub const DEFAULT_SUBNET_ENV: &str = "/run/flannel/subnet.env";
/// How long a carried flow's verdict is reused by default: a tenth of netfilter's
/// flowtable, which checks its flows' conntrack entries once a second.
pub const DEFAULT_CT_RECHECK_MS: u32 = 100;
/// As long as the flowtable's own interval.
pub const MAX_CT_RECHECK_MS: u32 = 1000;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub uplink: String,
    pub bridge: String,
    pub source: Source,
    /// Create the bridge with its gateway address, enable ip_forward, accept the
    /// cluster CIDR in FORWARD. Off by default: on a real host that is the admin's call.
    pub setup_node: bool,
    /// Which packets the eBPF fast path carries (off: kernel routes only, like
    /// flannel's host-gw).
    pub fast_path: FastPath,
    /// How long (ms) a carried flow's verdict is reused; 0: never.
    pub ct_recheck_ms: u32,
    /// Where the bridge-side program runs (`None`: as the kernel's hook kind suits).
    pub attach: Option<Attach>,
    pub status_socket: PathBuf,
    /// flannel's subnet file, written once the network is known.
    pub subnet_env: PathBuf,
    /// The CNI network config list to write, if any.
    pub cni_conf: Option<PathBuf>,
    /// Masquerade pod traffic leaving the cluster CIDR.
    pub ip_masq: bool,
    /// Where links and maps are pinned (`None`: not pinned).
    pub pin_dir: Option<PathBuf>,
    /// The fields as given, with the defaults filled in: what
    /// [`Config::restart_needed`] compares.
    given: RawConfig,
    /// Where metrics, /healthz and /readyz are served (none: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Config {
    /// Checks every field and every relation between the CIDRs; the first problem
    /// found is returned, naming the field and the value.
    pub fn from_raw(mut raw: RawConfig) -> Result<Self, ConfigError> {
        let kube = raw.kube.clone().filter(|k| k.enabled != Some(false));
        if kube.is_some() && raw.node_name.is_none() {
            // As flanneld: the DaemonSet passes the node's name in NODE_NAME.
            raw.node_name = std::env::var("NODE_NAME").ok();
            if raw.node_name.is_none() {
                return Err(ConfigError::invalid(
                    "node_name",
                    "",
                    "missing: set it in the config file, with --node-name or in NODE_NAME",
                ));
            }
        }
        let node_name = required(raw.node_name.clone(), "node_name", "node-name")?;
        let uplink = interface_name(required(raw.uplink.clone(), "uplink", "uplink")?, "uplink")?;
        let bridge = interface_name(
            raw.bridge.get_or_insert_with(|| "cni0".into()).clone(),
            "bridge",
        )?;
        if uplink == bridge {
            return Err(ConfigError::invalid(
                "bridge",
                &bridge,
                "the bridge cannot be the uplink",
            ));
        }
        let source = match (raw.etcd.clone(), kube) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "kube",
                    "(set)",
                    "[etcd] and [kube] are two sources of the same peers: keep one",
                ));
            }
            (None, Some(kube)) => {
                reject_given(&raw, "the Kubernetes API when [kube] is configured")?;
                Source::Kube(kube_config(kube)?)
            }
            (Some(etcd), None) => {
                reject_given(&raw, "etcd when [etcd] is configured")?;
                Source::Etcd(etcd_config(etcd)?)
            }
            (None, None) => static_source(
                &node_name,
                [raw.pod_cidr.clone(), raw.cluster_cidr.clone()],
                [raw.pod_cidr_v6.clone(), raw.cluster_cidr_v6.clone()],
                raw.peers.clone(),
            )?,
        };
        let metrics_addr = raw
            .metrics_addr
            .as_deref()
            .map(|addr| {
                addr.parse().map_err(|_| {
                    ConfigError::invalid(
                        "metrics_addr",
                        addr,
                        "expected IP:PORT, e.g. 127.0.0.1:9090 or [::]:9090",
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            node_name,
            uplink,
            bridge,
            source,
            setup_node: *raw.setup_node.get_or_insert(false),
            fast_path: *raw.fast_path.get_or_insert_default(),
            ct_recheck_ms: match *raw.ct_recheck_ms.get_or_insert(DEFAULT_CT_RECHECK_MS) {
                ms @ 0..=MAX_CT_RECHECK_MS => ms,
                ms => {
                    return Err(ConfigError::invalid(
                        "ct_recheck_ms",
                        ms,
                        format!(
                            "at most {MAX_CT_RECHECK_MS} (ms): longer would let a deleted conntrack entry's flow ride on"
                        ),
                    ));
                }
            },
            attach: raw.attach,
            status_socket: raw
                .status_socket
                .get_or_insert_with(|| DEFAULT_STATUS_SOCKET.into())
                .clone(),
            subnet_env: file_path(
                raw.subnet_env
                    .get_or_insert_with(|| DEFAULT_SUBNET_ENV.into())
                    .clone(),
                "subnet_env",
                None,
            )?,
            cni_conf: raw
                .cni_conf
                .clone()
                .map(|path| file_path(path, "cni_conf", Some(".conflist")))
                .transpose()?,
            ip_masq: *raw.ip_masq.get_or_insert(false),
            pin_dir: pin_dir(raw.pin_dir.get_or_insert_with(|| DEFAULT_PIN_DIR.into()))?,
            given: raw,
            metrics_addr,
        })
    }

    /// Reads the file (if any) and lays the flags over it, then checks the result.
    pub fn load(file: Option<&std::path::Path>, flags: RawConfig) -> Result<Self, ConfigError> {
        Self::load_with(file, flags, &mut PeerBlocks::default())
    }

    /// [`Config::load`], with the file's `[[peers]]` blocks kept in `blocks` from one
    /// read to the next.
    pub fn load_with(
        file: Option<&std::path::Path>,
        flags: RawConfig,
        blocks: &mut PeerBlocks,
    ) -> Result<Self, ConfigError> {
        let raw = match file {
            Some(path) => RawConfig::from_file_with(path, blocks)?,
            None => RawConfig::default(),
        };
        Self::from_raw(raw.with_flags(flags))
    }

    /// The fields whose values differ from the `running` config's, other than the
    /// static peers (applied while running): these wait for a restart. A field newly
    /// written with its default value is no change.
    pub fn restart_needed(&self, running: &Config) -> Vec<&'static str> {
        let mut names = self.given.differing(&running.given);
        names.retain(|name| *name != "peers");
        names
    }

    /// The static peers, moved out (`None` for another source): the config keeps
    /// neither them nor their given form, so the agent holds one copy of thousands of
    /// peers, its desired state's, and not two more for the config it runs with.
    pub fn take_static_peers(&mut self) -> Option<Vec<Peer>> {
        let Source::Static { peers, .. } = &mut self.source else {
            return None;
        };
        self.given.peers = Vec::new();
        Some(std::mem::take(peers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{FILE, file, flags, raw, static_peers};

    #[test]
    fn rejects_missing_and_bad_node_fields() {
        let mut r = raw(&[]);
        r.pod_cidr = None;
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("missing pod_cidr");
        assert!(e.to_string().contains("pod_cidr"), "{e}");
        let mut r = raw(&[]);
        r.pod_cidr = Some("10.245.1.0/24".into());
        let e = Config::from_raw(r)
            .map(|_| ())
            .expect_err("outside cluster");
        assert!(e.to_string().contains("not inside cluster_cidr"), "{e}");
        let mut r = raw(&[]);
        r.uplink = Some("an-interface-name-too-long".into());
        let e = Config::from_raw(r).map(|_| ()).expect_err("long name");
        assert!(e.to_string().contains("uplink"), "{e}");
    }

    #[test]
    fn file_only() {
        let config = Config::from_raw(file(FILE).with_flags(flags(&[]))).expect("valid");
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.bridge, "cni0");
        assert!(config.setup_node);
        assert_eq!(config.fast_path, FastPath::All);
        assert_eq!(config.attach, None);
        assert_eq!(static_peers(&config), ["n2"]);
    }

    #[test]
    fn flags_only() {
        let raw = RawConfig::default().with_flags(flags(&[
            "--node-name=n1",
            "--uplink=eth0",
            "--pod-cidr=10.244.1.0/24",
            "--cluster-cidr=10.244.0.0/16",
            "--setup-node",
            "--attach=bridge",
            "--status-socket=/tmp/hgw.sock",
            "--peer=n2=172.31.0.2,10.244.2.0/24",
            "--peer=n3=172.31.0.3,10.244.3.0/24,fd00:172:31::3,fd00:244:3::/64",
        ]));
        assert_eq!(raw.peers[1].pod_cidr_v6.as_deref(), Some("fd00:244:3::/64"));
        // No IPv6 on this node: n3's IPv6 fields are refused, naming the flag's peer.
        let e = Config::from_raw(raw.clone())
            .map(|_| ())
            .expect_err("v6 peer");
        assert!(e.to_string().contains("peers[1].pod_cidr_v6"), "{e}");
        let mut raw = raw;
        raw.peers[1].node_ip_v6 = None;
        raw.peers[1].pod_cidr_v6 = None;
        let config = Config::from_raw(raw).expect("valid");
        assert!(config.setup_node);
        assert_eq!(config.attach, Some(Attach::Bridge));
        assert_eq!(config.fast_path, FastPath::Established);
        assert_eq!(config.status_socket, PathBuf::from("/tmp/hgw.sock"));
        assert_eq!(static_peers(&config), ["n2", "n3"]);
    }

    #[test]
    fn a_flag_overrides_the_file() {
        let raw = file(FILE).with_flags(flags(&["--fast-path", "off", "--bridge", "br0"]));
        let config = Config::from_raw(raw).expect("valid");
        assert_eq!(config.fast_path, FastPath::Off);
        assert_eq!(config.bridge, "br0");
        // Fields without a flag keep the file's value; an absent --setup-node is no
        // `setup_node = false`.
        assert_eq!(config.uplink, "eth0");
        assert!(config.setup_node);
    }

    #[test]
    fn taken_static_peers_leave_the_config_without_them_and_needing_no_restart() {
        let mut running = Config::from_raw(file(FILE)).expect("valid");
        let peers = running.take_static_peers().expect("a static source");
        assert_eq!(
            peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["n2"]
        );
        assert_eq!(running.take_static_peers(), Some(Vec::new()));
        let reread = Config::from_raw(file(FILE)).expect("valid");
        assert!(reread.restart_needed(&running).is_empty());
    }

    #[test]
    fn restart_needed_names_the_changed_fields_but_not_peers() {
        let running = Config::from_raw(file(FILE)).expect("valid");
        let peers_only = format!(
            "{FILE}\n[[peers]]\nname = \"n3\"\nnode_ip = \"172.31.0.3\"\npod_cidr = \"10.244.3.0/24\"\n"
        );
        let reread = Config::from_raw(file(&peers_only)).expect("valid");
        assert_eq!(static_peers(&reread), ["n2", "n3"]);
        assert!(reread.restart_needed(&running).is_empty());
        // A default written out is no change.
        let explicit = format!("bridge = \"cni0\"\n{FILE}");
        let reread = Config::from_raw(file(&explicit)).expect("valid");
        assert!(reread.restart_needed(&running).is_empty());
        // Unset, `attach` is the kernel's choice: written out, it overrides that.
        let pinned = format!("attach = \"ports\"\n{FILE}");
        let reread = Config::from_raw(file(&pinned)).expect("valid");
        assert_eq!(reread.restart_needed(&running), ["attach"]);

        let changed = FILE
            .replace("fast_path = \"all\"", "fast_path = \"off\"")
            .replace("10.244.1.0/24", "10.244.4.0/24");
        let reread = Config::from_raw(file(&changed)).expect("valid");
        assert_eq!(reread.restart_needed(&running), ["pod_cidr", "fast_path"]);
    }

    #[test]
    fn subnet_env_cni_conf_and_ip_masq() {
        let config = Config::from_raw(file(FILE)).expect("valid");
        assert_eq!(config.subnet_env, PathBuf::from(DEFAULT_SUBNET_ENV));
        assert_eq!(config.cni_conf, None);
        assert!(!config.ip_masq);
        // Top-level fields go before the [[peers]] table.
        let text = format!(
            "subnet_env = \"/tmp/s.env\"\ncni_conf = \"/etc/cni/net.d/10-hgw.conflist\"\nip_masq = true\n{FILE}"
        );
        let config = Config::from_raw(file(&text)).expect("valid");
        assert_eq!(config.subnet_env, PathBuf::from("/tmp/s.env"));
        assert_eq!(
            config.cni_conf.as_deref(),
            Some(std::path::Path::new("/etc/cni/net.d/10-hgw.conflist"))
        );
        assert!(config.ip_masq);
        let raw = file(FILE).with_flags(flags(&[
            "--ip-masq",
            "--subnet-env=/run/x/subnet.env",
            "--cni-conf=/tmp/a.conflist",
        ]));
        let config = Config::from_raw(raw).expect("valid");
        assert!(config.ip_masq);
        assert_eq!(config.subnet_env, PathBuf::from("/run/x/subnet.env"));
        let e = Config::from_raw(
            file(FILE).with_flags(flags(&["--cni-conf=/etc/cni/net.d/10-hgw.conf"])),
        )
        .map(|_| ())
        .expect_err("not a list name");
        assert!(
            e.to_string().contains("cni_conf") && e.to_string().contains(".conflist"),
            "{e}"
        );
        let e = Config::from_raw(file(FILE).with_flags(flags(&["--subnet-env=/run/flannel/"])))
            .map(|_| ())
            .expect_err("a directory");
        assert!(e.to_string().contains("subnet_env"), "{e}");
    }

    #[test]
    fn metrics_addr_is_off_by_default_and_checked() {
        let base = raw(&[("n2", "172.31.0.2", "10.244.2.0/24")]);
        let config = Config::from_raw(base.clone()).expect("valid");
        assert_eq!(config.metrics_addr, None);
        let with = |addr: &str| {
            Config::from_raw(RawConfig {
                metrics_addr: Some(addr.into()),
                ..base.clone()
            })
        };
        let config = with("127.0.0.1:9090").expect("valid");
        assert_eq!(
            config.metrics_addr,
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        assert!(with("[::]:9090").is_ok());
        let e = with("localhost")
            .map(|_| ())
            .expect_err("no port")
            .to_string();
        assert!(e.contains("metrics_addr") && e.contains("localhost"), "{e}");
        let parsed =
            toml::from_str::<RawConfig>("metrics_addr = \"0.0.0.0:9090\"\n").expect("a file field");
        assert_eq!(parsed.metrics_addr.as_deref(), Some("0.0.0.0:9090"));
    }

    #[test]
    fn ct_recheck_ms_defaults_to_100_and_is_bounded_by_the_flowtables_second() {
        let base = raw(&[("n2", "172.31.0.2", "10.244.2.0/24")]);
        assert_eq!(
            Config::from_raw(base.clone()).expect("valid").ct_recheck_ms,
            100
        );
        let with = |ms: u32| {
            Config::from_raw(RawConfig {
                ct_recheck_ms: Some(ms),
                ..base.clone()
            })
        };
        assert_eq!(with(0).expect("off").ct_recheck_ms, 0);
        assert_eq!(with(1000).expect("the most").ct_recheck_ms, 1000);
        let e = with(1001).map(|_| ()).expect_err("too long").to_string();
        assert!(e.contains("ct_recheck_ms") && e.contains("1001"), "{e}");
        let parsed = toml::from_str::<RawConfig>("ct_recheck_ms = 250\n").expect("a file field");
        assert_eq!(parsed.ct_recheck_ms, Some(250));
    }
}
