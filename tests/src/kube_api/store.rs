//! The server's state: Nodes, the event history watches replay, tokens, and what clients
//! sent (for the tests to inspect).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// A watch event as the API server streams it.
#[derive(Clone)]
pub(crate) struct Event {
    pub rv: u64,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    pub object: Value,
}

/// A patch a client sent, as received.
#[derive(Clone, Debug)]
pub struct ReceivedPatch {
    pub node: String,
    /// `Some("status")` for `nodes/{name}/status`.
    pub subresource: Option<String>,
    /// The request's Content-Type, e.g. `application/strategic-merge-patch+json`.
    pub content_type: String,
    pub body: Value,
    /// The user the token belongs to.
    pub user: String,
}

/// One request: `GET /api/v1/nodes?watch=1&...` and the status it got.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub status: u16,
}

pub(crate) struct Token {
    pub user: String,
    pub grants: Vec<(String, String)>,
}

impl Token {
    pub fn allows(&self, verb: &str, resource: &str) -> bool {
        self.grants
            .iter()
            .any(|(v, r)| (v == "*" || v == verb) && (r == "*" || r == resource))
    }
}

pub(crate) struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest: u64,
    nodes: BTreeMap<String, Value>,
    /// Every change since `oldest`, in resourceVersion order.
    history: Vec<Event>,
    /// Bumped to end every open watch.
    pub watch_epoch: u64,
    pub bookmark_interval: Duration,
    tokens: HashMap<String, Token>,
    pub patches: Vec<ReceivedPatch>,
    pub requests: Vec<Request>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            rv: 1,
            oldest: 0,
            nodes: BTreeMap::new(),
            history: Vec::new(),
            watch_epoch: 0,
            bookmark_interval: Duration::from_secs(1),
            tokens: HashMap::new(),
            patches: Vec::new(),
            requests: Vec::new(),
        }
    }
}

impl Store {
    pub fn add_token(&mut self, token: &str, user: &str, grants: &[(&str, &str)]) {
        let grants = grants
            .iter()
            .map(|(v, r)| (v.to_string(), r.to_string()))
            .collect();
        let user = user.to_owned();
        self.tokens.insert(token.to_owned(), Token { user, grants });
    }

    pub fn revoke_token(&mut self, token: &str) {
        self.tokens.remove(token);
    }

    pub fn token(&self, token: &str) -> Option<&Token> {
        self.tokens.get(token)
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn node(&self, name: &str) -> Option<&Value> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Value> {
        self.nodes.values()
    }

    pub fn add_node(&mut self, mut node: Value) -> anyhow::Result<u64> {
        let name = node["metadata"]["name"]
            .as_str()
            .context("a Node needs metadata.name")?
            .to_owned();
        if self.nodes.contains_key(&name) {
            bail!("node {name} already exists");
        }
        node["kind"] = json!("Node");
        node["apiVersion"] = json!("v1");
        let meta = &mut node["metadata"];
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.rv + 1));
        meta["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        Ok(self.record("ADDED", name, node))
    }

    /// Applies `f` to Node `name`: a MODIFIED event if it changed anything.
    pub fn modify_node(&mut self, name: &str, f: impl FnOnce(&mut Value)) -> anyhow::Result<u64> {
        let old = self
            .nodes
            .get(name)
            .with_context(|| format!("no node {name}"))?;
        let mut new = old.clone();
        f(&mut new);
        // What clients may not change: the server keeps its own values.
        for field in ["name", "uid", "creationTimestamp", "resourceVersion"] {
            new["metadata"][field] = old["metadata"][field].clone();
        }
        if &new == old {
            return Ok(self.rv);
        }
        Ok(self.record("MODIFIED", name.to_owned(), new))
    }

    pub fn delete_node(&mut self, name: &str) -> anyhow::Result<u64> {
        let node = self
            .nodes
            .get(name)
            .with_context(|| format!("no node {name}"))?;
        Ok(self.record("DELETED", name.to_owned(), node.clone()))
    }

    fn record(&mut self, kind: &'static str, name: String, mut object: Value) -> u64 {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if kind == "DELETED" {
            self.nodes.remove(&name);
        } else {
            self.nodes.insert(name, object.clone());
        }
        let rv = self.rv;
        self.history.push(Event { rv, kind, object });
        rv
    }

    /// Whether a watch from `rv` can still be served from the history.
    pub fn too_old(&self, rv: u64) -> bool {
        rv < self.oldest
    }

    /// The events after `rv`.
    pub fn events_since(&self, rv: u64) -> &[Event] {
        &self.history[self.history.partition_point(|e| e.rv <= rv)..]
    }

    pub fn expire_history(&mut self) {
        // A fresh resourceVersion that a relist returns and a watch may start from, above
        // every one handed out before.
        self.rv += 1;
        self.oldest = self.rv;
        self.history.clear();
        self.close_watches();
    }

    pub fn close_watches(&mut self) {
        self.watch_epoch += 1;
    }
}

/// `2026-12-05T14:45:55Z`, as metav1.Time marshals.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |s| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_488_000 + 3723), "2026-12-05T17:28:43Z");
    }

    #[test]
    fn expired_history_refuses_old_watches_but_not_a_relist() {
        let mut store = Store::default();
        let rv = store
            .add_node(json!({"metadata": {"name": "n1"}}))
            .expect("added");
        assert!(!store.too_old(rv));
        store.expire_history();
        assert!(store.too_old(rv));
        assert!(!store.too_old(store.resource_version()));
        store
            .modify_node("n1", |n| n["spec"]["podCIDR"] = json!("10.0.0.0/24"))
            .expect("modified");
        let events = store.events_since(rv);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "MODIFIED");
    }
}
