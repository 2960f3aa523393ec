//! The kube source's faults, against the lab's API server: the server down at start
//! and mid-run, a 410 after an expired history, a 403 and a 401; and this node's own
//! Node: pod CIDRs assigned late, a public-ip-overwrite annotation.

mod kube_lab;

use std::time::{Duration, Instant};

use hgw_tests::{FLANNEL_GRANTS, hgw_routes, log_lines, run_in_ok, udp_replied_exchange};
use kube_lab::{KubeLab, PREFIX, TIMEOUT, flannel_annotations, has_peer};
use serde_json::json;

/// (Re)starts `node`'s agent and waits until its status, not ready, says it waits
/// for something that contains `what`; what it says.
fn restart_waiting_for(kube: &mut KubeLab, node: usize, what: &str) -> anyhow::Result<String> {
    kube.start_agent(node)?;
    let agent = kube.lab.agent(node).expect("agent");
    let status = agent.wait_for(TIMEOUT, |s| {
        s.waiting.as_deref().is_some_and(|w| w.contains(what))
    })?;
    anyhow::ensure!(!status.ready, "ready while waiting: {status}");
    Ok(status.waiting.unwrap_or_default())
}

/// Whether `agent`'s log removed a route of peer `name` at any point.
fn removed(log: &str, name: &str) -> bool {
    log_lines(log)
        .any(|l| l.message.starts_with(&format!("peer {name} (")) && l.message.contains("is gone"))
}

#[test]
fn api_server_down_at_start_and_mid_run_and_a_410_keep_the_routes() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 2)?;
    let (n1, n2) = (kube.lab.nodes[0].clone(), kube.lab.nodes[1].clone());
    let route_to_n1 = format!("{} via {}", n1.pod_cidr, n1.uplink_ip);
    let route_kept = |ns: &str| -> anyhow::Result<bool> {
        Ok(hgw_routes(ns)?.iter().any(|r| r.starts_with(&route_to_n1)))
    };

    // Down at start: n2's agent restarts while the API server is away.
    kube.api.stop();
    kube.start_agent(1)?;
    let agent = kube.lab.agent(1).expect("agent");
    let status = agent.wait_for(TIMEOUT, |s| {
        s.waiting
            .as_deref()
            .is_some_and(|w| w.contains("waiting for the Kubernetes API") && w.contains("kube API"))
    })?;
    assert!(!status.ready, "{status}");
    assert!(
        route_kept(&n2.ns)?,
        "n2's route to n1 went while the API server was down"
    );
    kube.api.resume()?;
    let status = agent.wait_ready(Duration::from_secs(20))?;
    assert!(has_peer(&status, &n1.pod_cidr), "{status}");

    // Down mid-run: forwarding goes on with the last peers; a Node added meanwhile
    // comes in once the server is back (the watcher's backoff, then a list).
    kube.api.stop();
    // Status says why, while the routes stay.
    for agent in kube.lab.agents() {
        agent.wait_for(TIMEOUT, |s| {
            s.waiting.as_deref().is_some_and(|w| {
                w.contains("the Kubernetes API") && w.contains("routes and maps kept")
            })
        })?;
    }
    let (a, b) = (&kube.lab.nodes[1].pods[0], &kube.lab.nodes[0].pods[0]);
    assert_eq!(
        udp_replied_exchange(&a.ns, &b.ns, b.ip, 50)?,
        50,
        "traffic while the API server is down"
    );
    assert!(route_kept(&n2.ns)?);
    kube.api.add_node(json!({
        "metadata": {"name": "while-down", "annotations": flannel_annotations("172.31.0.70", None)},
        "spec": {"podCIDRs": ["10.244.70.0/24"]},
    }))?;
    kube.api.resume()?;
    let took = Instant::now();
    kube.everywhere(Duration::from_secs(40), |s| {
        s.peers.iter().any(|p| p.name == "while-down" && p.route)
    })?;
    eprintln!(
        "the Node added while the API server was down applied {:?} after it came back",
        took.elapsed()
    );
    // No longer saying so (not ready, though: while-down's address answers nobody).
    kube.everywhere(TIMEOUT, |s| s.waiting.is_none())?;
    for agent in kube.lab.agents() {
        assert!(
            log_lines(&agent.log())
                .any(|l| l.level == "WARN" && l.message.contains("kube: watching nodes")),
            "no WARN about the broken watch:\n{}",
            agent.log()
        );
    }

    // 410 Gone: the history is expired and the watches broken; the agents list again.
    let seen = kube.api.requests().len();
    kube.api.expire_history();
    kube.api.add_node(json!({
        "metadata": {"name": "after-410", "annotations": flannel_annotations("172.31.0.71", None)},
        "spec": {"podCIDRs": ["10.244.71.0/24"]},
    }))?;
    kube.everywhere(TIMEOUT, |s| {
        s.peers.iter().any(|p| p.name == "after-410" && p.route)
    })?;
    let lists = kube.api.requests()[seen..]
        .iter()
        .filter(|r| {
            r.method == "GET"
                && (r.uri == "/api/v1/nodes" || r.uri.starts_with("/api/v1/nodes?"))
                && !r.uri.contains("watch=")
        })
        .count();
    assert!(
        lists >= 2,
        "{lists} relists after the 410 for two agents: {:#?}",
        kube.api.requests()
    );
    for agent in kube.lab.agents() {
        let log = agent.log();
        for name in [&n1.name, &n2.name, &"while-down".to_owned()] {
            assert!(
                !removed(&log, name),
                "peer {name} removed along the way:\n{log}"
            );
        }
    }
    assert!(route_kept(&n2.ns)?);
    Ok(())
}

#[test]
fn a_forbidden_or_expired_token_is_named_as_the_permission() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 1)?;
    // n2's agent with a token that may list and watch but not get or patch.
    const NARROW: &str = "narrow-token";
    const USER: &str = "system:serviceaccount:kube-flannel:narrow";
    kube.api
        .add_token(NARROW, USER, &[("list", "nodes"), ("watch", "nodes")]);
    kube.kubeconfig = kube.api.write_kubeconfig(NARROW)?.display().to_string();
    let waiting = restart_waiting_for(&mut kube, 1, "403")?;
    assert!(
        waiting.contains("403 Forbidden")
            && waiting.contains("nodes get, list, watch and nodes/status patch"),
        "{waiting}"
    );
    // Granted: it starts (the retry picks it up).
    kube.api.add_token(NARROW, USER, FLANNEL_GRANTS);
    kube.lab
        .agent(1)
        .expect("agent")
        .wait_ready(Duration::from_secs(40))?;

    // A revoked token on a restart: 401, named as the token.
    kube.api.revoke_token(NARROW);
    let waiting = restart_waiting_for(&mut kube, 1, "401")?;
    assert!(
        waiting.contains("401 Unauthorized") && waiting.contains("token"),
        "{waiting}"
    );
    Ok(())
}

#[test]
fn this_nodes_late_pod_cidr_is_waited_for_and_public_ip_overwrite_honoured() -> anyhow::Result<()> {
    let mut kube = KubeLab::up(2, 1, 1)?;
    let n2 = kube.lab.nodes[1].clone();
    // n2 is reached on a second address, named by flannel's overwrite annotation.
    const OVERWRITE: &str = "172.31.0.202";
    run_in_ok(
        &n2.ns,
        "ip",
        &["addr", "add", &format!("{OVERWRITE}/24"), "dev", "eth0"],
    )?;
    kube.api.modify_node(&n2.name, |node| {
        node["spec"] = json!({});
        node["metadata"]["annotations"] =
            json!({format!("{PREFIX}public-ip-overwrite"): OVERWRITE});
    })?;
    let waiting = restart_waiting_for(&mut kube, 1, "pod cidr not assigned")?;
    assert!(waiting.contains(&n2.name), "{waiting}");
    let assigned = Instant::now();
    kube.api.modify_node(&n2.name, |node| {
        node["spec"] = json!({"podCIDRs": [n2.pod_cidr, n2.pod_cidr6]});
    })?;
    kube.lab.agent(1).expect("agent").wait_ready(TIMEOUT)?;
    let took = assigned.elapsed();
    eprintln!("n2 ready {took:?} after its pod CIDRs were assigned");
    assert!(
        took < Duration::from_secs(3),
        "ready {took:?} after the assignment"
    );
    let annotations = &kube.api.node(&n2.name).expect("n2")["metadata"]["annotations"];
    assert_eq!(
        annotations[format!("{PREFIX}public-ip")],
        json!(OVERWRITE),
        "{annotations}"
    );
    let status = kube
        .lab
        .agent(0)
        .expect("agent")
        .wait_for(TIMEOUT, |s| has_peer(s, &n2.pod_cidr))?;
    let peer = status
        .peers
        .iter()
        .find(|p| p.pod_cidr == n2.pod_cidr)
        .expect("peer");
    assert_eq!(peer.node_ip, OVERWRITE, "{status}");
    Ok(())
}
