//! Asynchronous invocations over HTTP: their status and results, dead letters and re-driving.
//! Accepting, running and settling them is the dispatch layer's ([`crate::dispatch`]).
//! An invocation id is an unguessable capability: whoever holds it may read its status.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pixflow_backends::{InvocationRow, Status};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth;
use crate::problem::Problem;

pub(crate) fn describe(row: &InvocationRow) -> Value {
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
    let row = app.invocations.get(&id).await?.ok_or_else(|| not_found(&id))?;
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
    let row = app.invocations.get(&id).await?.ok_or_else(|| not_found(&id))?;
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
    let mut bytes = app.invocations.result(&id).await?.ok_or_else(|| not_found(&id))?;
    let total: u64 = metas.iter().map(|m| m["size"].as_u64().unwrap_or(0)).sum();
    if bytes.is_empty() && total > 0 {
        // Too large for the log: kept in the spool by the attempt that succeeded.
        let key = crate::dispatch::spool::result_key(&id, row.attempts);
        bytes = crate::dispatch::spool::read_result(&app, &key, total).await?;
    }
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
    auth::admin(&app.catalogue, &headers).await?;
    let Query(page) = page.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let rows = app.invocations.dead_letters(page.after.as_deref(), limit).await?;
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
    auth::admin(&app.catalogue, &headers).await?;
    check_id(&id)?;
    if !crate::dispatch::redrive(&app, &id).await? {
        return match app.invocations.get(&id).await? {
            None => Err(not_found(&id)),
            Some(row) => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_dead_lettered",
                format!("invocation `{id}` is {}, not dead-lettered", row.status.as_str()),
            )),
        };
    }
    metrics::counter!("pixflow_async_redriven_total").increment(1);
    let row = app.invocations.get(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok((StatusCode::ACCEPTED, Json(describe(&row))).into_response())
}
