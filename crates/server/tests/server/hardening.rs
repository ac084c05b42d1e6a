//! What a hostile or careless client tried against a node, kept as regression tests: slow
//! clients, refusals that must reach clients streaming a body, what stored content may do in a
//! browser, and what an invoking token may read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use pixflow_server::conn::ClientDeadlines;
use pixflow_server::{App, Config};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use crate::api::png;

const ADMIN: &str = "pfx_test-admin-token";

fn config(name: &str) -> Config {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pixflow-hardening-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = Config::new(dir);
    c.in_memory = true;
    c.admin_token = Some(ADMIN.into());
    c.async_workers = 0;
    c.tick = Duration::from_millis(50);
    c
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

async fn call(app: &Arc<App>, method: Method, uri: &str, token: Option<&str>, body: Vec<u8>, ctype: &str) -> Reply {
    let mut req = Request::builder().method(method).uri(uri).header("content-type", ctype);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = pixflow_server::router(app.clone()).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// The node on a real socket; dropping the sender stops it.
async fn listen(app: &Arc<App>) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn({
        let app = app.clone();
        async move {
            pixflow_server::serve(app, listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        }
    });
    (addr, stop, served)
}

/// Reads an HTTP/1.1 answer (head and body) until the server closes the connection.
async fn read_answer(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const FLIP: &str = "name: flip\nversion: '1'\nbuiltin: flip\nquota: {concurrency: 1, max_queue: 0, max_request_bytes: 64Ki}\nscaling: {min: 1, max: 1}\nauth: none\n";

async fn deploy(app: &Arc<App>, name: &str, manifest: &str) {
    let r = call(app, Method::PUT, &format!("/v1/functions/{name}"), Some(ADMIN), manifest.into(), "text/yaml").await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_and_frees_its_slot() {
    let mut c = config("slow-body");
    c.client_deadlines = ClientDeadlines { body_idle: Duration::from_millis(300), ..ClientDeadlines::default() };
    c.node.max_requests = 1;
    let app = App::start(c, None).await.unwrap().app;
    deploy(&app, "flip", FLIP).await;
    let (addr, stop, served) = listen(&app).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/functions/flip/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc").await.unwrap();
    // The request holds the node's only slot while its body is awaited…
    wait_until("the slow request is admitted", || app.node.requests() == 1).await;
    // …until the idle deadline answers it.
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert_eq!(app.node.requests(), 0);
    // A body that trickles (a byte at a time, each within the idle deadline) is cut by the rate.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/functions/flip/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..60 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    });
    let mut s = trickle.await.unwrap();
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("slower than 1024 bytes per second"), "{answer}");
    assert_eq!(app.node.requests(), 0);
    // The slot serves the next client.
    let r = call(&app, Method::POST, "/v1/functions/flip/invoke", None, png(4, 4), "image/png").await;
    assert_eq!(r.status, StatusCode::OK);
    let m = String::from_utf8(call(&app, Method::GET, "/metrics", None, vec![], "text/plain").await.body).unwrap();
    assert!(m.contains("pixflow_http_slow_clients_total{phase=\"body_idle\"}"), "{m}");
    assert!(m.contains("pixflow_http_slow_clients_total{phase=\"body_rate\"}"), "{m}");
    drop(stop);
    served.await.unwrap();
}

#[tokio::test]
async fn headers_trickled_past_the_deadline_close_the_connection() {
    let mut c = config("slow-head");
    c.client_deadlines = ClientDeadlines { header_read: Duration::from_millis(300), ..ClientDeadlines::default() };
    let app = App::start(c, None).await.unwrap().app;
    let (addr, stop, served) = listen(&app).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let mut closed = false;
    for i in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(format!("x-trickle-{i}: 1\r\n").as_bytes()).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
            assert!(!String::from_utf8_lossy(&probe[..n]).contains(" 200 "), "the trickled request was served");
            closed = true;
            break;
        }
    }
    assert!(closed, "the connection stayed open for {:?}", started.elapsed());
    // A prompt client is still served.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    assert!(read_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    drop(stop);
    served.await.unwrap();
}

/// Sends a request head and then `len` body bytes without `Expect: 100-continue`, as simple
/// clients do, before reading anything; returns the answer. A server that closes with the body
/// unread makes the writes fail instead.
async fn stream_then_read(addr: SocketAddr, path: &str, len: usize) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\ncontent-type: image/png\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        if let Err(e) = s.write_all(&chunk[..n]).await {
            panic!("the server cut the body after {sent} of {len} bytes: {e}");
        }
        sent += n;
    }
    read_answer(&mut s).await
}

#[tokio::test]
async fn refusals_before_reading_reach_clients_that_stream_without_expect() {
    let app = App::start(config("linger"), None).await.unwrap().app;
    deploy(&app, "flip", FLIP).await;
    let (addr, stop, served) = listen(&app).await;
    // Declared too large: 413 before a byte is read.
    let answer = stream_then_read(addr, "/v1/functions/flip/invoke", 4 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
    // The function is full: 429 with Retry-After.
    let f = app.registry.get("flip").unwrap();
    let held = f.pool.acquire(Duration::from_secs(5)).await.unwrap();
    let answer = stream_then_read(addr, "/v1/functions/flip/invoke", 60 << 10).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: "), "{answer}");
    drop(held);
    let m = String::from_utf8(call(&app, Method::GET, "/metrics", None, vec![], "text/plain").await.body).unwrap();
    assert!(m.contains("pixflow_http_lingering_total"), "{m}");
    drop(stop);
    served.await.unwrap();
}

#[tokio::test]
async fn stored_content_cannot_script_the_api_origin() {
    let app = App::start(config("xss"), None).await.unwrap().app;
    let r =
        call(&app, Method::PUT, "/v1/buckets/site", Some(ADMIN), br#"{"public": true}"#.to_vec(), "application/json")
            .await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    let page = b"<html><script>fetch('/v1/functions')</script></html>".to_vec();
    let svg = br#"<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>"#.to_vec();
    for (key, body, ctype) in [
        ("a/page.html", page, "text/html; charset=utf-8"),
        ("a/logo.svg", svg, "image/svg+xml"),
        ("a/photo.png", png(3, 3), "image/png"),
    ] {
        let r = call(&app, Method::PUT, &format!("/v1/buckets/site/objects/{key}"), Some(ADMIN), body, ctype).await;
        assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    }
    for path in ["/cdn/site/a/page.html", "/cdn/site/a/logo.svg", "/v1/buckets/site/objects/a/page.html"] {
        let r = call(&app, Method::GET, path, Some(ADMIN), vec![], "text/plain").await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        assert!(r.headers["content-security-policy"].to_str().unwrap().contains("sandbox"), "{path}");
        let d = r.headers["content-disposition"].to_str().unwrap();
        assert!(d.starts_with("attachment; filename=\""), "{path}: {d}");
    }
    // Images still display inline, under the same policy.
    let r = call(&app, Method::GET, "/cdn/site/a/photo.png", None, vec![], "text/plain").await;
    assert!(r.headers.get("content-disposition").is_none());
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    app.shutdown().await;
}

#[tokio::test]
async fn active_content_renders_inline_only_on_the_cdn_origin_of_a_bucket_that_allows_it() {
    let mut c = config("cdn-origin");
    c.cdn_inline_active = vec!["site".into()];
    let app = App::start(c, None).await.unwrap().app;
    call(&app, Method::PUT, "/v1/buckets/site", Some(ADMIN), br#"{"public": true}"#.to_vec(), "application/json").await;
    let r = call(&app, Method::PUT, "/v1/buckets/site/objects/i.html", Some(ADMIN), b"<p>hi</p>".to_vec(), "text/html")
        .await;
    assert!(r.status.is_success());
    // On the API's origin: still a download.
    let r = call(&app, Method::GET, "/cdn/site/i.html", None, vec![], "text/plain").await;
    assert!(r.headers["content-disposition"].to_str().unwrap().starts_with("attachment"));
    // On the CDN's own listener: inline, still sandboxed; and no API there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cdn = tokio::spawn(pixflow_server::serve_cdn(app.clone(), listener));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        read_answer(&mut s).await.to_ascii_lowercase()
    };
    let page = get("/cdn/site/i.html").await;
    assert!(page.starts_with("http/1.1 200") && page.ends_with("<p>hi</p>"), "{page}");
    assert!(!page.contains("content-disposition") && page.contains("sandbox"), "{page}");
    assert!(get("/v1/functions").await.starts_with("http/1.1 404"));
    app.shutdown().await;
    cdn.await.unwrap();
}

#[tokio::test]
async fn invoking_tokens_see_functions_but_not_their_manifests() {
    let app = App::start(config("manifests"), None).await.unwrap().app;
    let manifest = "name: tool\nversion: '1'\nprocess: {command: [python3, tool.py, --password, hunter2], env: {DSN: 'postgres://u:pw@db/x'}}\nscaling: {min: 0, max: 1, initial: 0}\n";
    deploy(&app, "tool", manifest).await;
    let t = call(&app, Method::POST, "/v1/tokens", Some(ADMIN), br#"{"role": "invoke"}"#.to_vec(), "application/json")
        .await;
    let invoke = json(&t.body)["token"].as_str().unwrap().to_owned();
    for path in ["/v1/functions/tool", "/v1/functions"] {
        let r = call(&app, Method::GET, path, Some(&invoke), vec![], "text/plain").await;
        assert_eq!(r.status, StatusCode::OK);
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains("hunter2") && !text.contains("pw@db") && !text.contains("manifest"), "{path}: {text}");
    }
    let r = call(&app, Method::GET, "/v1/functions/tool", Some(ADMIN), vec![], "text/plain").await;
    let v = json(&r.body);
    assert!(v["manifest"].as_str().unwrap().contains("pw@db"));
    assert_eq!(v["runs"]["process"][0], "python3");
    app.shutdown().await;
}

#[tokio::test]
async fn a_program_that_cannot_start_is_reported_at_once_with_its_last_words() {
    let app = App::start(config("no-start"), None).await.unwrap().app;
    let manifest = "name: broken\nversion: '1'\nprocess: {command: [python3, does-not-exist.py]}\nquota: {timeout: 60s}\nscaling: {min: 0, max: 1, initial: 0}\nauth: none\n";
    deploy(&app, "broken", manifest).await;
    for _ in 0..2 {
        let r = call(&app, Method::POST, "/v1/functions/broken/invoke", None, vec![1], "image/png").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&r.body));
        let p = json(&r.body);
        assert_eq!(p["code"], "instance_start_failed", "{p}");
        assert!(p["detail"].as_str().unwrap().contains("does-not-exist.py"), "{p}");
    }
    let r = call(&app, Method::GET, "/v1/functions/broken", Some(ADMIN), vec![], "text/plain").await;
    let v = json(&r.body);
    assert!(v["state"]["start_error"].as_str().unwrap().contains("exited before opening port"), "{v}");
    app.shutdown().await;
}

async fn invoke_json(app: &Arc<App>, function: &str, token: Option<&str>, doc: Value) -> Reply {
    let uri = format!("/v1/functions/{function}/invoke");
    call(app, Method::POST, &uri, token, serde_json::to_vec(&doc).unwrap(), "application/json").await
}

fn problem(r: &Reply, status: StatusCode, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let p = json(&r.body);
    assert_eq!(p["code"], code, "{p}");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    p
}

#[tokio::test]
async fn json_invocations_refuse_what_they_cannot_honour_with_specific_problems() {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let app = App::start(config("json-limits"), None).await.unwrap().app;
    deploy(&app, "open", "name: open\nversion: '1'\nbuiltin: flip\nquota: {max_input_bytes: 1Ki}\nauth: none\n").await;
    let small = b64(&png(2, 2));
    // More inputs or parameters than a request may carry.
    let inputs: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("in{i}"), serde_json::json!({"base64": small}))).collect();
    let r = invoke_json(&app, "open", None, serde_json::json!({"input": {"base64": small}, "inputs": inputs})).await;
    assert!(problem(&r, StatusCode::BAD_REQUEST, "bad_request")["detail"].as_str().unwrap().contains("16 inputs"));
    let params: serde_json::Map<String, Value> = (0..65).map(|i| (format!("p{i}"), Value::from(i))).collect();
    let r = invoke_json(&app, "open", None, serde_json::json!({"input": {"base64": small}, "params": params})).await;
    assert!(problem(&r, StatusCode::BAD_REQUEST, "bad_request")["detail"].as_str().unwrap().contains("64 params"));
    // Bytes that are not base64.
    let r = invoke_json(&app, "open", None, serde_json::json!({"input": {"base64": "not*base64"}})).await;
    assert!(problem(&r, StatusCode::BAD_REQUEST, "bad_request")["detail"].as_str().unwrap().contains("input.base64"));
    // An anonymous caller naming a private object, as the input or one of the inputs: it looks
    // missing, as on the CDN.
    call(&app, Method::PUT, "/v1/buckets/private", Some(ADMIN), b"{}".to_vec(), "application/json").await;
    let r = call(&app, Method::PUT, "/v1/buckets/private/objects/p.png", Some(ADMIN), png(2, 2), "image/png").await;
    assert!(r.status.is_success());
    for doc in [
        serde_json::json!({"input": {"bucket": "private", "key": "p.png"}}),
        serde_json::json!({"input": {"base64": small}, "inputs": {"logo": {"bucket": "private", "key": "p.png"}}}),
    ] {
        problem(&invoke_json(&app, "open", None, doc).await, StatusCode::NOT_FOUND, "no_such_key");
    }
    // A stored input over the function's `max_input_bytes` is refused before it is read.
    let noise = image::RgbImage::from_fn(64, 64, |x, y| {
        let v = (x * 7919 + y * 104_729).wrapping_mul(2_654_435_761) >> 8;
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut big = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut big, image::ImageFormat::Png).unwrap();
    let big = big.into_inner();
    assert!(big.len() > 1024, "{}", big.len());
    let r = call(&app, Method::PUT, "/v1/buckets/private/objects/big.png", Some(ADMIN), big, "image/png").await;
    assert!(r.status.is_success());
    let r =
        invoke_json(&app, "open", Some(ADMIN), serde_json::json!({"input": {"bucket": "private", "key": "big.png"}}))
            .await;
    problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "object_too_large");
    app.shutdown().await;
}

#[tokio::test]
async fn asynchronous_results_with_several_renditions_are_read_one_by_one() {
    let mut c = config("renditions");
    c.async_workers = 1;
    let app = App::start(c, None).await.unwrap().app;
    let manifest = "name: two\nversion: '1'\npipeline:\n  - {op: resize, params: {width: 8}}\n  - {op: output, params: {name: eight, format: png}}\n  - {op: resize, params: {width: 4}}\n  - {op: output, params: {name: four, format: png}}\nquota: {concurrency: 1}\nscaling: {min: 1, max: 1}\n";
    deploy(&app, "two", manifest).await;
    // The only slot is taken, so the queued invocation cannot finish yet.
    let held = app.registry.get("two").unwrap().pool.acquire(Duration::from_secs(5)).await.unwrap();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/functions/two/invoke")
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("prefer", "respond-async")
        .body(Body::from(png(16, 16)))
        .unwrap();
    let resp = pixflow_server::router(app.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let r = call(&app, Method::GET, &format!("{location}/result"), None, vec![], "text/plain").await;
    problem(&r, StatusCode::CONFLICT, "invocation_not_done");
    drop(held);
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = json(&call(&app, Method::GET, &location, None, vec![], "text/plain").await.body);
        if s["status"] == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (n, width) in [(0, 8), (1, 4)] {
        let r = call(&app, Method::GET, &format!("{location}/result?rendition={n}"), None, vec![], "text/plain").await;
        assert_eq!((r.status, r.headers["content-type"].to_str().unwrap()), (StatusCode::OK, "image/png"));
        assert_eq!(image::load_from_memory(&r.body).unwrap().width(), width);
    }
    let r = call(&app, Method::GET, &format!("{location}/result?rendition=2"), None, vec![], "text/plain").await;
    problem(&r, StatusCode::NOT_FOUND, "rendition_not_found");
    app.shutdown().await;
}

#[tokio::test]
async fn uploads_beyond_the_node_limit_are_refused_until_one_ends() {
    let mut c = config("uploads");
    c.max_uploads = 1;
    let app = App::start(c, None).await.unwrap().app;
    call(&app, Method::PUT, "/v1/buckets/uploads", Some(ADMIN), b"{}".to_vec(), "application/json").await;
    let (addr, stop, served) = listen(&app).await;
    // One upload under way: its body has not all arrived.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /v1/buckets/uploads/objects/a HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN}\r\ncontent-length: 6\r\nconnection: close\r\n\r\nabc"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    wait_until("the slow upload is admitted", || app.node.requests() == 1).await;
    let refused =
        call(&app, Method::PUT, "/v1/buckets/uploads/objects/b", Some(ADMIN), b"b".to_vec(), "text/plain").await;
    let p = problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(p["detail"].as_str().unwrap().contains("uploads"), "{p}");
    assert!(refused.headers.contains_key("retry-after"));
    slow.write_all(b"def").await.unwrap();
    assert!(read_answer(&mut slow).await.starts_with("HTTP/1.1 200"));
    let r = call(&app, Method::PUT, "/v1/buckets/uploads/objects/c", Some(ADMIN), b"c".to_vec(), "text/plain").await;
    assert!(r.status.is_success(), "{}", r.status);
    drop(stop);
    served.await.unwrap();
}

#[tokio::test]
async fn the_data_folder_and_everything_in_it_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = config("modes");
    c.in_memory = false;
    std::fs::create_dir_all(&c.data_dir).unwrap();
    std::fs::set_permissions(&c.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = c.data_dir.clone();
    let app = App::start(c, None).await.unwrap().app;
    call(&app, Method::PUT, "/v1/buckets/private", Some(ADMIN), b"{}".to_vec(), "application/json").await;
    let r =
        call(&app, Method::PUT, "/v1/buckets/private/objects/secret.png", Some(ADMIN), png(3, 3), "image/png").await;
    assert!(r.status.is_success());
    app.shutdown().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut seen = 0;
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                assert_eq!(mode(&p), 0o700, "{}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                seen += 1;
            }
        }
    }
    // The state file, the catalogue, the blob, the admin token and the CDN key at least.
    assert!(seen >= 4, "{seen} files");
    std::fs::remove_dir_all(&dir).unwrap();
}
