//! The HTTP API end to end: in-process through `Router::oneshot`, and over a real socket where
//! the test is about connections (graceful shutdown).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use pixflow_server::{App, Config};
use serde_json::{Value, json};
use tower::ServiceExt;

const ADMIN: &str = "pfx_test-admin-token";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A fresh folder for one test's files (objects), removed before use.
fn scratch(name: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pixflow-api-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config() -> Config {
    let mut c = Config::new(scratch("data"));
    c.in_memory = true;
    c.admin_token = Some(ADMIN.into());
    c.async_workers = 1;
    c.tick = Duration::from_millis(50);
    c
}

async fn start(c: Config) -> Arc<App> {
    App::start(c, None).await.unwrap().app
}

pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a problem response with this status and code.
    fn problem(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.headers["content-type"], "application/problem+json");
        let p = self.json();
        assert_eq!(p["code"], code, "{p}");
        assert_eq!(p["type"], format!("urn:pixflow:problem:{code}"));
        assert_eq!(p["status"], status.as_u16());
        p
    }
}

pub(crate) async fn call(
    app: &Arc<App>,
    method: Method,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = pixflow_server::router(app.clone()).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

async fn deploy(app: &Arc<App>, manifest: &str) -> Reply {
    let name = manifest.lines().find_map(|l| l.strip_prefix("name: ")).unwrap().trim().to_owned();
    call(app, Method::PUT, &format!("/v1/functions/{name}"), Some(ADMIN), &[], manifest.as_bytes().to_vec()).await
}

const THUMB: &str =
    "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\noverridable: [width, format]\nauth: none\n";

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = start(config()).await;
    assert_eq!(call(&app, Method::GET, "/healthz", None, &[], vec![]).await.status, StatusCode::OK);
    assert_eq!(call(&app, Method::GET, "/readyz", None, &[], vec![]).await.status, StatusCode::OK);
    deploy(&app, THUMB).await;
    call(&app, Method::POST, "/v1/functions/thumb/invoke", None, &[], png(32, 32)).await;
    let m = call(&app, Method::GET, "/metrics", None, &[], vec![]).await;
    let text = String::from_utf8(m.body).unwrap();
    for series in [
        "pixflow_invocations_total{function=\"thumb\",outcome=\"ok\"}",
        "pixflow_invocation_duration_seconds_bucket{function=\"thumb\"",
        "pixflow_bytes_in_total{function=\"thumb\"}",
        "pixflow_pixels_processed_total{function=\"thumb\"}",
        "pixflow_invocation_cpu_seconds_sum{function=\"thumb\"}",
        "pixflow_async_queue_depth",
        "pixflow_edge_cache_entries",
        "pixflow_edge_cache_bytes{tier=\"memory\"}",
        "pixflow_cdn_transformations_total",
        "pixflow_backend_up{backend=\"state\"} 1",
        "pixflow_backend_up{backend=\"queue\"} 1",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    let r = call(&app, Method::GET, "/v2/nothing", None, &[], vec![]).await;
    r.problem(StatusCode::NOT_FOUND, "not_found");
    app.shutdown().await;
    call(&app, Method::GET, "/readyz", None, &[], vec![]).await.problem(StatusCode::SERVICE_UNAVAILABLE, "not_ready");
}

#[tokio::test]
async fn management_needs_tokens_and_validates_manifests() {
    let app = start(config()).await;
    let put = |token: Option<&'static str>, body: &'static str| {
        let app = app.clone();
        async move { call(&app, Method::PUT, "/v1/functions/thumb", token, &[], body.as_bytes().to_vec()).await }
    };
    let r = put(None, THUMB).await;
    r.problem(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    put(Some("pfx_wrong"), THUMB).await.problem(StatusCode::UNAUTHORIZED, "unauthorized");
    // An invoke token may list but not deploy.
    let t = call(&app, Method::POST, "/v1/tokens", Some(ADMIN), &[], br#"{"role": "invoke", "label": "cms"}"#.to_vec())
        .await;
    assert_eq!(t.status, StatusCode::CREATED);
    let invoke_token = t.json()["token"].as_str().unwrap().to_owned();
    let r = call(&app, Method::PUT, "/v1/functions/thumb", Some(&invoke_token), &[], THUMB.as_bytes().to_vec()).await;
    r.problem(StatusCode::FORBIDDEN, "forbidden");

    let bad = put(Some(ADMIN), "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\nscalling: {}\n").await;
    let p = bad.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest");
    assert_eq!((p["errors"][0]["line"].as_u64(), p["errors"][0]["column"].as_u64()), (Some(5), Some(1)), "{p}");
    put(Some(ADMIN), "name: other\nversion: '1'\nbuiltin: flip\n")
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, "name_mismatch");

    let created = put(Some(ADMIN), THUMB).await;
    assert_eq!((created.status, created.json()["result"].as_str()), (StatusCode::CREATED, Some("created")));
    let again = put(Some(ADMIN), THUMB).await;
    assert_eq!((again.status, again.json()["result"].as_str()), (StatusCode::OK, Some("unchanged")));
    put(Some(ADMIN), "name: thumb\nversion: '1'\nbuiltin: resize\nparams: {width: 17}\n")
        .await
        .problem(StatusCode::CONFLICT, "version_conflict");
    let updated = put(Some(ADMIN), "name: thumb\nversion: '2'\nbuiltin: resize\nparams: {width: 17}\n").await;
    assert_eq!(updated.json()["previous_version"], "1");

    let list = call(&app, Method::GET, "/v1/functions", Some(&invoke_token), &[], vec![]).await.json();
    assert_eq!(list["functions"][0]["name"], "thumb");
    assert_eq!(list["functions"][0]["version"], "2");
    assert!(list["functions"][0]["state"]["ready_instances"].is_u64());
    let one = call(&app, Method::GET, "/v1/functions/thumb", Some(ADMIN), &[], vec![]).await.json();
    assert!(one["manifest"].as_str().unwrap().contains("width: 17"));
    assert_eq!(
        call(&app, Method::DELETE, "/v1/functions/thumb", Some(ADMIN), &[], vec![]).await.status,
        StatusCode::NO_CONTENT
    );
    call(&app, Method::GET, "/v1/functions/thumb", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "function_not_found");
}

#[tokio::test]
async fn synchronous_invocation_raw_and_json() {
    let app = start(config()).await;
    deploy(&app, THUMB).await;
    let r = call(&app, Method::POST, "/v1/functions/thumb/invoke?format=webp", None, &[], png(64, 32)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "image/webp");
    assert_eq!(
        (&r.headers["x-pixflow-width"], &r.headers["x-pixflow-height"]),
        (&"16".parse().unwrap(), &"8".parse().unwrap())
    );
    assert!(r.headers["server-timing"].to_str().unwrap().contains("cpu;dur="));
    let img = image::load_from_memory(&r.body).unwrap();
    assert_eq!((img.width(), img.height()), (16, 8));

    let doc = json!({"input": {"base64": B64.encode(png(64, 64))}, "params": {"width": 8}});
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke",
        None,
        &[("content-type", "application/json")],
        doc.to_string().into_bytes(),
    )
    .await;
    let v = r.json();
    assert_eq!(
        (v["renditions"][0]["width"].as_u64(), v["renditions"][0]["content_type"].as_str()),
        (Some(8), Some("image/png"))
    );
    let bytes = B64.decode(v["renditions"][0]["base64"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 8);

    let uri = "/v1/functions/thumb/invoke";
    call(&app, Method::POST, "/v1/functions/thumb/invoke?height=3", None, &[], png(8, 8))
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_parameter");
    call(&app, Method::POST, uri, None, &[], b"not an image".to_vec())
        .await
        .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format");
    let mut truncated = png(64, 64);
    truncated.truncate(60);
    let r = call(&app, Method::POST, uri, None, &[], truncated).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", String::from_utf8_lossy(&r.body));
    call(&app, Method::POST, uri, None, &[("content-type", "application/json")], b"{\"input\": 5}".to_vec())
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_request");
    // Without a token, a private or missing bucket looks like a missing object; with one, it is named.
    let by_ref = json!({"input": {"bucket": "nobucket", "key": "k"}});
    call(&app, Method::POST, uri, None, &[("content-type", "application/json")], by_ref.to_string().into_bytes())
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    call(
        &app,
        Method::POST,
        uri,
        Some(ADMIN),
        &[("content-type", "application/json")],
        by_ref.to_string().into_bytes(),
    )
    .await
    .problem(StatusCode::NOT_FOUND, "no_such_bucket");
    let to_ref = json!({"input": {"base64": B64.encode(png(4, 4))}, "output": {"bucket": "b", "key": "k"}});
    call(&app, Method::POST, uri, None, &[("content-type", "application/json")], to_ref.to_string().into_bytes())
        .await
        .problem(StatusCode::BAD_REQUEST, "invalid_bucket_name");
    call(&app, Method::POST, "/v1/functions/nope/invoke", None, &[], png(8, 8))
        .await
        .problem(StatusCode::NOT_FOUND, "function_not_found");

    // Quota: request bytes are refused before anything is read past the limit.
    deploy(&app, "name: small\nversion: '1'\nbuiltin: flip\nquota: {max_request_bytes: 100}\nauth: none\n").await;
    call(&app, Method::POST, "/v1/functions/small/invoke", None, &[], png(64, 64))
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    // Token-protected functions (the default).
    deploy(&app, "name: private\nversion: '1'\nbuiltin: flip\n").await;
    call(&app, Method::POST, "/v1/functions/private/invoke", None, &[], png(8, 8))
        .await
        .problem(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        call(&app, Method::POST, "/v1/functions/private/invoke", Some(ADMIN), &[], png(8, 8)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_full_queue_answers_429_and_an_overloaded_node_503() {
    let mut c = config();
    c.node.max_requests = 3;
    let app = start(c).await;
    deploy(&app, "name: one\nversion: '1'\nbuiltin: flip\nquota: {concurrency: 1, max_queue: 1}\nscaling: {min: 1, max: 1}\nauth: none\n").await;
    let f = app.registry.get("one").unwrap();
    let held = f.pool.acquire(Duration::from_secs(5)).await.unwrap();
    let queued = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, Method::POST, "/v1/functions/one/invoke", None, &[], png(4, 4)).await })
    };
    while f.pool.stats().queued == 0 {
        tokio::task::yield_now().await;
    }
    let r = call(&app, Method::POST, "/v1/functions/one/invoke", None, &[], png(4, 4)).await;
    r.problem(StatusCode::TOO_MANY_REQUESTS, "queue_full");
    assert_eq!(r.headers["retry-after"], "1");
    drop(held);
    assert_eq!(queued.await.unwrap().status, StatusCode::OK);

    // Node-wide: with every admitted request slot taken, the next one gets 503.
    deploy(&app, "name: wide\nversion: '1'\nbuiltin: flip\nquota: {concurrency: 1, max_queue: 10}\nscaling: {min: 1, max: 1}\nauth: none\n").await;
    let w = app.registry.get("wide").unwrap();
    let held = w.pool.acquire(Duration::from_secs(5)).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let app = app.clone();
        waiting.push(tokio::spawn(async move {
            call(&app, Method::POST, "/v1/functions/wide/invoke", None, &[], png(4, 4)).await
        }));
    }
    while app.node.requests() < 3 {
        tokio::task::yield_now().await;
    }
    let r = call(&app, Method::POST, "/v1/functions/wide/invoke", None, &[], png(4, 4)).await;
    r.problem(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(r.headers.contains_key("retry-after"));
    drop(held);
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
}

async fn wait_for(app: &Arc<App>, id: &str, status: &str) -> Value {
    for _ in 0..2000 {
        let v = call(app, Method::GET, &format!("/v1/invocations/{id}"), None, &[], vec![]).await.json();
        if v["status"] == status {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("invocation {id} never became {status}");
}

#[tokio::test]
async fn asynchronous_invocations_complete_retry_and_dead_letter() {
    let app = start(config()).await;
    deploy(&app, THUMB).await;
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke?width=10",
        None,
        &[("prefer", "respond-async")],
        png(40, 20),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.headers["preference-applied"], "respond-async");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(r.headers["location"], format!("/v1/invocations/{id}").as_str());
    let done = wait_for(&app, &id, "succeeded").await;
    assert_eq!(done["result"]["renditions"][0]["width"], 10);
    let bytes = call(&app, Method::GET, done["result"]["url"].as_str().unwrap(), None, &[], vec![]).await;
    assert_eq!(bytes.headers["content-type"], "image/png");
    assert_eq!(image::load_from_memory(&bytes.body).unwrap().height(), 5);

    // Bad parameters are refused before anything is queued.
    call(&app, Method::POST, "/v1/functions/thumb/invoke?width=0", None, &[("prefer", "respond-async")], png(4, 4))
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_parameter");
    // Input no retry can fix is dead-lettered after one attempt.
    let r =
        call(&app, Method::POST, "/v1/functions/thumb/invoke", None, &[("prefer", "respond-async")], b"junk".to_vec())
            .await;
    let bad = r.json()["id"].as_str().unwrap().to_owned();
    let dead = wait_for(&app, &bad, "dead").await;
    assert_eq!((dead["attempts"].as_u64(), dead["error"]["code"].as_str()), (Some(1), Some("unsupported_format")));
    call(&app, Method::GET, "/v1/dead-letters", None, &[], vec![])
        .await
        .problem(StatusCode::UNAUTHORIZED, "unauthorized");
    let letters = call(&app, Method::GET, "/v1/dead-letters", Some(ADMIN), &[], vec![]).await.json();
    assert_eq!(letters["dead_letters"][0]["id"], bad.as_str());
    let redriven = call(&app, Method::POST, &format!("/v1/invocations/{bad}/redrive"), Some(ADMIN), &[], vec![]).await;
    assert_eq!(redriven.status, StatusCode::ACCEPTED);
    wait_for(&app, &bad, "dead").await;
    call(&app, Method::POST, &format!("/v1/invocations/{id}/redrive"), Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::CONFLICT, "not_dead_lettered");
    call(&app, Method::GET, "/v1/invocations/zz", None, &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "invocation_not_found");
}

#[tokio::test]
async fn retryable_failures_back_off_then_dead_letter() {
    // An allowed origin that refuses connections: every attempt fails in a way a retry could
    // fix. (A full function no longer fails an attempt: it waits, see `dispatch`.)
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = config();
    c.url_policy = pixflow_server::fetch::UrlPolicy {
        hosts: vec![format!("127.0.0.1:{port}")],
        private: vec!["127.0.0.0/8".parse().unwrap()],
        tls: pixflow_server::fetch::Tls::default(),
    };
    let app = start(c).await;
    deploy(
        &app,
        "name: flaky\nversion: '1'\nbuiltin: flip\nauth: none\n\
         retry: {attempts: 3, backoff: 10ms, max_backoff: 20ms}\n",
    )
    .await;
    let doc = json!({"input": {"url": format!("http://127.0.0.1:{port}/img.png")}});
    let headers = [("prefer", "respond-async"), ("content-type", "application/json")];
    let r = call(&app, Method::POST, "/v1/functions/flaky/invoke", None, &headers, doc.to_string().into_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let dead = wait_for(&app, &id, "dead").await;
    assert_eq!((dead["attempts"].as_u64(), dead["error"]["code"].as_str()), (Some(3), Some("origin_failed")));
}

#[tokio::test]
async fn queued_work_and_deployed_functions_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("pixflow-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    std::fs::write(functions.join("flip.yaml"), "name: flipper\nversion: '1'\nbuiltin: flip\nauth: none\n").unwrap();
    let mut c = Config::new(dir.join("data"));
    c.functions_dir = Some(functions.clone());
    c.async_workers = 0;
    let started = App::start(c.clone(), None).await.unwrap();
    // First start: an admin token is made, shown once and kept beside the state (owner only).
    let token = started.new_admin_token.unwrap();
    let on_disk = std::fs::read_to_string(dir.join("data/admin-token")).unwrap();
    assert_eq!(on_disk.trim(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("data/admin-token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let app = started.app;
    assert!(app.registry.get("flipper").is_some());
    let put = call(&app, Method::PUT, "/v1/functions/thumb", Some(&token), &[], THUMB.as_bytes().to_vec()).await;
    assert_eq!(put.status, StatusCode::CREATED);
    let r =
        call(&app, Method::POST, "/v1/functions/thumb/invoke", None, &[("prefer", "respond-async")], png(32, 32)).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    app.shutdown().await;
    drop(app);

    c.async_workers = 1;
    let again = App::start(c, None).await.unwrap();
    assert!(again.new_admin_token.is_none());
    let app = again.app;
    assert!(app.registry.get("thumb").is_some() && app.registry.get("flipper").is_some());
    assert_eq!(call(&app, Method::GET, "/v1/functions", Some(&token), &[], vec![]).await.status, StatusCode::OK);
    let done = wait_for(&app, &id, "succeeded").await;
    assert_eq!(done["result"]["renditions"][0]["width"], 16);
    app.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_over_a_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = start(config()).await;
    deploy(
        &app,
        "name: one\nversion: '1'\nbuiltin: flip\nquota: {concurrency: 1}\nscaling: {min: 1, max: 1}\nauth: none\n",
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pixflow_server::serve(app.clone(), listener, async move {
        let _ = stop_rx.await;
    }));
    let f = app.registry.get("one").unwrap();
    let held = f.pool.acquire(Duration::from_secs(5)).await.unwrap();
    let body = png(6, 6);
    let client = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/functions/one/invoke HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    while f.pool.stats().queued == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Stop while the request waits; it must still be answered.
    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(held);
    let answer = client.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn the_example_functions_deploy_from_their_folder_and_answer() {
    let mut c = config();
    c.functions_dir = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/functions"));
    let app = start(c).await;
    let r = call(&app, Method::POST, "/v1/functions/thumbnail-800/invoke?format=jpeg", None, &[], png(1600, 900)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "image/jpeg");
    let img = image::load_from_memory(&r.body).unwrap();
    assert_eq!((img.width(), img.height()), (800, 450));
    let r = call(&app, Method::POST, "/v1/functions/poster-webp/invoke?text=Hello", Some(ADMIN), &[], png(2400, 1600))
        .await;
    assert_eq!((r.status, r.headers["content-type"].to_str().unwrap()), (StatusCode::OK, "image/webp"));
    assert_eq!(image::load_from_memory(&r.body).unwrap().width(), 1200);
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/image-info/invoke",
        None,
        &[("content-type", "image/png")],
        png(37, 21),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.json(), json!({"format": "png", "width": 37, "height": 21}));
    // The program's own errors are relayed as it answered them.
    let r = call(&app, Method::POST, "/v1/functions/image-info/invoke", None, &[], b"nope".to_vec()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let m = String::from_utf8(call(&app, Method::GET, "/metrics", None, &[], vec![]).await.body).unwrap();
    assert!(m.contains("pixflow_cold_start_seconds_count{function=\"image-info\"}"), "{m}");
    // Stored results: the upload by reference, two renditions back as CDN objects.
    bucket(&app, "media", json!({"public": true})).await;
    // A process function's answer is stored with its media type; its errors are relayed.
    let info =
        json!({"input": {"base64": B64.encode(png(5, 3))}, "output": {"bucket": "media", "key": "info/{id}.{ext}"}});
    let r = invoke_json(&app, "image-info", info).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let o = &r.json()["objects"][0];
    assert!(o["key"].as_str().unwrap().ends_with(".json"), "{o}");
    assert_eq!(o["content_type"], "application/json");
    let stored = call(
        &app,
        Method::GET,
        &format!("/v1/buckets/media/objects/{}", o["key"].as_str().unwrap()),
        Some(ADMIN),
        &[],
        vec![],
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&stored.body).unwrap(),
        json!({"format": "png", "width": 5, "height": 3})
    );
    let bad = json!({"input": {"base64": B64.encode(b"nope")}, "output": {"bucket": "media", "key": "info/bad.json"}});
    assert_eq!(invoke_json(&app, "image-info", bad).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    call(&app, Method::GET, "/v1/buckets/media/objects/info/bad.json", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    put_object(&app, "media/objects/uploads/hero.png", &[("content-type", "image/png")], png(2400, 1200)).await;
    let r = invoke_json(&app, "cms-renditions", json!({"input": {"bucket": "media", "key": "uploads/hero.png"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let objects = r.json()["objects"].as_array().unwrap().clone();
    let got: Vec<_> =
        objects.iter().map(|o| (o["key"].as_str().unwrap().to_owned(), o["width"].as_u64().unwrap())).collect();
    assert_eq!(
        got,
        [
            ("renditions/uploads/hero-large.webp".to_owned(), 1600),
            ("renditions/uploads/hero-small.webp".to_owned(), 400)
        ]
    );
    for o in &objects {
        let path = o["url"].as_str().unwrap().trim_start_matches("http://127.0.0.1:8080").to_owned();
        let served = call(&app, Method::GET, &path, None, &[], vec![]).await;
        assert_eq!(served.headers["content-type"], "image/webp");
        assert_eq!(image::load_from_memory(&served.body).unwrap().width() as u64, o["width"].as_u64().unwrap());
    }
    // Its program runs as our child until the node stops.
    assert!(!example_children().is_empty());
    app.shutdown().await;
    for _ in 0..500 {
        if example_children().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(example_children(), Vec::<String>::new(), "the example's program outlived the node");
}

/// A process function that misbehaves on request: sleeps, allocates, or exits mid-request.
const UNRULY: &str = r#"
import os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlparse, parse_qs

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        q = parse_qs(urlparse(self.path).query)
        if "sleep" in q:
            time.sleep(float(q["sleep"][0]))
        if "alloc" in q:
            n = int(q["alloc"][0]) << 20
            b = bytearray(n)
            for i in range(0, n, 4096):
                b[i] = 1
        if "exit" in q:
            os._exit(3)
        out = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

#[tokio::test]
async fn process_functions_are_killed_at_timeout_limited_in_memory_and_restarted() {
    let dir = std::env::temp_dir().join(format!("pixflow-unruly-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("unruly.py"), UNRULY).unwrap();
    // Only `small`'s timeout is under test; the others get room for a cold start or a large
    // allocation on a loaded machine.
    let manifest = |name: &str, memory: &str, timeout: &str| {
        format!(
            "name: {name}\nversion: '1'\nprocess: {{command: [python3, unruly.py]}}\n\
             quota: {{memory: {memory}, timeout: {timeout}, concurrency: 1}}\nscaling: {{min: 1, max: 1}}\nauth: none\n"
        )
    };
    std::fs::write(dir.join("small.yaml"), manifest("small", "128Mi", "5s")).unwrap();
    std::fs::write(dir.join("large.yaml"), manifest("large", "2Gi", "60s")).unwrap();
    let from_zero =
        manifest("idle", "128Mi", "60s").replace("scaling: {min: 1, max: 1}", "scaling: {min: 0, max: 1, initial: 0}");
    std::fs::write(dir.join("idle.yaml"), from_zero).unwrap();
    let mut c = config();
    c.functions_dir = Some(dir.clone());
    let app = start(c).await;
    let invoke = |name: &'static str, query: &'static str| {
        let app = app.clone();
        async move {
            call(&app, Method::POST, &format!("/v1/functions/{name}/invoke{query}"), None, &[], vec![1, 2, 3]).await
        }
    };
    // At zero instances a request waits for the cold start.
    assert_eq!(app.registry.get("idle").unwrap().pool.stats().ready, 0);
    let cold = invoke("idle", "").await;
    assert_eq!(cold.status, StatusCode::OK, "{}", String::from_utf8_lossy(&cold.body));
    let first = invoke("small", "").await;
    assert_eq!(first.status, StatusCode::OK, "{}", String::from_utf8_lossy(&first.body));
    let pid = String::from_utf8(first.body).unwrap();

    // Past the timeout: 504, and the stuck instance is killed and replaced.
    invoke("small", "?sleep=30").await.problem(StatusCode::GATEWAY_TIMEOUT, "timeout");
    let after = invoke("small", "").await;
    assert_eq!(after.status, StatusCode::OK, "{}", String::from_utf8_lossy(&after.body));
    let new_pid = String::from_utf8(after.body).unwrap();
    assert_ne!(pid, new_pid, "the timed-out instance still serves");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} outlived its timeout");

    // Memory: 400 MiB does not fit a 128 MiB quota, and does fit a 2 GiB one.
    invoke("small", "?alloc=400").await.problem(StatusCode::BAD_GATEWAY, "function_failed");
    assert_eq!(invoke("large", "?alloc=400").await.status, StatusCode::OK);

    // A crash mid-request: 502, then a fresh instance serves the next request.
    invoke("small", "?exit=1").await.problem(StatusCode::BAD_GATEWAY, "function_failed");
    assert_eq!(invoke("small", "").await.status, StatusCode::OK);
    let m = String::from_utf8(call(&app, Method::GET, "/metrics", None, &[], vec![]).await.body).unwrap();
    assert!(m.contains("pixflow_instance_restarts_total{function=\"small\",reason=\"timeout\"}"), "{m}");
    assert!(m.contains("pixflow_instance_restarts_total{function=\"small\",reason=\"failed\"}"), "{m}");
    app.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn untrusted_requests_get_specific_problems_before_work() {
    let mut c = config();
    c.async_workers = 0;
    c.max_async_queued = 1;
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let uri = "/v1/functions/thumb/invoke";
    let json = [("content-type", "application/json")];
    // Nested parameters are refused without being built.
    let nested = format!("{{\"params\": {{\"width\": [{}0]}}}}", "0,".repeat(10_000));
    call(&app, Method::POST, uri, None, &json, nested.into_bytes())
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_request");
    // A declared body over the quota is refused before it is read.
    call(&app, Method::POST, uri, None, &[("content-length", "999999999")], vec![])
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
    call(&app, Method::GET, uri, None, &[], vec![]).await.problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    call(&app, Method::GET, "/v1/dead-letters?limit=many", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_request");
    // The asynchronous queue is bounded.
    let a = call(&app, Method::POST, uri, None, &[("prefer", "respond-async")], png(4, 4)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    call(&app, Method::POST, uri, None, &[("prefer", "respond-async")], png(4, 4))
        .await
        .problem(StatusCode::SERVICE_UNAVAILABLE, "async_queue_full");
    // A configured admin token must be long enough to be a secret.
    let mut weak = config();
    weak.admin_token = Some("short".into());
    assert!(App::start(weak, None).await.is_err());
}

#[tokio::test]
async fn an_attempt_lost_with_its_node_is_retried_and_the_last_one_dead_lettered() {
    let dir = std::env::temp_dir().join(format!("pixflow-lost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = Config::new(&dir);
    c.admin_token = Some(ADMIN.into());
    c.async_workers = 0;
    let app = start(c.clone()).await;
    deploy(&app, "name: once\nversion: '1'\nbuiltin: flip\nauth: none\nretry: {attempts: 2}\n").await;
    let r =
        call(&app, Method::POST, "/v1/functions/once/invoke", None, &[("prefer", "respond-async")], png(4, 4)).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // Two attempts start and their node dies each time (the leases run out unanswered).
    for _ in 0..2 {
        let d = app.queue.claim("invocations", Duration::ZERO).await.unwrap().unwrap();
        app.invocations.start(&id, &d.lease.token()).await.unwrap().unwrap();
    }
    app.shutdown().await;
    c.async_workers = 1;
    let app = start(c).await;
    let dead = wait_for(&app, &id, "dead").await;
    assert_eq!(dead["error"]["code"], "attempt_lost");
    app.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn completions_are_posted_to_allowed_callback_urls() {
    use axum::routing::post;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let hook = axum::Router::new().route(
        "/done",
        post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let id = headers["x-pixflow-invocation-id"].to_str().unwrap().to_owned();
                tx.send((id, serde_json::from_slice(&body).unwrap())).unwrap();
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });

    let mut c = config();
    c.callback_allow = vec![hook_addr.to_string()];
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let url = format!("http://{hook_addr}/done");
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke",
        None,
        &[("prefer", "respond-async"), ("x-callback-url", &url)],
        png(32, 32),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let (got_id, status) = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got_id, id);
    assert_eq!(
        (status["status"].as_str(), status["result"]["renditions"][0]["width"].as_u64()),
        (Some("succeeded"), Some(16))
    );
    // Anywhere else is refused when the invocation is submitted.
    call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke",
        None,
        &[("prefer", "respond-async"), ("x-callback-url", "http://169.254.169.254/")],
        png(4, 4),
    )
    .await
    .problem(StatusCode::UNPROCESSABLE_ENTITY, "callback_not_allowed");
}

#[tokio::test]
async fn load_scales_a_function_out_and_queued_requests_run_on_the_new_instances() {
    let app = start(config()).await;
    deploy(
        &app,
        "name: wide\nversion: '1'\nbuiltin: flip\nauth: none\nquota: {concurrency: 1}\n\
         scaling: {min: 1, max: 4, target_concurrency: 1, panic_window: 1s, stable_window: 10s}\n",
    )
    .await;
    let f = app.registry.get("wide").unwrap();
    assert_eq!(f.pool.stats().ready, 1);
    // The one instance is busy; three more requests wait. Only new instances can serve them.
    let held = f.pool.acquire(Duration::from_secs(5)).await.unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(
                async move { call(&app, Method::POST, "/v1/functions/wide/invoke", None, &[], png(4, 4)).await },
            )
        })
        .collect();
    for w in waiting {
        assert_eq!(w.await.unwrap().status, StatusCode::OK);
    }
    assert!(f.pool.stats().ready >= 2, "{:?}", f.pool.stats());
    drop(held);
}

/// Pids of this test process's children running the example's program (threads included:
/// tokio spawns children from its worker threads).
fn example_children() -> Vec<String> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace() {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.contains("image_info.py") {
                pids.push(pid.to_owned());
            }
        }
    }
    pids
}

// ---- object storage, the CDN edge and stored results ----

async fn invoke_token(app: &Arc<App>) -> String {
    let t = call(app, Method::POST, "/v1/tokens", Some(ADMIN), &[], br#"{"role": "invoke", "label": "cms"}"#.to_vec())
        .await;
    t.json()["token"].as_str().unwrap().to_owned()
}

async fn bucket(app: &Arc<App>, name: &str, settings: Value) {
    let r = call(app, Method::PUT, &format!("/v1/buckets/{name}"), Some(ADMIN), &[], settings.to_string().into_bytes())
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
}

async fn put_object(app: &Arc<App>, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    call(app, Method::PUT, &format!("/v1/buckets/{path}"), Some(ADMIN), headers, body).await
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest as _;
    md5::Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn objects_round_trip_with_conditions_ranges_and_listing() {
    let mut c = config();
    c.max_object_bytes = 1 << 20;
    let app = start(c).await;
    let token = invoke_token(&app).await;
    // Buckets: admin only; PUT again updates.
    call(&app, Method::PUT, "/v1/buckets/media", None, &[], vec![])
        .await
        .problem(StatusCode::UNAUTHORIZED, "unauthorized");
    call(&app, Method::PUT, "/v1/buckets/media", Some(&token), &[], vec![])
        .await
        .problem(StatusCode::FORBIDDEN, "forbidden");
    call(&app, Method::PUT, "/v1/buckets/No_Good", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::BAD_REQUEST, "invalid_bucket_name");
    bucket(&app, "media", json!({})).await;
    let again = call(&app, Method::PUT, "/v1/buckets/media", Some(ADMIN), &[], vec![]).await;
    assert_eq!(again.status, StatusCode::OK);

    let body = b"0123456789".to_vec();
    let etag = format!("\"{}\"", md5_hex(&body));
    let r = put_object(
        &app,
        "media/objects/docs/a%20b.txt",
        &[("content-type", "text/plain"), ("x-pixflow-meta-origin", "cms")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["etag"], etag.as_str());
    assert_eq!((r.json()["key"].as_str(), r.json()["size"].as_u64()), (Some("docs/a b.txt"), Some(10)));
    assert!(r.json().get("url").is_none(), "a private bucket's objects have no CDN URL");

    let get = |headers: Vec<(&'static str, String)>| {
        let app = app.clone();
        let token = token.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            call(&app, Method::GET, "/v1/buckets/media/objects/docs/a%20b.txt", Some(&token), &h, vec![]).await
        }
    };
    let r = get(vec![]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, &body[..]));
    assert_eq!(r.headers["content-type"], "text/plain");
    assert_eq!(r.headers["etag"], etag.as_str());
    assert_eq!(r.headers["x-pixflow-meta-origin"], "cms");
    assert_eq!(r.headers["accept-ranges"], "bytes");
    let last_modified = r.headers["last-modified"].to_str().unwrap().to_owned();
    let head = call(&app, Method::HEAD, "/v1/buckets/media/objects/docs/a%20b.txt", Some(&token), &[], vec![]).await;
    assert_eq!((head.status, head.body.len()), (StatusCode::OK, 0));
    assert_eq!(head.headers["content-length"], "10");

    // Conditional reads.
    let r = get(vec![("if-none-match", etag.clone())]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(r.headers["etag"], etag.as_str());
    assert_eq!(get(vec![("if-none-match", "\"other\", W/".to_owned() + &etag)]).await.status, StatusCode::NOT_MODIFIED);
    assert_eq!(get(vec![("if-modified-since", last_modified.clone())]).await.status, StatusCode::NOT_MODIFIED);
    get(vec![("if-match", "\"stale\"".into())]).await.problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert_eq!(get(vec![("if-match", etag.clone())]).await.status, StatusCode::OK);
    // Ranges.
    let r = get(vec![("range", "bytes=2-4".into())]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"234"[..]));
    assert_eq!(r.headers["content-range"], "bytes 2-4/10");
    let r = get(vec![("range", "bytes=-3".into())]).await;
    assert_eq!(r.body, b"789");
    let r = get(vec![("range", "bytes=10-".into())]).await;
    r.problem(StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable");
    assert_eq!(r.headers["content-range"], "bytes */10");
    let r = get(vec![("range", "bytes=0-1".into()), ("if-range", "\"stale\"".into())]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 10));

    // Conditional writes.
    let path = "media/objects/docs/a%20b.txt";
    put_object(&app, path, &[("if-none-match", "*")], b"x".to_vec())
        .await
        .problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    put_object(&app, path, &[("if-match", "\"stale\"")], b"x".to_vec())
        .await
        .problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = put_object(&app, path, &[("if-match", &etag)], b"new".to_vec()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(vec![]).await.body, b"new");

    // Untrusted keys, sizes and digests.
    for bad in ["media/objects/a/../b", "media/objects/a/%00b", "media/objects/a//b", "media/objects/dir/"] {
        put_object(&app, bad, &[], b"x".to_vec()).await.problem(StatusCode::BAD_REQUEST, "invalid_key");
    }
    put_object(&app, "media/objects/big", &[("content-length", "2000000")], vec![0; 16])
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "object_too_large");
    put_object(&app, "media/objects/big", &[], vec![0; (1 << 20) + 1])
        .await
        .problem(StatusCode::PAYLOAD_TOO_LARGE, "object_too_large");
    put_object(&app, "media/objects/d", &[("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")], b"x".to_vec())
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_digest");
    put_object(&app, "nobucket/objects/k", &[], b"x".to_vec()).await.problem(StatusCode::NOT_FOUND, "no_such_bucket");
    call(&app, Method::GET, "/v1/buckets/media/objects/nope", Some(&token), &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    call(&app, Method::GET, "/v1/buckets/media/objects/docs/a%20b.txt", None, &[], vec![])
        .await
        .problem(StatusCode::UNAUTHORIZED, "unauthorized");

    // Listing: prefix, delimiter, pages.
    for k in ["p/1", "p/2", "p/q/1", "p/q/2", "p/r/1"] {
        assert_eq!(put_object(&app, &format!("media/objects/{k}"), &[], b"x".to_vec()).await.status, StatusCode::OK);
    }
    let list = |q: String| {
        let app = app.clone();
        let token = token.clone();
        async move { call(&app, Method::GET, &format!("/v1/buckets/media/objects?{q}"), Some(&token), &[], vec![]).await }
    };
    let v = list("prefix=p/&delimiter=/".into()).await.json();
    let keys: Vec<_> = v["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["p/1", "p/2"]);
    assert_eq!(v["prefixes"], json!(["p/q/", "p/r/"]));
    assert!(v["next_cursor"].is_null());
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("prefix=p/&limit=2&cursor={c}"),
            None => "prefix=p/&limit=2".into(),
        };
        let v = list(q).await.json();
        seen.extend(v["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["p/1", "p/2", "p/q/1", "p/q/2", "p/r/1"]);
    list("cursor=%21%21".into()).await.problem(StatusCode::BAD_REQUEST, "bad_request");
    list("limit=x".into()).await.problem(StatusCode::BAD_REQUEST, "bad_request");

    // Deletes: idempotent objects, buckets only when empty.
    call(&app, Method::DELETE, "/v1/buckets/media", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::CONFLICT, "bucket_not_empty");
    let del = call(&app, Method::DELETE, "/v1/buckets/media/objects/p/1", Some(&token), &[], vec![]).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let again = call(&app, Method::DELETE, "/v1/buckets/media/objects/p/1", Some(&token), &[], vec![]).await;
    assert_eq!(again.status, StatusCode::NO_CONTENT);
    call(&app, Method::GET, "/v1/buckets/media/objects/p/1", Some(&token), &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    let listed = call(&app, Method::GET, "/v1/buckets", Some(&token), &[], vec![]).await.json();
    assert_eq!(listed["buckets"][0]["name"], "media");
    app.shutdown().await;
}

#[tokio::test]
async fn the_cdn_serves_public_buckets_with_http_caching() {
    let app = start(config()).await;
    bucket(&app, "private", json!({})).await;
    bucket(&app, "public", json!({"public": true, "cache_control": "public, max-age=60"})).await;
    let img = png(20, 10);
    put_object(&app, "private/objects/a.png", &[("content-type", "image/png")], img.clone()).await;
    let put =
        put_object(&app, "public/objects/x/%E7%8C%AB%20a.png", &[("content-type", "image/png")], img.clone()).await;
    let url = put.json()["url"].as_str().unwrap().to_owned();
    assert_eq!(url, "http://127.0.0.1:8080/cdn/public/x/%E7%8C%AB%20a.png");
    let path = url.trim_start_matches("http://127.0.0.1:8080").to_owned();

    // Private or missing buckets look like missing objects.
    for hidden in ["/cdn/private/a.png", "/cdn/nobucket/a.png", "/cdn/public/none.png"] {
        call(&app, Method::GET, hidden, None, &[], vec![]).await.problem(StatusCode::NOT_FOUND, "no_such_key");
    }
    let r = call(&app, Method::GET, &path, None, &[], vec![]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, img.as_slice()));
    assert_eq!(r.headers["cache-control"], "public, max-age=60");
    assert_eq!(r.headers["content-type"], "image/png");
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", md5_hex(&img)));
    assert!(r.headers.contains_key("last-modified"));
    let r = call(&app, Method::GET, &path, None, &[("if-none-match", &etag)], vec![]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(r.headers["cache-control"], "public, max-age=60");
    let r = call(&app, Method::GET, &path, None, &[("range", "bytes=0-7")], vec![]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &img[..8]));
    let r = call(&app, Method::GET, &format!("{path}?download"), None, &[], vec![]).await;
    assert_eq!(
        r.headers["content-disposition"],
        "attachment; filename=\"_ a.png\"; filename*=UTF-8''%E7%8C%AB%20a.png"
    );
    let r = call(&app, Method::GET, &format!("{path}?download=poster.png"), None, &[], vec![]).await;
    assert!(r.headers["content-disposition"].to_str().unwrap().contains("filename=\"poster.png\""));
    call(&app, Method::GET, &format!("{path}?width=100"), None, &[], vec![])
        .await
        .problem(StatusCode::BAD_REQUEST, "bad_request");
    // A bucket's default Cache-Control is the node's.
    bucket(&app, "plain", json!({"public": true})).await;
    put_object(&app, "plain/objects/a.png", &[], img.clone()).await;
    put_object(&app, "plain/objects/blob.bin", &[], b"not a known format".to_vec()).await;
    let r = call(&app, Method::GET, "/cdn/plain/a.png", None, &[], vec![]).await;
    assert_eq!(r.headers["cache-control"], "public, max-age=3600");
    // Uploaded without a Content-Type: sniffed from its first bytes.
    assert_eq!(r.headers["content-type"], "image/png");
    let r = call(&app, Method::GET, "/cdn/plain/blob.bin", None, &[], vec![]).await;
    assert_eq!(r.headers["content-type"], "application/octet-stream");
    app.shutdown().await;
}

async fn invoke_json(app: &Arc<App>, function: &str, doc: Value) -> Reply {
    call(
        app,
        Method::POST,
        &format!("/v1/functions/{function}/invoke"),
        Some(ADMIN),
        &[("content-type", "application/json")],
        doc.to_string().into_bytes(),
    )
    .await
}

#[tokio::test]
async fn functions_read_stored_inputs_and_store_their_results() {
    let app = start(config()).await;
    bucket(&app, "media", json!({"public": true})).await;
    bucket(&app, "uploads", json!({})).await;
    let source = png(64, 32);
    let up = put_object(&app, "uploads/objects/2026/cat.png", &[("content-type", "image/png")], source.clone()).await;
    let source_etag = up.json()["etag"].as_str().unwrap().to_owned();
    // The CMS case: the manifest names where results go.
    deploy(
        &app,
        "name: thumb-store\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\noverridable: [format]\n\
         quota: {max_request_bytes: 100}\n\
         output: {bucket: media, key: 'thumbs/{source_key_stem}-{width}.{ext}'}\n",
    )
    .await;
    // The input comes by reference, so the 100-byte request limit does not bound it.
    let r = invoke_json(&app, "thumb-store", json!({"input": {"bucket": "uploads", "key": "2026/cat.png"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let o = &r.json()["objects"][0];
    assert_eq!((o["bucket"].as_str(), o["key"].as_str()), (Some("media"), Some("thumbs/2026/cat-16.png")));
    assert_eq!((o["width"].as_u64(), o["height"].as_u64()), (Some(16), Some(8)));
    assert_eq!(o["url"], "http://127.0.0.1:8080/cdn/media/thumbs/2026/cat-16.png");
    let served = call(&app, Method::GET, "/cdn/media/thumbs/2026/cat-16.png", None, &[], vec![]).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(format!("\"{}\"", o["etag"].as_str().unwrap()), served.headers["etag"].to_str().unwrap());
    assert_eq!(o["size"].as_u64(), Some(served.body.len() as u64));
    let thumb = image::load_from_memory(&served.body).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (16, 8));

    // A pinned ETag must still match; missing objects are named.
    let pinned = json!({"input": {"bucket": "uploads", "key": "2026/cat.png", "etag": source_etag}, "params": {"format": "webp"}});
    let r = invoke_json(&app, "thumb-store", pinned).await;
    assert_eq!(r.json()["objects"][0]["key"], "thumbs/2026/cat-16.webp");
    let stale = json!({"input": {"bucket": "uploads", "key": "2026/cat.png", "etag": "0000"}});
    invoke_json(&app, "thumb-store", stale).await.problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let missing = json!({"input": {"bucket": "uploads", "key": "2026/dog.png"}});
    invoke_json(&app, "thumb-store", missing).await.problem(StatusCode::NOT_FOUND, "no_such_key");
    let traversal = json!({"input": {"bucket": "uploads", "key": "../state.db"}});
    invoke_json(&app, "thumb-store", traversal).await.problem(StatusCode::BAD_REQUEST, "invalid_key");
    // Inline input: the request limit applies, and the template's source key cannot be filled.
    let inline = json!({"input": {"base64": B64.encode(png(1, 1))}});
    let p = invoke_json(&app, "thumb-store", inline).await.problem(StatusCode::BAD_REQUEST, "bad_request");
    assert!(p["detail"].as_str().unwrap().contains("object reference"), "{p}");
    let too_big = json!({"input": {"base64": B64.encode(png(64, 64))}});
    invoke_json(&app, "thumb-store", too_big).await.problem(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");

    // A request may name its own output; content-addressed keys from {hash}.
    deploy(&app, THUMB).await;
    let doc =
        json!({"input": {"base64": B64.encode(png(32, 32))}, "output": {"bucket": "media", "key": "h/{hash}.{ext}"}});
    let r = invoke_json(&app, "thumb", doc).await;
    let key = r.json()["objects"][0]["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("h/") && key.len() == "h/.png".len() + 16, "{key}");
    let stored = call(&app, Method::GET, &format!("/v1/buckets/media/objects/{key}"), Some(ADMIN), &[], vec![]).await;
    let digest = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&stored.body).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(&key[2..18], &digest[..16]);

    // Several renditions: keys must differ, checked before anything is stored.
    deploy(
        &app,
        "name: sizes\nversion: '1'\npipeline:\n  - {op: resize, params: {width: 32}}\n  - {op: output, params: {name: large.png}}\n  - {op: resize, params: {width: 8}}\n  - {op: output, params: {name: small.png}}\n",
    )
    .await;
    let src = json!({"bucket": "uploads", "key": "2026/cat.png"});
    let r = invoke_json(&app, "sizes", json!({"input": src, "output": {"bucket": "media", "key": "same.png"}})).await;
    r.problem(StatusCode::BAD_REQUEST, "bad_request");
    call(&app, Method::GET, "/v1/buckets/media/objects/same.png", Some(ADMIN), &[], vec![])
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    let r = invoke_json(
        &app,
        "sizes",
        json!({"input": src, "output": {"bucket": "media", "key": "r/{source_name}-{name}.{ext}"}}),
    )
    .await;
    let keys: Vec<_> =
        r.json()["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, ["r/cat-large.png", "r/cat-small.png"]);
    // Output into a bucket that does not exist.
    let r = invoke_json(&app, "thumb", json!({"input": src, "output": {"bucket": "nobucket", "key": "k.png"}})).await;
    r.problem(StatusCode::NOT_FOUND, "no_such_bucket");
    // A manifest with a bad output template does not deploy.
    let bad = "name: badout\nversion: '1'\nbuiltin: flip\noutput: {bucket: media, key: '{nope}.png'}\n";
    let p = deploy(&app, bad).await.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest");
    assert_eq!(p["errors"][0]["field"], "output", "{p}");
    let bad = "name: badout\nversion: '1'\nbuiltin: flip\noutput: {bucket: Media_1, key: 'a.png'}\n";
    let p = deploy(&app, bad).await.problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest");
    assert_eq!(p["errors"][0]["field"], "output.bucket", "{p}");

    // Asynchronously: the worker reads the stored input and stores the results.
    let submit = |doc: Value| {
        let app = app.clone();
        async move {
            let h = [("content-type", "application/json"), ("prefer", "respond-async")];
            call(&app, Method::POST, "/v1/functions/thumb-store/invoke", Some(ADMIN), &h, doc.to_string().into_bytes())
                .await
        }
    };
    let r = submit(json!({"input": src, "params": {"format": "webp"}})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, &id, "succeeded").await;
    assert_eq!(done["result"]["objects"][0]["key"], "thumbs/2026/cat-16.webp", "{done}");
    let res = call(&app, Method::GET, &format!("/v1/invocations/{id}/result"), None, &[], vec![]).await;
    assert_eq!(res.status, StatusCode::SEE_OTHER);
    assert_eq!(res.headers["location"], "/v1/buckets/media/objects/thumbs/2026/cat-16.webp");
    // A missing stored input is refused at submission.
    submit(json!({"input": {"bucket": "uploads", "key": "nope.png"}}))
        .await
        .problem(StatusCode::NOT_FOUND, "no_such_key");
    app.shutdown().await;
}

/// The node's change feed keeps what its configuration says: older changes are trimmed, and a
/// reader whose cursor they were is told it fell behind.
#[tokio::test]
async fn the_change_feed_keeps_what_the_node_is_configured_to() {
    let mut c = config();
    c.feed_retention = pixflow_backends::Retention { max_records: 2, max_age: Duration::from_secs(3600) };
    let app = start(c).await;
    assert_eq!(
        app.objects.feed().retention(),
        pixflow_backends::Retention { max_records: 2, max_age: Duration::from_secs(3600) }
    );
    bucket(&app, "media", json!({})).await;
    for k in ["a", "b", "c", "d"] {
        assert!(put_object(&app, &format!("media/objects/{k}.bin"), &[], vec![1]).await.status.is_success());
    }
    app.objects.feed().trim().await.unwrap();
    let last = app.objects.feed().last().await.unwrap();
    assert_eq!(app.objects.feed().oldest().await.unwrap(), last - 1);
    assert!(matches!(app.objects.feed().read(0, 10).await, Err(pixflow_backends::FeedError::Behind { cursor: 0, .. })));
    app.shutdown().await;
}

// ---- CDN transformations: presets, signed ad-hoc URLs, negotiation, edge cache ----

/// The same pipeline with objects in an S3 service: registration of the service's buckets,
/// streamed uploads, stored results, CDN reads and transformations, listing, deletes.
#[cfg(feature = "s3")]
#[tokio::test]
async fn the_pipeline_runs_over_an_s3_service() {
    use pixflow_backends::objects::test_server;
    let root = scratch("s3-service");
    // The node's spool bucket is the operator's to create in the service, like the others.
    for b in ["media", "uploads", pixflow_server::DEFAULT_SPOOL_BUCKET] {
        std::fs::create_dir_all(root.join(b)).unwrap();
    }
    let mut c = config();
    c.objects_s3 = Some(test_server::config(test_server::start(&root).await.unwrap()));
    let app = start(c.clone()).await;
    assert_eq!(app.objects.kind(), "s3");
    bucket(&app, "media", json!({"public": true, "cache_control": "public, max-age=60"})).await;
    bucket(&app, "uploads", json!({})).await;
    let r = call(
        &app,
        Method::PUT,
        "/v1/buckets/ghost",
        Some(ADMIN),
        &[("content-type", "application/json")],
        b"{}".to_vec(),
    )
    .await;
    r.problem(StatusCode::UNPROCESSABLE_ENTITY, "bucket_not_in_service");
    let source = png(64, 32);
    let up = put_object(&app, "uploads/objects/2026/cat.png", &[], source.clone()).await;
    assert!(up.status.is_success(), "{}", String::from_utf8_lossy(&up.body));
    assert_eq!(up.json()["content_type"], "image/png", "sniffed");
    // The bytes are in the service, under the same key, byte for byte.
    assert_eq!(std::fs::read(root.join("uploads/2026/cat.png")).unwrap(), source);
    put_object(&app, "uploads/objects/2026/k%C3%A4tze%20%25.png", &[], source.clone()).await;
    assert_eq!(std::fs::read(root.join("uploads/2026/kätze %.png")).unwrap(), source);
    // Sending to the service holds the body in memory, so it counts on the node.
    let mut small = c;
    small.data_dir = scratch("s3-small-node");
    small.node.max_held_bytes = 1 << 20;
    let small = start(small).await;
    bucket(&small, "uploads", json!({})).await;
    let r = put_object(&small, "uploads/objects/big.bin", &[], vec![7; 2 << 20]).await;
    r.problem(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert!(!root.join("uploads/big.bin").exists());
    small.shutdown().await;
    // A service nobody answers stops the start, naming the setting (a service lost while the
    // node runs: `outage.rs`). The port stays bound without listening for the whole test, so
    // connections are refused and no other program can take it meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let mut dead = config();
    dead.objects_s3 = Some(test_server::config(format!("http://127.0.0.1:{port}")));
    let Err(refused) = App::start(dead, None).await else { panic!("a node started on a service that does not answer") };
    assert!(refused.to_string().contains("--objects-s3-endpoint"), "{refused:#}");
    drop(reserved);
    // A service without the node's spool bucket stops the start too, naming that setting.
    let bare = scratch("s3-service-without-spool");
    std::fs::create_dir_all(bare.join("media")).unwrap();
    let mut unspooled = config();
    unspooled.objects_s3 = Some(test_server::config(test_server::start(&bare).await.unwrap()));
    let Err(refused) = App::start(unspooled, None).await else { panic!("a node started without its spool bucket") };
    let refused = format!("{refused:#}");
    assert!(refused.contains("--spool-bucket") && refused.contains(pixflow_server::DEFAULT_SPOOL_BUCKET), "{refused}");
    deploy(
        &app,
        "name: thumb-store\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\n\
         output: {bucket: media, key: 'thumbs/{source_key_stem}-{width}.{ext}'}\ncdn: {}\n",
    )
    .await;
    let r = invoke_json(&app, "thumb-store", json!({"input": {"bucket": "uploads", "key": "2026/cat.png"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let o = &r.json()["objects"][0];
    assert_eq!(o["key"], "thumbs/2026/cat-16.png");
    let served = cdn_get(&app, "/cdn/media/thumbs/2026/cat-16.png", &[]).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.headers["cache-control"], "public, max-age=60");
    assert_eq!(format!("\"{}\"", o["etag"].as_str().unwrap()), served.headers["etag"].to_str().unwrap());
    let etag = served.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(
        cdn_get(&app, "/cdn/media/thumbs/2026/cat-16.png", &[("if-none-match", &etag)]).await.status,
        StatusCode::NOT_MODIFIED
    );
    let part = cdn_get(&app, "/cdn/media/thumbs/2026/cat-16.png", &[("range", "bytes=1-3")]).await;
    assert_eq!((part.status, &part.body[..]), (StatusCode::PARTIAL_CONTENT, &served.body[1..4]));
    // A preset transforms a stored source on the fly, cached at the edge.
    let public = serde_json::to_vec(&json!({"public": true})).unwrap();
    let r =
        call(&app, Method::PUT, "/v1/buckets/uploads", Some(ADMIN), &[("content-type", "application/json")], public)
            .await;
    assert_eq!(r.status, StatusCode::OK);
    let first = cdn_get(&app, "/cdn/p/thumb-store/uploads/2026/cat.png", &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", String::from_utf8_lossy(&first.body));
    assert_eq!(image::load_from_memory(&first.body).unwrap().width(), 16);
    assert_eq!(cdn_get(&app, "/cdn/p/thumb-store/uploads/2026/cat.png", &[]).await.headers["x-cache"], "HIT");
    // Overwriting the source through pixflow purges what derives from it.
    put_object(&app, "uploads/objects/2026/cat.png", &[], png(32, 32)).await;
    let again = cdn_get(&app, "/cdn/p/thumb-store/uploads/2026/cat.png", &[]).await;
    assert_eq!(
        (again.headers["x-cache"].to_str().unwrap(), image::load_from_memory(&again.body).unwrap().height()),
        ("MISS", 16)
    );
    let listed = call(&app, Method::GET, "/v1/buckets/media/objects?prefix=thumbs/", Some(ADMIN), &[], vec![]).await;
    assert_eq!(listed.json()["objects"][0]["key"], "thumbs/2026/cat-16.png");
    let gone =
        call(&app, Method::DELETE, "/v1/buckets/media/objects/thumbs/2026/cat-16.png", Some(ADMIN), &[], vec![]).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    assert!(!root.join("media/thumbs/2026/cat-16.png").exists());
    cdn_get(&app, "/cdn/media/thumbs/2026/cat-16.png", &[]).await.problem(StatusCode::NOT_FOUND, "no_such_key");
    // The S3-compatible endpoint serves only the embedded store.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(pixflow_server::s3::serve(app.clone(), listener).await.is_err());
    app.shutdown().await;
}

/// The S3-compatible endpoint with a client written elsewhere (`object_store`, the one the S3
/// backend uses): writes, conditional creates, reads and listings, then a shutdown that does
/// not wait for the client's idle kept-alive connection.
#[cfg(feature = "s3")]
#[tokio::test]
async fn the_s3_endpoint_serves_another_client_and_lets_idle_connections_go_at_shutdown() {
    use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
    let mut c = config();
    c.s3_access_key = Some("cms".into());
    c.s3_secret_key = Some("0123456789abcdef".into());
    let app = start(c).await;
    bucket(&app, "media", json!({})).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = tokio::spawn(pixflow_server::s3::serve(app.clone(), listener));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = |secret: &str| {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://{addr}"))
            .with_allow_http(true)
            .with_bucket_name("media")
            .with_region("us-east-1")
            .with_access_key_id("cms")
            .with_secret_access_key(secret)
            .with_retry(object_store::RetryConfig { max_retries: 0, ..Default::default() })
            .build()
            .unwrap()
    };
    let s3 = client("0123456789abcdef");
    let path = object_store::path::Path::parse("a/b ü.txt").unwrap();
    s3.put(&path, bytes::Bytes::from_static(b"hello").into()).await.unwrap();
    assert_eq!(&s3.get(&path).await.unwrap().bytes().await.unwrap()[..], b"hello");
    assert_eq!(app.objects.head("media", "a/b ü.txt").await.unwrap().size, 5);
    let create = PutOptions { mode: PutMode::Create, ..Default::default() };
    let again = s3.put_opts(&path, bytes::Bytes::from_static(b"other").into(), create).await;
    assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");
    let listed = s3.list_with_delimiter(Some(&"a".into())).await.unwrap();
    assert_eq!(listed.objects.iter().map(|o| o.location.to_string()).collect::<Vec<_>>(), ["a/b ü.txt"]);
    assert!(client("a-wrong-secret-key").get(&path).await.is_err());
    // The client keeps its connection open; the node stops anyway, at once.
    let stopping = std::time::Instant::now();
    app.shutdown().await;
    endpoint.await.unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5), "{:?}", stopping.elapsed());
}

async fn cdn_get(app: &Arc<App>, path: &str, headers: &[(&str, &str)]) -> Reply {
    call(app, Method::GET, path, None, headers, vec![]).await
}

async fn sign(app: &Arc<App>, ops: &str, bucket: &str, key: &str) -> String {
    let r = call(
        app,
        Method::POST,
        "/v1/cdn/sign",
        Some(ADMIN),
        &[],
        json!({"ops": ops, "bucket": bucket, "key": key}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    r.json()["url"].as_str().unwrap().trim_start_matches("http://127.0.0.1:8080").to_owned()
}

const CDN_PRESET: &str = "name: small\nversion: '1'\nbuiltin: resize\nparams: {width: 16}\n\
                          cdn: {auto_format: true, cache_control: 'public, max-age=31536000, immutable'}\n";

/// Waits until the edge's purge follower has handled every change committed so far (it follows
/// the change feed in a task of its own). A condition, not a time budget: the bound only ends a
/// broken run.
async fn purges_caught_up(app: &Arc<App>) {
    let feed = app.objects.feed();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while feed.cursor(pixflow_server::cdn::PURGE_CURSOR).await.unwrap() < feed.last().await.unwrap() {
        assert!(tokio::time::Instant::now() < until, "the purge follower caught up with the change feed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cdn_presets_negotiate_formats_and_cache_at_the_edge() {
    let app = start(config()).await;
    bucket(&app, "public", json!({"public": true})).await;
    bucket(&app, "private", json!({})).await;
    put_object(&app, "public/objects/cat.png", &[("content-type", "image/png")], png(64, 32)).await;
    put_object(&app, "private/objects/cat.png", &[("content-type", "image/png")], png(64, 32)).await;
    // The sources' own changes are purged before anything derives from them.
    purges_caught_up(&app).await;
    deploy(&app, CDN_PRESET).await;
    deploy(&app, THUMB).await;
    let webp = [("accept", "image/webp,*/*")];
    let r = cdn_get(&app, "/cdn/p/small/public/cat.png", &webp).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        (r.headers["content-type"].to_str().unwrap(), r.headers["x-cache"].to_str().unwrap()),
        ("image/webp", "MISS")
    );
    assert_eq!(r.headers["vary"], "Accept");
    assert_eq!(r.headers["cache-control"], "public, max-age=31536000, immutable");
    let img = image::load_from_memory(&r.body).unwrap();
    assert_eq!((img.width(), img.height()), (16, 8));
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    // The same Accept capability, written differently: the same cache entry.
    let again = cdn_get(&app, "/cdn/p/small/public/cat.png", &[("accept", "image/webp")]).await;
    assert_eq!((again.headers["x-cache"].to_str().unwrap(), again.body.as_slice()), ("HIT", r.body.as_slice()));
    assert_eq!(again.headers["etag"].to_str().unwrap(), etag);
    let avif = cdn_get(&app, "/cdn/p/small/public/cat.png", &[("accept", "image/avif,image/webp")]).await;
    assert_eq!(avif.headers["content-type"], "image/avif");
    let own = cdn_get(&app, "/cdn/p/small/public/cat.png", &[]).await;
    assert_eq!(own.headers["content-type"], "image/png");
    assert_eq!(app.cdn.transformations(), 3);
    // Conditional and ranged reads of a transformed result.
    let r = cdn_get(&app, "/cdn/p/small/public/cat.png", &[("accept", "image/webp"), ("if-none-match", &etag)]).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(r.headers["vary"], "Accept");
    let r = cdn_get(&app, "/cdn/p/small/public/cat.png", &[("accept", "image/webp"), ("range", "bytes=0-3")]).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::PARTIAL_CONTENT, &b"RIFF"[..]));
    assert_eq!(app.cdn.transformations(), 3);

    // Only presets, only public buckets.
    cdn_get(&app, "/cdn/p/thumb/public/cat.png", &[]).await.problem(StatusCode::NOT_FOUND, "no_such_preset");
    cdn_get(&app, "/cdn/p/small/private/cat.png", &[]).await.problem(StatusCode::NOT_FOUND, "no_such_key");
    cdn_get(&app, "/cdn/p/small/public/dog.png", &[]).await.problem(StatusCode::NOT_FOUND, "no_such_key");

    // Overwriting the source: a new ETag, so a miss, and its old derivatives are purged.
    let before = app.cdn.cache.stats().entries;
    assert_eq!(before, 3);
    put_object(&app, "public/objects/cat.png", &[("content-type", "image/png")], png(32, 32)).await;
    purges_caught_up(&app).await;
    assert_eq!(app.cdn.cache.stats().entries, 0, "derivatives of an overwritten object are purged");
    let r = cdn_get(&app, "/cdn/p/small/public/cat.png", &webp).await;
    assert_eq!(r.headers["x-cache"], "MISS");
    assert_eq!(image::load_from_memory(&r.body).unwrap().height(), 16);
    // Purge by prefix through the API.
    let p = call(
        &app,
        Method::POST,
        "/v1/cdn/purge",
        Some(ADMIN),
        &[],
        br#"{"bucket": "public", "prefix": "ca"}"#.to_vec(),
    )
    .await;
    assert_eq!(p.json()["purged"], 1);
    let token = invoke_token(&app).await;
    call(&app, Method::POST, "/v1/cdn/purge", Some(&token), &[], br#"{"bucket": "public", "key": "cat.png"}"#.to_vec())
        .await
        .problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(cdn_get(&app, "/cdn/p/small/public/cat.png", &webp).await.headers["x-cache"], "MISS");
    app.shutdown().await;
}

/// The edge follows the change feed from a saved cursor: an overwrite made while the node was
/// down purges that object's derivatives at the next start, and only those.
#[tokio::test]
async fn cdn_purges_at_start_what_changed_while_the_node_was_down() {
    let c = config();
    let app = start(c.clone()).await;
    bucket(&app, "public", json!({"public": true})).await;
    put_object(&app, "public/objects/cat.png", &[("content-type", "image/png")], png(64, 32)).await;
    put_object(&app, "public/objects/dog.png", &[("content-type", "image/png")], png(64, 32)).await;
    deploy(&app, CDN_PRESET).await;
    purges_caught_up(&app).await;
    for path in ["/cdn/p/small/public/cat.png", "/cdn/p/small/public/dog.png"] {
        assert_eq!(cdn_get(&app, path, &[]).await.headers["x-cache"], "MISS");
    }
    assert_eq!(app.cdn.cache.stats().entries, 2);
    app.shutdown().await;
    drop(app);

    // While no node runs, another writer of the store overwrites one source.
    let objects = pixflow_backends::Objects::open(&c.data_dir.join("objects")).await.unwrap();
    let none = std::collections::BTreeMap::new();
    let condition = pixflow_backends::Condition::None;
    objects.put("public", "cat.png", "image/png", &none, &condition, &png(32, 32)).await.unwrap();
    objects.close().await;

    let app = start(c).await;
    purges_caught_up(&app).await;
    assert_eq!(app.cdn.cache.stats().entries, 1, "the overwritten object's derivative went, the other stayed");
    // The state of this node is in memory: the preset is deployed again, the same.
    deploy(&app, CDN_PRESET).await;
    assert_eq!(cdn_get(&app, "/cdn/p/small/public/dog.png", &[]).await.headers["x-cache"], "HIT");
    let cat = cdn_get(&app, "/cdn/p/small/public/cat.png", &[]).await;
    assert_eq!(cat.headers["x-cache"], "MISS");
    assert_eq!(image::load_from_memory(&cat.body).unwrap().height(), 16);
    app.shutdown().await;
}

/// Who made each object change is in the change feed: a token (label and id), a function storing
/// its results (synchronously or from the queue), the S3 endpoint's access key (tested there).
#[tokio::test]
async fn object_changes_are_recorded_with_who_made_them() {
    use pixflow_backends::{ActorKind, ChangeKind};
    let app = start(config()).await;
    bucket(&app, "media", json!({})).await;
    let token = invoke_token(&app).await;
    let put = call(&app, Method::PUT, "/v1/buckets/media/objects/a.png", Some(&token), &[], png(8, 8)).await;
    assert_eq!(put.status, StatusCode::OK);
    deploy(&app, THUMB).await;
    let doc = json!({"input": {"base64": B64.encode(png(32, 32))}, "output": {"bucket": "media", "key": "sync.{ext}"}});
    assert_eq!(invoke_json(&app, "thumb", doc).await.status, StatusCode::OK);
    let del = call(&app, Method::DELETE, "/v1/buckets/media/objects/a.png", Some(&token), &[], vec![]).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let doc =
        json!({"input": {"base64": B64.encode(png(32, 32))}, "output": {"bucket": "media", "key": "async.{ext}"}});
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke",
        Some(ADMIN),
        &[("content-type", "application/json"), ("prefer", "respond-async")],
        doc.to_string().into_bytes(),
    )
    .await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    wait_for(&app, &id, "succeeded").await;
    let records = app.objects.feed().read(0, 100).await.unwrap();
    let seen: Vec<_> = records
        .iter()
        .map(|r| (r.kind, r.key.as_str(), r.actor.kind, r.actor.name.split('#').next().unwrap(), r.actor.depth))
        .collect();
    assert_eq!(
        seen,
        [
            (ChangeKind::Put, "a.png", ActorKind::Token, "cms", 0),
            (ChangeKind::Put, "sync.png", ActorKind::Function, "thumb", 1),
            (ChangeKind::Delete, "a.png", ActorKind::Token, "cms", 0),
            (ChangeKind::Put, "async.png", ActorKind::Function, "thumb", 1),
        ]
    );
    // The token's id: the first 8 hex digits of its SHA-256.
    let digest = {
        use sha2::Digest as _;
        sha2::Sha256::digest(token.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(records[0].actor.name, format!("cms#{digest}"));
    app.shutdown().await;
}

#[tokio::test]
async fn cdn_ad_hoc_urls_need_a_valid_signature() {
    let app = start(config()).await;
    bucket(&app, "public", json!({"public": true})).await;
    put_object(&app, "public/objects/photos/cat%201.png", &[("content-type", "image/png")], png(64, 64)).await;
    let url = sign(&app, "resize,width=20+convert,format=webp", "public", "photos/cat 1.png").await;
    assert!(
        url.starts_with("/cdn/t/") && url.ends_with("/resize,width=20+convert,format=webp/public/photos/cat%201.png"),
        "{url}"
    );
    let r = cdn_get(&app, &url, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "image/webp");
    assert!(r.headers.get("vary").is_none());
    assert_eq!(image::load_from_memory(&r.body).unwrap().width(), 20);
    // Any change to the signed path, or no signature: 403.
    let tampered = url.replace("width=20", "width=2000");
    cdn_get(&app, &tampered, &[]).await.problem(StatusCode::FORBIDDEN, "bad_signature");
    let other_key = url.replace("cat%201.png", "cat%202.png");
    cdn_get(&app, &other_key, &[]).await.problem(StatusCode::FORBIDDEN, "bad_signature");
    cdn_get(&app, "/cdn/t/_/resize,width=20/public/photos/cat%201.png", &[])
        .await
        .problem(StatusCode::FORBIDDEN, "bad_signature");
    cdn_get(&app, "/cdn/t/AAAA/resize,width=20/public/photos/cat%201.png", &[])
        .await
        .problem(StatusCode::FORBIDDEN, "bad_signature");
    // Bad operations are refused before any work, signed or not.
    let r = call(
        &app,
        Method::POST,
        "/v1/cdn/sign",
        Some(ADMIN),
        &[],
        br#"{"ops": "explode", "bucket": "public", "key": "k"}"#.to_vec(),
    )
    .await;
    r.problem(StatusCode::BAD_REQUEST, "unknown_operation");
    let r = call(
        &app,
        Method::POST,
        "/v1/cdn/sign",
        Some(ADMIN),
        &[],
        br#"{"ops": "watermark,image=logo.png", "bucket": "public", "key": "k"}"#.to_vec(),
    )
    .await;
    r.problem(StatusCode::BAD_REQUEST, "bad_request");
    let auto = sign(&app, "resize,width=10+convert,format=auto", "public", "photos/cat 1.png").await;
    let r = cdn_get(&app, &auto, &[("accept", "image/avif")]).await;
    assert_eq!(
        (r.headers["content-type"].to_str().unwrap(), r.headers["vary"].to_str().unwrap()),
        ("image/avif", "Accept")
    );
    app.shutdown().await;

    // An operator may allow unsigned URLs.
    let mut c = config();
    c.cdn_allow_unsigned = true;
    let app = start(c).await;
    bucket(&app, "public", json!({"public": true})).await;
    put_object(&app, "public/objects/a.png", &[], png(40, 40)).await;
    let r = cdn_get(&app, "/cdn/t/_/resize,width=10/public/a.png", &[]).await;
    assert_eq!(image::load_from_memory(&r.body).unwrap().width(), 10);
    cdn_get(&app, "/cdn/t/_/resize,width=0/public/a.png", &[]).await.problem(StatusCode::BAD_REQUEST, "bad_parameter");
    app.shutdown().await;
}

/// A foreign decoder that blocks until the test lets it go, holding the node's CPU.
struct Gate {
    entered: std::sync::atomic::AtomicBool,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl pixflow_imageops::ForeignDecoder for Gate {
    fn decode(
        &self,
        _: pixflow_imageops::Format,
        _: &[u8],
        _: &pixflow_imageops::Limits,
    ) -> pixflow_imageops::Result<Option<image::DynamicImage>> {
        self.entered.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.release.lock().unwrap().recv();
        Ok(Some(image::DynamicImage::new_rgb8(8, 8)))
    }
}

/// The smallest HEIF/AVIF the engine hands to a foreign decoder: a brand and an 8x8 `ispe`.
fn heif_8x8() -> Vec<u8> {
    let mut b = b"\0\0\0\x14ftypavif\0\0\0\0mif1\0\0\0\x14ispe\0\0\0\0".to_vec();
    b.extend_from_slice(&8u32.to_be_bytes());
    b.extend_from_slice(&8u32.to_be_bytes());
    b
}

#[tokio::test]
async fn identical_cdn_requests_in_flight_run_one_transformation() {
    let mut c = config();
    c.cdn_allow_unsigned = true;
    // No cache: only coalescing can make several requests share one run.
    c.cdn_cache_memory = 0;
    c.cdn_cache_disk = 0;
    c.node.cpus = 1;
    let (release, gate) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate { entered: false.into(), release: std::sync::Mutex::new(gate) });
    let foreign: Arc<dyn pixflow_imageops::ForeignDecoder + Send + Sync> = gate.clone();
    let app = App::start(c, Some(foreign)).await.unwrap().app;
    bucket(&app, "public", json!({"public": true})).await;
    put_object(&app, "public/objects/big.png", &[], png(160, 160)).await;
    // The node's only CPU is held by another request until the CDN requests have all arrived.
    deploy(&app, "name: held\nversion: '1'\nbuiltin: flip\nauth: none\n").await;
    let holder = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, Method::POST, "/v1/functions/held/invoke", None, &[], heif_8x8()).await })
    };
    wait_until("the CPU is held", || gate.entered.load(std::sync::atomic::Ordering::Acquire)).await;
    let path = "/cdn/t/_/resize,width=80+blur,sigma=2/public/big.png";
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { cdn_get(&app, path, &[]).await })
        })
        .collect();
    wait_until("every request waits on the one transformation", || app.cdn.coalesced() == 7).await;
    release.send(()).unwrap();
    assert_eq!(holder.await.unwrap().status, StatusCode::OK);
    let mut bodies = Vec::new();
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(app.cdn.transformations(), 1, "8 identical requests in flight share one transformation");
    // Nothing was cached: a later request runs again.
    cdn_get(&app, path, &[]).await;
    assert_eq!(app.cdn.transformations(), 2);
    app.shutdown().await;
}

/// Waits until `cond` holds; the bound only ends a broken run.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn the_edge_cache_survives_a_restart() {
    let mut c = config();
    c.cdn_allow_unsigned = true;
    let app = start(c.clone()).await;
    bucket(&app, "public", json!({"public": true})).await;
    put_object(&app, "public/objects/a.png", &[], png(40, 40)).await;
    let path = "/cdn/t/_/resize,width=10/public/a.png";
    assert_eq!(cdn_get(&app, path, &[]).await.headers["x-cache"], "MISS");
    app.shutdown().await;
    drop(app);
    let app = start(c).await;
    let r = cdn_get(&app, path, &[]).await;
    assert_eq!((r.status, r.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "HIT"));
    assert_eq!(app.cdn.transformations(), 0);
    app.shutdown().await;
}

// ---- URL sources behind the allow-list and the SSRF guard ----

/// A small origin on loopback: an image, a redirect, a large answer.
async fn origin() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::routing::get;
    let img = png(48, 24);
    let router = axum::Router::new()
        .route("/img.png", get(move || async move { ([("content-type", "image/png")], img.clone()) }))
        .route("/moved", get(|| async { (StatusCode::FOUND, [("location", "http://169.254.169.254/")], "") }))
        .route("/big", get(|| async { vec![0u8; 300_000] }))
        // The same bytes without a Content-Length: chunks until they are done.
        .route(
            "/streamed",
            get(|| async {
                let chunks = (0..30).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 10_000])));
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(async move { axum::serve(listener, router).await.unwrap() }))
}

/// An https origin on loopback serving one image, with a certificate for `name` from a CA
/// made here; returns its address and the CA's PEM.
async fn tls_origin(name: &str) -> (std::net::SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let img = bytes::Bytes::from(png(48, 24));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, img) = (acceptor.clone(), img.clone());
            tokio::spawn(async move {
                // Clients that do not trust the CA end the handshake here.
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |_req| {
                    let img = img.clone();
                    async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(img))) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test]
async fn https_sources_are_verified_against_the_trusted_roots() {
    let (addr, ca) = tls_origin("127.0.0.1").await;
    let (other, other_ca) = tls_origin("images.example.com").await;
    let doc = json!({"input": {"url": format!("https://127.0.0.1:{}/img.png", addr.port())}});
    let policy = |tls| pixflow_server::fetch::UrlPolicy {
        hosts: vec![format!("127.0.0.1:{}", addr.port()), format!("127.0.0.1:{}", other.port())],
        private: vec!["127.0.0.0/8".parse().unwrap()],
        tls,
    };
    // Mozilla's roots alone do not know this origin's CA.
    let mut c = config();
    c.url_policy = policy(pixflow_server::fetch::Tls::default());
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let p = invoke_json(&app, "thumb", doc.clone()).await.problem(StatusCode::BAD_GATEWAY, "origin_failed");
    assert!(p["detail"].as_str().unwrap().contains("certificate"), "{p}");
    app.shutdown().await;
    // With the operator's CA the image comes over TLS.
    let mut c = config();
    c.url_policy = policy(pixflow_server::fetch::Tls::with_roots(ca.as_bytes()).unwrap());
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let r = invoke_json(&app, "thumb", doc).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["renditions"][0]["width"].as_u64(), Some(16));
    app.shutdown().await;
    // A trusted certificate for another name is refused: it must name the URL's host.
    let mut c = config();
    let both = format!("{ca}{other_ca}");
    c.url_policy = policy(pixflow_server::fetch::Tls::with_roots(both.as_bytes()).unwrap());
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let wrong = json!({"input": {"url": format!("https://127.0.0.1:{}/img.png", other.port())}});
    let p = invoke_json(&app, "thumb", wrong).await.problem(StatusCode::BAD_GATEWAY, "origin_failed");
    assert!(p["detail"].as_str().unwrap().contains("not valid for name"), "{p}");
    app.shutdown().await;
}

#[tokio::test]
async fn url_sources_reach_only_allowed_public_origins() {
    let (addr, server) = origin().await;
    let doc = |path: &str| json!({"input": {"url": format!("http://{addr}{path}")}});
    // Allowed host, but a loopback address: the SSRF guard refuses it.
    let mut c = config();
    c.url_policy =
        pixflow_server::fetch::UrlPolicy { hosts: vec!["127.0.0.1".into(), "localhost".into()], ..Default::default() };
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let p = invoke_json(&app, "thumb", doc("/img.png")).await.problem(StatusCode::FORBIDDEN, "url_not_allowed");
    assert!(p["detail"].as_str().unwrap().contains("not a public address"), "{p}");
    let by_name = json!({"input": {"url": format!("http://localhost:{}/img.png", addr.port())}});
    invoke_json(&app, "thumb", by_name).await.problem(StatusCode::FORBIDDEN, "url_not_allowed");
    for (url, code) in [
        ("http://169.254.169.254/latest/meta-data/", "url_not_allowed"),
        ("http://[::ffff:127.0.0.1]/", "url_not_allowed"),
        ("https://127.0.0.1/a.png", "url_not_allowed"),
        ("gopher://127.0.0.1/", "url_not_allowed"),
    ] {
        let r = invoke_json(&app, "thumb", json!({"input": {"url": url}})).await;
        assert_eq!(r.json()["code"], code, "{url}: {}", String::from_utf8_lossy(&r.body));
    }
    app.shutdown().await;

    // The operator allows the loopback range: the image is fetched and processed.
    let mut c = config();
    c.url_policy = pixflow_server::fetch::UrlPolicy {
        hosts: vec![format!("127.0.0.1:{}", addr.port())],
        private: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let app = start(c).await;
    deploy(&app, THUMB).await;
    let r = invoke_json(&app, "thumb", doc("/img.png")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        (r.json()["renditions"][0]["width"].as_u64(), r.json()["renditions"][0]["height"].as_u64()),
        (Some(16), Some(8))
    );
    let p = invoke_json(&app, "thumb", doc("/moved")).await.problem(StatusCode::BAD_GATEWAY, "origin_failed");
    assert!(p["detail"].as_str().unwrap().contains("redirects are not followed"), "{p}");
    invoke_json(&app, "thumb", doc("/missing")).await.problem(StatusCode::BAD_GATEWAY, "origin_failed");
    deploy(&app, "name: tiny\nversion: '1'\nbuiltin: flip\nquota: {max_input_bytes: 100000}\nauth: none\n").await;
    invoke_json(&app, "tiny", doc("/big")).await.problem(StatusCode::PAYLOAD_TOO_LARGE, "origin_too_large");
    let p =
        invoke_json(&app, "tiny", doc("/streamed")).await.problem(StatusCode::PAYLOAD_TOO_LARGE, "origin_too_large");
    assert!(p["detail"].as_str().unwrap().contains("more than 100000"), "{p}");
    // Another port on the same host is not an allowed origin.
    let other = json!({"input": {"url": "http://127.0.0.1:1/img.png"}});
    invoke_json(&app, "thumb", other).await.problem(StatusCode::FORBIDDEN, "url_not_allowed");
    // Asynchronously: checked at submission, fetched when the attempt runs.
    let r = call(
        &app,
        Method::POST,
        "/v1/functions/thumb/invoke",
        None,
        &[("content-type", "application/json"), ("prefer", "respond-async")],
        doc("/img.png").to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let done = wait_for(&app, r.json()["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["result"]["renditions"][0]["width"], 16);
    app.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn anonymous_callers_of_open_functions_reach_only_public_objects() {
    let app = start(config()).await;
    bucket(&app, "public", json!({"public": true})).await;
    bucket(&app, "private", json!({})).await;
    put_object(&app, "public/objects/a.png", &[], png(32, 32)).await;
    put_object(&app, "private/objects/a.png", &[], png(32, 32)).await;
    deploy(&app, THUMB).await;
    let anon = |doc: Value| {
        let app = app.clone();
        async move {
            let h = [("content-type", "application/json")];
            call(&app, Method::POST, "/v1/functions/thumb/invoke", None, &h, doc.to_string().into_bytes()).await
        }
    };
    let r = anon(json!({"input": {"bucket": "public", "key": "a.png"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    anon(json!({"input": {"bucket": "private", "key": "a.png"}})).await.problem(StatusCode::NOT_FOUND, "no_such_key");
    let store = json!({"input": {"bucket": "public", "key": "a.png"}, "output": {"bucket": "public", "key": "x.png"}});
    anon(store.clone()).await.problem(StatusCode::UNAUTHORIZED, "unauthorized");
    // With a token, both work.
    assert_eq!(
        invoke_json(&app, "thumb", json!({"input": {"bucket": "private", "key": "a.png"}})).await.status,
        StatusCode::OK
    );
    assert_eq!(invoke_json(&app, "thumb", store).await.status, StatusCode::OK);
    app.shutdown().await;
}

/// With `--queue nats` the node's asynchronous invocations go through NATS JetStream (when
/// `PIXFLOW_TEST_NATS_URL` names a server; `.ci/run` sets it).
#[tokio::test]
async fn asynchronous_invocations_run_through_a_nats_queue() {
    let Some(url) = std::env::var("PIXFLOW_TEST_NATS_URL").ok().filter(|u| !u.is_empty()) else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: skipped the NATS queue of a node (set PIXFLOW_TEST_NATS_URL=nats://127.0.0.1:4222)"
        );
        return;
    };
    let mut c = config();
    c.queue = pixflow_server::QueueBackend::Nats { url, namespace: None };
    c.node_name = format!("api-nats-{}", std::process::id());
    c.async_workers = 1;
    let app = start(c).await;
    deploy(&app, "name: nats-flip\nversion: '1'\nbuiltin: flip\nauth: none\n").await;
    let r = call(&app, Method::POST, "/v1/functions/nats-flip/invoke", None, &[("prefer", "respond-async")], png(4, 4))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, &id, "succeeded").await;
    assert_eq!(done["attempts"], 1);
    app.shutdown().await;
}
