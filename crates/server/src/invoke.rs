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
use pixflow_runtime::function::NodeTicket;
use pixflow_runtime::{AuthMode, Function, Invocation, Output, Produced};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::App;
use crate::auth;
use crate::functions::{not_found, read_body};
use crate::problem::Problem;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How the caller spoke, so the answer (now or from the queue) speaks the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Raw,
    Json,
}

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

/// A stored object named as an input; with `etag`, only that content is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ObjectRef {
    pub bucket: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// An input the node reads itself: a stored object or a URL (queued as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Remote {
    Object(ObjectRef),
    Url(String),
}

/// Where an input's bytes are.
pub(crate) enum Source {
    Inline(Vec<u8>),
    Remote(Remote),
}

impl Remote {
    /// Refuses now what would only fail when read: a missing object, a URL the policy refuses.
    pub(crate) async fn check(&self, app: &App) -> Result<(), Problem> {
        match self {
            Remote::Object(r) => app.objects.head(&r.bucket, &r.key).await.map(|_| ()).map_err(Problem::from),
            Remote::Url(u) => app.config.url_policy.check(u).map(|_| ()),
        }
    }

    /// Reads the bytes under the function's input limit; they join the request's ticket.
    async fn read(&self, app: &App, f: &Function, ticket: Option<&mut NodeTicket>) -> Result<Vec<u8>, Problem> {
        match self {
            Remote::Object(r) => read_stored(app, f, r, ticket).await,
            Remote::Url(u) => fetch_url(app, f, u, ticket).await,
        }
    }
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

/// Where results go, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputRequest {
    pub bucket: String,
    /// Key template (see `pixflow_runtime::output`).
    pub key: String,
}

impl OutputRequest {
    fn target(&self) -> Result<pixflow_runtime::OutputTarget, Problem> {
        pixflow_backends::objects::check_bucket(&self.bucket)?;
        let spec = pixflow_runtime::OutputSpec { bucket: self.bucket.clone(), key: self.key.clone() };
        pixflow_runtime::OutputTarget::parse(&spec).map_err(|e| Problem::bad_request(format!("output.{e}")))
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

/// A request as read, before stored inputs are fetched.
pub(crate) struct Parsed {
    pub input: Option<Source>,
    pub inputs: BTreeMap<String, Source>,
    pub params: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub mode: Mode,
    pub output: Option<OutputRequest>,
}

impl Parsed {
    /// Bytes the request carried itself (what `max_request_bytes` bounds).
    fn inline_bytes(&self) -> u64 {
        let inline = |s: &Source| if let Source::Inline(b) = s { b.len() as u64 } else { 0 };
        self.input.as_ref().map_or(0, inline) + self.inputs.values().map(inline).sum::<u64>()
    }

    /// The key of the main input when it is a stored object (what `{source_key}` fills in).
    fn source_key(&self) -> Option<&str> {
        match &self.input {
            Some(Source::Remote(Remote::Object(r))) => Some(&r.key),
            _ => None,
        }
    }

    /// Refuses an output key template that names the source key of an input that has none.
    fn check_output(&self, target: Option<&pixflow_runtime::OutputTarget>) -> Result<(), Problem> {
        match target {
            Some(t) if t.key.needs_source() && self.source_key().is_none() => Err(Problem::bad_request(format!(
                "output key `{}` names the source key: send the input as an object reference",
                t.key.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

/// Reads the request.
async fn decode(f: &Function, query: Option<String>, headers: &HeaderMap, body: Body) -> Result<Parsed, Problem> {
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
        return Ok(Parsed {
            input: Some(Source::Inline(input)),
            inputs: BTreeMap::new(),
            params,
            content_type,
            mode: Mode::Raw,
            output: None,
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
    Ok(Parsed { input, inputs, params, content_type: None, mode: Mode::Json, output: req.output })
}

/// Reads one stored input: refused before reading when larger than the function takes, or
/// when the node cannot hold it (the bytes join the request's ticket); `etag` pins the content.
async fn read_stored(
    app: &App,
    f: &Function,
    r: &ObjectRef,
    ticket: Option<&mut NodeTicket>,
) -> Result<Vec<u8>, Problem> {
    let limit = f.deployment.quota.limits.max_input_bytes;
    let head = app.objects.head(&r.bucket, &r.key).await?;
    if head.size > limit {
        return Err(pixflow_backends::ObjectError::TooLarge { limit, actual: head.size }.into());
    }
    let mut ticket = ticket;
    if let Some(t) = ticket.as_deref_mut() {
        t.grow(head.size)?;
    }
    // Replaced by a larger version since the lookup: still within the limit, and held too.
    let (meta, bytes) = app.objects.read(&r.bucket, &r.key, limit).await?;
    if let Some(t) = ticket
        && bytes.len() as u64 > head.size
    {
        t.grow(bytes.len() as u64 - head.size)?;
    }
    if r.etag.as_ref().is_some_and(|e| *e != meta.etag) {
        return Err(Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            format!("`{}` in `{}` no longer has ETag {}", r.key, r.bucket, r.etag.as_deref().unwrap_or_default()),
        ));
    }
    Ok(bytes)
}

/// Fetches a URL source (allowed origins, public addresses, the function's input limit); its
/// bytes join the request's ticket.
async fn fetch_url(
    app: &App,
    f: &Function,
    url: &str,
    mut ticket: Option<&mut NodeTicket>,
) -> Result<Vec<u8>, Problem> {
    let mut reserve = |n: u64| match ticket.as_deref_mut() {
        Some(t) => t.grow(n).map_err(Problem::from),
        None => Ok(()),
    };
    crate::fetch::fetch(&app.config.url_policy, url, f.deployment.quota.limits.max_input_bytes, &mut reserve).await
}

/// The invocation with every stored input read; the key of the stored main input, if any.
pub(crate) async fn resolve(
    app: &App,
    f: &Function,
    parsed: Parsed,
    mut ticket: Option<&mut NodeTicket>,
) -> Result<(Invocation, Option<String>), Problem> {
    let source_key = parsed.source_key().map(str::to_owned);
    let mut referenced = 0u64;
    let input = match parsed.input {
        None => Vec::new(),
        Some(source) => bytes_of(app, f, source, ticket.as_deref_mut(), &mut referenced).await?,
    };
    let mut inputs = BTreeMap::new();
    for (name, source) in parsed.inputs {
        inputs.insert(name, bytes_of(app, f, source, ticket.as_deref_mut(), &mut referenced).await?);
    }
    let invocation = Invocation {
        input,
        params: parsed.params,
        inputs,
        content_type: parsed.content_type,
        referenced_bytes: referenced,
        platform_params: Vec::new(),
    };
    Ok((invocation, source_key))
}

/// An input's bytes; those the node read itself are added to `referenced`.
async fn bytes_of(
    app: &App,
    f: &Function,
    source: Source,
    ticket: Option<&mut NodeTicket>,
    referenced: &mut u64,
) -> Result<Vec<u8>, Problem> {
    match source {
        Source::Inline(b) => Ok(b),
        Source::Remote(r) => {
            let bytes = r.read(app, f, ticket).await?;
            *referenced += bytes.len() as u64;
            Ok(bytes)
        }
    }
}

/// Where this request's results are stored, if anywhere: the request's `output`, else the
/// manifest's.
pub(crate) fn output_target(
    f: &Function,
    requested: Option<&OutputRequest>,
) -> Result<Option<pixflow_runtime::OutputTarget>, Problem> {
    match requested {
        Some(o) => o.target().map(Some),
        None => Ok(f.deployment.output.clone()),
    }
}

/// One result to store: its bytes and what it is.
pub(crate) struct Stored<'a> {
    pub bytes: &'a [u8],
    pub content_type: &'a str,
    pub ext: &'a str,
    pub name: Option<&'a str>,
    pub width: u32,
    pub height: u32,
    /// Facts about the result to show beside the object (size, frame, ...).
    pub meta: Value,
}

/// Stores results under the target's keys (all keys distinct, checked before anything is
/// written), as writes of `function` (invoked by a client: one hop), and describes the objects.
pub(crate) async fn store_results(
    app: &App,
    function: &str,
    target: &pixflow_runtime::OutputTarget,
    source_key: Option<&str>,
    id: &str,
    results: Vec<Stored<'_>>,
) -> Result<Vec<Value>, Problem> {
    use sha2::Digest as _;
    let mut keys = Vec::with_capacity(results.len());
    for (index, r) in results.iter().enumerate() {
        let hash = hex::encode(sha2::Sha256::digest(r.bytes));
        let vars = pixflow_runtime::KeyVars {
            source_key,
            name: r.name,
            ext: r.ext,
            width: r.width,
            height: r.height,
            index,
            hash: &hash,
            id,
        };
        let key = target.key.expand(&vars).map_err(|e| Problem::bad_request(format!("output: {e}")))?;
        pixflow_backends::objects::check_key(&key)
            .map_err(|e| Problem::bad_request(format!("output key `{key}` (from `{}`): {e}", target.key.as_str())))?;
        if keys.contains(&key) {
            return Err(Problem::bad_request(format!(
                "output: key template `{}` gives `{key}` to two renditions; use {{name}}, {{index}} or {{hash}}",
                target.key.as_str()
            )));
        }
        keys.push(key);
    }
    let public = app.objects.bucket(&target.bucket).await?.is_some_and(|b| b.config.public);
    let objects = app.objects.by(pixflow_backends::Actor::function(function, 1));
    let mut described = Vec::with_capacity(results.len());
    for (r, key) in results.into_iter().zip(keys) {
        let meta = objects
            .put(&target.bucket, &key, r.content_type, &BTreeMap::new(), &pixflow_backends::Condition::None, r.bytes)
            .await?;
        let mut v = r.meta;
        if let (Value::Object(v), Value::Object(o)) = (&mut v, crate::objects::describe_object(app, &meta, public)) {
            v.extend(o);
        }
        described.push(v);
    }
    Ok(described)
}

/// The results of a run as storable items.
pub(crate) fn storable(produced: &Produced) -> Vec<Stored<'_>> {
    match produced {
        Produced::Renditions(renditions) => renditions
            .iter()
            .map(|r| Stored {
                bytes: &r.bytes,
                content_type: r.format.mime(),
                ext: r.format.extension(),
                name: r.name.as_deref(),
                width: r.width,
                height: r.height,
                meta: rendition_meta(r),
            })
            .collect(),
        Produced::Reply(reply) => vec![Stored {
            bytes: &reply.bytes,
            content_type: &reply.content_type,
            ext: extension_of(&reply.content_type),
            name: None,
            width: 0,
            height: 0,
            meta: json!({"content_type": reply.content_type, "size": reply.bytes.len()}),
        }],
    }
}

/// The `{ext}` of a process function's answer: its media type's, `json`, else `bin`.
fn extension_of(content_type: &str) -> &'static str {
    match pixflow_imageops::OutFormat::from_mime(content_type) {
        Some(f) => f.extension(),
        None if content_type.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")) => {
            "json"
        }
        None => "bin",
    }
}

/// What a caller without a token may name in a request to an open (`auth: none`) function:
/// stored inputs in public buckets only (others look missing, as on the CDN), and no `output`
/// of its own (the manifest's output still applies).
async fn guard_anonymous(app: &App, parsed: &Parsed) -> Result<(), Problem> {
    if parsed.output.is_some() {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "naming where results are stored needs an API token (`Authorization: Bearer ...`)",
        ));
    }
    for source in parsed.input.iter().chain(parsed.inputs.values()) {
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
    let mut ticket = app.node.admit(reserve(&f, &headers)?)?;
    let parsed = decode(&f, query, &headers, body).await?;
    if anonymous {
        guard_anonymous(&app, &parsed).await?;
    }
    // Inline bytes are bounded by the request limit, checked before anything is read or queued.
    let size = parsed.inline_bytes();
    let max = f.deployment.quota.max_request_bytes;
    if size > max {
        return Err(pixflow_runtime::InvokeError::RequestTooLarge { limit: max, actual: size }.into());
    }
    let target = output_target(&f, parsed.output.as_ref())?;
    parsed.check_output(target.as_ref())?;
    if asynchronous {
        let callback = match headers.get("x-callback-url") {
            None => None,
            Some(v) => {
                let url = v.to_str().map_err(|_| Problem::bad_request("X-Callback-Url: not text"))?;
                crate::callback::check(url, &app.config.callback_allow)?;
                Some(url.to_owned())
            }
        };
        return crate::dispatch::accept(&app, &f, parsed, callback).await;
    }
    let mode = parsed.mode;
    let (invocation, source_key) = resolve(&app, &f, parsed, Some(&mut ticket)).await?;
    // A new version may have rolled out while the body arrived: the request goes to it.
    let f = match app.registry.get(&name) {
        Some(latest) if f.is_retired() => latest,
        _ => f,
    };
    let out = pixflow_runtime::invoke(&app.node, &f, invocation, app.foreign.clone(), Some(ticket)).await?;
    match target {
        None => Ok(respond(&f, out, mode)),
        Some(target) => {
            if let Produced::Reply(r) = &out.produced
                && !(200..300).contains(&r.status)
            {
                // A process function's error is relayed, not stored.
                return Ok(respond(&f, out, mode));
            }
            let id = auth::invocation_id().map_err(Problem::internal)?;
            let stored = storable(&out.produced);
            let objects = store_results(&app, &f.deployment.name, &target, source_key.as_deref(), &id, stored).await?;
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
    }
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

/// What a rendition is, without its bytes.
pub(crate) fn rendition_meta(r: &pixflow_imageops::Rendition) -> Value {
    let mut v = json!({
        "name": r.name,
        "content_type": r.format.mime(),
        "width": r.width,
        "height": r.height,
        "size": r.bytes.len(),
    });
    if let Some(pos) = r.frame {
        v["frame"] = json!({"index": pos.index, "time_ms": pos.time_ms, "duration_ms": pos.duration_ms});
    }
    v
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
