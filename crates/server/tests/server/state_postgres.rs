//! Nodes sharing one PostgreSQL state, end to end through their routers (`Router::oneshot`):
//! what one node writes (tokens, functions, asynchronous invocations) the other sees and does,
//! its registry following deploys and removals made through the other.
//! Runs when `PIXFLOW_TEST_POSTGRES_URL` names a server (`.ci/run` sets it; a configured server
//! that does not answer fails the test), in a schema made for the test, so other tests, runs
//! and branches on the same database neither see its rows nor share its migrations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use pixflow_server::{App, Config, StateBackend};
use serde_json::json;

use crate::api::{call, png};

use crate::support::{Schema, unique};

const ADMIN: &str = "pfx_test-admin-token";

fn postgres_url() -> Option<String> {
    let url = std::env::var("PIXFLOW_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: skipped the nodes sharing a PostgreSQL state (set PIXFLOW_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test)"
        );
    }
    url
}

/// A node on the shared state, with a data folder of its own.
async fn node(url: &str, name: &str, async_workers: usize) -> Arc<App> {
    let dir = std::env::temp_dir().join(unique(&format!("pixflow-node-{name}")));
    let mut c = Config::new(&dir);
    c.state = StateBackend::Postgres { url: url.to_owned() };
    c.node_name = unique(name);
    c.admin_token = Some(ADMIN.into());
    c.async_workers = async_workers;
    c.tick = Duration::from_millis(50);
    App::start(c, None).await.unwrap().app
}

/// `fut`, or a failure after `secs` (a bound on a wait that should end, never a measurement).
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after {secs} s"))
}

/// Waits until `done` holds, for at most 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_tokens_functions_and_asynchronous_work() {
    let Some(server) = postgres_url() else { return };
    let schema = Schema::create(&server).await;
    // A only accepts asynchronous work; B's worker runs it.
    let a = node(&schema.url, "a", 0).await;
    let b = node(&schema.url, "b", 1).await;

    // A token made on A works on B.
    let made = call(
        &a,
        Method::POST,
        "/v1/tokens",
        Some(ADMIN),
        &[],
        json!({"role": "invoke", "label": "cms"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&made.body));
    let token = made.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(call(&b, Method::GET, "/v1/functions", Some(&token), &[], vec![]).await.status, StatusCode::OK);
    let forged = format!("{token}x");
    assert_eq!(
        call(&b, Method::GET, "/v1/functions", Some(&forged), &[], vec![]).await.status,
        StatusCode::UNAUTHORIZED
    );
    // An invoke token is not an admin token on either node.
    let on_b =
        call(&b, Method::POST, "/v1/tokens", Some(&token), &[], json!({"role": "admin"}).to_string().into_bytes())
            .await;
    assert_eq!(on_b.status, StatusCode::FORBIDDEN);

    // A function deployed through A's API is in B's catalogue.
    let name = unique("thumb");
    let manifest = format!("name: {name}\nversion: '1'\nbuiltin: resize\nparams: {{width: 16}}\nauth: none\n");
    let uri = format!("/v1/functions/{name}");
    let deployed = call(&a, Method::PUT, &uri, Some(ADMIN), &[], manifest.clone().into_bytes()).await;
    assert_eq!(deployed.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&deployed.body));
    let listed = b.catalogue.functions().await.unwrap();
    assert!(listed.contains(&(name.clone(), manifest.clone())), "{listed:?}");
    // B's registry follows the catalogue, without a restart or a deploy of its own.
    let version = |app: &Arc<App>| app.registry.get(&name).map(|f| f.deployment.version.clone());
    eventually("B deploys the function", || version(&b).as_deref() == Some("1")).await;

    // Accepted by A, which runs no workers; done by B.
    let invoke = format!("/v1/functions/{name}/invoke");
    let accepted = call(&a, Method::POST, &invoke, None, &[("prefer", "respond-async")], png(64, 32)).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&accepted.body));
    let id = accepted.json()["id"].as_str().unwrap().to_owned();
    let status = format!("/v1/invocations/{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let r = call(&a, Method::GET, &status, None, &[], vec![]).await.json();
        if r["status"] == "succeeded" || r["status"] == "dead" {
            break r;
        }
        assert!(Instant::now() < deadline, "not done within 30 s: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    let result = call(&a, Method::GET, &format!("{status}/result"), None, &[], vec![]).await;
    assert_eq!(result.status, StatusCode::OK);
    let img = image::load_from_memory(&result.body).unwrap();
    assert_eq!((img.width(), img.height()), (16, 8));
    // Both nodes read the same log; the queue holds nothing more.
    assert_eq!(b.invocations.get(&id).await.unwrap().unwrap().status, pixflow_backends::Status::Succeeded);
    assert_eq!(a.queue.stats("invocations").await.unwrap().depth, 0);

    // A new version and a removal through A reach B's registry too.
    let manifest = manifest.replace("version: '1'", "version: '2'");
    let updated = call(&a, Method::PUT, &uri, Some(ADMIN), &[], manifest.into_bytes()).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", String::from_utf8_lossy(&updated.body));
    eventually("B updates the function", || version(&b).as_deref() == Some("2")).await;
    assert_eq!(call(&a, Method::DELETE, &uri, Some(ADMIN), &[], vec![]).await.status, StatusCode::NO_CONTENT);
    eventually("B removes the function", || version(&b).is_none()).await;
    let gone = call(&b, Method::POST, &invoke, None, &[], png(8, 8)).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    // A node's shutdown closes the state under its queue's and catalogue's listeners.
    within(60, "node A's shutdown", a.shutdown()).await;
    within(60, "node B's shutdown", b.shutdown()).await;
    schema.drop().await;
    for app in [a, b] {
        std::fs::remove_dir_all(&app.config.data_dir).unwrap();
    }
}
