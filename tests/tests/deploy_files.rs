//! deploy/: the systemd unit passes `systemd-analyze verify` without a word and keeps
//! the capabilities to the four the agent needs; the DaemonSet is shaped like
//! kube-flannel's (host network, node-critical, tolerating every NoSchedule taint)
//! with those capabilities unprivileged, the host paths the agent works in, and its
//! config from a ConfigMap, which is itself a valid agent config.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;
use serde::Deserialize as _;
use serde_yaml::Value;

fn deploy(file: &str) -> anyhow::Result<(PathBuf, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path, text))
}

/// `KEY=VALUE` lines of the unit's `[Service]` section.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            settings.push((key.to_owned(), value.to_owned()));
        }
    }
    settings
}

#[test]
fn the_systemd_unit_verifies_and_bounds_the_capabilities() -> anyhow::Result<()> {
    let (_, unit) = deploy("hgw.service")?;
    let settings = service_settings(&unit);
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let caps = "CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_SYS_ADMIN";
    assert_eq!(get("CapabilityBoundingSet"), [caps]);
    assert_eq!(get("AmbientCapabilities"), [caps]);
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    let exec = get("ExecStart");
    assert!(
        exec.len() == 1 && exec[0].ends_with("hgw-agent run --config /etc/hgw/hgw.toml"),
        "ExecStart {exec:?}"
    );
    // Where the agent writes, under ProtectSystem=strict.
    assert!(get("RuntimeDirectory").iter().any(|v| {
        let dirs: Vec<&str> = v.split_whitespace().collect();
        dirs.contains(&"hgw") && dirs.contains(&"flannel")
    }));
    let writable = get("ReadWritePaths").join(" ");
    for path in ["/etc/cni/net.d", "/sys/fs/bpf"] {
        assert!(writable.contains(path), "{path} not writable: {writable}");
    }
    // It would make /proc/sys read-only: setup_node writes ip_forward.
    assert!(get("ProtectKernelTunables").is_empty());

    // systemd-analyze checks that ExecStart exists: the unit as installed, with the
    // agent where this build put it.
    let agent = hgw_tests::agent_bin();
    let dir = std::env::temp_dir().join(format!("hgw-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("hgw.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/hgw-agent", &agent.to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("running systemd-analyze (cargo xtask setup installs systemd)")?;
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits 0 on unknown keys and bad values, only saying so: silence is the pass.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
    Ok(())
}

fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn the_daemonset_is_shaped_like_flannels() -> anyhow::Result<()> {
    let config = shaped_like_flannels("daemonset.yaml")?;
    assert!(
        matches!(config.source, hgw_agent::config::Source::Etcd(_)),
        "daemonset.yaml's agent does not read etcd: {:?}",
        config.source
    );
    Ok(())
}

/// The kube variant: flannel's kube subnet manager's permissions (and no more), bound to
/// the DaemonSet's service account; kube-flannel's net-conf.json where the agent reads
/// it; NODE_NAME from the downward API; a `[kube]` config.
#[test]
fn the_kube_daemonset_has_flannels_permissions_and_network_config() -> anyhow::Result<()> {
    let config = shaped_like_flannels("daemonset-kube.yaml")?;
    let hgw_agent::config::Source::Kube(kube) = &config.source else {
        panic!(
            "daemonset-kube.yaml's agent does not read the Kubernetes API: {:?}",
            config.source
        );
    };
    assert_eq!(kube.kubeconfig, None, "not the in-cluster service account");
    assert_eq!(
        kube.net_conf,
        PathBuf::from(hgw_agent::config::DEFAULT_NET_CONF)
    );

    let (_, text) = deploy("daemonset-kube.yaml")?;
    let docs = documents(&text)?;
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k);
    let ds = kind("DaemonSet").context("no DaemonSet")?;
    let namespace = &ds["metadata"]["namespace"];
    let spec = &ds["spec"]["template"]["spec"];
    let account = kind("ServiceAccount").context("no ServiceAccount")?;
    assert_eq!(account["metadata"]["namespace"], *namespace);
    assert_eq!(spec["serviceAccountName"], account["metadata"]["name"]);

    let binding = kind("ClusterRoleBinding").context("no ClusterRoleBinding")?;
    let role = kind("ClusterRole").context("no ClusterRole")?;
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subjects = binding["subjects"].as_sequence().context("subjects")?;
    assert!(
        subjects.iter().any(|s| s["kind"] == "ServiceAccount"
            && s["name"] == account["metadata"]["name"]
            && s["namespace"] == *namespace),
        "the ClusterRole is not bound to the service account: {subjects:?}"
    );
    let mut grants = Vec::new();
    for rule in role["rules"].as_sequence().context("rules")? {
        assert_eq!(strings(&rule["apiGroups"]), [""], "{rule:?}");
        for resource in strings(&rule["resources"]) {
            for verb in strings(&rule["verbs"]) {
                grants.push((verb, resource));
            }
        }
    }
    grants.sort_unstable();
    let mut flannels = hgw_tests::FLANNEL_GRANTS.to_vec();
    flannels.sort_unstable();
    assert_eq!(grants, flannels, "not flannel's ClusterRole");

    let agent = &spec["containers"][0];
    let node_name = agent["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "NODE_NAME")
        .context("no NODE_NAME")?;
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volume = spec["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["configMap"]["name"] == "kube-flannel-cfg")
        .context("no volume of kube-flannel's ConfigMap")?;
    let mount = agent["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume["name"])
        .context("kube-flannel's ConfigMap is not mounted")?;
    let net_conf = PathBuf::from(mount["mountPath"].as_str().context("mountPath")?);
    let items = volume["configMap"]["items"]
        .as_sequence()
        .context("items")?;
    assert!(
        items.iter().any(|i| i["key"] == "net-conf.json"
            && Some(net_conf.join(i["path"].as_str().unwrap_or_default()))
                == Some(PathBuf::from(hgw_agent::config::DEFAULT_NET_CONF))),
        "net-conf.json is not at {}: {items:?}",
        hgw_agent::config::DEFAULT_NET_CONF
    );
    Ok(())
}

/// The checks both DaemonSets pass; the agent config its ConfigMap and flags make.
fn shaped_like_flannels(yaml: &str) -> anyhow::Result<hgw_agent::config::Config> {
    let (_, text) = deploy(yaml)?;
    let docs = documents(&text)?;
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k);
    let ds = kind("DaemonSet").context("no DaemonSet")?;
    assert_eq!(ds["apiVersion"], "apps/v1");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let tolerations = spec["tolerations"].as_sequence().context("tolerations")?;
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["effect"] == "NoSchedule"),
        "no toleration of every NoSchedule taint: {tolerations:?}"
    );
    // The selector matches the pods it makes.
    let selector = ds["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .context("selector")?;
    for (key, value) in selector {
        assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][key], value);
    }

    let containers = spec["containers"].as_sequence().context("containers")?;
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort_unstable();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    let args = strings(&agent["args"]);
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/hgw/hgw.toml"]),
        "args {args:?}"
    );
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");

    // Host paths, each mounted where it is on the host; the config from a ConfigMap.
    let volumes = spec["volumes"].as_sequence().context("volumes")?;
    let mounts = agent["volumeMounts"].as_sequence().context("mounts")?;
    let mounted_at = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
    };
    for path in [
        "/sys/fs/bpf",
        "/run/flannel",
        "/etc/cni/net.d",
        "/opt/cni/bin",
    ] {
        let volume = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == path)
            .with_context(|| format!("no hostPath volume {path}"))?;
        let name = volume["name"].as_str().context("volume name")?;
        assert_eq!(mounted_at(name), Some(path), "{path} mounted elsewhere");
    }
    let config = volumes
        .iter()
        .find(|v| v["configMap"]["name"].is_string())
        .context("no ConfigMap volume")?;
    assert_eq!(
        mounted_at(config["name"].as_str().context("name")?),
        Some("/etc/hgw")
    );
    let map = kind("ConfigMap").context("no ConfigMap")?;
    assert_eq!(map["metadata"]["name"], config["configMap"]["name"]);
    assert_eq!(map["metadata"]["namespace"], ds["metadata"]["namespace"]);

    // The ConfigMap's file, with the node name the DaemonSet passes as a flag, is a
    // config the agent accepts.
    let toml = map["data"]["hgw.toml"].as_str().context("no hgw.toml")?;
    let file =
        std::env::temp_dir().join(format!("hgw-configmap-{yaml}-{}.toml", std::process::id()));
    std::fs::write(&file, toml)?;
    let flags = hgw_agent::config::RawConfig {
        node_name: Some("node-1".into()),
        ..Default::default()
    };
    let config = hgw_agent::config::Config::load(Some(&file), flags);
    let _ = std::fs::remove_file(&file);
    let config = config.with_context(|| format!("{yaml}: the ConfigMap's hgw.toml"))?;
    assert!(
        config.metrics_addr.is_some(),
        "the probes need metrics_addr"
    );
    // The image `cargo xtask image` makes, run as the image's entrypoint is.
    assert_eq!(
        agent["image"].as_str(),
        Some(format!("{}:{}", xtask::image::NAME, xtask::image::TAG).as_str())
    );
    assert_eq!(strings(&agent["command"]), [xtask::image::AGENT_PATH]);
    Ok(config)
}
