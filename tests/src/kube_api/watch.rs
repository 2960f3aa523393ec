//! Watch streams: one JSON event a line (`{"type":"ADDED","object":{...}}`), as the API
//! server sends them, with bookmarks, `sendInitialEvents` and the `410 Gone` ERROR event
//! for a resourceVersion older than the history.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, channel::Channel};
use hyper::{StatusCode, header::CONTENT_TYPE};
use serde_json::{Value, json};
use tokio::time::{Instant, interval_at, sleep_until};

use super::{
    Shared,
    http::{Query, Response, expired_status},
};

/// The annotation on the bookmark that ends a `sendInitialEvents` watch's initial state.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Answers a watch request: 200 and a stream fed by a task of its own.
pub(crate) fn start(shared: Arc<Shared>, query: &Query, name: Option<String>) -> Response {
    let params = Params {
        rv: query.get("resourceVersion").unwrap_or("").to_owned(),
        bookmarks: query.flag("allowWatchBookmarks"),
        initial_events: query.flag("sendInitialEvents"),
        timeout: query
            .get("timeoutSeconds")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs),
        name,
    };
    let (tx, body) = Channel::<Bytes>::new(64);
    tokio::spawn(stream(shared, params, tx));
    hyper::Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(body.boxed())
        .unwrap_or_else(|_| hyper::Response::new(http_body_util::Full::default().boxed()))
}

struct Params {
    rv: String,
    bookmarks: bool,
    initial_events: bool,
    timeout: Option<Duration>,
    /// From `fieldSelector=metadata.name=...`.
    name: Option<String>,
}

impl Params {
    fn selects(&self, object: &Value) -> bool {
        self.name
            .as_deref()
            .is_none_or(|name| object["metadata"]["name"] == name)
    }
}

type Sender = http_body_util::channel::Sender<Bytes>;

/// Sends one event; false once the client has gone.
async fn send(tx: &mut Sender, kind: &str, object: &Value) -> bool {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    tx.send_data(Bytes::from(line)).await.is_ok()
}

fn bookmark(rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    json!({"kind": "Node", "apiVersion": "v1", "metadata": meta})
}

async fn stream(shared: Arc<Shared>, params: Params, mut tx: Sender) {
    let mut changed = shared.changed.subscribe();
    // Unset and "0" mean "the current state, then changes", as for the real server;
    // sendInitialEvents asks for the same from any resourceVersion.
    let from: Option<u64> = match params.rv.as_str() {
        "" | "0" => None,
        rv => match rv.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                let status = super::http::status_object(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resource version: {rv}"),
                    None,
                );
                send(&mut tx, "ERROR", &status).await;
                return;
            }
        },
    };
    let (last, epoch, every, first) = {
        let store = shared.lock();
        let mut first: Vec<(&str, Value)> = Vec::new();
        let last = match from {
            Some(rv) if !params.initial_events => {
                if store.too_old(rv) {
                    first.push((
                        "ERROR",
                        expired_status(&params.rv, store.resource_version()),
                    ));
                }
                first.extend(
                    store
                        .events_since(rv)
                        .iter()
                        .filter(|e| params.selects(&e.object))
                        .map(|e| (e.kind, e.object.clone())),
                );
                // A resourceVersion from the future is waited for, as the real server does.
                rv.max(store.resource_version())
            }
            _ => {
                first.extend(
                    store
                        .nodes()
                        .filter(|n| params.selects(n))
                        .map(|n| ("ADDED", n.clone())),
                );
                let rv = store.resource_version();
                if params.initial_events && params.bookmarks {
                    first.push(("BOOKMARK", bookmark(rv, true)));
                }
                rv
            }
        };
        (last, store.watch_epoch, store.bookmark_interval, first)
    };
    let expired = first.first().is_some_and(|(kind, _)| *kind == "ERROR");
    for (kind, object) in &first {
        if !send(&mut tx, kind, object).await {
            return;
        }
    }
    if expired {
        return;
    }
    let mut last = last;
    let deadline = params.timeout.map(|t| Instant::now() + t);
    let mut ticks = interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            changed = changed.changed() => {
                if changed.is_err() {
                    return;
                }
                let (events, closed) = {
                    let store = shared.lock();
                    let events: Vec<(&str, Value)> = store
                        .events_since(last)
                        .iter()
                        .filter(|e| params.selects(&e.object))
                        .map(|e| (e.kind, e.object.clone()))
                        .collect();
                    // Filtered-out events are passed too: the next bookmark may name them.
                    last = last.max(store.resource_version());
                    (events, store.watch_epoch != epoch)
                };
                if closed {
                    return;
                }
                for (kind, object) in &events {
                    if !send(&mut tx, kind, object).await {
                        return;
                    }
                }
            }
            _ = ticks.tick(), if params.bookmarks => {
                if !send(&mut tx, "BOOKMARK", &bookmark(last, false)).await {
                    return;
                }
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                return;
            }
        }
    }
}
