//! `POST /v1/functions/{name}/invoke`.
//!
//! - Raw bytes in (parameters in the query string) and, for a single result, the image bytes
//!   out, with its size in `X-Pixflow-Width`/`-Height` and the queue and CPU time in
//!   `Server-Timing`.
//! - `Content-Type: application/json` in: `{"input": {"base64": ...}, "params": {...},
//!   "inputs": {"logo.png": {"base64": ...}}}`; a JSON description of every rendition out
//!   (bytes in base64). A function with several renditions always answers in JSON. Any input
//!   may instead be an object reference `{"bucket", "key", "etag"?}`, read from the object
//!   store (bounded by the function's input limit, not its request limit).
//! - Stored results: with `"output": {"bucket", "key"}` in the request, or an `output` in the
//!   manifest, every rendition is stored under its expanded key template and the answer lists
//!   the objects (reference, size, ETag, CDN URL) instead of bytes: the CMS upload in one call.
//! - `Prefer: respond-async`: the request is validated, committed to the durable queue and
//!   answered `202 Accepted` with the invocation's id and `Location`; `X-Callback-Url` names
//!   where its completion is POSTed (allowed destinations only).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use pixflow_runtime::{AuthMode, Function, Output, Produced};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth;
use crate::dispatch::{Call, Destination, Mode, ObjectRef, OutputRequest, Remote, Source, rendition_meta};
use crate::functions::{not_found, read_body};
use crate::problem::Problem;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Bytes in a JSON document: inline base64, or a reference to a stored object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    base64: Option<String>,
    bucket: Option<String>,
    key: Option<String>,
    etag: Option<String>,
    /// An `http://` URL the node fetches (allowed origins only; see `fetch`).
    url: Option<String>,
}

impl Data {
    fn source(self, what: &str) -> Result<Source, Problem> {
        match (self.base64, self.bucket, self.key, self.etag, self.url) {
            (None, None, None, None, Some(url)) => Ok(Source::Remote(Remote::Url(url))),
            (Some(b), None, None, None, None) => B64
                .decode(b.as_bytes())
                .map(Source::Inline)
                .map_err(|e| Problem::bad_request(format!("{what}.base64: {e}"))),
            (None, Some(bucket), Some(key), etag, None) => {
                pixflow_backends::objects::check_bucket(&bucket)?;
                pixflow_backends::objects::check_key(&key)?;
                let etag = etag.map(|e| e.trim_matches('"').to_owned());
                Ok(Source::Remote(Remote::Object(ObjectRef { bucket, key, etag })))
            }
            _ => Err(Problem::bad_request(format!(
                "{what}: give `base64`, `url`, or `bucket` and `key` (and maybe `etag`)"
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    input: Option<Data>,
    /// Kept as unparsed text: a parameter is a scalar, and a nested document is refused
    /// without building it in memory.
    #[serde(default)]
    params: BTreeMap<String, Box<serde_json::value::RawValue>>,
    #[serde(default)]
    inputs: BTreeMap<String, Data>,
    /// Where to store the results (overrides the manifest's `output`).
    output: Option<OutputRequest>,
}

/// Most parameters and named inputs one request may carry.
const MAX_PARAMS: usize = 64;
const MAX_INPUTS: usize = 16;

fn param_text(key: &str, raw: &serde_json::value::RawValue) -> Result<String, Problem> {
    let text = raw.get().trim_start();
    let scalar = || Problem::bad_request(format!("params.{key}: a string, number or boolean"));
    if text.starts_with(['[', '{']) {
        return Err(scalar());
    }
    match serde_json::from_str::<Value>(text).map_err(|_| scalar())? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(scalar()),
    }
}

/// Bytes a request will hold once read: what it declares, else the most it may send. JSON
/// holds the document and the decoded bytes at once.
pub(crate) fn reserve(f: &Function, headers: &HeaderMap) -> Result<u64, Problem> {
    let max = f.deployment.quota.max_request_bytes;
    let json = is_json(headers);
    let limit = if json { json_limit(max) } else { max };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is {n} bytes; this function accepts at most {limit}"),
        )),
        Some(n) => Ok(if json { n.saturating_mul(2) } else { n }),
        None => Ok(if json { limit.saturating_mul(2) } else { limit }),
    }
}

/// Base64 is 4/3 of the bytes it carries; leave room for the rest of the document.
fn json_limit(max: u64) -> u64 {
    max.saturating_mul(4) / 3 + (64 << 10)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")))
}

/// Reads the request.
async fn decode(f: &Function, query: Option<String>, headers: &HeaderMap, body: Body) -> Result<Call, Problem> {
    let max = f.deployment.quota.max_request_bytes;
    let is_json = is_json(headers);
    let mut params: Vec<(String, String)> = match &query {
        Some(q) => serde_urlencoded::from_str(q).map_err(|e| Problem::bad_request(format!("query string: {e}")))?,
        None => Vec::new(),
    };
    if params.len() > MAX_PARAMS {
        return Err(Problem::bad_request(format!("at most {MAX_PARAMS} query parameters")));
    }
    if !is_json {
        let input = read_body(body, max).await?.to_vec();
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        return Ok(Call {
            input: Some(Source::Inline(input)),
            inputs: BTreeMap::new(),
            params,
            platform: Vec::new(),
            content_type,
            mode: Mode::Raw,
            output: Destination::Default,
            background: false,
        });
    }
    let body = read_body(body, json_limit(max)).await?;
    let req: JsonRequest =
        serde_json::from_slice(&body).map_err(|e| Problem::bad_request(format!("request document: {e}")))?;
    drop(body);
    if let Some(o) = &req.output {
        o.target()?;
    }
    if req.params.len() > MAX_PARAMS || req.inputs.len() > MAX_INPUTS {
        return Err(Problem::bad_request(format!("at most {MAX_PARAMS} params and {MAX_INPUTS} inputs")));
    }
    for (k, v) in &req.params {
        let text = param_text(k, v)?;
        params.push((k.clone(), text));
    }
    let input = req.input.map(|d| d.source("input")).transpose()?;
    let mut inputs = BTreeMap::new();
    for (name, d) in req.inputs {
        let source = d.source(&format!("inputs.{name}"))?;
        inputs.insert(name, source);
    }
    let output = req.output.map_or(Destination::Default, Destination::To);
    Ok(Call {
        input,
        inputs,
        params,
        platform: Vec::new(),
        content_type: None,
        mode: Mode::Json,
        output,
        background: false,
    })
}

/// What a caller without a token may name in a request to an open (`auth: none`) function:
/// stored inputs in public buckets only (others look missing, as on the CDN), and no `output`
/// of its own (the manifest's output still applies).
async fn guard_anonymous(app: &App, call: &Call) -> Result<(), Problem> {
    if call.output != Destination::Default {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "naming where results are stored needs an API token (`Authorization: Bearer ...`)",
        ));
    }
    for source in call.input.iter().chain(call.inputs.values()) {
        if let Source::Remote(Remote::Object(r)) = source {
            let public = app.objects.bucket(&r.bucket).await?.is_some_and(|b| b.config.public);
            if !public {
                return Err(Problem::not_found(
                    "no_such_key",
                    format!("no object `{}` in bucket `{}`", r.key, r.bucket),
                ));
            }
        }
    }
    Ok(())
}

/// 401/403 unless the caller may invoke `f`.
pub(crate) async fn check_invoke(app: &App, f: &Function, headers: &HeaderMap) -> Result<(), Problem> {
    match f.deployment.auth {
        AuthMode::None => Ok(()),
        AuthMode::Token => auth::role(&app.catalogue, headers).await.map(|_| ()),
    }
}

fn wants_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|p| p.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async")))
    })
}

pub(crate) async fn invoke(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let f = app.registry.get(&name).ok_or_else(|| not_found(&name))?;
    check_invoke(&app, &f, &headers).await?;
    // A full function is refused before its body is read; the node admits the bytes before
    // they are read, so uploads cannot pile up unbounded.
    let asynchronous = wants_async(&headers);
    if !asynchronous && let Some(full) = f.pool.refusal() {
        return Err(pixflow_runtime::InvokeError::Rejected(full).into());
    }
    // An open function's anonymous callers reach only what is public anyway.
    let anonymous = f.deployment.auth == AuthMode::None && auth::role(&app.catalogue, &headers).await.is_err();
    let ticket = app.node.admit(reserve(&f, &headers)?)?;
    let call = decode(&f, query, &headers, body).await?;
    if anonymous {
        guard_anonymous(&app, &call).await?;
    }
    // Inline bytes are bounded by the request limit, checked before anything is read or queued.
    let size = call.inline_bytes();
    let max = f.deployment.quota.max_request_bytes;
    if size > max {
        return Err(pixflow_runtime::InvokeError::RequestTooLarge { limit: max, actual: size }.into());
    }
    call.target(&f)?;
    if asynchronous {
        let callback = match headers.get("x-callback-url") {
            None => None,
            Some(v) => {
                let url = v.to_str().map_err(|_| Problem::bad_request("X-Callback-Url: not text"))?;
                crate::callback::check(url, &app.config.callback_allow)?;
                Some(url.to_owned())
            }
        };
        let id = crate::dispatch::accept(&app, &f, call, callback).await?;
        return Ok(accepted(&id));
    }
    let mode = call.mode;
    let done = crate::dispatch::call(&app, f, call, Some(ticket), None).await?;
    let (f, out) = (done.function, done.output);
    let Some(objects) = done.stored else {
        return Ok(respond(&f, out, mode));
    };
    let timing = format!("queue;dur={:.3}, cpu;dur={:.3}", ms(out.queued), ms(out.cpu));
    let mut resp = Json(json!({
        "function": f.deployment.name,
        "version": f.deployment.version,
        "objects": objects,
        "timing": {"queued_ms": ms(out.queued), "cpu_ms": ms(out.cpu)},
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&timing) {
        resp.headers_mut().insert("server-timing", v);
    }
    Ok(resp)
}

/// `202 Accepted`: where to follow an asynchronous invocation.
fn accepted(id: &str) -> Response {
    let location = format!("/v1/invocations/{id}");
    let mut resp =
        (StatusCode::ACCEPTED, Json(json!({"id": id, "status": "queued", "status_url": location}))).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    h.insert("preference-applied", HeaderValue::from_static("respond-async"));
    resp
}

/// The answer to a successful synchronous invocation.
fn respond(f: &Function, out: Output, mode: Mode) -> Response {
    let timing = format!("queue;dur={:.3}, cpu;dur={:.3}", ms(out.queued), ms(out.cpu));
    let renditions = match out.produced {
        Produced::Renditions(r) => r,
        // A process function's answer is relayed as it came.
        Produced::Reply(reply) => {
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut resp = (status, reply.bytes).into_response();
            if let Ok(v) = HeaderValue::from_str(&reply.content_type) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("queue;dur={:.3}", ms(out.queued))) {
                resp.headers_mut().insert("server-timing", v);
            }
            return resp;
        }
    };
    let mut response = if mode == Mode::Raw && renditions.len() == 1 {
        let r = renditions.into_iter().next().expect("one rendition");
        let mut resp = r.bytes.into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(r.format.mime()));
        h.insert("x-pixflow-width", HeaderValue::from(r.width));
        h.insert("x-pixflow-height", HeaderValue::from(r.height));
        resp
    } else {
        Json(json!({
            "function": f.deployment.name,
            "version": f.deployment.version,
            "renditions": renditions.iter().map(|r| {
                let mut v = rendition_meta(r);
                v["base64"] = Value::String(B64.encode(&r.bytes));
                v
            }).collect::<Vec<_>>(),
            "timing": {"queued_ms": ms(out.queued), "cpu_ms": ms(out.cpu)},
        }))
        .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", v);
    }
    response
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_respond_async_is_recognised_among_other_preferences() {
        let mut h = HeaderMap::new();
        assert!(!wants_async(&h));
        h.insert("prefer", "return=minimal, respond-async; wait=10".parse().unwrap());
        assert!(wants_async(&h));
        h.insert("prefer", "respond-asyncx".parse().unwrap());
        assert!(!wants_async(&h));
    }
}
