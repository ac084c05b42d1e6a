//! The management API: list, show, deploy (`PUT` a manifest), remove functions, and create API
//! tokens. Writes need an admin token; reads need any token. A deploy through the API is
//! persisted in the catalogue and comes back after a restart; with a catalogue other nodes
//! share, [`follow_catalogue`] applies their deploys and removals to this node's registry.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use pixflow_backends::CatalogueChange;
use pixflow_runtime::{DeployError, Deployed, Function, Runnable};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth::{self, Role};
use crate::problem::{FieldError, Problem};

/// Reads a request body of at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: u64) -> Result<bytes::Bytes, Problem> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match http_body_util::Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than {limit} bytes"),
        )),
        Err(e) => Err(body_problem(&*e)),
    }
}

/// The answer to a request body that could not be read: 408 for a client the deadlines cut
/// off, else 400.
pub(crate) fn body_problem(e: &(dyn std::error::Error + 'static)) -> Problem {
    if crate::conn::is_slow_body(e) {
        return Problem::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", format!("reading the request body: {e}"));
    }
    Problem::bad_request(format!("reading the request body: {e}"))
}

/// A small JSON request document (at most 16 KiB).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(body: Body, what: &str) -> Result<T, Problem> {
    let bytes = read_body(body, 16 << 10).await?;
    serde_json::from_slice(&bytes).map_err(|e| Problem::bad_request(format!("{what}: {e}")))
}

/// A function as the API shows it; `admin` adds a process's command line.
pub(crate) fn describe(f: &Function, admin: bool) -> Value {
    let d = &f.deployment;
    let stats = f.pool.stats();
    let kind = match &d.runnable {
        Runnable::Pipeline { steps, .. } if steps.len() == 1 => json!({"builtin": steps[0].op}),
        Runnable::Pipeline { steps, .. } => {
            json!({"pipeline": steps.iter().map(|s| s.op.as_str()).collect::<Vec<_>>()})
        }
        Runnable::Process(p) if admin => json!({"process": p.command}),
        Runnable::Process(_) => json!({"process": Value::Null}),
    };
    let overridable = match &d.runnable {
        Runnable::Pipeline { overridable, .. } => overridable.clone(),
        Runnable::Process(_) => Vec::new(),
    };
    let deployed_at = f.deployed_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis());
    let mut v = json!({
        "name": d.name,
        "version": d.version,
        "description": d.description,
        "runs": kind,
        "overridable": overridable,
        "auth": d.auth.as_str(),
        "deployed_at_ms": deployed_at,
        "state": {"ready_instances": stats.ready, "in_flight": stats.in_flight, "queued": stats.queued},
        "quota": {
            "memory_bytes": d.quota.memory_bytes,
            "timeout_ms": d.quota.timeout.as_millis(),
            "max_request_bytes": d.quota.max_request_bytes,
            "max_response_bytes": d.quota.max_response_bytes,
            "concurrency": d.quota.concurrency,
            "max_queue": d.quota.max_queue,
        },
        "scaling": {
            "min": d.scaling.min,
            "max": d.scaling.max,
            "target_concurrency": d.scaling.target_concurrency,
            "scale_to_zero_after_ms": d.scaling.scale_to_zero_after.as_millis(),
        },
        "retry": {"attempts": d.retry.attempts, "backoff_ms": d.retry.backoff.as_millis()},
    });
    // A process function whose program does not start says why (its last standard-error line).
    if let Some(error) = f.processes.as_ref().and_then(|p| p.failing()) {
        v["state"]["start_error"] = Value::String(error);
    }
    v
}

pub(crate) async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, Problem> {
    let admin = auth::role(&app.catalogue, &headers).await? == Role::Admin;
    let functions: Vec<Value> = app.registry.list().iter().map(|f| describe(f, admin)).collect();
    Ok(Json(json!({ "functions": functions })))
}

pub(crate) async fn show(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let role = auth::role(&app.catalogue, &headers).await?;
    let f = app.registry.get(&name).ok_or_else(|| not_found(&name))?;
    // The manifest and a process's command line are for admins: they may hold settings an
    // invoking client has no business reading.
    let admin = role == Role::Admin;
    let mut v = describe(&f, admin);
    if admin {
        v["manifest"] = Value::String(f.manifest.clone());
    }
    Ok(Json(v))
}

pub(crate) fn not_found(name: &str) -> Problem {
    Problem::not_found("function_not_found", format!("no function named `{name}` is deployed"))
}

pub(crate) async fn deploy(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    let body = read_body(body, pixflow_runtime::manifest::MAX_MANIFEST_BYTES as u64).await?;
    let text = String::from_utf8(body.to_vec()).map_err(|_| Problem::bad_request("the manifest is not UTF-8 text"))?;
    let deployment = pixflow_runtime::parse(&text).map_err(|invalid| {
        let errors = invalid
            .0
            .iter()
            .map(|d| FieldError { field: d.field.clone(), message: d.message.clone(), line: d.line, column: d.column })
            .collect();
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", invalid.to_string()).with_errors(errors)
    })?;
    if let Some(out) = &deployment.output
        && let Err(e) = pixflow_backends::objects::check_bucket(&out.bucket)
    {
        let message = e.to_string();
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_manifest",
            format!("output.bucket: {message}"),
        )
        .with_errors(vec![FieldError { field: "output.bucket".into(), message, line: None, column: None }]));
    }
    if deployment.name != name {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name_mismatch",
            format!("the manifest names `{}` but was sent to `{name}`", deployment.name),
        ));
    }
    let version = deployment.version.clone();
    // Deploys and removals apply one at a time, so the catalogue ends with what runs.
    let _serial = app.deploys.lock().await;
    // Process functions deployed through the API run in the data folder.
    let outcome = app.registry.deploy(deployment, text.clone(), &app.config.data_dir).map_err(|e| match e {
        DeployError::VersionConflict { .. } => Problem::new(StatusCode::CONFLICT, "version_conflict", e.to_string()),
        DeployError::Secret { ref var, .. } => {
            let field = format!("process.secrets.{var}");
            let message = e.to_string();
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", message.clone())
                .with_errors(vec![FieldError { field, message, line: None, column: None }])
        }
    })?;
    if outcome != Deployed::Unchanged {
        app.catalogue.save_function(&name, &version, &text).await?;
    }
    let (status, result) = match &outcome {
        Deployed::Created => (StatusCode::CREATED, "created"),
        Deployed::Updated { .. } => (StatusCode::OK, "updated"),
        Deployed::Unchanged => (StatusCode::OK, "unchanged"),
    };
    tracing::info!(function = %name, %version, result, "deploy");
    let f = app.registry.get(&name).ok_or_else(|| not_found(&name))?;
    let mut body = describe(&f, true);
    body["result"] = Value::from(result);
    if let Deployed::Updated { previous } = outcome {
        body["previous_version"] = Value::from(previous);
    }
    Ok((status, Json(body)).into_response())
}

pub(crate) async fn remove(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    let _serial = app.deploys.lock().await;
    if !app.registry.remove(&name) {
        return Err(not_found(&name));
    }
    app.catalogue.delete_function(&name).await?;
    tracing::info!(function = %name, "removed");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    role: String,
    #[serde(default)]
    label: String,
}

/// `POST /v1/tokens {"role": "invoke", "label": "cms"}`: the token is shown once.
pub(crate) async fn create_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    let body = read_body(body, 4096).await?;
    let req: NewToken = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("expected {{\"role\", \"label\"}}: {e}")))?;
    let role = Role::parse(&req.role)
        .ok_or_else(|| Problem::bad_request(format!("role `{}`: expected `admin` or `invoke`", req.role)))?;
    if req.label.len() > 200 {
        return Err(Problem::bad_request("label: at most 200 characters"));
    }
    let token = auth::generate().map_err(Problem::internal)?;
    app.catalogue.add_token(&auth::digest(&token), role.as_str(), &req.label).await?;
    Ok((StatusCode::CREATED, Json(json!({"token": token, "role": role.as_str(), "label": req.label}))).into_response())
}

/// Applies deploys and removals made through other nodes' APIs to this node's registry, as the
/// catalogue announces them, until the node stops. A lost announcement reloads every function
/// (removals then wait for the next announcement of that name, or the next start).
pub(crate) async fn follow_catalogue(
    app: Arc<App>,
    changes: Option<tokio::sync::broadcast::Receiver<CatalogueChange>>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut changes = match changes {
        Some(changes) => changes,
        // Started again after a failure: what changed meanwhile was missed.
        None => {
            let Some(changes) = app.catalogue.changes() else { return };
            let _serial = app.deploys.lock().await;
            reload_all(&app).await;
            changes
        }
    };
    loop {
        let change = tokio::select! {
            () = app.stopped() => return,
            change = changes.recv() => change,
        };
        let _serial = app.deploys.lock().await;
        match change {
            Ok(CatalogueChange::Function(name)) => match app.catalogue.function(&name).await {
                Ok(Some(manifest)) => apply(&app, &name, manifest),
                Ok(None) => {
                    if app.registry.remove(&name) {
                        tracing::info!(function = %name, "removed through another node");
                    }
                }
                Err(e) => tracing::error!(function = %name, error = %e, "reading a function another node changed"),
            },
            Ok(CatalogueChange::Missed) | Err(RecvError::Lagged(_)) => reload_all(&app).await,
            Err(RecvError::Closed) => return,
        }
    }
}

/// Applies every function of the catalogue (after changes were missed).
async fn reload_all(app: &Arc<App>) {
    match app.catalogue.functions().await {
        Ok(all) => {
            for (name, manifest) in all {
                apply(app, &name, manifest);
            }
        }
        Err(e) => tracing::error!(error = %e, "reading the functions after missed catalogue changes"),
    }
}

/// Deploys a manifest from the catalogue to this node's registry (in the data folder, as a
/// deploy through the API).
fn apply(app: &App, name: &str, manifest: String) {
    let deployment = match pixflow_runtime::parse(&manifest) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(function = %name, error = %e, "a stored manifest no longer validates");
            return;
        }
    };
    match app.registry.deploy(deployment, manifest, &app.config.data_dir) {
        Ok(Deployed::Unchanged) => {}
        Ok(outcome) => tracing::info!(function = %name, ?outcome, "deployed through another node"),
        Err(e) => tracing::warn!(function = %name, error = %e, "a deploy through another node does not apply here"),
    }
}
