//! Two nodes on one PostgreSQL state, one JetStream queue and one S3 service, as real `pixflow
//! serve` processes: a node killed with SIGKILL in the middle of an asynchronous invocation
//! loses nothing (the other node runs it again once the lease is over, and it succeeds once); a
//! token made on one node works on the other; a function deployed through one node answers on
//! the other within seconds, without a restart; an invocation accepted by a node without
//! workers runs on the other one, reading and writing objects in the S3 service.
//!
//! Runs when `PIXFLOW_TEST_POSTGRES_URL` and `PIXFLOW_TEST_NATS_URL` name servers (`.ci/run`
//! sets both; a server that is named but does not answer fails the test), in a PostgreSQL schema
//! and a JetStream namespace (`--queue-namespace`) of its own, both removed at the end, so
//! other tests and runs see none of its rows, streams or messages. The S3 service is a third
//! node on embedded defaults serving its store with `--s3-listen`.
//!
//! Takes about 40 s, most of it the 30 s lease of the killed node's claim (the nodes' fixed
//! `LEASE`, JetStream's `AckWait`), which only running out can end.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{gone, skipped, temp_dir};

const ADMIN: &str = "pfx_two-nodes-admin-token";
const S3_KEY: &str = "two-nodes";
const S3_SECRET: &str = "two-nodes-secret-0123456789";
/// The bucket the two nodes spool large payloads in.
const SPOOL: &str = "two-nodes-spool";

/// A process function that records each request it takes (`started`: its node's pid, its own,
/// the time) and answers only once the folder `MARKS` holds a file `go`, recording that too
/// (`finished`). So the test decides when an attempt may end: the first one is still waiting
/// when its node is killed.
const HELD: &str = r#"
import os, time
from http.server import BaseHTTPRequestHandler, HTTPServer

MARKS = os.environ["MARKS"]

def mark(name, line):
    with open(os.path.join(MARKS, name), "a") as f:
        f.write(line + "\n")

class Held(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        mark("started", f"{os.getppid()} {os.getpid()} {time.time_ns() // 1_000_000}")
        while not os.path.exists(os.path.join(MARKS, "go")):
            time.sleep(0.05)
        mark("finished", f"{os.getppid()} {os.getpid()}")
        out = b"held:" + body
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Held).serve_forever()
"#;

#[test]
fn two_nodes_share_state_queue_and_objects_and_lose_nothing_to_a_sigkill() {
    let (Some(postgres), Some(nats)) = (service("PIXFLOW_TEST_POSTGRES_URL"), service("PIXFLOW_TEST_NATS_URL")) else {
        skipped(
            "two nodes on PostgreSQL, JetStream and S3",
            "set PIXFLOW_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test and \
             PIXFLOW_TEST_NATS_URL=nats://127.0.0.1:4222",
        );
        return;
    };
    let began = Instant::now();
    // Declared before the nodes, so it is dropped after them: nodes are gone before their
    // schema and streams are.
    let shared = Shared::create(&postgres, &nats);
    let dir = temp_dir("two-nodes");
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::write(dir.join("held.py"), HELD).unwrap();

    let mut s3 = Serve::start(
        &dir,
        "s3",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "s3-data",
            "--admin-token",
            ADMIN,
            "--s3-listen",
            "127.0.0.1:0",
            "--s3-access-key",
            S3_KEY,
            "--s3-secret-key",
            S3_SECRET,
        ],
    );
    let s3_endpoint = format!("http://{}", s3.line("S3-compatible endpoint on http://"));
    assert_eq!(call(&s3.addr, "PUT", "/v1/buckets/media", &[admin()], b"").status, 201);
    // The nodes' spool bucket, which the operator creates in the service (the service's own
    // spool bucket, `pixflow-spool`, is reserved to it).
    assert_eq!(call(&s3.addr, "PUT", &format!("/v1/buckets/{SPOOL}"), &[admin()], b"").status, 201);
    let node = |name: &str, workers: &str| {
        let args = shared.node_args(name, workers, &s3_endpoint);
        Serve::start(&dir, name, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // A node killed in the middle of an invocation. Node A alone, with a worker, claims it; B
    // starts once A's function holds it, then A is killed.
    let mut a = node("a", "1");
    assert_eq!(call(&a.addr, "PUT", "/v1/buckets/media", &[admin()], b"").status, 201);
    let manifest = json!({
        "name": "held",
        "version": "1",
        "process": {"command": ["python3", dir.join("held.py")], "env": {"MARKS": marks}},
        "scaling": {"min": 1, "max": 1},
    });
    let deployed = call(&a.addr, "PUT", "/v1/functions/held", &[admin()], manifest.to_string().as_bytes());
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    let accepted = call(&a.addr, "POST", "/v1/functions/held/invoke", &[admin(), async_()], b"payload");
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let held = accepted.json()["id"].as_str().unwrap().to_owned();
    let first = until("A's function takes the invocation", Duration::from_secs(20), || {
        lines(&marks.join("started")).into_iter().next()
    });
    let (a_pid, first_child, first_ms) = parse_started(&first);
    assert_eq!(a_pid, a.pid(), "the invocation started on another node: {first}");
    let running = call(&a.addr, "GET", &format!("/v1/invocations/{held}"), &[], b"").json();
    assert_eq!((running["status"].as_str(), running["attempts"].as_u64()), (Some("running"), Some(1)), "{running}");
    let b = node("b", "1");
    a.kill();
    // A's child dies with it (parent-death signal), before anything may end an attempt.
    until("the killed node's child is gone", Duration::from_secs(10), || gone(&first_child).then_some(()));
    std::fs::write(marks.join("go"), "").unwrap();
    // B claims the invocation only when A's lease runs out (30 s after A's claim; A was killed
    // before its first renewal), then runs it to the end.
    let status_on_b = format!("/v1/invocations/{held}");
    let done = until("B finishes the killed node's invocation", Duration::from_secs(50), || {
        let v = call(&b.addr, "GET", &status_on_b, &[], b"").json();
        (v["status"] != "queued" && v["status"] != "running").then_some(v)
    });
    assert_eq!((done["status"].as_str(), done["attempts"].as_u64()), (Some("succeeded"), Some(2)), "{done}");
    let result = call(&b.addr, "GET", &format!("/v1/invocations/{held}/result"), &[admin()], b"");
    assert_eq!((result.status, result.body.as_slice()), (200, b"held:payload".as_slice()), "{}", result.text());
    // Started twice (A, then B), finished once (B).
    let started = lines(&marks.join("started"));
    assert_eq!(started.len(), 2, "{started:?}");
    let (b_pid, _, second_ms) = parse_started(&started[1]);
    assert_eq!(b_pid, b.pid(), "{started:?}");
    assert!(second_ms - first_ms >= 20_000, "B took the invocation over {} ms after A took it", second_ms - first_ms);
    let finished = lines(&marks.join("finished"));
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert!(finished[0].starts_with(&format!("{} ", b.pid())), "{finished:?}");
    // Nothing stays queued or leased (the message is acknowledged just after the outcome is
    // recorded).
    until("B's queue is empty", Duration::from_secs(5), || (queue_gauges(&b.addr) == (0, 0)).then_some(()));

    // A again, without workers: whatever it accepts, B runs.
    let a = node("a", "0");
    // A token made on A works on B.
    let made = call(&a.addr, "POST", "/v1/tokens", &[admin()], br#"{"role": "invoke", "label": "two-nodes"}"#);
    assert_eq!(made.status, 201, "{}", made.text());
    let token = format!("Bearer {}", made.json()["token"].as_str().unwrap());
    let bearer = ("authorization", token.as_str());
    let source = two_rows();
    let png = ("content-type", "image/png");
    let stored = call(&a.addr, "PUT", "/v1/buckets/media/objects/in/rows.png", &[bearer, png], &source);
    assert!(matches!(stored.status, 200 | 201), "{}", stored.text());
    let read = call(&b.addr, "GET", "/v1/buckets/media/objects/in/rows.png", &[bearer], b"");
    assert_eq!((read.status, read.body == source), (200, true), "{}", read.text());
    let forged = ("authorization", "Bearer pfx_not-a-token-of-this-state");
    assert_eq!(call(&b.addr, "GET", "/v1/buckets/media/objects/in/rows.png", &[forged], b"").status, 401);

    // A function deployed through A answers on B within seconds, without a restart.
    assert_eq!(call(&b.addr, "POST", "/v1/functions/flip/invoke", &[bearer, png], &source).status, 404);
    let flip = "name: flip\nversion: '1'\nbuiltin: flip\n";
    assert_eq!(call(&a.addr, "PUT", "/v1/functions/flip", &[admin()], flip.as_bytes()).status, 201);
    let flipped = until("B answers with the function deployed through A", Duration::from_secs(5), || {
        let r = call(&b.addr, "POST", "/v1/functions/flip/invoke", &[bearer, png], &source);
        (r.status != 404).then_some(r)
    });
    assert_eq!(flipped.status, 200, "{}", flipped.text());
    assert_flipped(&flipped.body);

    // An invocation accepted by A (no workers) runs on B: its input read from the S3 service,
    // its output written there.
    let request = json!({
        "input": {"bucket": "media", "key": "in/rows.png"},
        "output": {"bucket": "media", "key": "out/{id}.{ext}"},
    });
    let accepted = call(
        &a.addr,
        "POST",
        "/v1/functions/flip/invoke",
        &[bearer, async_(), ("content-type", "application/json")],
        request.to_string().as_bytes(),
    );
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let id = accepted.json()["id"].as_str().unwrap().to_owned();
    let done = until("B runs what A accepted", Duration::from_secs(20), || {
        let v = call(&a.addr, "GET", &format!("/v1/invocations/{id}"), &[], b"").json();
        (v["status"] != "queued" && v["status"] != "running").then_some(v)
    });
    assert_eq!((done["status"].as_str(), done["attempts"].as_u64()), (Some("succeeded"), Some(1)), "{done}");
    let key = done["result"]["objects"][0]["key"].as_str().unwrap_or_else(|| panic!("{done}"));
    // In the service itself, as its own API shows it.
    let output = call(&s3.addr, "GET", &format!("/v1/buckets/media/objects/{key}"), &[admin()], b"");
    assert_eq!(output.status, 200, "{}", output.text());
    assert_flipped(&output.body);
    for node in [&a, &b] {
        until("the queue is empty", Duration::from_secs(5), || (queue_gauges(&node.addr) == (0, 0)).then_some(()));
    }
    // A bound on the whole test, so that a slower takeover shows (see the module's doc).
    assert!(began.elapsed() < Duration::from_secs(90), "took {:?}", began.elapsed());
    drop((a, b, s3));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The service a variable names, if any.
fn service(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|u| !u.is_empty())
}

fn admin() -> (&'static str, &'static str) {
    ("authorization", "Bearer pfx_two-nodes-admin-token")
}

fn async_() -> (&'static str, &'static str) {
    ("prefer", "respond-async")
}

/// Runs `fut` to its end on a runtime of its own (the test is otherwise blocking).
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(fut)
}

/// The test's PostgreSQL schema and JetStream namespace; dropping it removes both.
struct Shared {
    server: String,
    schema: String,
    url: String,
    nats: String,
    namespace: String,
}

impl Shared {
    /// Makes the schema and checks that NATS answers; panics when either server does not.
    fn create(postgres: &str, nats: &str) -> Shared {
        use sqlx::Connection;
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 1_000_000;
        let unique = format!("{}-{ms}", std::process::id());
        let schema = format!("two_nodes_{}", unique.replace('-', "_"));
        block_on(async {
            async_nats::connect(nats)
                .await
                .unwrap_or_else(|e| panic!("PIXFLOW_TEST_NATS_URL is set but unreachable: {e}"));
            // Last, so that nothing after it can fail before the guard exists.
            let mut conn = sqlx::PgConnection::connect(postgres)
                .await
                .unwrap_or_else(|e| panic!("PIXFLOW_TEST_POSTGRES_URL is set but unreachable: {e}"));
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
            let _ = conn.close().await;
        });
        let joint = if postgres.contains('?') { '&' } else { '?' };
        Shared {
            server: postgres.to_owned(),
            url: format!("{postgres}{joint}options=-c%20search_path%3D{schema}"),
            schema,
            nats: nats.to_owned(),
            namespace: format!("two-nodes-{unique}"),
        }
    }

    /// The flags of a node named `name` on the shared state, queue and S3 service.
    fn node_args(&self, name: &str, workers: &str, s3: &str) -> Vec<String> {
        [
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &format!("{name}-data"),
            "--node-name",
            &format!("{}-{name}", self.namespace),
            "--admin-token",
            ADMIN,
            "--async-workers",
            workers,
            "--state",
            "postgres",
            "--state-url",
            &self.url,
            "--queue",
            "nats",
            "--queue-url",
            &self.nats,
            "--queue-namespace",
            &self.namespace,
            "--objects-backend",
            "s3",
            "--objects-s3-endpoint",
            s3,
            "--objects-s3-region",
            "us-east-1",
            "--objects-s3-access-key",
            S3_KEY,
            "--objects-s3-secret-key",
            S3_SECRET,
            "--spool-bucket",
            SPOOL,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        use sqlx::Connection;
        block_on(async {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&self.server).await {
                let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
                let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
                let _ = conn.close().await;
            }
            // The namespace's streams: the invocations' queue, dead letters, lease bucket.
            if let Ok(client) = async_nats::connect(&self.nats).await {
                let js = async_nats::jetstream::new(client);
                let ns = &self.namespace;
                for name in [
                    format!("PIXFLOW-{ns}_Q_invocations"),
                    format!("PIXFLOW-{ns}_DEAD"),
                    format!("KV_pixflow-{ns}_leases"),
                ] {
                    let _ = js.delete_stream(name).await;
                }
            }
        });
    }
}

/// A `pixflow serve` process logging to a file in the test's folder, killed when dropped (so a
/// failing test leaves no node behind); a failing test shows the end of its log.
struct Serve {
    child: Child,
    log: PathBuf,
    addr: String,
}

impl Serve {
    /// Starts `pixflow serve ARGS` in `dir`, logging to `NAME.log` (`NAME-2.log` for its second
    /// run, and so on), and waits for its address.
    fn start(dir: &Path, name: &str, args: &[&str]) -> Serve {
        let log = (1..)
            .map(|run| dir.join(if run == 1 { format!("{name}.log") } else { format!("{name}-{run}.log") }))
            .find(|log| !log.exists())
            .unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pixflow"))
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info,s3s=off")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut serve = Serve { child, log, addr: String::new() };
        let serving = serve.line("pixflow serving on http://");
        serve.addr = serving.split_whitespace().next().unwrap().to_owned();
        serve
    }

    /// The rest of the first line of the log that starts with `prefix`, once it is there.
    fn line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.to_owned();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pixflow serve exited ({status}) before `{prefix}`:\n{text}");
            }
            assert!(Instant::now() < deadline, "no `{prefix}` within 30 s:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGKILL: no shutdown runs, nothing is handed back.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let mut err = std::io::stderr();
            let _ = writeln!(err, "--- the last lines of {}:", self.log.display());
            for line in tail.into_iter().rev() {
                let _ = writeln!(err, "{line}");
            }
        }
    }
}

/// An HTTP answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.text()))
    }
}

/// One HTTP/1.1 exchange on a connection of its own.
fn call(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    head.push_str(&format!("content-length: {}\r\n", body.len()));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let mut body = raw[split + 4..].to_vec();
    if head.contains("\r\ntransfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Answer { status, body }
}

/// The data of a chunked body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size");
        let size = std::str::from_utf8(&raw[..end]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let size = size.expect("a chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 4 + size..];
    }
}

/// Polls `probe` until it gives a value, for at most `limit`.
fn until<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// A `started` mark: the node's pid, the child's pid, the time in ms.
fn parse_started(line: &str) -> (String, String, i64) {
    let mut parts = line.split_whitespace();
    let (node, child, ms) = (parts.next(), parts.next(), parts.next().and_then(|ms| ms.parse().ok()));
    match (node, child, ms) {
        (Some(node), Some(child), Some(ms)) => (node.to_owned(), child.to_owned(), ms),
        _ => panic!("not a mark: {line}"),
    }
}

/// The async queue's depth and leased messages, as a node's `/metrics` tells them.
fn queue_gauges(addr: &str) -> (u64, u64) {
    let text = call(addr, "GET", "/metrics", &[], b"").text();
    let gauge = |name: &str| {
        let value = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        value.and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
    };
    (gauge("pixflow_async_queue_depth"), gauge("pixflow_async_queue_leased"))
}

/// A 2x2 PNG: a red row over a blue one.
fn two_rows() -> Vec<u8> {
    let im =
        image::RgbImage::from_fn(2, 2, |_, y| if y == 0 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
    let mut out = std::io::Cursor::new(Vec::new());
    im.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `bytes` is [`two_rows`] mirrored top to bottom.
fn assert_flipped(bytes: &[u8]) {
    let im = image::load_from_memory(bytes).unwrap().to_rgb8();
    assert_eq!((im.width(), im.height()), (2, 2));
    assert_eq!((im.get_pixel(0, 0).0, im.get_pixel(1, 1).0), ([0, 0, 255], [255, 0, 0]));
}
