//! Nodes that lose their PostgreSQL state, their NATS queue or their S3 service while they run,
//! and get it back:
//! readiness turns red naming the backend, the paths that need it answer 503 problems with
//! `Retry-After` (and the others keep working), and once the service is back the node is ready
//! again by itself and runs what it accepted before (decision 019). The services are never
//! stopped: each node reaches them through a TCP proxy the test controls ([`Proxy`]), so the
//! shared servers and other tests are untouched.
//!
//! Runs when `PIXFLOW_TEST_POSTGRES_URL` (and, for the queue, `PIXFLOW_TEST_NATS_URL`) name
//! servers; `.ci/run` sets both. The S3 service is one in the test's process (`s3s-fs`), so that
//! test always runs. Each test keeps to a PostgreSQL schema and NATS stream names of
//! its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use pixflow_server::{App, Config, QueueBackend, StateBackend};
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::api::{Reply, call};
use crate::support::{Schema, service, unique};

const ADMIN: &str = "pfx_test-admin-token";

/// A TCP proxy in front of one service. [`Proxy::cut`] closes every connection it forwards and
/// its port (new connections are refused, as by a stopped server); [`Proxy::restore`] listens on
/// the same port again.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    /// The stop signal and task of the forwarding, while not cut.
    running: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

/// A `scheme://[user@]host[:port]/rest` URL as what comes before the host, `host[:port]`, and
/// what follows.
fn split(url: &str) -> (&str, &str, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let host = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    (&url[..host], &url[host..end], &url[end..])
}

/// A listener on `addr`, which a listener closed a moment ago may have held.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap_or_else(|e| panic!("the proxy cannot listen on {addr} again: {e}"));
    socket.listen(128).unwrap()
}

/// Forwards every connection to `target` until `stop`; then closes them all, and the port.
async fn forward(listener: TcpListener, target: SocketAddr, mut stop: oneshot::Receiver<()>) {
    let mut open = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut inbound, _)) = accepted else { continue };
        open.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        while open.try_join_next().is_some() {}
    }
    open.shutdown().await;
    drop(listener);
}

impl Proxy {
    /// A proxy to the host and port of `url` (`default_port` when it names none), on a free
    /// port of the loopback address.
    async fn to(url: &str, default_port: u16) -> Proxy {
        let (_, host, _) = split(url);
        let host = if host.contains(':') { host.to_owned() } else { format!("{host}:{default_port}") };
        let target = tokio::net::lookup_host(&host).await.unwrap().next().unwrap();
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let proxy = Proxy { addr: listener.local_addr().unwrap(), target, running: Mutex::new(None) };
        proxy.run(listener);
        proxy
    }

    fn run(&self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(forward(listener, self.target, stopped));
        *self.running.lock().unwrap() = Some((stop, task));
    }

    /// `url` with the proxy in place of its host and port.
    fn url(&self, url: &str) -> String {
        let (before, _, after) = split(url);
        format!("{before}{}{after}", self.addr)
    }

    /// Drops every connection and refuses new ones; returns once they are closed.
    async fn cut(&self) {
        let (stop, task) = self.running.lock().unwrap().take().expect("the proxy was cut already");
        let _ = stop.send(());
        task.await.unwrap();
    }

    /// Accepts connections again.
    fn restore(&self) {
        self.run(listen(self.addr));
    }
}

/// What the outage tests read from an answer besides the API tests' own.
trait Answer {
    fn text(&self) -> String;
    fn is_problem(&self, status: StatusCode, code: &str) -> bool;
    fn unavailable(&self, code: &str);
}

impl Answer for Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether this is a problem with `status` and `code`.
    fn is_problem(&self, status: StatusCode, code: &str) -> bool {
        self.status == status
            && self.headers.get("content-type").is_some_and(|v| v == "application/problem+json")
            && self.json()["code"] == code
    }

    /// Asserts a 503 problem `code` that says when to retry.
    fn unavailable(&self, code: &str) {
        assert!(self.is_problem(StatusCode::SERVICE_UNAVAILABLE, code), "{}: {}", self.status, self.text());
        assert_eq!(self.json()["type"], format!("urn:pixflow:problem:{code}"));
        let after = self.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        assert!(after.is_some_and(|s| (1..=60).contains(&s)), "Retry-After: {:?}", self.headers.get("retry-after"));
    }
}

async fn get(app: &Arc<App>, uri: &str, token: Option<&str>) -> Reply {
    call(app, Method::GET, uri, token, &[], vec![]).await
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Asks `check` every 50 ms until it answers, for at most `secs` seconds (a bound on a wait that
/// should end, never a measurement); returns the answer and how long it took.
async fn until<T>(secs: u64, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return (found, start.elapsed());
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `app`'s readiness is 503 `backend_unavailable` naming exactly `lost` (in the
/// node's order: state, queue, objects).
async fn red(app: &Arc<App>, who: &str, lost: &[&str]) -> Duration {
    let (_, took) = until(20, &format!("{who} not ready for want of {lost:?}"), async || {
        let r = get(app, "/readyz", None).await;
        if !r.is_problem(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable") {
            return None;
        }
        let detail = r.json()["detail"].as_str().unwrap_or_default().to_owned();
        let named: Vec<&str> =
            ["state", "queue", "objects"].into_iter().filter(|b| detail.contains(&format!("{b} ("))).collect();
        (named == lost).then(|| r.unavailable("backend_unavailable"))
    })
    .await;
    // Alive all the while: only readiness turns red.
    assert_eq!(get(app, "/healthz", None).await.status, StatusCode::OK);
    took
}

/// Waits until `app` is ready, every backend up.
async fn green(app: &Arc<App>, who: &str) -> Duration {
    let (_, took) = until(20, &format!("{who} ready again"), async || {
        let r = get(app, "/readyz", None).await;
        let up = |b: &str| r.json()["backends"][b]["up"] == true;
        (r.status == StatusCode::OK && up("state") && up("queue") && up("objects")).then_some(())
    })
    .await;
    took
}

/// A node on the test's schema (`state`), with its queue in NATS (`(url, namespace)`) or in the
/// state's database, and a data folder of its own.
async fn node(name: &str, state: String, nats: Option<(String, &str)>, workers: usize) -> Arc<App> {
    let mut c = Config::new(std::env::temp_dir().join(unique(&format!("pixflow-outage-{name}"))));
    c.state = StateBackend::Postgres { url: state };
    if let Some((url, namespace)) = nats {
        c.queue = QueueBackend::Nats { url, namespace: Some(namespace.to_owned()) };
    }
    c.node_name = unique(name);
    c.admin_token = Some(ADMIN.into());
    c.async_workers = workers;
    c.tick = Duration::from_millis(50);
    App::start(c, None).await.unwrap().app
}

/// Deploys a resizing function through `via` and waits until `also` has it too.
async fn deploy(via: &Arc<App>, also: &Arc<App>, version: &str) -> String {
    let name = unique("thumb");
    let manifest = format!("name: {name}\nversion: '{version}'\nbuiltin: resize\nparams: {{width: 16}}\nauth: none\n");
    let r = call(via, Method::PUT, &format!("/v1/functions/{name}"), Some(ADMIN), &[], manifest.into_bytes()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    until(30, "the other node deploys the function", async || also.registry.get(&name).map(|_| ())).await;
    name
}

async fn invoke_async(app: &Arc<App>, function: &str) -> Reply {
    let uri = format!("/v1/functions/{function}/invoke");
    call(app, Method::POST, &uri, None, &[("prefer", "respond-async")], png(64, 32)).await
}

/// Accepts an asynchronous invocation through `app`; its id.
async fn accepted(app: &Arc<App>, function: &str) -> String {
    let r = invoke_async(app, function).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

/// The status of invocation `id`, as `app` reads it.
async fn status(app: &Arc<App>, id: &str) -> Value {
    let r = get(app, &format!("/v1/invocations/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

/// Waits until invocation `id` succeeded (once: nothing ran twice).
async fn succeeded(app: &Arc<App>, id: &str, secs: u64) -> Duration {
    let (done, took) = until(secs, &format!("invocation {id} done"), async || {
        let r = status(app, id).await;
        (r["status"] == "succeeded" || r["status"] == "dead").then_some(r)
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    took
}

/// The image functions answer synchronously: no state or queue in the way.
async fn still_resizes(app: &Arc<App>, function: &str) {
    let r = call(app, Method::POST, &format!("/v1/functions/{function}/invoke"), None, &[], png(64, 32)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

fn log(what: &str, took: Duration) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "outage: {what} after {} ms", took.as_millis());
}

/// Node A reaches PostgreSQL through one proxy and NATS through another and runs no workers;
/// node B, the worker, reaches NATS through a proxy of its own. A loses PostgreSQL, then both
/// lose NATS (B first, so what A accepted waits in the queue meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_state_or_its_queue_answers_503_and_recovers_by_itself() {
    let what = "a node losing its PostgreSQL state and NATS queue";
    let Some(server) = service("PIXFLOW_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test", what) else {
        return;
    };
    let Some(nats) = service("PIXFLOW_TEST_NATS_URL", "nats://127.0.0.1:4222", what) else { return };
    let schema = Schema::create(&server).await;
    let to_pg = Proxy::to(&schema.url, 5432).await;
    let (a_to_nats, b_to_nats) = (Proxy::to(&nats, 4222).await, Proxy::to(&nats, 4222).await);
    // The suite's own JetStream namespace: its streams are kept apart from any deployment's on
    // the server, and later runs reuse its dead-letter stream and lease bucket.
    let prefix = "suite-outage".to_owned();
    let a = node("a", to_pg.url(&schema.url), Some((a_to_nats.url(&nats), &prefix)), 0).await;
    let b = node("b", schema.url.clone(), Some((b_to_nats.url(&nats), &prefix)), 1).await;
    green(&a, "A").await;
    let function = deploy(&a, &b, "1").await;
    let first = accepted(&a, &function).await;
    succeeded(&a, &first, 30).await;

    // PostgreSQL lost: readiness names the state store, what needs it answers 503.
    to_pg.cut().await;
    log("A not ready (state)", red(&a, "A", &["state"]).await);
    let started = Instant::now();
    get(&a, "/v1/functions", Some(ADMIN)).await.unavailable("state_unavailable");
    log("a request needing the state store refused", started.elapsed());
    invoke_async(&a, &function).await.unavailable("state_unavailable");
    still_resizes(&a, &function).await;
    to_pg.restore();
    log("A ready again", green(&a, "A").await);
    let listed = get(&a, "/v1/functions", Some(ADMIN)).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());

    // NATS lost by the worker, then by A too, after A accepted an invocation.
    b_to_nats.cut().await;
    log("B not ready (queue)", red(&b, "B", &["queue"]).await);
    let waiting = accepted(&a, &function).await;
    a_to_nats.cut().await;
    log("A not ready (queue)", red(&a, "A", &["queue"]).await);
    let started = Instant::now();
    invoke_async(&a, &function).await.unavailable("queue_unavailable");
    log("an asynchronous invocation refused", started.elapsed());
    still_resizes(&a, &function).await;
    // What was accepted is still there, waiting.
    assert_eq!(status(&a, &waiting).await["status"], "queued");
    a_to_nats.restore();
    log("A ready again", green(&a, "A").await);
    b_to_nats.restore();
    log("B ready again", green(&b, "B").await);
    // At once: a worker whose pull request went with the lost connection asks again when the
    // client is back (not when that request would have expired, up to 35 s later).
    log("the invocation accepted before the cut done", succeeded(&a, &waiting, 10).await);
    let last = accepted(&a, &function).await;
    succeeded(&a, &last, 30).await;

    for app in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(60), app.shutdown()).await.expect("a node's shutdown");
        std::fs::remove_dir_all(&app.config.data_dir).unwrap();
    }
    // The test's stream (the queue handle outlives the node's shutdown).
    a.queue.remove("invocations").await.unwrap();
    schema.drop().await;
}

/// Node B, the worker, keeps its queue in PostgreSQL and reaches it through a proxy; node A,
/// directly connected, accepts work and deploys while B is cut off. Once B is back, its worker
/// runs what waited, and its listeners (queue wake-ups, catalogue changes) listen again: new
/// work wakes it without waiting for the 30 s backstop, and a deploy it missed is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_a_lost_postgresql_queue_resumes_when_it_is_back() {
    let what = "a worker losing its PostgreSQL queue";
    let Some(server) = service("PIXFLOW_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test", what) else {
        return;
    };
    let schema = Schema::create(&server).await;
    let to_pg = Proxy::to(&schema.url, 5432).await;
    let a = node("a", schema.url.clone(), None, 0).await;
    let b = node("b", to_pg.url(&schema.url), None, 1).await;
    let function = deploy(&a, &b, "1").await;

    to_pg.cut().await;
    log("B not ready (state and queue)", red(&b, "B", &["state", "queue"]).await);
    let waiting = accepted(&a, &function).await;
    let manifest = format!("name: {function}\nversion: '2'\nbuiltin: resize\nparams: {{width: 16}}\nauth: none\n");
    let uri = format!("/v1/functions/{function}");
    let updated = call(&a, Method::PUT, &uri, Some(ADMIN), &[], manifest.into_bytes()).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text());
    to_pg.restore();
    log("B ready again", green(&b, "B").await);
    log("the invocation accepted meanwhile done", succeeded(&a, &waiting, 30).await);
    let version = async || b.registry.get(&function).map(|f| f.deployment.version.clone()).filter(|v| v == "2");
    log("the deploy B missed applied", until(20, "B applies the deploy it missed", version).await.1);
    // Woken by the enqueue's notification (or by the listener's return), not found by the
    // backstop 30 s later.
    let next = accepted(&a, &function).await;
    log("new work run", succeeded(&a, &next, 10).await);

    for app in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(60), app.shutdown()).await.expect("a node's shutdown");
        std::fs::remove_dir_all(&app.config.data_dir).unwrap();
    }
    schema.drop().await;
}

#[test]
fn urls_are_split_around_their_host_and_port() {
    assert_eq!(
        split("postgres://postgres@127.0.0.1:5432/test?x=y"),
        ("postgres://postgres@", "127.0.0.1:5432", "/test?x=y")
    );
    assert_eq!(split("nats://127.0.0.1:4222"), ("nats://", "127.0.0.1:4222", ""));
    assert_eq!(split("postgres://u:p@w@db/x"), ("postgres://u:p@w@", "db", "/x"));
}

/// A node on an S3 service loses it: readiness names the object store, a stored input is an
/// error of the service (502) while image work on bytes still runs, and once the service is back
/// the node is ready again and reads and writes objects. The spool bucket must exist in the
/// service; the node registers it at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_s3_service_turns_unready_and_recovers_by_itself() {
    let dir = std::env::temp_dir().join(unique("pixflow-outage-s3"));
    for bucket in ["media", pixflow_server::DEFAULT_SPOOL_BUCKET] {
        std::fs::create_dir_all(dir.join("service").join(bucket)).unwrap();
    }
    let endpoint = pixflow_backends::objects::test_server::start(&dir.join("service")).await.unwrap();
    let to_s3 = Proxy::to(&endpoint, 80).await;
    let mut c = Config::new(dir.join("node"));
    c.in_memory = true;
    c.admin_token = Some(ADMIN.into());
    c.objects_s3 = Some(pixflow_backends::objects::test_server::config(to_s3.url(&endpoint)));
    c.tick = Duration::from_millis(50);
    let app = App::start(c, None).await.unwrap().app;
    let r = call(&app, Method::PUT, "/v1/buckets/media", Some(ADMIN), &[], Vec::new()).await;
    assert!(r.status.is_success(), "{}", r.text());
    let manifest = "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\nauth: none\n";
    let r = call(&app, Method::PUT, "/v1/functions/thumb", Some(ADMIN), &[], manifest.into()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let put = |key: &'static str| {
        let app = app.clone();
        async move {
            call(&app, Method::PUT, &format!("/v1/buckets/media/objects/{key}"), Some(ADMIN), &[], png(8, 8)).await
        }
    };
    assert!(put("a.png").await.status.is_success());
    green(&app, "the node").await;

    to_s3.cut().await;
    log("not ready (objects)", red(&app, "the node", &["objects"]).await);
    // A fixed message: the service's address stays in the log.
    let r = get(&app, "/v1/buckets/media/objects/a.png", Some(ADMIN)).await;
    assert!(r.is_problem(StatusCode::BAD_GATEWAY, "object_service_failed"), "{} {}", r.status, r.text());
    assert!(!r.text().contains(&to_s3.addr.port().to_string()), "{}", r.text());
    still_resizes(&app, "thumb").await;
    to_s3.restore();
    log("ready again", green(&app, "the node").await);
    assert!(put("b.png").await.status.is_success());
    let r = get(&app, "/v1/buckets/media/objects/a.png", Some(ADMIN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    tokio::time::timeout(Duration::from_secs(60), app.shutdown()).await.expect("the node's shutdown");
    std::fs::remove_dir_all(&dir).unwrap();
}
