//! Pods made by the real CNI plugins (Debian's containernetworking-plugins in
//! [`CNI_PATH`]), called the way a container runtime calls them through libcni: each
//! plugin of a network config list in turn, with the list's `name` and `cniVersion`
//! and the previous plugin's result (`prevResult`) added to its config, `runtimeConfig`
//! only for the capabilities it declares, the `CNI_*` variables in its environment; DEL
//! in reverse order, each plugin given the cached ADD result.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Output;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use crate::lab::Pod;
use crate::netfilter::{CNI_PATH, Proto, run_with_input};

/// The interface a runtime asks for inside the pod.
pub const POD_IFNAME: &str = "eth0";

/// A hostPort, as kubelet passes it in `runtimeConfig.portMappings`.
#[derive(Clone, Copy, Debug)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

/// Runs CNI plugin `plugin` from [`CNI_PATH`] in `node_ns` for the pod whose network
/// namespace is `/run/netns/<pod_ns>`, with `config` on stdin; fails unless it exits 0.
pub fn exec_plugin(
    node_ns: &str,
    plugin: &str,
    command: &str,
    container_id: &str,
    pod_ns: &str,
    config: &str,
) -> anyhow::Result<Output> {
    let netns = format!("/run/netns/{pod_ns}");
    run_with_input(
        node_ns,
        &format!("{CNI_PATH}/{plugin}"),
        &[],
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", POD_IFNAME),
            ("CNI_PATH", CNI_PATH),
        ],
        config,
    )
    .with_context(|| format!("CNI {plugin} {command} in {node_ns} for {pod_ns}"))
}

/// A pod added through a CNI network config list. Dropping it calls DEL (errors
/// ignored; [`CniPod::del`] reports them).
#[derive(Debug)]
pub struct CniPod {
    /// The pod's network namespace.
    pub ns: String,
    /// The node's namespace, where the plugins ran.
    pub node_ns: String,
    /// The sandbox id the plugins were given.
    pub container_id: String,
    /// Its addresses, from the ADD result.
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    /// The list's final ADD result (what a runtime caches for DEL).
    pub result: Value,
    list: Value,
    runtime_config: Value,
    added: bool,
}

impl CniPod {
    /// ADD: every plugin of `list` in order, in `node_ns`, for the pod namespace
    /// `pod_ns`, with `port_mappings` for the plugins that declare that capability.
    pub fn add(
        node_ns: &str,
        pod_ns: &str,
        list: Value,
        port_mappings: &[PortMapping],
    ) -> anyhow::Result<CniPod> {
        let mappings: Vec<Value> = port_mappings
            .iter()
            .map(|m| {
                json!({
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": m.proto.name(),
                })
            })
            .collect();
        let mut pod = CniPod {
            ns: pod_ns.to_owned(),
            node_ns: node_ns.to_owned(),
            // A sandbox id as a runtime makes one: unique per pod.
            container_id: format!("{pod_ns}-sandbox"),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            result: Value::Null,
            list,
            runtime_config: json!({ "portMappings": mappings }),
            added: false,
        };
        let mut prev: Option<Value> = None;
        for plugin in plugins(&pod.list)? {
            // A failed ADD is cleaned up with DEL, as libcni's callers do.
            pod.added = true;
            let out = pod.call(plugin, "ADD", prev.as_ref())?;
            let result: Value = serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "CNI {} ADD printed no JSON result: {}",
                    plugin_type(plugin).unwrap_or("?"),
                    String::from_utf8_lossy(&out.stdout)
                )
            })?;
            prev = Some(result);
        }
        pod.result = prev.context("the network config list has no plugins")?;
        for ip in result_ips(&pod.result)? {
            match ip {
                IpAddr::V4(ip) => pod.ip = ip,
                IpAddr::V6(ip) => pod.ip6 = Some(ip),
            }
        }
        if pod.ip.is_unspecified() {
            bail!("CNI ADD result has no IPv4 address: {}", pod.result);
        }
        Ok(pod)
    }

    /// DEL: every plugin in reverse order, each given the cached ADD result.
    pub fn del(&mut self) -> anyhow::Result<()> {
        if !self.added {
            return Ok(());
        }
        self.added = false;
        let prev = (!self.result.is_null()).then(|| self.result.clone());
        for plugin in plugins(&self.list)?.iter().rev() {
            self.call(plugin, "DEL", prev.as_ref())?;
        }
        Ok(())
    }

    /// As a lab [`Pod`] (the traffic helpers take those); `::` without IPv6.
    pub fn pod(&self) -> Pod {
        Pod {
            ns: self.ns.clone(),
            ip: self.ip,
            ip6: self.ip6.unwrap_or(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// One plugin's config as libcni builds it, then the plugin run with it.
    fn call(&self, plugin: &Value, command: &str, prev: Option<&Value>) -> anyhow::Result<Output> {
        let kind = plugin_type(plugin)?;
        let mut config = plugin
            .as_object()
            .context("a plugin config is not an object")?
            .clone();
        config.insert("name".into(), self.list["name"].clone());
        config.insert("cniVersion".into(), self.list["cniVersion"].clone());
        if let Some(prev) = prev {
            config.insert("prevResult".into(), prev.clone());
        }
        let runtime: Map<String, Value> = plugin["capabilities"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .filter_map(|(cap, _)| Some((cap.clone(), self.runtime_config.get(cap)?.clone())))
            .collect();
        if !runtime.is_empty() {
            config.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        exec_plugin(
            &self.node_ns,
            kind,
            command,
            &self.container_id,
            &self.ns,
            &Value::Object(config).to_string(),
        )
    }
}

impl Drop for CniPod {
    fn drop(&mut self) {
        let _ = self.del();
    }
}

/// Reads a network config list, and points every host-local IPAM at `data_dir`, so
/// allocations stay apart from the host's (/var/lib/cni/networks) and other labs'.
pub fn read_conflist(path: &Path, data_dir: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut list: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} as JSON", path.display()))?;
    for plugin in list["plugins"].as_array_mut().into_iter().flatten() {
        if plugin["ipam"]["type"] == "host-local" {
            plugin["ipam"]["dataDir"] = json!(data_dir);
        }
    }
    Ok(list)
}

fn plugins(list: &Value) -> anyhow::Result<&Vec<Value>> {
    list["plugins"]
        .as_array()
        .with_context(|| format!("not a network config list (no plugins): {list}"))
}

fn plugin_type(plugin: &Value) -> anyhow::Result<&str> {
    plugin["type"]
        .as_str()
        .with_context(|| format!("a plugin without a type: {plugin}"))
}

/// The addresses of a CNI result (`ips[].address`, CIDR notation).
fn result_ips(result: &Value) -> anyhow::Result<Vec<IpAddr>> {
    result["ips"]
        .as_array()
        .with_context(|| format!("CNI result without ips: {result}"))?
        .iter()
        .map(|ip| {
            let address = ip["address"].as_str().unwrap_or_default();
            let (addr, _) = address.split_once('/').unwrap_or((address, ""));
            addr.parse()
                .with_context(|| format!("CNI result address {address:?}"))
        })
        .collect()
}
