//! Asynchronous invocations: their status and results, dead letters and re-driving, and the
//! workers that run them from the durable queue.
//!
//! A worker claims the oldest due invocation, runs it through the same path as a synchronous
//! call (so quotas, queues and node limits apply alike), then records the result, puts it back
//! with exponential backoff (errors a retry can fix: overload, timeouts, internal failures), or
//! dead-letters it (its last attempt failed, or the input itself is wrong, which no retry fixes).
//! While an attempt runs, a heartbeat renews its short lease, so a node that dies leaves its
//! work to other claims within [`LEASE`] (and its own next start takes it back at once); an
//! outcome is recorded only while the row is still this claim's, and an attempt whose row was
//! taken over is given up.
//! An invocation id is an unguessable capability: whoever holds it may read its status.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pixflow_backends::{Claimed, InvocationRow, Status, Store};
use pixflow_runtime::{InvokeError, Produced};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth;
use crate::invoke::{QueuedMeta, output_target, rendition_meta, resolve, storable, store_results};
use crate::problem::Problem;

/// How long a claim is leased without a heartbeat: the longest a running invocation whose node
/// died waits before another claim takes it (its own node's next start takes it back at once).
/// A worker renews the lease every third of it while the attempt runs, however long that is.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

fn describe(row: &InvocationRow) -> Value {
    let mut v = json!({
        "id": row.id,
        "function": row.function,
        "status": row.status.as_str(),
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "created_at_ms": row.created_ms,
        "updated_at_ms": row.updated_ms,
    });
    if row.status == Status::Queued && row.attempts > 0 {
        v["next_attempt_at_ms"] = Value::from(row.next_ms);
    }
    if let Some(e) = &row.error {
        v["error"] = serde_json::from_str(e).unwrap_or_else(|_| Value::String(e.clone()));
    }
    if let Some(m) = &row.result_meta {
        let renditions: Value = serde_json::from_str(m).unwrap_or(Value::Null);
        v["result"] = if is_stored(&renditions) {
            json!({"objects": renditions})
        } else {
            json!({"renditions": renditions, "url": format!("/v1/invocations/{}/result", row.id)})
        };
    }
    v
}

/// Whether a result's renditions went to object storage (they then name their objects).
fn is_stored(renditions: &Value) -> bool {
    renditions.as_array().and_then(|a| a.first()).is_some_and(|r| r.get("key").is_some())
}

fn not_found(id: &str) -> Problem {
    Problem::not_found("invocation_not_found", format!("no invocation `{id}`"))
}

/// Ids are hex; anything else cannot exist (and is not worth a query).
fn check_id(id: &str) -> Result<(), Problem> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found(id));
    }
    Ok(())
}

pub(crate) async fn status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    check_id(&id)?;
    let row = app.store.get(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(describe(&row)))
}

#[derive(Deserialize)]
pub(crate) struct ResultQuery {
    #[serde(default)]
    rendition: usize,
}

/// The bytes of one rendition of a succeeded invocation.
pub(crate) async fn result(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    q: Result<Query<ResultQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    check_id(&id)?;
    let row = app.store.get(&id).await?.ok_or_else(|| not_found(&id))?;
    if row.status != Status::Succeeded {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "invocation_not_done",
            format!("invocation `{id}` is {}", row.status.as_str()),
        ));
    }
    let metas: Vec<Value> = row.result_meta.as_deref().and_then(|m| serde_json::from_str(m).ok()).unwrap_or_default();
    if is_stored(&Value::Array(metas.clone())) {
        // The bytes live in the object store: point there.
        let m = metas.get(q.rendition).ok_or_else(|| {
            Problem::not_found("rendition_not_found", format!("invocation `{id}` has {} renditions", metas.len()))
        })?;
        let path = format!(
            "/v1/buckets/{}/objects/{}",
            m["bucket"].as_str().unwrap_or_default(),
            crate::cdn::key_path(m["key"].as_str().unwrap_or_default())
        );
        let mut resp = StatusCode::SEE_OTHER.into_response();
        if let Ok(v) = HeaderValue::from_str(&path) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(resp);
    }
    let bytes = app.store.result(&id).await?.ok_or_else(|| not_found(&id))?;
    // Renditions are stored back to back; each one's size says where the next begins.
    let mut offset = 0usize;
    for (i, m) in metas.iter().enumerate() {
        let size = m["size"].as_u64().and_then(|s| usize::try_from(s).ok()).unwrap_or(0);
        let end = offset.saturating_add(size).min(bytes.len());
        if i == q.rendition {
            let mut resp = bytes[offset..end].to_vec().into_response();
            let mime = m["content_type"].as_str().unwrap_or("application/octet-stream");
            if let Ok(v) = HeaderValue::from_str(mime) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            return Ok(resp);
        }
        offset = end;
    }
    Err(Problem::not_found("rendition_not_found", format!("invocation `{id}` has {} renditions", metas.len())))
}

#[derive(Deserialize)]
pub(crate) struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn dead_letters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Problem> {
    auth::admin(&app.store, &headers).await?;
    let Query(page) = page.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let rows = app.store.dead_letters(page.after.as_deref(), limit).await?;
    let next = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.id.clone())).flatten();
    Ok(Json(json!({
        "dead_letters": rows.iter().map(describe).collect::<Vec<_>>(),
        "next_after": next,
    })))
}

pub(crate) async fn redrive(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    auth::admin(&app.store, &headers).await?;
    check_id(&id)?;
    if !app.store.redrive(&id).await? {
        return match app.store.get(&id).await? {
            None => Err(not_found(&id)),
            Some(row) => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_dead_lettered",
                format!("invocation `{id}` is {}, not dead-lettered", row.status.as_str()),
            )),
        };
    }
    app.queue_wake.notify_one();
    metrics::counter!("pixflow_async_redriven_total").increment(1);
    let row = app.store.get(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok((StatusCode::ACCEPTED, Json(describe(&row))).into_response())
}

/// One worker: claims and runs queued invocations until the node stops.
pub(crate) async fn worker(app: Arc<App>) {
    work(app, LEASE).await;
}

/// A worker whose claims are leased for `lease`.
async fn work(app: Arc<App>, lease: Duration) {
    while !app.stopping() {
        match app.store.claim(lease).await {
            Ok(Some(claimed)) => run(&app, claimed, lease).await,
            Ok(None) => {
                tokio::select! {
                    () = app.queue_wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming queued invocations");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn problem_json(p: &Problem) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

/// Deletes finished invocations past the retention period, hourly.
pub(crate) async fn retention(app: Arc<App>) {
    while !app.stopping() {
        let keep = i64::try_from(app.config.async_retention.as_millis()).unwrap_or(i64::MAX);
        match app.store.purge_finished(pixflow_backends::state::now_ms().saturating_sub(keep)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "finished asynchronous invocations past retention deleted"),
            Err(e) => tracing::error!(error = %e, "purging finished invocations"),
        }
        tokio::select! {
            () = app.stopped() => {}
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Runs `work` while renewing the lease of `claim` every third of `lease`. `None`: the row was
/// taken over by another claim (this one's lease ran out unrenewed, the store out of reach or
/// the node stalled), and `work` was dropped, as the new owner runs the invocation.
async fn with_lease<F: Future>(store: &Store, id: &str, claim: &str, lease: Duration, work: F) -> Option<F::Output> {
    let heartbeat = async {
        let period = (lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(period).await;
            match store.extend_lease(id, claim, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                // Renewed at the next beat, if the lease has not run out by then.
                Err(e) => tracing::warn!(%id, error = %e, "renewing an invocation's lease"),
            }
        }
    };
    tokio::select! {
        out = work => Some(out),
        () = heartbeat => None,
    }
}

async fn run(app: &Arc<App>, claimed: Claimed, lease: Duration) {
    let Claimed { row, payload, claim } = claimed;
    let recorded = if row.attempts > row.max_attempts {
        // Its last attempt was lost with its node (stopped while running it, maybe because of
        // it). It is not run again.
        let problem = Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "attempt_lost",
            "the node stopped while running the last attempt",
        );
        metrics::counter!("pixflow_dead_letters_total", "function" => row.function.clone()).increment(1);
        app.store.bury(&row.id, &claim, &problem_json(&problem)).await
    } else {
        let Some(outcome) = with_lease(&app.store, &row.id, &claim, lease, attempt(app, &row, payload)).await else {
            tracing::warn!(id = %row.id, function = %row.function, "another claim took this invocation over; attempt given up");
            return;
        };
        match outcome {
            Ok((meta, bytes)) => app.store.finish(&row.id, &claim, &meta, &bytes).await,
            Err((problem, retry)) => {
                let error = problem_json(&problem);
                match retry {
                    Some(delay) if row.attempts < row.max_attempts => {
                        metrics::counter!("pixflow_async_retries_total", "function" => row.function.clone())
                            .increment(1);
                        app.store.retry_at(&row.id, &claim, &error, delay).await
                    }
                    _ => {
                        metrics::counter!("pixflow_dead_letters_total", "function" => row.function.clone())
                            .increment(1);
                        tracing::warn!(id = %row.id, function = %row.function, code = problem.code, "dead-lettered");
                        app.store.bury(&row.id, &claim, &error).await
                    }
                }
            }
        }
    };
    match recorded {
        Ok(true) => notify(app, &row.id).await,
        // Another claim owns the row now; its outcome is the one that counts.
        Ok(false) => {
            tracing::warn!(id = %row.id, function = %row.function, "another claim took this invocation over; outcome dropped");
        }
        // The lease runs out and brings the invocation back; nothing is lost.
        Err(e) => tracing::error!(id = %row.id, error = %e, "recording an invocation's outcome"),
    }
}

/// Sends the completion callback of a finished invocation, if it asked for one.
async fn notify(app: &Arc<App>, id: &str) {
    match app.store.get(id).await {
        Ok(Some(row)) if matches!(row.status, Status::Succeeded | Status::Dead) => {
            if let Some(url) = row.callback.clone() {
                crate::callback::send(app, row.id.clone(), url, describe(&row));
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(%id, error = %e, "reading an invocation for its callback"),
    }
}

/// A result kept in the queue: the renditions' metadata, and their bytes back to back.
fn inline_result(produced: Produced) -> (String, Vec<u8>) {
    match produced {
        Produced::Renditions(renditions) => {
            let metas: Vec<Value> = renditions.iter().map(rendition_meta).collect();
            let bytes = renditions.into_iter().flat_map(|r| r.bytes).collect();
            (serde_json::to_string(&metas).unwrap_or_default(), bytes)
        }
        Produced::Reply(reply) => {
            let metas =
                json!([{"content_type": reply.content_type, "size": reply.bytes.len(), "status": reply.status}]);
            (metas.to_string(), reply.bytes)
        }
    }
}

/// Runs one attempt: the stored result (renditions' metadata, their bytes back to back), or the
/// problem and, when a retry could help, the delay before it.
async fn attempt(
    app: &Arc<App>,
    row: &InvocationRow,
    payload: Vec<u8>,
) -> Result<(String, Vec<u8>), (Problem, Option<Duration>)> {
    let Some(f) = app.registry.get(&row.function) else {
        return Err((crate::functions::not_found(&row.function), None));
    };
    let meta: QueuedMeta = serde_json::from_str(&row.meta)
        .map_err(|e| (Problem::internal(format!("stored invocation {}: {e}", row.id)), None))?;
    let parsed = meta.into_parsed(payload).map_err(|e| (Problem::internal(e), None))?;
    let target = output_target(&f, parsed.output.as_ref()).map_err(|p| (p, None))?;
    // A stored input that went missing or changed will not come back by retrying.
    let (invocation, source_key) = resolve(app, &f, parsed, None).await.map_err(|p| {
        let retry = (p.status >= 500).then(|| f.deployment.retry.delay(row.attempts + 1));
        (p, retry)
    })?;
    match pixflow_runtime::invoke(&app.node, &f, invocation, app.foreign.clone(), None).await {
        // The program answered with an error: its own 5xx may pass on a retry, 4xx not.
        Ok(pixflow_runtime::Output { produced: Produced::Reply(reply), .. }) if !(200..300).contains(&reply.status) => {
            let text = String::from_utf8_lossy(&reply.bytes[..reply.bytes.len().min(500)]).into_owned();
            let problem = Problem::new(
                StatusCode::BAD_GATEWAY,
                "function_error",
                format!("the function answered {}: {text}", reply.status),
            );
            let retry = (reply.status >= 500).then(|| f.deployment.retry.delay(row.attempts + 1));
            Err((problem, retry))
        }
        Ok(out) => match &target {
            None => Ok(inline_result(out.produced)),
            // Stored: the result lists the objects and holds no bytes.
            Some(t) => {
                match store_results(app, &row.function, t, source_key.as_deref(), &row.id, storable(&out.produced))
                    .await
                {
                    Ok(objects) => Ok((serde_json::to_string(&objects).unwrap_or_default(), Vec::new())),
                    Err(p) => {
                        let retry = (p.status >= 500).then(|| f.deployment.retry.delay(row.attempts + 1));
                        Err((p, retry))
                    }
                }
            }
        },
        Err(e) => {
            let retry = e.retryable().then(|| f.deployment.retry.delay(row.attempts + 1));
            let retry = retry.or(match e {
                InvokeError::Engine(pixflow_imageops::Error::Timeout { .. }) => Some(f.deployment.retry.backoff),
                _ => None,
            });
            Err((Problem::from(e), retry))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use pixflow_backends::NewInvocation;
    use pixflow_backends::state::now_ms;

    use super::*;

    fn invocation(id: &str) -> NewInvocation {
        NewInvocation {
            id: id.into(),
            function: "slow".into(),
            max_attempts: 3,
            meta: "{}".into(),
            payload: Vec::new(),
            callback: None,
        }
    }

    /// Polls `done` until it holds, for at most 20 s.
    async fn eventually<F: Future<Output = bool>>(mut done: impl FnMut() -> F) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(Instant::now() < deadline, "not done within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_heartbeat_keeps_the_lease_of_a_long_attempt() {
        let store = Store::memory().await.unwrap();
        store.enqueue(&invocation("a")).await.unwrap();
        let lease = Duration::from_millis(1500);
        let claimed = store.claim(lease).await.unwrap().unwrap();
        let first_end = claimed.row.lease_ms;
        // An attempt that runs until its first lease is long over.
        let long = eventually(|| async { now_ms() > first_end + 2_000 });
        let out = with_lease(&store, "a", &claimed.claim, lease, async {
            long.await;
            // Renewed all along: no other claim can take the row.
            store.claim(lease).await.unwrap().map(|c| c.row.id)
        })
        .await;
        assert_eq!(out, Some(None), "the row was taken over while its attempt ran");
        assert!(store.get("a").await.unwrap().unwrap().lease_ms > first_end);
        assert!(store.finish("a", &claimed.claim, "[]", b"").await.unwrap());
    }

    #[tokio::test]
    async fn an_attempt_whose_row_was_taken_over_is_given_up() {
        let store = Store::memory().await.unwrap();
        store.enqueue(&invocation("a")).await.unwrap();
        let lease = Duration::from_millis(150);
        let stale = store.claim(lease).await.unwrap().unwrap();
        let taker = store.clone();
        let owner = tokio::spawn(async move {
            // Another run of the node takes the row back and claims it.
            taker.requeue_interrupted().await.unwrap();
            taker.claim(Duration::from_secs(60)).await.unwrap().unwrap()
        });
        let given_up = tokio::time::timeout(
            Duration::from_secs(20),
            with_lease(&store, "a", &stale.claim, lease, std::future::pending::<()>()),
        )
        .await
        .unwrap();
        assert_eq!(given_up, None);
        let owner = owner.await.unwrap();
        assert!(!store.finish("a", &stale.claim, "[\"stale\"]", b"stale").await.unwrap());
        assert!(store.finish("a", &owner.claim, "[\"owner\"]", b"owner").await.unwrap());
        assert_eq!(store.get("a").await.unwrap().unwrap().result_meta.as_deref(), Some("[\"owner\"]"));
    }

    /// A node killed while running an invocation (its claim's lease still far from over) runs it
    /// again as soon as it starts.
    #[tokio::test]
    async fn a_restarted_node_reruns_its_interrupted_invocations_at_once() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let dir = std::env::temp_dir().join(format!("pixflow-interrupted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("functions")).unwrap();
        std::fs::write(dir.join("functions/flip.yaml"), "name: flip\nversion: '1'\nbuiltin: flip\nauth: none\n")
            .unwrap();
        let mut c = crate::Config::new(dir.join("data"));
        c.functions_dir = Some(dir.join("functions"));
        c.admin_token = Some("pfx_test-admin-token".into());
        c.async_workers = 0;
        let app = crate::App::start(c.clone(), None).await.unwrap().app;
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(4, 4).write_to(&mut png, image::ImageFormat::Png).unwrap();
        let req = axum::http::Request::post("/v1/functions/flip/invoke")
            .header("prefer", "respond-async")
            .body(axum::body::Body::from(png.into_inner()))
            .unwrap();
        let resp = crate::router(app.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let id = body["id"].as_str().unwrap().to_owned();
        // A worker claims it for an hour, and the node dies.
        app.store.claim(Duration::from_secs(3600)).await.unwrap().unwrap();
        app.shutdown().await;
        c.async_workers = 1;
        let app = crate::App::start(c, None).await.unwrap().app;
        let store = app.store.clone();
        eventually(|| async { store.get(&id).await.unwrap().unwrap().status == Status::Succeeded }).await;
        assert_eq!(store.get(&id).await.unwrap().unwrap().attempts, 2);
        app.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
