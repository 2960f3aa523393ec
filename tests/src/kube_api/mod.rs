//! A small Kubernetes API server for the lab: it serves Node objects over HTTPS (its
//! own CA: kubectl sends a bearer token only over TLS) the way kube-apiserver does (list with a resourceVersion, get, watch streams with
//! bookmarks, `410 Gone` for an expired resourceVersion, merge and strategic merge
//! patches on `nodes/{name}` and `nodes/{name}/status`, bearer tokens with 401 and 403),
//! since no package on these machines ships a kube-apiserver. `kubectl` works against it
//! (tests/tests/kube_api_server.rs).
//!
//! The test drives it: it adds, changes and deletes Nodes, stops and resumes the server,
//! expires its history, and reads back the patches clients sent.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use hgw_tests::KubeApi;
//! let api = KubeApi::start("127.0.0.1:0".parse()?)?;
//! api.add_node(serde_json::json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.1.0/24"}}))?;
//! // kubectl --server <api.url()> --certificate-authority <api.ca_path()>
//         --token <api.admin_token()> get nodes
//! # Ok(()) }
//! ```

mod http;
mod patch;
mod store;
mod tls;
mod watch;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::{runtime, sync::oneshot, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

pub use patch::{PatchError, merge_patch, strategic_merge_patch};
use store::Store;
pub use store::{ReceivedPatch, Request};

/// The token [`KubeApi::start`] grants everything to (as `system:admin`).
pub const ADMIN_TOKEN: &str = "hgw-lab-admin";
/// Where [`KubeApi::start_on_lab`] listens: on the lab nodes' segment (they are .1 to .N).
pub const LAB_API_IP: &str = "172.31.0.251";
pub const LAB_API_PORT: u16 = 6443;

/// What flannel's ClusterRole grants (kube-flannel.yml): what a node agent reading peers
/// from Nodes and announcing its own needs.
pub const FLANNEL_GRANTS: &[(&str, &str)] = &[
    ("get", "nodes"),
    ("list", "nodes"),
    ("watch", "nodes"),
    ("patch", "nodes/status"),
];

/// State shared by the server's tasks and the test's controls.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Woken on every change a watch may have to send (a new event, closed watches).
    changed: tokio::sync::watch::Sender<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic in a handler must not take the test's controls down with it.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the store and wakes the watches.
    fn update<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_replace(());
        out
    }
}

/// The running server. Dropping it stops the server and its thread.
pub struct KubeApi {
    shared: Arc<Shared>,
    /// The network namespace it listens in (None: the caller's).
    ns: Option<String>,
    addr: SocketAddr,
    /// Its certificates and kubeconfigs; removed on drop.
    dir: PathBuf,
    ca: PathBuf,
    tls: TlsAcceptor,
    runtime: runtime::Handle,
    /// The accept loop; aborting it closes the listener and every connection.
    serving: Option<JoinHandle<()>>,
    stop_thread: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Listens on `addr` (port 0 picks one) in the caller's network namespace.
    pub fn start(addr: SocketAddr) -> anyhow::Result<KubeApi> {
        Self::start_with(None, addr)
    }

    /// Listens on `addr` inside network namespace `ns` (`/run/netns/<ns>`), such as a lab
    /// node's, where clients in that namespace reach it.
    pub fn start_in(ns: &str, addr: SocketAddr) -> anyhow::Result<KubeApi> {
        Self::start_with(Some(ns.to_owned()), addr)
    }

    /// Listens at [`LAB_API_IP`]:[`LAB_API_PORT`] in a namespace of its own on `lab`'s
    /// switch, where every lab node reaches it.
    pub fn start_on_lab(lab: &mut crate::Lab) -> anyhow::Result<KubeApi> {
        let ns = lab.add_extra_namespace("kube")?;
        lab.attach_to_switch(&ns, "kube", &format!("{LAB_API_IP}/24"))?;
        Self::start_in(&ns, format!("{LAB_API_IP}:{LAB_API_PORT}").parse()?)
    }

    fn start_with(ns: Option<String>, addr: SocketAddr) -> anyhow::Result<KubeApi> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hgw-kube-api-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = tls::make_certs(&dir, addr.ip())?;
        let tls = tls::acceptor(&dir)?;
        let rt = runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the kube API server's runtime")?;
        let runtime = rt.handle().clone();
        let (stop_thread, stopped) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || {
                // Dropping the runtime after this cancels every task it still runs.
                let _ = rt.block_on(stopped);
            })
            .context("starting the kube API server's thread")?;
        let mut store = Store::default();
        store.add_token(ADMIN_TOKEN, "system:admin", &[("*", "*")]);
        let mut api = KubeApi {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                changed: tokio::sync::watch::Sender::new(()),
            }),
            ns,
            addr,
            dir,
            ca,
            tls,
            runtime,
            serving: None,
            stop_thread: Some(stop_thread),
            thread: Some(thread),
        };
        api.resume()?;
        Ok(api)
    }

    /// `https://ADDR:PORT`, for `kubectl --server` and a kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Its own directory (certificates, kubeconfigs), removed on drop; clients may keep
    /// caches there.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA that signed the server's certificate (`kubectl --certificate-authority`).
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// Writes a kubeconfig for this server and `token` (what `kubectl --kubeconfig` and
    /// a kube-rs client read); its path.
    pub fn write_kubeconfig(&self, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{token}"));
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    \
             server: {}\n    certificate-authority: {}\nusers:\n- name: lab\n  user:\n    \
             token: {token}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    \
             user: lab\ncurrent-context: lab\n",
            self.url(),
            self.ca.display()
        );
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_token(&self) -> &'static str {
        ADMIN_TOKEN
    }

    /// Accepts `token` as `user`, allowed the (verb, resource) pairs of `grants`
    /// (`"*"` matches any; resources are `nodes` and `nodes/status`).
    pub fn add_token(&self, token: &str, user: &str, grants: &[(&str, &str)]) {
        self.shared.lock().add_token(token, user, grants);
    }

    /// Stops accepting a token: its requests get 401.
    pub fn revoke_token(&self, token: &str) {
        self.shared.lock().revoke_token(token);
    }

    /// Stops the server: the listener closes (connections are refused) and open watches
    /// break. The Nodes and history stay for [`KubeApi::resume`].
    pub fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
            // Wait until the listener is really closed, so a connect right after fails.
            let _ = self.runtime.block_on(serving);
        }
    }

    /// Listens again on the same address, after [`KubeApi::stop`] (a no-op if serving).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.serving.is_some() {
            return Ok(());
        }
        let listener = match &self.ns {
            Some(ns) => crate::netns::in_netns(ns, || std::net::TcpListener::bind(self.addr))?,
            None => std::net::TcpListener::bind(self.addr),
        }
        .with_context(|| format!("binding the kube API server to {}", self.addr))?;
        self.addr = listener.local_addr().context("kube API server address")?;
        listener
            .set_nonblocking(true)
            .context("kube API server listener")?;
        let listener = {
            let _entered = self.runtime.enter();
            tokio::net::TcpListener::from_std(listener).context("kube API server listener")?
        };
        let serve = http::serve(listener, self.tls.clone(), self.shared.clone());
        self.serving = Some(self.runtime.spawn(serve));
        Ok(())
    }

    pub fn is_serving(&self) -> bool {
        self.serving.is_some()
    }

    /// Adds a Node (an object with at least `metadata.name`); the server fills in `kind`,
    /// `apiVersion`, `uid`, `creationTimestamp` and `resourceVersion`. Its new
    /// resourceVersion.
    pub fn add_node(&self, node: Value) -> anyhow::Result<u64> {
        self.shared.update(|s| s.add_node(node))
    }

    /// Changes Node `name` with `f` (a MODIFIED event, if `f` changed anything).
    pub fn modify_node(&self, name: &str, f: impl FnOnce(&mut Value)) -> anyhow::Result<u64> {
        self.shared.update(|s| s.modify_node(name, f))
    }

    /// Deletes Node `name` (a DELETED event).
    pub fn delete_node(&self, name: &str) -> anyhow::Result<u64> {
        self.shared.update(|s| s.delete_node(name))
    }

    /// Node `name` as the server holds it now.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.lock().node(name).cloned()
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// Forgets the event history and breaks open watches, as an etcd compaction with a
    /// watch cache restart does: a watch from any resourceVersion seen so far gets a
    /// `410 Gone` (an ERROR event with an `Expired` Status); a new list works.
    pub fn expire_history(&self) {
        self.shared.update(Store::expire_history);
    }

    /// Ends every open watch stream cleanly, as the API server does at its
    /// `timeoutSeconds` or on a restart; the history stays, so a client resumes.
    pub fn close_watches(&self) {
        self.shared.update(Store::close_watches);
    }

    /// How often an open watch that asked for bookmarks gets one (the real server: about
    /// once a minute; 1 s by default here, so tests see them).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.update(|s| s.bookmark_interval = every);
    }

    /// Every patch received and authorized so far, in order (also those then refused).
    pub fn patches(&self) -> Vec<ReceivedPatch> {
        self.shared.lock().patches.clone()
    }

    /// Every request received so far, in order, with the status answered.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Waits until `pred` holds for the requests received, or fails after `timeout`.
    pub fn wait_for_request(
        &self,
        timeout: Duration,
        pred: impl Fn(&Request) -> bool,
    ) -> anyhow::Result<Request> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(&pred) {
                return Ok(r);
            }
            if std::time::Instant::now() > deadline {
                bail!("no such request in {timeout:?}; got {:#?}", self.requests());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
        if let Some(stop) = self.stop_thread.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
