//! The HTTP server on `metrics_addr` (hyper 1, HTTP/1.1): `/metrics`, `/healthz` and
//! `/readyz`, GET or HEAD, one request per connection.
//!
//! Each connection is a task of its own with a deadline, so a slow or broken client
//! holds up no one else. A scrape never waits for the agent's loop; only `/healthz`
//! asks the loop, to prove it still turns. When the loop's status sender goes (the
//! agent is stopping), the server stops accepting, lets the requests under way finish
//! and closes.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
};

use super::status::Status;

/// How long `/healthz` waits for the loop's answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A client has this long to send its request head, and again to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one connection may take: the head, the loop's answer, the answer's write.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest request head read (hyper's smallest limit); longer ones get 431.
const MAX_REQUEST: usize = 8 * 1024;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain";

/// The loop's side of `/healthz`: pings to answer.
#[derive(Debug, Default)]
pub struct Health {
    pings: Option<mpsc::Receiver<oneshot::Sender<()>>>,
    /// Set once the loop listens for pings; before, `/healthz` answers for the start.
    listening: Arc<AtomicBool>,
    /// The server's accept task: it ends once the loop's status sender is gone and the
    /// requests under way have their answers.
    server: Option<JoinHandle<()>>,
}

impl Health {
    /// The server's task, for the agent to wait on as it stops (`None` without one).
    pub fn take_server(&mut self) -> Option<JoinHandle<()>> {
        self.server.take()
    }

    /// The next `/healthz` ping; answer it by sending `()`. The first call marks the
    /// event loop as running. Never resolves without a metrics server.
    pub async fn ping(&mut self) -> oneshot::Sender<()> {
        self.listening.store(true, Ordering::Relaxed);
        if let Some(pings) = &mut self.pings
            && let Some(reply) = pings.recv().await
        {
            return reply;
        }
        std::future::pending().await
    }
}

/// What the server reads from.
struct Shared {
    registry: Registry,
    snapshot: watch::Receiver<Arc<Status>>,
    /// Set for good once a snapshot said ready.
    was_ready: AtomicBool,
    pings: mpsc::Sender<oneshot::Sender<()>>,
    listening: Arc<AtomicBool>,
}

/// Serves `registry` and the health of the loop that publishes `snapshot` on
/// `listener`, on tasks of its own. The returned [`Health`] is for the agent's loop.
pub fn spawn(
    listener: TcpListener,
    registry: Registry,
    snapshot: watch::Receiver<Arc<Status>>,
) -> Health {
    let (pings, rx) = mpsc::channel(16);
    let listening = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        registry,
        snapshot,
        was_ready: AtomicBool::new(false),
        pings,
        listening: listening.clone(),
    });
    tokio::spawn(watch_ready(shared.clone()));
    let server = tokio::spawn(accept(listener, shared));
    Health {
        pings: Some(rx),
        listening,
        server: Some(server),
    }
}

/// Resolves once the loop's status sender is gone: the agent is stopping.
async fn closed(mut snapshot: watch::Receiver<Arc<Status>>) {
    while snapshot.changed().await.is_ok() {}
}

/// Takes connections until the agent stops, then waits for those under way.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let stop = closed(shared.snapshot.clone());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors or the like: try again soon, not in a spin.
                    warn!("metrics: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut stop => break,
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One request, one answer (`Connection: close`), within [`CONNECTION_TIMEOUT`].
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let service = service_fn(|request: Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&shared, request.method(), request.uri().path()).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let stop = closed(shared.snapshot.clone());
    let result = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        tokio::select! {
            result = served.as_mut() => result,
            () = stop => {
                // Finishes a request under way; an idle connection closes now.
                served.as_mut().graceful_shutdown();
                served.await
            }
        }
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("metrics client: {e}"),
        Err(_) => debug!("metrics client too slow; dropped"),
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    Ready,
    NotFound,
    BadMethod,
}

/// The query string chooses nothing: `path` is without it.
fn route(method: &Method, path: &str) -> Route {
    if method != Method::GET && method != Method::HEAD {
        return Route::BadMethod;
    }
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => Route::NotFound,
    }
}

/// The answer to `method path` (hyper leaves the body out for HEAD).
async fn answer(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (code, content_type, body) = match route(method, path) {
        Route::Metrics => metrics(shared),
        Route::Health => health(shared).await,
        Route::Ready => ready(shared),
        Route::NotFound => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
        Route::BadMethod => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if code == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

type Answer = (StatusCode, &'static str, String);

fn metrics(shared: &Shared) -> Answer {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &shared.registry) {
        Ok(()) => (StatusCode::OK, OPENMETRICS, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("encoding the metrics: {e}\n"),
        ),
    }
}

async fn health(shared: &Shared) -> Answer {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, TEXT, why);
    if !shared.listening.load(Ordering::Relaxed) {
        // Starting (or waiting for etcd): the runtime answers, which is all there is.
        return (StatusCode::OK, TEXT, "ok: starting\n".into());
    }
    let (reply, answered) = oneshot::channel();
    if shared.pings.try_send(reply).is_err() {
        return unavailable("the event loop is not taking pings\n".into());
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, answered).await {
        Ok(Ok(())) => (StatusCode::OK, TEXT, "ok\n".into()),
        Ok(Err(_)) => unavailable("the event loop stopped\n".into()),
        Err(_) => unavailable(format!(
            "the event loop did not answer within {HEALTH_TIMEOUT:?}\n"
        )),
    }
}

/// Latches readiness: `/readyz` says 200 from the first snapshot that is ready on,
/// also between two requests. A peer that goes away later is not this node's fault
/// (and the peer gauges show it), nor is a source in trouble while the routes and maps
/// it gave stay (the kube source says so in `waiting`): the answer says that one after
/// "ready".
async fn watch_ready(shared: Arc<Shared>) {
    let mut snapshot = shared.snapshot.clone();
    loop {
        if snapshot.borrow_and_update().ready {
            shared.was_ready.store(true, Ordering::Relaxed);
            return;
        }
        if snapshot.changed().await.is_err() {
            return;
        }
    }
}

fn ready(shared: &Shared) -> Answer {
    let status = shared.snapshot.borrow().clone();
    if shared.was_ready.load(Ordering::Relaxed) || status.ready {
        shared.was_ready.store(true, Ordering::Relaxed);
        let body = match &status.waiting {
            Some(why) => format!("ready; {why}\n"),
            None => "ready\n".into(),
        };
        return (StatusCode::OK, TEXT, body);
    }
    let why = status
        .waiting
        .clone()
        .unwrap_or_else(|| "converging: routes or next hops missing".into());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        TEXT,
        format!("not ready: {why}\n"),
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::serve::metrics::tests::status;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let cases = [
            (Method::GET, "/metrics", Route::Metrics),
            (Method::HEAD, "/metrics", Route::Metrics),
            (Method::GET, "/healthz", Route::Health),
            (Method::GET, "/readyz", Route::Ready),
            (Method::GET, "/", Route::NotFound),
            (Method::GET, "/metrics/", Route::NotFound),
            (Method::POST, "/metrics", Route::BadMethod),
            (Method::DELETE, "/nothing-here", Route::BadMethod),
        ];
        for (method, path, expected) in cases {
            assert_eq!(route(&method, path), expected, "{method} {path}");
        }
    }

    /// A server on a loopback port of its own, with a status that is not ready yet.
    async fn server() -> (SocketAddr, watch::Sender<Arc<Status>>, Health) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut status = status(Vec::new(), false);
        status.waiting = Some("waiting for etcd: connecting".into());
        let (snapshot, rx) = watch::channel(Arc::new(status));
        let health = spawn(listener, Registry::default(), rx);
        (addr, snapshot, health)
    }

    /// Sends `request` as is and reads the answer to the end: the server must close.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("the server closes after its answer")
            .expect("read");
        answer
    }

    fn get(path: &str, method: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: hgw\r\n\r\n")
    }

    #[tokio::test]
    async fn answers_as_the_probes_and_scrapers_expect() {
        let (addr, snapshot, _health) = server().await;
        // A client that connects and says nothing holds up no one.
        let _silent = TcpStream::connect(addr).await.expect("connect");

        let answer = exchange(addr, &get("/readyz?verbose", "GET")).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("content-type: text/plain\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\nnot ready: waiting for etcd: connecting\n"),
            "{answer}"
        );

        let answer = exchange(addr, &get("/healthz", "GET")).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok: starting\n"), "{answer}");

        let answer = exchange(addr, &get("/metrics", "GET")).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.contains(OPENMETRICS), "{answer}");
        assert!(answer.ends_with("# EOF\n"), "{answer}");

        let answer = exchange(addr, &get("/readyz", "HEAD")).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "HEAD has no body: {answer}");

        let answer = exchange(addr, &get("/readyz", "POST")).await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
        assert!(answer.contains("allow: GET, HEAD\r\n"), "{answer}");

        let answer = exchange(addr, &get("/nothing-here", "GET")).await;
        assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");

        // Ready once (what it waited for came), ready for good.
        snapshot.send_modify(|status| {
            let status = Arc::make_mut(status);
            status.ready = true;
            status.waiting = None;
        });
        let answer = exchange(addr, &get("/readyz", "GET")).await;
        assert!(answer.ends_with("\r\n\r\nready\n"), "{answer}");
        snapshot.send_modify(|status| Arc::make_mut(status).ready = false);
        let answer = exchange(addr, &get("/readyz", "GET")).await;
        assert!(answer.ends_with("\r\n\r\nready\n"), "{answer}");
        // A source in trouble later: still ready (routes and maps stay), and it says why.
        snapshot.send_modify(|status| {
            Arc::make_mut(status).waiting =
                Some("the Kubernetes API is unreachable: routes and maps kept".into());
        });
        let answer = exchange(addr, &get("/readyz", "GET")).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(
            answer.ends_with(
                "\r\n\r\nready; the Kubernetes API is unreachable: routes and maps kept\n"
            ),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn healthz_asks_the_loop_and_the_server_stops_with_it() {
        let (addr, snapshot, mut health) = server().await;
        let listening = health.listening.clone();
        let answered = tokio::spawn(async move {
            let reply = health.ping().await;
            reply.send(()).expect("the request waits");
        });
        // Before the loop's first ping, `/healthz` answers for the start.
        while !listening.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        let answer = exchange(addr, &get("/healthz", "GET")).await;
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        answered.await.expect("the loop's side");

        drop(snapshot);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting after the loop stopped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
