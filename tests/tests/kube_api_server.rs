//! The lab's Kubernetes API server speaks the real protocol: a real client, `kubectl`,
//! lists, gets and watches Nodes from it, patches their status with merge and strategic
//! merge patches, and gets the 401, 403, 404 and 410 errors the real server gives.
//! `KUBECTL` names another kubectl binary (`patch --subresource` needs kubectl 1.24+).

use std::{
    io::BufReader,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use hgw_tests::{FLANNEL_GRANTS, KubeApi, Lab, run_in};
use serde_json::{Value, json};

const FLANNEL_TOKEN: &str = "flannel-token";
const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";

fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// `kubectl --kubeconfig <one for token> ARGS`, bounded in time by coreutils' timeout.
fn kubectl_command(
    api: &KubeApi,
    token: &str,
    args: &[impl AsRef<str>],
) -> anyhow::Result<Command> {
    let kubeconfig = api.write_kubeconfig(token)?;
    let mut cmd = Command::new("timeout");
    cmd.arg("30")
        .arg(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        // Its discovery cache, which would otherwise go to ~/.kube.
        .arg("--cache-dir")
        .arg(api.dir().join("kube-cache"))
        .args(args.iter().map(AsRef::as_ref));
    Ok(cmd)
}

fn kubectl(api: &KubeApi, token: &str, args: &[impl AsRef<str>]) -> anyhow::Result<Output> {
    Ok(kubectl_command(api, token, args)?.output()?)
}

/// kubectl's stdout, or an error with its stderr.
fn kubectl_ok(api: &KubeApi, token: &str, args: &[impl AsRef<str>]) -> anyhow::Result<String> {
    let out = kubectl(api, token, args)?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {}: {}",
        joined(args),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// kubectl's stderr, failing if the command succeeded.
fn kubectl_err(api: &KubeApi, token: &str, args: &[impl AsRef<str>]) -> anyhow::Result<String> {
    let out = kubectl(api, token, args)?;
    anyhow::ensure!(
        !out.status.success(),
        "kubectl {} succeeded: {}",
        joined(args),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8(out.stderr)?)
}

fn joined(args: &[impl AsRef<str>]) -> String {
    args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ")
}

/// `patch node NODE [--subresource=status] --type=TYPE -p PATCH`.
fn patch_args(node: &str, status: bool, patch_type: &str, patch: &str) -> Vec<String> {
    let mut args = vec!["patch".to_owned(), "node".to_owned(), node.to_owned()];
    if status {
        args.push("--subresource=status".to_owned());
    }
    args.extend([
        format!("--type={patch_type}"),
        "-p".to_owned(),
        patch.to_owned(),
    ]);
    args
}

fn node(name: &str, pod_cidr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"},
        ]},
    })
}

fn server_with_nodes() -> anyhow::Result<KubeApi> {
    let api = KubeApi::start("127.0.0.1:0".parse()?)?;
    api.add_token(FLANNEL_TOKEN, FLANNEL_USER, FLANNEL_GRANTS);
    api.add_node(node("n1", "10.244.1.0/24"))?;
    api.add_node(node("n2", "10.244.2.0/24"))?;
    Ok(api)
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect()
}

#[test]
fn kubectl_lists_and_gets_nodes() -> anyhow::Result<()> {
    let api = server_with_nodes()?;
    let token = api.admin_token();

    let list: Value =
        serde_json::from_str(&kubectl_ok(&api, token, &["get", "nodes", "-o", "json"])?)?;
    assert_eq!(names(&list), ["n1", "n2"], "{list:#}");
    assert_eq!(
        list["items"][0]["spec"]["podCIDRs"],
        json!(["10.244.1.0/24"])
    );
    // kubectl prints a List; the NodeList's resourceVersion is in the raw response.
    let raw: Value = serde_json::from_str(&kubectl_ok(
        &api,
        token,
        &["get", "--raw", "/api/v1/nodes"],
    )?)?;
    assert_eq!(raw["kind"], "NodeList");
    assert_eq!(
        raw["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );

    let n2: Value = serde_json::from_str(&kubectl_ok(
        &api,
        token,
        &["get", "node", "n2", "-o", "json"],
    )?)?;
    assert_eq!(n2["metadata"]["name"], "n2");
    assert_eq!(n2["kind"], "Node");
    assert!(n2["metadata"]["uid"].is_string() && n2["metadata"]["creationTimestamp"].is_string());

    let missing = kubectl_err(&api, token, &["get", "node", "n9"])?;
    assert!(missing.contains(r#"nodes "n9" not found"#), "{missing}");

    // The table kubectl prints by default (the server sends no Table: client-side columns).
    let table = kubectl_ok(&api, token, &["get", "nodes"])?;
    assert!(table.lines().any(|l| l.starts_with("n1 ")), "{table}");
    Ok(())
}

#[test]
fn kubectl_gets_401_and_403() -> anyhow::Result<()> {
    let api = server_with_nodes()?;
    api.add_token("reader", "reader", &[("get", "nodes")]);

    let err = kubectl_err(&api, "not-a-token", &["get", "nodes"])?;
    assert!(err.contains("You must be logged in to the server"), "{err}");
    assert!(api.requests().iter().any(|r| r.status == 401));

    let err = kubectl_err(&api, "reader", &["get", "nodes"])?;
    assert!(
        err.contains(
            r#"nodes is forbidden: User "reader" cannot list resource "nodes" in API group "" at the cluster scope"#
        ),
        "{err}"
    );
    // get is granted, list is not.
    kubectl_ok(&api, "reader", &["get", "node", "n1", "-o", "name"])?;

    // flannel's role may patch nodes/status but not the Node itself.
    let err = kubectl_err(
        &api,
        FLANNEL_TOKEN,
        &patch_args("n1", false, "merge", r#"{"spec":{"unschedulable":true}}"#),
    )?;
    assert!(
        err.contains(&format!(
            r#"nodes "n1" is forbidden: User "{FLANNEL_USER}" cannot patch resource "nodes""#
        )),
        "{err}"
    );
    assert_eq!(
        api.node("n1").expect("n1")["spec"]["unschedulable"],
        Value::Null
    );
    assert!(api.patches().is_empty(), "a refused patch was applied");

    api.revoke_token(FLANNEL_TOKEN);
    let err = kubectl_err(&api, FLANNEL_TOKEN, &["get", "nodes"])?;
    assert!(err.contains("You must be logged in to the server"), "{err}");
    Ok(())
}

#[test]
fn kubectl_patches_node_status() -> anyhow::Result<()> {
    let api = server_with_nodes()?;
    // kubectl gets nodes/status before patching it, which flannel's role does not allow
    // (flannel patches without a get).
    const PATCHER: &str = "patcher";
    api.add_token(
        PATCHER,
        PATCHER,
        &[("get", "nodes/status"), ("patch", "nodes/status")],
    );
    let before = api.resource_version();

    // flannel's announcement: annotations and a condition, through nodes/status.
    let announce = json!({
        "metadata": {"annotations": {
            "flannel.alpha.coreos.com/backend-type": "host-gw",
            "flannel.alpha.coreos.com/public-ip": "172.31.0.1",
        }},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False",
                                   "reason": "FlannelIsUp"}]},
    });
    kubectl_ok(
        &api,
        PATCHER,
        &patch_args("n1", true, "strategic", &announce.to_string()),
    )?;
    let n1 = api.node("n1").expect("n1");
    assert_eq!(
        n1["metadata"]["annotations"],
        announce["metadata"]["annotations"]
    );
    // Strategic: merged by type, Ready kept.
    assert_eq!(
        n1["status"]["conditions"],
        json!([{"type": "Ready", "status": "True", "reason": "KubeletReady"},
               {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]),
        "{n1:#}"
    );
    assert!(api.resource_version() > before);
    let patches = api.patches();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0].content_type,
        "application/strategic-merge-patch+json"
    );
    assert_eq!(patches[0].subresource.as_deref(), Some("status"));
    assert_eq!(patches[0].user, PATCHER);
    assert_eq!(patches[0].body, announce);

    // Merge: the list is replaced; the status subresource leaves the spec alone.
    kubectl_ok(
        &api,
        PATCHER,
        &patch_args(
            "n2",
            true,
            "merge",
            r#"{"spec":{"podCIDR":"10.9.9.0/24"},"status":{"conditions":[{"type":"NetworkUnavailable","status":"False"}]}}"#,
        ),
    )?;
    let n2 = api.node("n2").expect("n2");
    assert_eq!(
        n2["status"]["conditions"],
        json!([{"type": "NetworkUnavailable", "status": "False"}])
    );
    assert_eq!(n2["spec"]["podCIDR"], "10.244.2.0/24");
    assert_eq!(
        api.patches()[1].content_type,
        "application/merge-patch+json"
    );

    // The main resource changes metadata and spec, never the status.
    let labelled = r#"{"metadata":{"labels":{"x":"y"}},"status":{"conditions":[]}}"#;
    let admin = api.admin_token();
    kubectl_ok(&api, admin, &patch_args("n2", false, "merge", labelled))?;
    let n2 = api.node("n2").expect("n2");
    assert_eq!(n2["metadata"]["labels"]["x"], "y");
    assert_eq!(n2["status"]["conditions"][0]["type"], "NetworkUnavailable");

    // A stale resourceVersion in the patch is a conflict, as optimistic locking is.
    let stale = r#"{"metadata":{"resourceVersion":"1","labels":{"x":"z"}}}"#;
    let err = kubectl_err(&api, admin, &patch_args("n2", false, "merge", stale))?;
    assert!(err.contains("the object has been modified"), "{err}");
    Ok(())
}

/// Reads a stream of JSON values from `child`'s stdout onto a channel.
fn json_stream(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for value in serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter() {
            let Ok(value) = value else { return };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<Value>) -> anyhow::Result<(String, String)> {
    let event = rx.recv_timeout(Duration::from_secs(10))?;
    Ok((
        event["type"].as_str().unwrap_or_default().to_owned(),
        event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

#[test]
fn kubectl_watch_sees_changes_made_afterwards() -> anyhow::Result<()> {
    let mut api = server_with_nodes()?;
    let listed = api.resource_version();
    let mut watch = kubectl_command(
        &api,
        FLANNEL_TOKEN,
        &[
            "get",
            "nodes",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ],
    )?
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()?;
    let events = json_stream(&mut watch);
    let mut first = vec![next_event(&events)?, next_event(&events)?];
    first.sort();
    assert_eq!(
        first,
        [("ADDED".into(), "n1".into()), ("ADDED".into(), "n2".into())]
    );
    // kubectl lists, then watches from the list's resourceVersion.
    api.wait_for_request(Duration::from_secs(10), |r| {
        r.uri.contains("watch=true") && r.uri.contains(&format!("resourceVersion={listed}"))
    })?;

    api.add_node(node("n3", "10.244.3.0/24"))?;
    api.modify_node("n2", |n| n["metadata"]["labels"]["changed"] = json!("yes"))?;
    api.delete_node("n1")?;
    assert_eq!(next_event(&events)?, ("ADDED".into(), "n3".into()));
    assert_eq!(next_event(&events)?, ("MODIFIED".into(), "n2".into()));
    assert_eq!(next_event(&events)?, ("DELETED".into(), "n1".into()));

    // Stopped, the server refuses connections and the open watch breaks.
    api.stop();
    let err = kubectl_err(&api, FLANNEL_TOKEN, &["get", "nodes"])?;
    assert!(err.contains("refused"), "{err}");
    let _ = watch.kill();
    let _ = watch.wait();

    // Back on the same address, with the same Nodes.
    api.resume()?;
    let list: Value = serde_json::from_str(&kubectl_ok(
        &api,
        FLANNEL_TOKEN,
        &["get", "nodes", "-o", "json"],
    )?)?;
    assert_eq!(names(&list), ["n2", "n3"]);
    Ok(())
}

/// The watch lines `kubectl get --raw` prints for a watch that ends after a second.
fn raw_watch(api: &KubeApi, query: &str) -> anyhow::Result<Vec<Value>> {
    let path = format!("/api/v1/nodes?watch=1&timeoutSeconds=2&{query}");
    let out = kubectl_ok(api, api.admin_token(), &["get", "--raw", &path])?;
    Ok(serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()?)
}

#[test]
fn watch_bookmarks_initial_events_and_410_gone() -> anyhow::Result<()> {
    let api = server_with_nodes()?;
    let from = api.resource_version();
    let n1_rv = api.modify_node("n1", |n| n["metadata"]["labels"]["a"] = json!("b"))?;
    api.set_bookmark_interval(Duration::from_millis(300));

    let events = raw_watch(
        &api,
        &format!("resourceVersion={from}&allowWatchBookmarks=true"),
    )?;
    assert_eq!(events[0]["type"], "MODIFIED", "{events:#?}");
    assert_eq!(
        events[0]["object"]["metadata"]["resourceVersion"],
        n1_rv.to_string()
    );
    let bookmarks: Vec<&Value> = events.iter().filter(|e| e["type"] == "BOOKMARK").collect();
    assert!(bookmarks.len() >= 2, "{events:#?}");
    assert_eq!(bookmarks[0]["object"]["kind"], "Node");
    assert_eq!(
        bookmarks[0]["object"]["metadata"]["resourceVersion"],
        n1_rv.to_string()
    );

    // Streaming lists (what kube-rs' watcher uses with streaming_lists()).
    let events = raw_watch(
        &api,
        "sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan",
    )?;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["type"], "ADDED");
    assert_eq!(events[2]["type"], "BOOKMARK");
    assert_eq!(
        events[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // Expired: the ERROR event carrying a 410 Expired Status, then the end.
    api.expire_history();
    let events = raw_watch(
        &api,
        &format!("resourceVersion={n1_rv}&allowWatchBookmarks=true"),
    )?;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["type"], "ERROR");
    let status = &events[0]["object"];
    assert_eq!(
        (
            status["kind"].as_str(),
            status["code"].as_u64(),
            status["reason"].as_str()
        ),
        (Some("Status"), Some(410), Some("Expired")),
        "{status:#}"
    );
    // An exact list at that resourceVersion is a 410 too.
    let err = kubectl_err(
        &api,
        api.admin_token(),
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes?resourceVersion={n1_rv}&resourceVersionMatch=Exact"),
        ],
    )?;
    assert!(err.contains("too old resource version"), "{err}");
    // A relist and a watch from its resourceVersion work.
    let relisted = api.resource_version();
    let events = raw_watch(&api, &format!("resourceVersion={relisted}"))?;
    assert!(events.is_empty(), "{events:#?}");
    Ok(())
}

#[test]
fn serves_inside_a_lab_namespace() -> anyhow::Result<()> {
    let lab = Lab::up(1, 0)?;
    let ns = &lab.nodes[0].ns;
    let api = KubeApi::start_in(ns, "127.0.0.1:0".parse()?)?;
    api.add_node(node("n1", "10.244.1.0/24"))?;
    let kubeconfig = api.write_kubeconfig(api.admin_token())?;
    let kubeconfig = kubeconfig.to_string_lossy();
    let cache = api.dir().join("kube-cache");
    let args = [
        "--kubeconfig",
        &kubeconfig,
        "--cache-dir",
        &cache.to_string_lossy(),
        "get",
        "nodes",
        "-o",
        "name",
    ];
    let out = run_in(ns, &kubectl_bin(), &args)?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "node/n1",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Not in the host's namespace.
    let out = kubectl(
        &api,
        api.admin_token(),
        &["get", "nodes", "--request-timeout=3s"],
    )?;
    assert!(!out.status.success(), "reached from outside the namespace");
    Ok(())
}
