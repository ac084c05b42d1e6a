//! Measures the queue seam and asynchronous invocations (issue 13); a measuring program, not a
//! test (`harness = false`; `cargo test` does not build benches, `clippy --all-targets` checks it).
//!
//! Three parts, each repeated `--rounds` times (the machine is shared: quote medians):
//! - `latency`: per backend (SQLite, PostgreSQL, NATS JetStream), a consumer waits in
//!   [`Queue::next`]; after a pause (so it is parked) a message is enqueued; the sample runs from
//!   just before `enqueue` to the moment `next` returns in the consumer's task. Sequential, one
//!   message at a time.
//! - `throughput`: per backend, messages through the queue (enqueue by P producers, `next` +
//!   `finish` by a fixed pool of C consumers), from the first enqueue to the last finish.
//! - `async`: a real `pixflow serve` (SQLite state, embedded objects, default async workers: one
//!   per CPU) driven over loopback HTTP: `Prefer: respond-async` invocations of a built-in `flip`
//!   on a 4x4 PNG by P producers (accepted per second, 202 round trip), and the time from each
//!   202 to `succeeded` as the invocation log records it (`updated_at_ms`, whole milliseconds of
//!   the server's clock); and one at a time, each awaited before the next is sent: logged, and
//!   until its completion callback (`X-Callback-Url`, to a listener in this program) arrives.
//!
//! Each row of the queue parts uses a queue of its own, removed after the row (so JetStream
//! streams do not pile up on a shared server).
//!
//! CPU is read from `/proc` (utime + stime, 10 ms ticks): this process; for PostgreSQL, its
//! backends serving the benchmark's database; for JetStream, the `nats-server` process (all of
//! it: whatever else uses that server is counted too); for `async`, the server process.
//!
//! ```text
//! cargo build -p pixflow-cli && cargo bench --profile dev -p pixflow-server --bench queue -- \
//!     --pg-url postgres://postgres@127.0.0.1:5432/pixflow_bench --nats-url nats://127.0.0.1:4222 \
//!     --backends sqlite,postgres,nats --pixflow target/debug/pixflow
//! ```
//!
//! Options: `--parts latency,throughput,async`, `--backends sqlite,postgres` (or any of
//! `sqlite,postgres,nats`), `--pg-url` (or `PIXFLOW_BENCH_POSTGRES_URL`), `--nats-url` (or
//! `PIXFLOW_BENCH_NATS_URL`), `--rounds 3`,
//! `--samples 3000`, `--gap-ms 5`, `--messages 4000`, `--producers 1,4,16`, `--consumers 2,4`,
//! `--invocations 1500`, `--sequential 300`, `--json FILE` (every row as a JSON line), `--scratch
//! DIR` (where the SQLite files and the node's data folder go; default: the temp folder),
//! `--node NAME=ARGS` (repeatable: a node configuration of the `async` part, its extra `serve`
//! arguments, e.g. `--node 'pg=--state postgres --state-url postgres://... --async-workers 16'`;
//! default: one node on the embedded defaults).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pixflow_backends::queue::NatsOptions;
use pixflow_backends::{Queue, State};
use serde_json::{Value, json};

/// Leases taken by the benchmark's consumers (never run out during a row).
const LEASE: Duration = Duration::from_secs(60);
/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK` on Linux).
const TICKS: f64 = 100.0;

struct Args {
    parts: Vec<String>,
    backends: Vec<String>,
    pg_url: Option<String>,
    nats_url: Option<String>,
    pixflow: PathBuf,
    rounds: usize,
    samples: usize,
    gap: Duration,
    messages: usize,
    producers: Vec<usize>,
    consumers: Vec<usize>,
    invocations: usize,
    sequential: usize,
    json: Option<PathBuf>,
    scratch: PathBuf,
    /// The node configurations of the `async` part: a name and the extra `serve` arguments.
    nodes: Vec<(String, Vec<String>)>,
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
    s.split(',').map(|x| x.trim().parse().map_err(|_| anyhow::anyhow!("`{x}` in `{s}`"))).collect()
}

fn parse_args() -> Result<Args> {
    let pg_url = std::env::var("PIXFLOW_BENCH_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    let nats_url = std::env::var("PIXFLOW_BENCH_NATS_URL").ok().filter(|u| !u.is_empty());
    // Beside this program in the target folder: target/<profile>/deps/queue-* -> target/<profile>/pixflow.
    let exe = std::env::current_exe()?;
    let pixflow = exe.parent().and_then(Path::parent).map(|d| d.join("pixflow")).unwrap_or_default();
    let mut a = Args {
        parts: list("latency,throughput,async")?,
        backends: list("sqlite,postgres")?,
        pg_url,
        nats_url,
        pixflow,
        rounds: 3,
        samples: 3000,
        gap: Duration::from_millis(5),
        messages: 4000,
        producers: list("1,4,16")?,
        consumers: list("2,4")?,
        invocations: 1500,
        sequential: 300,
        json: None,
        scratch: std::env::temp_dir(),
        nodes: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench program.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--parts" => a.parts = list(&value)?,
            "--backends" => a.backends = list(&value)?,
            "--pg-url" => a.pg_url = Some(value),
            "--nats-url" => a.nats_url = Some(value),
            "--pixflow" => a.pixflow = value.into(),
            "--rounds" => a.rounds = value.parse()?,
            "--samples" => a.samples = value.parse()?,
            "--gap-ms" => a.gap = Duration::from_millis(value.parse()?),
            "--messages" => a.messages = value.parse()?,
            "--producers" => a.producers = list(&value)?,
            "--consumers" => a.consumers = list(&value)?,
            "--invocations" => a.invocations = value.parse()?,
            "--sequential" => a.sequential = value.parse()?,
            "--json" => a.json = Some(value.into()),
            "--scratch" => a.scratch = value.into(),
            "--node" => {
                let (name, extra) = value.split_once('=').unwrap_or((value.as_str(), ""));
                a.nodes.push((name.to_owned(), extra.split_whitespace().map(str::to_owned).collect()));
            }
            _ => bail!("unknown option {flag}"),
        }
    }
    if a.nodes.is_empty() {
        a.nodes.push(("default".to_owned(), Vec::new()));
    }
    if a.backends.iter().any(|b| b == "postgres") && a.pg_url.is_none() {
        bail!("the postgres backend needs --pg-url (or PIXFLOW_BENCH_POSTGRES_URL)");
    }
    if a.backends.iter().any(|b| b == "nats") && a.nats_url.is_none() {
        bail!("the nats backend needs --nats-url (or PIXFLOW_BENCH_NATS_URL)");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(&args))
}

/// Where results go: stdout, and the JSON file when asked.
struct Report {
    json: Option<std::fs::File>,
    rows: Vec<Value>,
}

impl Report {
    fn row(&mut self, row: Value) -> Result<()> {
        println!("{row}");
        if let Some(f) = &mut self.json {
            writeln!(f, "{row}")?;
        }
        self.rows.push(row);
        Ok(())
    }
}

async fn run(args: &Args) -> Result<()> {
    let json = args.json.as_ref().map(std::fs::File::create).transpose().context("creating the JSON file")?;
    let mut report = Report { json, rows: Vec::new() };
    let scratch = args.scratch.join(format!("pixflow-queue-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let started = unix_ms() as u64;
    report.row(json!({
        "kind": "machine", "load": load_average(), "cpus": std::thread::available_parallelism()?.get(),
        "scratch": scratch.display().to_string(),
    }))?;
    for round in 1..=args.rounds {
        for backend in &args.backends {
            let queue = open_queue(args, backend, &scratch.join(format!("{backend}-{round}"))).await?;
            if args.parts.iter().any(|p| p == "latency") {
                let name = format!("lat-{started}-{round}");
                let row = latency(args, &queue, backend, &name).await?;
                queue.remove(&name).await?;
                report.row(with(row, json!({"round": round, "backend": backend})))?;
            }
            if args.parts.iter().any(|p| p == "throughput") {
                for &c in &args.consumers {
                    for &p in &args.producers {
                        let name = format!("tp-{started}-{round}-{c}-{p}");
                        let row = throughput(args, &queue, backend, &name, p, c).await?;
                        queue.remove(&name).await?;
                        report.row(with(row, json!({"round": round, "backend": backend})))?;
                    }
                }
            }
        }
        if args.parts.iter().any(|p| p == "async") {
            for (label, extra) in &args.nodes {
                let mut callbacks = Callbacks::listen().await?;
                let dir = scratch.join(format!("node-{label}-{round}"));
                let node = Node::start(&args.pixflow, &dir, &callbacks.addr, extra)?;
                let result = async {
                    warm_up(&node).await?;
                    for &p in &args.producers {
                        let row = async_burst(&node, p, args.invocations).await?;
                        report.row(with(row, json!({"round": round, "node": label})))?;
                    }
                    let row = async_sequential(&node, &mut callbacks, args.sequential).await?;
                    report.row(with(row, json!({"round": round, "node": label})))
                }
                .await;
                node.stop();
                result?;
            }
        }
    }
    report.row(json!({"kind": "machine", "load": load_average()}))?;
    summary(&report.rows);
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// `row` with the fields of `more` added.
fn with(mut row: Value, more: Value) -> Value {
    if let (Some(r), Value::Object(m)) = (row.as_object_mut(), more) {
        r.extend(m);
    }
    row
}

async fn open_queue(args: &Args, backend: &str, dir: &Path) -> Result<Queue> {
    match backend {
        // A file on disk (WAL, synchronous=FULL: what a node runs), never `:memory:`.
        "sqlite" => {
            std::fs::create_dir_all(dir)?;
            Ok(State::sqlite(&dir.join("state.db")).await?.queue("local").await?)
        }
        "postgres" => {
            let url = args.pg_url.as_deref().context("--pg-url")?;
            let pg = State::postgres(url).await.context("opening PostgreSQL")?;
            Ok(pg.queue(&format!("bench-{}", std::process::id())).await?)
        }
        "nats" => {
            let url = args.nats_url.as_deref().context("--nats-url")?;
            // Leases as long as the benchmark's, so none runs out during a row.
            let options = NatsOptions { ack_wait: LEASE, ..NatsOptions::default() };
            Queue::nats(url, options, &format!("bench-{}", std::process::id())).await.context("connecting to NATS")
        }
        other => bail!("unknown backend {other}"),
    }
}

// ---- the queue alone ----

async fn latency(args: &Args, queue: &Queue, backend: &str, name: &str) -> Result<Value> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let consumer = {
        let (queue, name) = (queue.clone(), name.to_owned());
        tokio::spawn(async move {
            loop {
                let d = queue.next(&name, LEASE).await.expect("waiting for a message");
                let at = Instant::now();
                queue.finish(&d.lease).await.expect("finishing a message");
                if tx.send(at).is_err() {
                    return;
                }
            }
        })
    };
    let payload = [b'x'; 32];
    let warm = 50;
    let (mut total, mut enqueue) = (Vec::new(), Vec::new());
    let cpu = Cpu::start(args, backend);
    let begun = Instant::now();
    for i in 0..warm + args.samples {
        if i == warm {
            // Warm-up done: measure from here.
            total.clear();
            enqueue.clear();
        }
        // The consumer finished the last message and is back in `next`: let it park.
        tokio::time::sleep(args.gap).await;
        let t0 = Instant::now();
        queue.enqueue(name, &format!("m{i}"), &payload, Duration::ZERO).await?;
        let t1 = Instant::now();
        let at = rx.recv().await.context("the consumer stopped")?;
        total.push(ms(at - t0));
        enqueue.push(ms(t1 - t0));
    }
    let wall = begun.elapsed();
    let cpu = cpu.finish();
    consumer.abort();
    let wake: Vec<f64> = total.iter().zip(&enqueue).map(|(t, e)| t - e).collect();
    Ok(json!({
        "kind": "latency", "samples": total.len(), "gap_ms": ms(args.gap), "wall_s": wall.as_secs_f64(),
        "p50_ms": pct(&total, 50.0), "p90_ms": pct(&total, 90.0), "p99_ms": pct(&total, 99.0), "max_ms": pct(&total, 100.0),
        "enqueue_p50_ms": pct(&enqueue, 50.0), "enqueue_p99_ms": pct(&enqueue, 99.0),
        "wake_claim_p50_ms": pct(&wake, 50.0), "wake_claim_p99_ms": pct(&wake, 99.0),
        "cpu_ms_per_msg": cpu.own / (args.samples + warm) as f64,
        "db_cpu_ms_per_msg": cpu.db.map(|d| d / (args.samples + warm) as f64),
    }))
}

async fn throughput(
    args: &Args,
    queue: &Queue,
    backend: &str,
    name: &str,
    producers: usize,
    consumers: usize,
) -> Result<Value> {
    let n = args.messages;
    let finished = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let pool: Vec<_> = (0..consumers)
        .map(|_| {
            let (queue, name, finished, all_done) =
                (queue.clone(), name.to_owned(), finished.clone(), all_done.clone());
            tokio::spawn(async move {
                loop {
                    let d = queue.next(&name, LEASE).await.expect("waiting for a message");
                    queue.finish(&d.lease).await.expect("finishing a message");
                    if finished.fetch_add(1, Ordering::AcqRel) + 1 == n {
                        all_done.notify_one();
                    }
                }
            })
        })
        .collect();
    // Let the consumers park in `next` first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = Cpu::start(args, backend);
    let begun = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let feeders: Vec<_> = (0..producers)
        .map(|_| {
            let (queue, name, next) = (queue.clone(), name.to_owned(), next.clone());
            tokio::spawn(async move {
                let payload = [b'x'; 32];
                loop {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    if i >= n {
                        return;
                    }
                    queue.enqueue(&name, &format!("m{i}"), &payload, Duration::ZERO).await.expect("enqueueing");
                }
            })
        })
        .collect();
    for f in feeders {
        f.await?;
    }
    let enqueued = begun.elapsed();
    tokio::time::timeout(Duration::from_secs(600), all_done.notified()).await.context("messages never finished")?;
    let wall = begun.elapsed();
    let cpu = cpu.finish();
    for c in pool {
        c.abort();
    }
    Ok(json!({
        "kind": "throughput", "producers": producers, "consumers": consumers, "messages": n,
        "msgs_per_s": n as f64 / wall.as_secs_f64(), "enqueued_per_s": n as f64 / enqueued.as_secs_f64(),
        "wall_s": wall.as_secs_f64(),
        "cpu_ms_per_msg": cpu.own / n as f64, "db_cpu_ms_per_msg": cpu.db.map(|d| d / n as f64),
    }))
}

// ---- the whole path on a node ----

type Http = Client<HttpConnector, Full<Bytes>>;

/// A `pixflow serve` process on loopback, with its own data folder.
struct Node {
    child: std::process::Child,
    api: Api,
}

/// The node's API as a client sees it; cheap to clone.
#[derive(Clone)]
struct Api {
    base: String,
    http: Http,
    /// The input of every invocation: a 4x4 PNG.
    png: Bytes,
}

impl Node {
    /// Starts a node whose completion callbacks may go to `callbacks` (`host:port`).
    fn start(pixflow: &Path, dir: &Path, callbacks: &str, extra: &[String]) -> Result<Node> {
        if !pixflow.is_file() {
            bail!("{} not found: build it (cargo build -p pixflow-cli) or pass --pixflow", pixflow.display());
        }
        let functions = dir.join("functions");
        std::fs::create_dir_all(&functions)?;
        std::fs::write(functions.join("flip.yaml"), "name: flip\nversion: '1'\nbuiltin: flip\nauth: none\n")?;
        let log = dir.join("serve.log");
        let child = std::process::Command::new(pixflow)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--functions")
            .arg(&functions)
            .args(["--callback-allow", callbacks])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", pixflow.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let base = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(at) = text.find("pixflow serving on ") {
                let rest = &text[at + "pixflow serving on ".len()..];
                break rest.split_whitespace().next().unwrap_or_default().to_owned();
            }
            if Instant::now() > deadline {
                bail!("pixflow serve did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([x as u8 * 60, y as u8 * 60, 90]))
            .write_to(&mut png, image::ImageFormat::Png)?;
        let http = Client::builder(TokioExecutor::new()).build_http();
        Ok(Node { child, api: Api { base, http, png: png.into_inner().into() } })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api {
    /// Sends one asynchronous invocation (with a completion callback to `callback`, if any);
    /// its id and the wall clock (ms) when the 202 arrived.
    async fn submit(&self, callback: Option<&str>) -> Result<(String, f64)> {
        let mut req = hyper::Request::post(format!("{}/v1/functions/flip/invoke", self.base))
            .header("prefer", "respond-async")
            .header("content-type", "image/png");
        if let Some(url) = callback {
            req = req.header("x-callback-url", url);
        }
        let req = req.body(Full::new(self.png.clone()))?;
        let resp = self.http.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let at = unix_ms();
        if status != hyper::StatusCode::ACCEPTED {
            bail!("invoke answered {status}: {}", String::from_utf8_lossy(&body));
        }
        let v: Value = serde_json::from_slice(&body)?;
        Ok((v["id"].as_str().context("no id in the 202")?.to_owned(), at))
    }

    async fn status(&self, id: &str) -> Result<Value> {
        let req = hyper::Request::get(format!("{}/v1/invocations/{id}", self.base)).body(Full::new(Bytes::new()))?;
        let resp = self.http.request(req).await?;
        Ok(serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?)
    }

    /// The invocation's status once it is settled (succeeded or dead), polling every `every`.
    async fn settled(&self, id: &str, every: Duration) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let v = self.status(id).await?;
            if matches!(v["status"].as_str(), Some("succeeded" | "dead")) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("invocation {id} still {v} after 600 s");
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// First requests (connections, the function's first instance) outside any row.
async fn warm_up(node: &Node) -> Result<()> {
    for _ in 0..20 {
        let (id, _) = node.api.submit(None).await?;
        node.api.settled(&id, Duration::from_millis(2)).await?;
    }
    Ok(())
}

/// `producers` tasks send `n` asynchronous invocations as fast as they are accepted; then waits
/// for all of them to succeed.
async fn async_burst(node: &Node, producers: usize, n: usize) -> Result<Value> {
    let server0 = proc_ticks(node.pid());
    let own0 = proc_ticks(std::process::id());
    let begun = Instant::now();
    let begun_ms = unix_ms();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let (api, next) = (node.api.clone(), next.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::AcqRel) < n {
                    let sent = Instant::now();
                    let (id, at) = api.submit(None).await?;
                    mine.push((id, at, ms(sent.elapsed())));
                }
                Ok::<_, anyhow::Error>(mine)
            })
        })
        .collect();
    let mut accepted: Vec<(String, f64, f64)> = Vec::new();
    for t in tasks {
        accepted.extend(t.await??);
    }
    let accept_wall = begun.elapsed();
    accepted.sort_by(|a, b| a.1.total_cmp(&b.1));
    // The last one accepted is (about) the last one run: wait for it, then read the CPU.
    let last = accepted.last().context("nothing accepted")?;
    node.api.settled(&last.0, Duration::from_millis(10)).await?;
    let server_cpu = (proc_ticks(node.pid()) - server0) / TICKS * 1000.0;
    let own_cpu = (proc_ticks(std::process::id()) - own0) / TICKS * 1000.0;
    let (mut done, mut rtt, mut retried, mut last_done) = (Vec::new(), Vec::new(), 0, begun_ms);
    for (id, at, round_trip) in &accepted {
        let v = node.api.settled(id, Duration::from_millis(10)).await?;
        if v["status"] != "succeeded" {
            bail!("invocation {id} ended {v}");
        }
        if v["attempts"].as_u64() != Some(1) {
            retried += 1;
        }
        let finished = v["updated_at_ms"].as_f64().context("no updated_at_ms")?;
        last_done = last_done.max(finished);
        done.push(finished - at);
        rtt.push(*round_trip);
    }
    let drained_s = (last_done - begun_ms) / 1000.0;
    Ok(json!({
        "kind": "async", "producers": producers, "invocations": n,
        "accepted_per_s": n as f64 / accept_wall.as_secs_f64(), "completed_per_s": n as f64 / drained_s,
        "accept_rtt_p50_ms": pct(&rtt, 50.0), "accept_rtt_p99_ms": pct(&rtt, 99.0),
        "to_succeeded_p50_ms": pct(&done, 50.0), "to_succeeded_p99_ms": pct(&done, 99.0),
        "to_succeeded_max_ms": pct(&done, 100.0), "retried": retried,
        "server_cpu_ms_per_inv": server_cpu / n as f64, "client_cpu_ms_per_inv": own_cpu / n as f64,
    }))
}

/// One invocation at a time, each awaited (its completion callback) before the next: 202 to
/// `succeeded` without anything queued ahead, as logged and as the callback tells it.
async fn async_sequential(node: &Node, callbacks: &mut Callbacks, n: usize) -> Result<Value> {
    let url = format!("http://{}/done", callbacks.addr);
    let server0 = proc_ticks(node.pid());
    let (mut logged, mut called, mut rtt) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let sent = Instant::now();
        let (id, at) = node.api.submit(Some(&url)).await?;
        let accepted = Instant::now();
        let arrived = callbacks.wait(&id).await?;
        called.push(ms(arrived.saturating_duration_since(accepted)));
        rtt.push(ms(accepted - sent));
        let v = node.api.status(&id).await?;
        if v["status"] != "succeeded" {
            bail!("invocation {id} ended {v}");
        }
        logged.push(v["updated_at_ms"].as_f64().context("no updated_at_ms")? - at);
    }
    let server_cpu = (proc_ticks(node.pid()) - server0) / TICKS * 1000.0;
    Ok(json!({
        "kind": "async_sequential", "invocations": n,
        "accept_rtt_p50_ms": pct(&rtt, 50.0), "accept_rtt_p99_ms": pct(&rtt, 99.0),
        "to_succeeded_p50_ms": pct(&logged, 50.0), "to_succeeded_p99_ms": pct(&logged, 99.0),
        "callback_p50_ms": pct(&called, 50.0), "callback_p99_ms": pct(&called, 99.0),
        "server_cpu_ms_per_inv": server_cpu / n as f64,
    }))
}

/// A listener for completion callbacks: when each arrived, by invocation id.
struct Callbacks {
    addr: String,
    arrivals: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Callbacks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Callbacks {
    async fn listen() -> Result<Callbacks> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (tx, arrivals) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let at = Instant::now();
                        let id = req.headers().get("x-pixflow-invocation-id").and_then(|v| v.to_str().ok());
                        let _ = tx.send((id.unwrap_or_default().to_owned(), at));
                        async { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new()))) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Ok(Callbacks { addr, arrivals, task })
    }

    /// When the callback of invocation `id` arrived (others are skipped).
    async fn wait(&mut self, id: &str) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (got, at) = tokio::time::timeout_at(deadline, self.arrivals.recv())
                .await
                .with_context(|| format!("no callback for {id} within 60 s"))?
                .context("the callback listener stopped")?;
            if got == id {
                return Ok(at);
            }
        }
    }
}

// ---- measuring ----

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The `p`th percentile (nearest rank) of `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// utime + stime of a process, in clock ticks (0 if it is gone).
fn proc_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first, utime the 12th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    field(11) + field(12)
}

/// The processes of the backend's server that serve this benchmark, with their CPU ticks.
#[derive(Clone, Copy)]
enum ServerProcs<'a> {
    /// PostgreSQL backends serving this database (their process title names it).
    Postgres(&'a str),
    /// Every process whose command is `nats-server` (the whole server, not only this
    /// benchmark's share).
    Nats,
}

impl ServerProcs<'_> {
    fn ticks(self) -> HashMap<u32, f64> {
        let mut out = HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let ours = match self {
                ServerProcs::Postgres(database) => {
                    let title = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
                    title.starts_with("postgres: ") && title.contains(&format!(" {database} "))
                }
                ServerProcs::Nats => {
                    std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim_end() == "nats-server")
                }
            };
            if ours {
                out.insert(pid, proc_ticks(pid));
            }
        }
        out
    }
}

/// CPU spent over a row: this process's, and the backend server's (PostgreSQL's backends, or
/// `nats-server`), reported as `db_cpu_ms_per_msg`.
struct Cpu<'a> {
    own: f64,
    db: Option<(ServerProcs<'a>, HashMap<u32, f64>)>,
}

struct CpuSpent {
    own: f64,
    db: Option<f64>,
}

impl Cpu<'_> {
    fn start<'a>(args: &'a Args, backend: &str) -> Cpu<'a> {
        let procs = match backend {
            "postgres" => {
                let url = args.pg_url.as_deref().unwrap_or_default();
                Some(ServerProcs::Postgres(
                    url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default(),
                ))
            }
            "nats" => Some(ServerProcs::Nats),
            _ => None,
        };
        let db = procs.map(|p| (p, p.ticks()));
        Cpu { own: proc_ticks(std::process::id()), db }
    }

    /// Milliseconds of CPU since [`Cpu::start`].
    fn finish(self) -> CpuSpent {
        let own = (proc_ticks(std::process::id()) - self.own) / TICKS * 1000.0;
        let db = self.db.map(|(procs, before)| {
            let after = procs.ticks();
            let ticks: f64 = after.iter().map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0)).sum();
            ticks / TICKS * 1000.0
        });
        CpuSpent { own, db }
    }
}

// ---- the summary: medians over rounds ----

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Medians over rounds of `fields` of the rows matching `key`.
fn medians(rows: &[Value], key: &[(&str, Value)], fields: &[&str]) -> Option<Vec<f64>> {
    let matching: Vec<&Value> = rows.iter().filter(|r| key.iter().all(|(k, v)| &r[*k] == v)).collect();
    if matching.is_empty() {
        return None;
    }
    Some(fields.iter().map(|f| median(matching.iter().filter_map(|r| r[*f].as_f64()).collect())).collect())
}

fn cells(v: &[f64]) -> String {
    v.iter().map(|x| if x.is_nan() { "-".to_owned() } else { format!("{x:.2}") }).collect::<Vec<_>>().join(" | ")
}

fn summary(rows: &[Value]) {
    let rounds = rows.iter().filter_map(|r| r["round"].as_u64()).max().unwrap_or(0);
    println!("\nMedians over {rounds} rounds.");
    let kind = |k: &str| rows.iter().any(|r| r["kind"] == k);
    let backends = ["sqlite", "postgres", "nats"];
    if kind("latency") {
        println!(
            "\n| backend | p50 ms | p90 ms | p99 ms | enqueue p50 ms | wake + claim p50 ms | CPU ms/msg (bench) | CPU ms/msg (PostgreSQL or nats-server) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let fields = [
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "enqueue_p50_ms",
            "wake_claim_p50_ms",
            "cpu_ms_per_msg",
            "db_cpu_ms_per_msg",
        ];
        for b in backends {
            if let Some(m) = medians(rows, &[("kind", json!("latency")), ("backend", json!(b))], &fields) {
                println!("| {b} | {} |", cells(&m));
            }
        }
    }
    if kind("throughput") {
        println!(
            "\n| backend | consumers | producers | msgs/s | enqueued/s | CPU ms/msg (bench) | CPU ms/msg (PostgreSQL or nats-server) |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut shapes: Vec<(u64, u64)> = rows
            .iter()
            .filter(|r| r["kind"] == "throughput")
            .filter_map(|r| Some((r["consumers"].as_u64()?, r["producers"].as_u64()?)))
            .collect();
        shapes.sort_unstable();
        shapes.dedup();
        let fields = ["msgs_per_s", "enqueued_per_s", "cpu_ms_per_msg", "db_cpu_ms_per_msg"];
        for b in backends {
            for &(c, p) in &shapes {
                let key = [
                    ("kind", json!("throughput")),
                    ("backend", json!(b)),
                    ("consumers", json!(c)),
                    ("producers", json!(p)),
                ];
                if let Some(m) = medians(rows, &key, &fields) {
                    println!("| {b} | {c} | {p} | {} |", cells(&m));
                }
            }
        }
    }
    let mut nodes: Vec<&str> = rows.iter().filter_map(|r| r["node"].as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    nodes.retain(|n| seen.insert(*n));
    if kind("async") {
        println!(
            "\n| node | producers | accepted/s | completed/s | 202 p50 ms | 202 p99 ms | 202 → succeeded p50 ms | p99 ms | server CPU ms/inv | client CPU ms/inv |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let mut producers: Vec<u64> =
            rows.iter().filter(|r| r["kind"] == "async").filter_map(|r| r["producers"].as_u64()).collect();
        producers.sort_unstable();
        producers.dedup();
        let fields = [
            "accepted_per_s",
            "completed_per_s",
            "accept_rtt_p50_ms",
            "accept_rtt_p99_ms",
            "to_succeeded_p50_ms",
            "to_succeeded_p99_ms",
            "server_cpu_ms_per_inv",
            "client_cpu_ms_per_inv",
        ];
        for n in &nodes {
            for &p in &producers {
                let key = [("kind", json!("async")), ("node", json!(n)), ("producers", json!(p))];
                if let Some(m) = medians(rows, &key, &fields) {
                    println!("| {n} | {p} | {} |", cells(&m));
                }
            }
        }
    }
    let fields = [
        "accept_rtt_p50_ms",
        "accept_rtt_p99_ms",
        "to_succeeded_p50_ms",
        "to_succeeded_p99_ms",
        "callback_p50_ms",
        "callback_p99_ms",
        "server_cpu_ms_per_inv",
    ];
    if kind("async_sequential") {
        println!(
            "\n| one at a time | 202 p50 ms | 202 p99 ms | 202 → succeeded (logged) p50 ms | p99 ms | 202 → callback p50 ms | p99 ms | server CPU ms/inv |"
        );
        println!("|---|---|---|---|---|---|---|---|");
    }
    for n in &nodes {
        if let Some(m) = medians(rows, &[("kind", json!("async_sequential")), ("node", json!(n))], &fields) {
            println!("| {n} | {} |", cells(&m));
        }
    }
}
