//! The kube tests' lab: the lab's Kubernetes API server in a namespace of its own on
//! the lab's L2 segment (the nodes reach it over the lab network as they would reach a
//! cluster's API server), a Node object per lab node, kube-mode agents.

use std::time::{Duration, Instant};

use hgw_tests::{FLANNEL_GRANTS, KubeApi, Lab, Status, net_conf_json};
use serde_json::{Value, json};

/// Where the API server listens on the lab segment (the nodes are .1 to .N, etcd .250).
const TOKEN: &str = "hgw-node-token";
pub const TIMEOUT: Duration = Duration::from_secs(15);
pub const PREFIX: &str = "flannel.alpha.coreos.com/";

pub struct KubeLab {
    // The agents go with the lab, before the server they talk to.
    pub lab: Lab,
    pub api: KubeApi,
    /// The kubeconfig the agents started from now on get.
    pub kubeconfig: String,
    net_conf: String,
}

impl KubeLab {
    /// A dual-stack lab of `nodes` x `pods`, a Node object per lab node (its lab pod
    /// CIDRs in spec.podCIDRs) and kube-mode agents on `0..agents`, each ready.
    pub fn up(nodes: usize, pods: usize, agents: usize) -> anyhow::Result<KubeLab> {
        let mut lab = Lab::up(nodes, pods)?;
        let api = KubeApi::start_on_lab(&mut lab)?;
        api.add_token(
            TOKEN,
            "system:serviceaccount:kube-flannel:hgw",
            FLANNEL_GRANTS,
        );
        let kubeconfig = api.write_kubeconfig(TOKEN)?.display().to_string();
        let net_conf = lab.dir().join("net-conf.json");
        std::fs::write(&net_conf, net_conf_json())?;
        for node in &lab.nodes {
            api.add_node(json!({
                "metadata": {"name": node.name},
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
            }))?;
        }
        let mut kube = KubeLab {
            lab,
            api,
            kubeconfig,
            net_conf: net_conf.display().to_string(),
        };
        for node in 0..agents {
            kube.start_agent(node)?;
        }
        for agent in kube.lab.agents() {
            agent.wait_ready(TIMEOUT)?;
        }
        Ok(kube)
    }

    fn config(&self, node: usize) -> String {
        format!(
            "node_name = \"{}\"\nuplink = \"eth0\"\nbridge = \"cni0\"\n\n[kube]\nkubeconfig = \"{}\"\nnet_conf = \"{}\"\n",
            self.lab.nodes[node].name, self.kubeconfig, self.net_conf
        )
    }

    pub fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let config = self.config(node);
        self.lab.start_agent_with_config(node, &config, &[])?;
        Ok(())
    }

    /// Waits until every agent's status satisfies `pred`; how long that took.
    pub fn everywhere(
        &self,
        within: Duration,
        pred: impl Fn(&Status) -> bool + Copy,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for agent in self.lab.agents() {
            agent.wait_for(within.saturating_sub(start.elapsed()), pred)?;
        }
        Ok(start.elapsed())
    }
}

/// The annotations flanneld writes for a host-gw node (pkg/subnet/kube `AcquireLease`).
pub fn flannel_annotations(ip4: &str, ip6: Option<&str>) -> Value {
    let mut a = json!({
        format!("{PREFIX}backend-type"): "host-gw",
        format!("{PREFIX}backend-data"): "null",
        format!("{PREFIX}kube-subnet-manager"): "true",
        format!("{PREFIX}public-ip"): ip4,
    });
    if let Some(ip6) = ip6 {
        a[format!("{PREFIX}backend-v6-data")] = json!("null");
        a[format!("{PREFIX}public-ipv6")] = json!(ip6);
    }
    a
}

pub fn has_peer(status: &Status, pod_cidr: &str) -> bool {
    status
        .peers
        .iter()
        .any(|p| p.pod_cidr == pod_cidr && p.route && p.mac.is_some())
}
