//! The HTTP side: routing, bearer-token authentication and authorization, discovery,
//! list, get and patch. Watches are in `watch.rs`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::{
    Method, StatusCode,
    body::Incoming,
    header::{AUTHORIZATION, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use super::{
    Shared,
    patch::{merge_patch, strategic_merge_patch},
    store::{ReceivedPatch, Request, Store},
    watch,
};

pub(crate) type Body = BoxBody<Bytes, Infallible>;
pub(crate) type Response = hyper::Response<Body>;

const MERGE_PATCH: &str = "application/merge-patch+json";
const STRATEGIC_PATCH: &str = "application/strategic-merge-patch+json";
/// The API server's own limit on a request body.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Accepts connections until aborted; aborting drops the listener and, with `conns`,
/// every connection and watch it serves.
pub(crate) async fn serve(listener: TcpListener, tls: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or the like: try again soon rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (shared, tls) = (shared.clone(), tls.clone());
        conns.spawn(async move {
            // A client that fails the handshake or goes away mid-request is its own business.
            let Ok(stream) = tls.accept(stream).await else {
                return;
            };
            let service = service_fn(move |req| handle(shared.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: hyper::Request<Incoming>,
) -> Result<Response, Infallible> {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let resp = route(&shared, req).await;
    shared.lock().requests.push(Request {
        method,
        uri,
        status: resp.status().as_u16(),
    });
    Ok(resp)
}

async fn route(shared: &Arc<Shared>, req: hyper::Request<Incoming>) -> Response {
    let user = match authenticate(&shared.lock(), &req) {
        Some(user) => user,
        None => {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized",
                None,
            );
        }
    };
    let uri = req.uri().clone();
    let path: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let query = Query::parse(uri.query().unwrap_or(""));
    // Discovery is open to every authenticated user, as with RBAC's system:discovery.
    match (req.method(), path.as_slice()) {
        (&Method::GET, ["api"]) => return json_response(StatusCode::OK, &api_versions()),
        (&Method::GET, ["apis"]) => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            );
        }
        (&Method::GET, ["api", "v1"]) => return json_response(StatusCode::OK, &api_resources()),
        (&Method::GET, ["version"]) => return json_response(StatusCode::OK, &version()),
        _ => {}
    }
    let (name, subresource) = match path.as_slice() {
        ["api", "v1", "nodes"] => (None, None),
        ["api", "v1", "nodes", name] => (Some(*name), None),
        ["api", "v1", "nodes", name, "status"] => (Some(*name), Some("status")),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
                None,
            );
        }
    };
    let verb = match (req.method(), name) {
        (&Method::GET, None) if query.is_watch() => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::PATCH, Some(_)) => "patch",
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            );
        }
    };
    let resource = match subresource {
        Some(sub) => format!("nodes/{sub}"),
        None => "nodes".to_owned(),
    };
    let allowed = shared
        .lock()
        .token(&user.1)
        .is_some_and(|t| t.allows(verb, &resource));
    if !allowed {
        return forbidden(&user.0, verb, &resource, name);
    }
    let selector = match query.name_selector() {
        Ok(selector) => selector,
        Err(message) => return bad_request(&message),
    };
    match (verb, name) {
        ("watch", _) => watch::start(shared.clone(), &query, selector),
        ("list", _) => list(&shared.lock(), &query, selector.as_deref()),
        ("get", Some(name)) => match shared.lock().node(name) {
            Some(node) => json_response(StatusCode::OK, node),
            None => not_found(name),
        },
        ("patch", Some(name)) => {
            let content_type = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return bad_request(&format!("reading the request body: {e}")),
            };
            let patch = ReceivedPatch {
                node: name.to_owned(),
                subresource: subresource.map(str::to_owned),
                content_type,
                body: match serde_json::from_slice(&body) {
                    Ok(body) => body,
                    Err(e) => return bad_request(&format!("error decoding patch: {e}")),
                },
                user: user.0,
            };
            shared.update(|store| apply_patch(store, patch))
        }
        _ => unreachable!("verbs are matched with their names above"),
    }
}

/// `(user, token)` of a valid `Authorization: Bearer` header.
fn authenticate(store: &Store, req: &hyper::Request<Incoming>) -> Option<(String, String)> {
    let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let token = header.strip_prefix("Bearer ")?.trim();
    let user = store.token(token)?.user.clone();
    Some((user, token.to_owned()))
}

/// The query parameters a Node client uses.
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(query: &str) -> Query {
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query { pairs }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true"))
    }

    fn is_watch(&self) -> bool {
        self.flag("watch")
    }

    /// The name a `fieldSelector=metadata.name=NAME` picks (what `kubectl get node X
    /// --watch` sends); other selectors are refused rather than ignored.
    fn name_selector(&self) -> Result<Option<String>, String> {
        if self.get("labelSelector").is_some_and(|s| !s.is_empty()) {
            return Err("labelSelector is not supported by the lab server".to_owned());
        }
        let Some(selector) = self.get("fieldSelector").filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let name = selector
            .strip_prefix("metadata.name==")
            .or_else(|| selector.strip_prefix("metadata.name="));
        match name {
            Some(name) if !name.contains(',') => Ok(Some(name.to_owned())),
            _ => Err(format!("field label not supported: {selector}")),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list(store: &Store, query: &Query, selector: Option<&str>) -> Response {
    // Only the current state is kept, so an exact older list is as gone as an expired one.
    if query.get("resourceVersionMatch") == Some("Exact") {
        let asked = query.get("resourceVersion").unwrap_or("");
        if asked != store.resource_version().to_string() {
            return expired(asked, store.resource_version());
        }
    }
    let items: Vec<&Value> = store
        .nodes()
        .filter(|n| selector.is_none_or(|s| n["metadata"]["name"] == s))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": store.resource_version().to_string()},
            "items": items,
        }),
    )
}

fn apply_patch(store: &mut Store, patch: ReceivedPatch) -> Response {
    let name = patch.node.clone();
    store.patches.push(patch.clone());
    let Some(old) = store.node(&name).cloned() else {
        return not_found(&name);
    };
    if let Some(rv) = patch.body["metadata"]["resourceVersion"].as_str()
        && Some(rv) != old["metadata"]["resourceVersion"].as_str()
    {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on nodes \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
            Some(json!({"name": name, "kind": "nodes"})),
        );
    }
    let mut new = old.clone();
    match patch.content_type.split(';').next().unwrap_or("").trim() {
        MERGE_PATCH => merge_patch(&mut new, &patch.body),
        STRATEGIC_PATCH => {
            if let Err(e) = strategic_merge_patch(&mut new, &patch.body) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.0, None);
            }
        }
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: {MERGE_PATCH}, {STRATEGIC_PATCH} (got {other:?})"
                ),
                None,
            );
        }
    }
    // As the Node strategies do: the main resource cannot change the status and the
    // status subresource cannot change the spec; metadata changes through either.
    let kept = if patch.subresource.is_some() {
        "spec"
    } else {
        "status"
    };
    match old.get(kept) {
        Some(v) => new[kept] = v.clone(),
        None => drop(new.as_object_mut().map(|o| o.remove(kept))),
    }
    match store.modify_node(&name, |n| *n = new) {
        Ok(_) => json_response(StatusCode::OK, store.node(&name).unwrap_or(&Value::Null)),
        Err(e) => status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &e.to_string(),
            None,
        ),
    }
}

fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn api_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
             "verbs": ["get", "list", "patch", "watch"], "shortNames": ["no"]},
            {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
             "verbs": ["get", "patch"]},
        ],
    })
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-hgw-lab",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "", "compiler": "", "platform": "linux/amd64",
    })
}

pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    hyper::Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .unwrap_or_else(|_| hyper::Response::new(Full::default().boxed()))
}

/// A `metav1.Status` failure, the body every API error carries.
pub(crate) fn status_object(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Value {
    let mut status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response {
    json_response(code, &status_object(code, reason, message, details))
}

fn bad_request(message: &str) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("nodes \"{name}\" not found"),
        Some(json!({"name": name, "kind": "nodes"})),
    )
}

/// RBAC's refusal, worded as kube-apiserver words it.
fn forbidden(user: &str, verb: &str, resource: &str, name: Option<&str>) -> Response {
    let object = match name {
        Some(name) => format!("nodes \"{name}\""),
        None => "nodes".to_owned(),
    };
    let mut details = json!({"kind": "nodes"});
    if let Some(name) = name {
        details["name"] = json!(name);
    }
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "{object} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in \
             API group \"\" at the cluster scope"
        ),
        Some(details),
    )
}

/// The `410 Gone` for a resourceVersion older than the history.
pub(crate) fn expired_status(asked: &str, current: u64) -> Value {
    status_object(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: {asked} ({current})"),
        None,
    )
}

fn expired(asked: &str, current: u64) -> Response {
    json_response(StatusCode::GONE, &expired_status(asked, current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decodes_selectors() {
        let q = Query::parse("fieldSelector=metadata.name%3Dn1&watch=true&resourceVersion=7");
        assert!(q.is_watch());
        assert_eq!(q.get("resourceVersion"), Some("7"));
        assert_eq!(q.name_selector().ok(), Some(Some("n1".to_owned())));
        assert!(
            Query::parse("fieldSelector=spec.unschedulable%3Dfalse")
                .name_selector()
                .is_err()
        );
    }
}
