//! The agent from its image, run as deploy/daemonset-kube.yaml runs it: the image that
//! `cargo xtask image` builds is unpacked from its OCI layout as a runtime does (index,
//! manifest, config and layer checked against their digests, the layer's diff_id too),
//! and on each of two lab nodes the agent runs from that root filesystem in a mount
//! and PID namespace of its own, with the DaemonSet's volumes bound where the DaemonSet
//! mounts them (each hostPath from a per-node stand-in for the host's directory; the
//! ConfigMaps; the service account's token), its environment and arguments, and exactly
//! its capabilities: the bounding set, hence the permitted and effective sets of root,
//! cut to them, no inheritable or ambient ones, no_new_privs (allowPrivilegeEscalation:
//! false). The Nodes come from the lab's API server, reached in-cluster as a pod reaches
//! it, with exactly the ClusterRole's permissions. The fast path then carries traffic
//! between the nodes' pods, both families.
//!
//! Everything the yaml says is read from it, so the test and the DaemonSet cannot drift.
//! setpriv has no chroot, and a chroot run after it would need CAP_SYS_CHROOT in the
//! set, while the image has no setpriv to run after a chroot: so the chroot and the
//! bounding set are capsh's (`--chroot`, then `--drop`), after setpriv's no_new_privs
//! and empty inheritable and ambient sets.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use hgw_tests::{
    Credentials, KubeApi, LAB_API_IP, LAB_API_PORT, Lab, Status, agent_bin, counter, credentials,
    net_conf_json, set_sysctls, status_at, udp_replied_exchange, wait_ready_at,
};
use serde::Deserialize as _;
use serde_json::{Value as Json, json};
use serde_yaml::Value;

const DAEMONSET: &str = "daemonset-kube.yaml";
/// kube-flannel.yml's ConfigMap, which the DaemonSet mounts and does not define.
const FLANNEL_CONFIGMAP: &str = "kube-flannel-cfg";
const TOKEN: &str = "hgw-daemonset-token";
/// Where kubelet mounts a pod's service account token.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The devices a runtime gives a container, bound from the host's.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Linux's capability names, by number (capability(7)).
const CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What the yaml asks of the runtime for the agent's container.
struct DaemonSet {
    namespace: String,
    service_account: String,
    command: Vec<String>,
    args: Vec<String>,
    /// name -> value, or the downward API's field path.
    env: Vec<(String, EnvValue)>,
    /// Capability numbers of `securityContext.capabilities.add` (after drop ALL).
    caps: Vec<usize>,
    mounts: Vec<Mount>,
    /// The ClusterRole bound to the service account: (verb, resource).
    grants: Vec<(String, String)>,
    /// The ConfigMaps the yaml defines: name -> key -> text.
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

enum EnvValue {
    Value(String),
    Field(String),
}

struct Mount {
    path: String,
    read_only: bool,
    source: Source,
}

enum Source {
    HostPath(String),
    /// A ConfigMap, with its `items` (key -> file name), or every key.
    ConfigMap {
        name: String,
        items: Vec<(String, String)>,
    },
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn text(value: &Value, what: &str) -> anyhow::Result<String> {
    value
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{what}: not a string"))
}

impl DaemonSet {
    fn read() -> anyhow::Result<DaemonSet> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(DAEMONSET);
        let yaml = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&yaml) {
            let value = Value::deserialize(doc)?;
            if !value.is_null() {
                docs.push(value);
            }
        }
        let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
        let ds = kind("DaemonSet").next().context("no DaemonSet")?;
        let namespace = text(&ds["metadata"]["namespace"], "DaemonSet namespace")?;
        let pod = &ds["spec"]["template"]["spec"];
        let service_account = text(&pod["serviceAccountName"], "serviceAccountName")?;
        let containers = pod["containers"].as_sequence().context("containers")?;
        ensure!(containers.len() == 1, "one container expected");
        let container = &containers[0];
        ensure!(
            pod["initContainers"].is_null(),
            "init containers: this test runs one"
        );

        let security = &container["securityContext"];
        ensure!(security["privileged"] == false, "a privileged container");
        ensure!(
            security["runAsUser"].is_null() && pod["securityContext"]["runAsUser"].is_null(),
            "runAsUser: this test runs root's uid"
        );
        ensure!(
            strings(&security["capabilities"]["drop"]) == ["ALL"],
            "this test runs drop: [ALL]"
        );
        let mut caps = Vec::new();
        for name in strings(&security["capabilities"]["add"]) {
            let bare = name.trim_start_matches("CAP_");
            caps.push(
                CAPS.iter()
                    .position(|c| *c == bare)
                    .with_context(|| format!("unknown capability {name}"))?,
            );
        }
        ensure!(
            security["allowPrivilegeEscalation"] == false,
            "this test runs no_new_privs"
        );

        let mut env = Vec::new();
        for var in container["env"].as_sequence().into_iter().flatten() {
            let name = text(&var["name"], "env name")?;
            let value = if let Some(value) = var["value"].as_str() {
                EnvValue::Value(value.to_owned())
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                EnvValue::Field(field.to_owned())
            } else {
                bail!("env {name}: only values and fieldRefs are run here");
            };
            env.push((name, value));
        }

        let volumes = pod["volumes"].as_sequence().context("volumes")?;
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_sequence().context("mounts")? {
            let name = text(&mount["name"], "volumeMount name")?;
            let volume = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name.as_str()))
                .with_context(|| format!("no volume {name}"))?;
            let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
                Source::HostPath(path.to_owned())
            } else if let Some(map) = volume["configMap"]["name"].as_str() {
                let mut items = Vec::new();
                for item in volume["configMap"]["items"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                {
                    items.push((text(&item["key"], "key")?, text(&item["path"], "path")?));
                }
                Source::ConfigMap {
                    name: map.to_owned(),
                    items,
                }
            } else {
                bail!("volume {name}: only hostPath and configMap volumes are run here");
            };
            mounts.push(Mount {
                path: text(&mount["mountPath"], "mountPath")?,
                read_only: mount["readOnly"] == true,
                source,
            });
        }

        // The ClusterRoles bound to the service account, as the API server authorizes.
        let mut grants = Vec::new();
        for binding in kind("ClusterRoleBinding") {
            let bound = binding["subjects"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"].as_str() == Some(service_account.as_str())
                        && s["namespace"].as_str() == Some(namespace.as_str())
                });
            if !bound {
                continue;
            }
            let role = kind("ClusterRole")
                .find(|r| r["metadata"]["name"] == binding["roleRef"]["name"])
                .context("a binding to a ClusterRole the yaml does not define")?;
            for rule in role["rules"].as_sequence().context("rules")? {
                ensure!(
                    strings(&rule["apiGroups"]) == [""],
                    "rules of the core API group only"
                );
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push((verb, resource.clone()));
                    }
                }
            }
        }

        let mut config_maps = BTreeMap::new();
        for map in kind("ConfigMap") {
            ensure!(map["metadata"]["namespace"].as_str() == Some(namespace.as_str()));
            let mut data = BTreeMap::new();
            for (key, value) in map["data"].as_mapping().context("data")? {
                data.insert(text(key, "data key")?, text(value, "data value")?);
            }
            config_maps.insert(text(&map["metadata"]["name"], "name")?, data);
        }

        Ok(DaemonSet {
            namespace,
            service_account,
            command: strings(&container["command"]),
            args: strings(&container["args"]),
            env,
            caps,
            mounts,
            grants,
            config_maps,
        })
    }

    fn cap_mask(&self) -> u64 {
        self.caps.iter().fold(0, |mask, cap| mask | (1 << cap))
    }
}

/// `$(VAR)` references expanded as kubelet expands them in command and args.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    env.iter().fold(arg.to_owned(), |arg, (k, v)| {
        arg.replace(&format!("$({k})"), v)
    })
}

/// `sha256:<hex>` of a file, by coreutils (not by the image builder's own code).
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout)?;
    let hex = text.split_whitespace().next().context("sha256sum output")?;
    Ok(format!("sha256:{hex}"))
}

/// The blob a descriptor names, its size and digest checked.
fn blob(layout: &Path, descriptor: &Json) -> anyhow::Result<PathBuf> {
    let digest = descriptor["digest"].as_str().context("digest")?;
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("{digest}: not sha256"))?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}: malformed"
    );
    let path = layout.join("blobs/sha256").join(hex);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("blob {digest}"))?
        .len();
    ensure!(
        Some(size) == descriptor["size"].as_u64(),
        "blob {digest}: {size} bytes, the descriptor says {}",
        descriptor["size"]
    );
    ensure!(
        sha256_file(&path)? == digest,
        "blob {digest}: digest mismatch"
    );
    Ok(path)
}

fn read_json(path: &Path) -> anyhow::Result<Json> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// The image config's process: Env, Entrypoint, Cmd.
struct ImageConfig {
    env: Vec<String>,
    entrypoint: Vec<String>,
}

/// Unpacks image `tag` of the OCI layout at `layout` into `rootfs`, as a runtime pulls
/// and unpacks it.
fn unpack(layout: &Path, tag: &str, rootfs: &Path) -> anyhow::Result<ImageConfig> {
    ensure!(
        read_json(&layout.join("oci-layout"))?["imageLayoutVersion"] == "1.0.0",
        "not an OCI image layout 1.0.0"
    );
    let index = read_json(&layout.join("index.json"))?;
    let entry = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no manifest tagged {tag} in index.json"))?;
    ensure!(entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json");
    let manifest = read_json(&blob(layout, entry)?)?;
    ensure!(manifest["schemaVersion"] == 2);
    ensure!(manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json");
    let config = read_json(&blob(layout, &manifest["config"])?)?;
    ensure!(config["os"] == "linux" && config["architecture"] == "amd64");
    let layers = manifest["layers"].as_array().context("layers")?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .context("diff_ids")?;
    ensure!(layers.len() == diff_ids.len(), "a diff_id per layer");
    std::fs::create_dir_all(rootfs)?;
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        ensure!(layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip");
        let gz = blob(layout, layer)?;
        let tar = rootfs.with_extension("layer.tar");
        let status = Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .stdout(File::create(&tar)?)
            .status()?;
        ensure!(status.success(), "gunzip {}", gz.display());
        ensure!(
            Some(sha256_file(&tar)?.as_str()) == diff_id.as_str(),
            "layer {}: the uncompressed tar is not its diff_id {diff_id}",
            layer["digest"]
        );
        let out = Command::new("tar")
            .args(["--numeric-owner", "--same-permissions", "-xf"])
            .arg(&tar)
            .arg("-C")
            .arg(rootfs)
            .output()?;
        ensure!(
            out.status.success(),
            "unpacking: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&tar)?;
    }
    let process = &config["config"];
    let list = |v: &Json| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    Ok(ImageConfig {
        env: list(&process["Env"]),
        entrypoint: list(&process["Entrypoint"]),
    })
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The agent's container on one lab node: `ip netns exec NODE unshare --mount --pid
/// --fork` (everything it mounts goes with it), then the mounts, then setpriv and capsh
/// into the root filesystem. Dropping it stops the agent, SIGTERM first.
struct Container {
    name: String,
    /// `unshare`, whose child (PID 1 of the container) becomes the agent.
    child: Child,
    rootfs: PathBuf,
    /// Container path -> host stand-in, for each bind mount.
    binds: Vec<(String, PathBuf)>,
    log: PathBuf,
}

impl Container {
    fn start(
        ns: &str,
        name: &str,
        rootfs: &Path,
        binds: Vec<(String, PathBuf, bool)>,
        argv: &[String],
        env: &[(String, String)],
        drop_caps: &[usize],
    ) -> anyhow::Result<Container> {
        let log = rootfs.with_extension("log");
        let r = |path: &str| quote(&format!("{}{path}", rootfs.display()));
        let mut script = vec![
            "set -e".to_owned(),
            format!("mount -t proc proc {}", r("/proc")),
            // A container's /sys: read-only, as runtimes mount it unprivileged.
            format!(
                "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {}",
                r("/sys")
            ),
            format!("mount -t tmpfs -o nosuid,mode=755 tmpfs {}", r("/dev")),
        ];
        for dev in DEVICES {
            let at = r(&format!("/dev/{dev}"));
            script.push(format!("touch {at}"));
            script.push(format!("mount --bind /dev/{dev} {at}"));
        }
        for (path, source, read_only) in &binds {
            let at = r(path);
            script.push(format!("mkdir -p {at}"));
            script.push(format!(
                "mount --bind {} {at}",
                quote(&source.to_string_lossy())
            ));
            if *read_only {
                script.push(format!("mount -o remount,bind,ro {at}"));
            }
        }
        let drop = drop_caps
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let (program, args) = argv.split_first().context("no command")?;
        let mut exec = vec!["exec /usr/bin/env -i".to_owned()];
        exec.extend(env.iter().map(|(k, v)| quote(&format!("{k}={v}"))));
        exec.extend([
            "/usr/bin/setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all".to_owned(),
            format!(
                "/usr/sbin/capsh --chroot={}",
                quote(&rootfs.to_string_lossy())
            ),
            format!("--drop={drop}"),
            format!("--shell={}", quote(program)),
            "--".to_owned(),
        ]);
        exec.extend(args.iter().map(|a| quote(a)));
        script.push(exec.join(" "));

        let out = File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child=SIGTERM",
            ])
            .args(["--propagation", "private", "sh", "-c"])
            .arg(script.join("\n"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting unshare (util-linux)")?;
        Ok(Container {
            name: name.to_owned(),
            child,
            rootfs: rootfs.to_owned(),
            binds: binds.into_iter().map(|(p, s, _)| (p, s)).collect(),
            log,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The host's file behind `path` in the container, through its bind mounts.
    fn host_path(&self, path: &str) -> anyhow::Result<PathBuf> {
        let (at, source) = self
            .binds
            .iter()
            .filter(|(at, _)| path == at || path.starts_with(&format!("{at}/")))
            .max_by_key(|(at, _)| at.len())
            .with_context(|| format!("{path} is on no volume of the DaemonSet"))?;
        Ok(source.join(path[at.len()..].trim_start_matches('/')))
    }

    /// The agent's pid: unshare's child, once it has exec'd the agent.
    fn agent_pid(&self) -> Option<u32> {
        let unshare = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
        let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        exe.ends_with("hgw-agent").then_some(pid)
    }

    fn status(&self) -> anyhow::Result<Status> {
        status_at(&self.host_path(hgw_agent::config::DEFAULT_STATUS_SOCKET)?)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Status> {
        let socket = self.host_path(hgw_agent::config::DEFAULT_STATUS_SOCKET)?;
        let log = self.log.clone();
        wait_ready_at(&socket, &mut self.child, timeout, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
        .with_context(|| format!("{}'s container", self.name))
    }

    /// SIGTERM to the agent, as kubelet stops a container; SIGKILL after 10 s.
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(exit) = self.child.try_wait()? {
            return Ok(exit);
        }
        let target = self.agent_pid().unwrap_or(self.child.id());
        let pid = i32::try_from(target)?;
        // SAFETY: kill(2) on a pid of our own child's tree; no memory involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(exit) = self.child.try_wait()? {
                return Ok(exit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let exit = self.child.wait()?;
        bail!("{}: still running 10 s after SIGTERM ({exit})", self.name)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Its mounts live in its own mount namespace: they go with its last process.
        let _ = self.stop();
    }
}

#[test]
fn the_agent_runs_from_its_image_with_the_daemonsets_privileges_and_volumes() -> anyhow::Result<()>
{
    let started = Instant::now();
    let ds = DaemonSet::read()?;
    let mut lab = Lab::up(2, 1)?;
    let api = KubeApi::start_on_lab(&mut lab)?;
    let grants: Vec<(&str, &str)> = ds
        .grants
        .iter()
        .map(|(v, r)| (v.as_str(), r.as_str()))
        .collect();
    let user = format!(
        "system:serviceaccount:{}:{}",
        ds.namespace, ds.service_account
    );
    api.add_token(TOKEN, &user, &grants);
    for node in &lab.nodes {
        api.add_node(json!({
            "metadata": {"name": node.name},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
        }))?;
    }

    let built = Instant::now();
    let image = xtask::image::build(&agent_bin(), &lab.dir().join("oci"))?;
    eprintln!(
        "image {} built in {:?}: layer {} bytes",
        image.digest,
        built.elapsed(),
        image.layer_bytes
    );

    // kube-flannel's ConfigMap, which the DaemonSet mounts beside its own.
    let mut config_maps = ds.config_maps.clone();
    config_maps.insert(
        FLANNEL_CONFIGMAP.to_owned(),
        BTreeMap::from([("net-conf.json".to_owned(), net_conf_json())]),
    );
    let drop_caps: Vec<usize> = (0..=last_cap()?).filter(|c| !ds.caps.contains(c)).collect();

    let mut containers = Vec::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        // The node as a flannel node was: forwarding on (setup_node is not the
        // DaemonSet's; /proc/sys is the node's business).
        set_sysctls(
            &node.ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ],
        )?;
        let base = lab.dir().join(format!("{}-host", node.name));
        let rootfs = lab.dir().join(format!("{}-rootfs", node.name));
        let config = unpack(&image.dir, xtask::image::TAG, &rootfs)?;

        let mut binds = Vec::new();
        for mount in &ds.mounts {
            let source = match &mount.source {
                // This node's bpffs: the lab's, a directory per node.
                Source::HostPath(path) if path == "/sys/fs/bpf" => lab.prepare_pin_dir(i)?,
                Source::HostPath(path) => {
                    let dir = base.join(path.trim_start_matches('/'));
                    std::fs::create_dir_all(&dir)?;
                    dir
                }
                Source::ConfigMap { name, items } => {
                    let data = config_maps
                        .get(name)
                        .with_context(|| format!("no ConfigMap {name}"))?;
                    let dir = base.join("configmaps").join(name);
                    std::fs::create_dir_all(&dir)?;
                    let files: Vec<(String, String)> = if items.is_empty() {
                        data.keys().map(|k| (k.clone(), k.clone())).collect()
                    } else {
                        items.clone()
                    };
                    for (key, file) in files {
                        let value = data
                            .get(&key)
                            .with_context(|| format!("ConfigMap {name} has no {key}"))?;
                        std::fs::write(dir.join(file), value)?;
                    }
                    dir
                }
            };
            binds.push((mount.path.clone(), source, mount.read_only));
        }
        // kubelet's service account volume, for serviceAccountName.
        let account = base.join("serviceaccount");
        std::fs::create_dir_all(&account)?;
        std::fs::write(account.join("token"), TOKEN)?;
        std::fs::copy(api.ca_path(), account.join("ca.crt"))?;
        std::fs::write(account.join("namespace"), &ds.namespace)?;
        binds.push((SERVICE_ACCOUNT_DIR.to_owned(), account, true));

        // The image's Env, the pod's, and the API server's address, as kubelet sets it.
        let mut env: Vec<(String, String)> = config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (name, value) in &ds.env {
            let value = match value {
                EnvValue::Value(v) => v.clone(),
                EnvValue::Field(f) if f == "spec.nodeName" => node.name.clone(),
                EnvValue::Field(f) => bail!("env {name}: fieldRef {f} is not run here"),
            };
            env.push((name.clone(), value));
        }
        env.push(("KUBERNETES_SERVICE_HOST".into(), LAB_API_IP.into()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), LAB_API_PORT.to_string()));
        let argv: Vec<String> = if ds.command.is_empty() {
            config.entrypoint.clone()
        } else {
            ds.command.clone()
        }
        .into_iter()
        .chain(ds.args.iter().cloned())
        .map(|a| expand(&a, &env))
        .collect();

        containers.push(Container::start(
            &node.ns, &node.name, &rootfs, binds, &argv, &env, &drop_caps,
        )?);
    }
    for container in &mut containers {
        container.wait_ready(Duration::from_secs(30))?;
    }
    eprintln!("both agents ready {:?} after the start", started.elapsed());

    for container in &containers {
        let pid = container.agent_pid().context("no agent process")?;
        // Its root is the image's, and its privileges are the DaemonSet's.
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root"))?,
            container.rootfs.canonicalize()?,
            "{}: not in the image's root",
            container.name
        );
        let mask = ds.cap_mask();
        assert_eq!(
            credentials(pid)?,
            Credentials {
                uid: 0,
                effective: mask,
                permitted: mask,
                bounding: mask,
                inheritable: 0,
                ambient: 0,
                no_new_privs: true,
            },
            "{}: not the DaemonSet's privileges",
            container.name
        );
        // It wrote where the DaemonSet's host paths are.
        let subnet_env = std::fs::read_to_string(container.host_path("/run/flannel/subnet.env")?)
            .context("no subnet.env on the host's /run/flannel")?;
        assert!(subnet_env.contains("FLANNEL_SUBNET="), "{subnet_env}");
        let pins = container.host_path("/sys/fs/bpf/hgw")?;
        assert!(
            std::fs::read_dir(&pins)
                .with_context(|| format!("no pins in {}", pins.display()))?
                .next()
                .is_some(),
            "{}: nothing pinned",
            container.name
        );
    }
    // It announced itself through nodes/status, with the ClusterRole's permissions.
    for node in &lab.nodes {
        let object = api.node(&node.name).context("node gone")?;
        assert_eq!(
            object["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"],
            "true",
            "{}: not announced: {object}",
            node.name
        );
    }

    // The fast path carries traffic between the nodes' pods, both families.
    const PACKETS: usize = 50;
    let (from, to) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let cases: [(&str, std::net::IpAddr); 2] = [("ipv4", to.ip.into()), ("ipv6", to.ip6.into())];
    for (family, ip) in cases {
        let name = format!("{family}.fwd_to_peer");
        let before = counter(&containers[0].status()?, &name);
        let arrived = udp_replied_exchange(&from.ns, &to.ns, ip, PACKETS)?;
        assert_eq!(arrived, PACKETS, "{family}: packets lost");
        let after = counter(&containers[0].status()?, &name);
        assert!(
            after >= before + PACKETS as u64,
            "{family}: the fast path did not carry the flow: {name} {before} -> {after}\n{}",
            containers[0].log()
        );
    }

    // SIGTERM, as kubelet stops it: the agent exits 0.
    for container in &mut containers {
        let exit = container.stop()?;
        assert!(
            exit.success(),
            "{}: {exit}\n{}",
            container.name,
            container.log()
        );
    }
    eprintln!("done in {:?}", started.elapsed());
    Ok(())
}

fn last_cap() -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()?)
}
