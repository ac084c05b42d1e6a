//! The CDN edge: public buckets' objects and on-the-fly transformations of them.
//!
//! - `/cdn/{bucket}/{key}`: the stored object as it is.
//! - `/cdn/p/{preset}/{bucket}/{key}`: through a preset, a deployed function whose manifest
//!   has a `cdn` block (its quota, admission and metrics apply).
//! - `/cdn/t/{signature}/{ops}/{bucket}/{key}`: ad-hoc operations in the URL
//!   (`resize,width=300,fit=cover+convert,format=webp`), signed with HMAC-SHA256 over
//!   `{ops}/{bucket}/{key}` as sent (imgproxy's model); `_` instead of a signature only when
//!   the operator allows unsigned URLs.
//!
//! Transformations negotiate `format=auto` from `Accept` (AVIF, WebP, else the pipeline's own
//! format; `Vary: Accept`), are cached at the edge under the transformation, the source's ETag
//! and the negotiated format, and run once for any number of identical requests arriving
//! together. A write or delete of an object purges what was derived from it; `POST
//! /v1/cdn/purge` purges by key or prefix. A private or missing bucket answers like a missing
//! object, so the edge does not tell which buckets exist.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use pixflow_backends::{CachedEntry, EdgeCache, ObjectMeta};
use pixflow_imageops::OutFormat;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::App;
use crate::auth;
use crate::delivery::{self, Extra, Payload, Representation};
use crate::problem::Problem;

/// Bytes of a key segment that stay as they are in a URL path (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
const SIG: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Longest `{ops}` segment of an ad-hoc URL.
const MAX_OPS_BYTES: usize = 1024;
/// Largest result of an ad-hoc transformation (a function's default `max_response_bytes`).
const MAX_RESULT_BYTES: u64 = 64 << 20;

type Hmac = hmac::Hmac<sha2::Sha256>;
/// Pipeline steps as text: `(op, [(key, value)])`.
type Steps = Vec<(String, Vec<(String, String)>)>;
/// A transformation in flight: its result, once there.
type Flight = tokio::sync::watch::Receiver<Option<Result<CachedEntry, Problem>>>;

/// The edge's state: the cache, the signing key and the transformations in flight.
pub struct Cdn {
    pub cache: EdgeCache,
    key: Vec<u8>,
    inflight: Mutex<HashMap<String, Flight>>,
    transformations: AtomicU64,
    /// Requests that waited for a transformation already in flight instead of running one.
    joined: AtomicU64,
}

impl Cdn {
    pub fn new(cache: EdgeCache, key: Vec<u8>) -> Cdn {
        Cdn {
            cache,
            key,
            inflight: Mutex::new(HashMap::new()),
            transformations: AtomicU64::new(0),
            joined: AtomicU64::new(0),
        }
    }

    /// Requests so far that shared a transformation already in flight.
    pub fn coalesced(&self) -> u64 {
        self.joined.load(Ordering::Relaxed)
    }

    /// Transformations run so far (cache misses that did the work).
    pub fn transformations(&self) -> u64 {
        self.transformations.load(Ordering::Relaxed)
    }

    fn mac(&self, path: &str) -> Hmac {
        let mut mac = <Hmac as KeyInit>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(path.as_bytes());
        mac
    }

    /// The signature of an ad-hoc path `{ops}/{bucket}/{key}` (as it appears in the URL).
    pub fn sign(&self, path: &str) -> String {
        SIG.encode(self.mac(path).finalize().into_bytes())
    }

    /// Checks a signature in constant time.
    fn verify(&self, signature: &str, path: &str) -> bool {
        SIG.decode(signature).is_ok_and(|sig| self.mac(path).verify_slice(&sig).is_ok())
    }
}

/// A key as URL path segments (each percent-encoded, `/` kept).
pub(crate) fn key_path(key: &str) -> String {
    key.split('/').map(|s| utf8_percent_encode(s, SEGMENT).to_string()).collect::<Vec<_>>().join("/")
}

/// The CDN URL of a stored object.
pub(crate) fn url(app: &App, bucket: &str, key: &str) -> String {
    format!("{}/cdn/{bucket}/{}", app.config.public_url.trim_end_matches('/'), key_path(key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CdnQuery {
    /// Serve as an attachment; a non-empty value names the file.
    download: Option<String>,
}

fn hidden(bucket: &str, key: &str) -> Problem {
    Problem::not_found("no_such_key", format!("no object `{key}` in bucket `{bucket}`"))
}

/// The bucket's settings if it is public; a private or missing one looks like a missing object.
async fn public_bucket(app: &App, bucket: &str, key: &str) -> Result<pixflow_backends::Bucket, Problem> {
    match app.objects.bucket(bucket).await? {
        Some(b) if b.config.public => Ok(b),
        _ => Err(hidden(bucket, key)),
    }
}

fn disposition(q: CdnQuery, key: &str) -> Option<String> {
    q.download.map(|name| {
        let name = if name.is_empty() { file_name(key).to_owned() } else { name };
        delivery::attachment(&name)
    })
}

/// The last segment of a key, as a download's file name.
pub(crate) fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Marks requests that came through the CDN's own listener (`--cdn-listen`), the one origin
/// where an operator may let active content render.
#[derive(Clone, Copy)]
pub(crate) struct OwnOrigin;

/// `GET /cdn/{bucket}/{key}`: the object as stored.
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    Path((bucket, key)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    own_origin: Option<axum::Extension<OwnOrigin>>,
    q: Result<Query<CdnQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let b = public_bucket(&app, &bucket, &key).await?;
    let (meta, file) = app.objects.get(&bucket, &key).await?;
    let cache_control = Some(b.config.cache_control.unwrap_or_else(|| app.config.cdn_cache_control.clone()));
    let extra = Extra {
        cache_control,
        content_disposition: disposition(q, &key),
        file_name: Some(file_name(&key).to_owned()),
        active_inline: own_origin.is_some() && app.config.cdn_inline_active.contains(&bucket),
        ..Extra::default()
    };
    delivery::respond(&method, &headers, (&meta).into(), Payload::Object(file), extra).await
}

/// What a transformation URL asks for.
enum Transform {
    Preset(Arc<pixflow_runtime::Function>),
    /// `ops` as sent (also what the cache key holds); `auto`: it asked for `format=auto`.
    AdHoc {
        ops: String,
        steps: Steps,
        auto: bool,
    },
}

/// The format `Accept` allows, in the operator's order of preference; `None`: the pipeline's own.
pub(crate) fn negotiate(headers: &HeaderMap, preferred: &[OutFormat]) -> Option<OutFormat> {
    let accepted: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';');
            let media = parts.next()?.trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.trim().strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0)
            });
            (!refused).then_some(media)
        })
        .collect();
    preferred.iter().copied().find(|f| accepted.iter().any(|a| a == f.mime()))
}

/// Parses `resize,width=300+convert,format=webp` into steps (keys and values percent-decoded);
/// `format=auto` is taken out and reported.
fn parse_ops(ops: &str) -> Result<(Steps, bool), Problem> {
    if ops.is_empty() || ops.len() > MAX_OPS_BYTES {
        return Err(Problem::bad_request(format!("operations: 1 to {MAX_OPS_BYTES} bytes")));
    }
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| Problem::bad_request("operations: not UTF-8 once percent-decoded"))
    };
    let mut auto = false;
    let mut steps = Vec::new();
    for step in ops.split('+') {
        let mut parts = step.split(',');
        let op = decode(parts.next().unwrap_or_default())?;
        if matches!(op.as_str(), "output" | "frames" | "sprite") {
            return Err(Problem::bad_request(format!("`{op}` is not available in CDN URLs: they give one image")));
        }
        let mut params = Vec::new();
        for p in parts {
            let (k, v) = p.split_once('=').ok_or_else(|| Problem::bad_request(format!("`{p}`: write key=value")))?;
            let (k, v) = (decode(k)?, decode(v)?);
            if k == "format" && v == "auto" {
                auto = true;
                continue;
            }
            params.push((k, v));
        }
        if !(op == "convert" && params.is_empty() && auto) {
            steps.push((op, params));
        }
    }
    if steps.len() > 16 {
        return Err(Problem::bad_request("operations: at most 16 steps"));
    }
    Ok((steps, auto))
}

fn build(steps: &[(String, Vec<(String, String)>)]) -> Result<pixflow_imageops::Pipeline, Problem> {
    let pipeline = pixflow_imageops::Pipeline::from_steps(
        steps.iter().map(|(op, ps)| (op.as_str(), ps.iter().map(|(k, v)| (k.as_str(), v.as_str())))),
    )
    .map_err(|e| crate::problem::engine(&e))?;
    if pipeline.is_generated() || !pipeline.input_names().is_empty() {
        return Err(Problem::bad_request(
            "CDN URLs transform the object they name: no sources (qrcode, compose) and no extra inputs",
        ));
    }
    Ok(pipeline)
}

/// `GET /cdn/p/{preset}/{bucket}/{key}`.
pub(crate) async fn preset(
    State(app): State<Arc<App>>,
    Path((preset, bucket, key)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    q: Result<Query<CdnQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let f = app
        .registry
        .get(&preset)
        .filter(|f| f.deployment.cdn.is_some())
        .ok_or_else(|| Problem::not_found("no_such_preset", format!("no CDN preset `{preset}`")))?;
    transform(&app, &method, &headers, &bucket, &key, Transform::Preset(f), disposition(q, &key)).await
}

/// `GET /cdn/t/{signature}/{ops}/{bucket}/{key}`.
pub(crate) async fn adhoc(
    State(app): State<Arc<App>>,
    Path((signature, _ops, bucket, key)): Path<(String, String, String, String)>,
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    q: Result<Query<CdnQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    // The signature covers the path as sent: `{ops}/{bucket}/{key}`, still percent-encoded.
    let raw = uri.path().strip_prefix("/cdn/t/").and_then(|p| p.split_once('/')).map_or("", |(_, rest)| rest);
    let signed = if signature == "_" { app.config.cdn_allow_unsigned } else { app.cdn.verify(&signature, raw) };
    if !signed {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "bad_signature",
            if signature == "_" {
                "unsigned CDN URLs are not allowed here; sign them (POST /v1/cdn/sign)"
            } else {
                "the CDN URL's signature does not match"
            },
        ));
    }
    let raw_ops = raw.split('/').next().unwrap_or_default();
    let (steps, auto) = parse_ops(raw_ops)?;
    // Validate before any lookup, so a bad URL is a 400 whatever the object.
    build(&steps)?;
    let t = Transform::AdHoc { ops: raw_ops.to_owned(), steps, auto };
    transform(&app, &method, &headers, &bucket, &key, t, disposition(q, &key)).await
}

/// Serves a transformation of a public object: from the edge cache, or computed once for all
/// identical requests in flight.
async fn transform(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    bucket: &str,
    key: &str,
    t: Transform,
    content_disposition: Option<String>,
) -> Result<Response, Problem> {
    let b = public_bucket(app, bucket, key).await?;
    let source = app.objects.head(bucket, key).await.map_err(|e| match e {
        pixflow_backends::ObjectError::NoSuchKey { .. } => hidden(bucket, key),
        e => e.into(),
    })?;
    let (id, auto, preset_cache) = match &t {
        Transform::Preset(f) => {
            let cdn = f.deployment.cdn.as_ref();
            (
                format!("p\n{}\n{}", f.deployment.name, f.deployment.version),
                cdn.is_some_and(|c| c.auto_format),
                cdn.and_then(|c| c.cache_control.clone()),
            )
        }
        Transform::AdHoc { ops, auto, .. } => (format!("t\n{ops}"), *auto, None),
    };
    let format = if auto { negotiate(headers, &app.config.cdn_auto_formats) } else { None };
    let digest = hex::encode(sha2::Sha256::digest(
        format!("{id}\n{bucket}\n{key}\n{}\n{}", source.etag, format.map_or("own", OutFormat::extension)).as_bytes(),
    ));
    let (entry, status) = match app.cdn.cache.get(&digest).await {
        Some(e) => (e, "HIT"),
        None => (coalesced(app, &digest, &source, t, format).await?, "MISS"),
    };
    metrics::counter!("pixflow_cdn_requests_total", "cache" => status).increment(1);
    let cache_control =
        Some(preset_cache.or(b.config.cache_control).unwrap_or_else(|| app.config.cdn_cache_control.clone()));
    let extra = Extra {
        cache_control,
        content_disposition,
        vary: auto.then_some("Accept"),
        cache_status: Some(status),
        metadata: false,
        file_name: Some(file_name(key).to_owned()),
        active_inline: false,
    };
    let rep = Representation {
        etag: &entry.etag,
        modified_ms: entry.created_ms,
        size: entry.bytes.len() as u64,
        content_type: &entry.content_type,
        metadata: None,
    };
    delivery::respond(method, headers, rep, Payload::Bytes(entry.bytes.clone()), extra).await
}

/// Runs the transformation once for every request waiting on the same digest. It runs in a
/// task of its own, so a caller that goes away neither cancels it for the others nor leaves
/// its entry in the map.
async fn coalesced(
    app: &Arc<App>,
    digest: &str,
    source: &ObjectMeta,
    t: Transform,
    format: Option<OutFormat>,
) -> Result<CachedEntry, Problem> {
    let mut flight = {
        let mut inflight = app.cdn.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match inflight.get(digest) {
            Some(f) => {
                app.cdn.joined.fetch_add(1, Ordering::Relaxed);
                f.clone()
            }
            None => {
                let (tx, rx) = tokio::sync::watch::channel(None);
                inflight.insert(digest.to_owned(), rx.clone());
                let (app, digest, source) = (app.clone(), digest.to_owned(), source.clone());
                tokio::spawn(async move {
                    let result = run(&app, &digest, &source, t, format).await;
                    tx.send_replace(Some(result));
                    app.cdn.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&digest);
                });
                rx
            }
        }
    };
    let done = flight
        .wait_for(Option::is_some)
        .await
        .map_err(|_| Problem::internal("a CDN transformation ended without a result"))?;
    done.clone().unwrap_or_else(|| Err(Problem::internal("a CDN transformation ended without a result")))
}

async fn run(
    app: &Arc<App>,
    digest: &str,
    source: &ObjectMeta,
    t: Transform,
    format: Option<OutFormat>,
) -> Result<CachedEntry, Problem> {
    let platform: Vec<(String, String)> =
        format.map(|f| vec![("format".to_owned(), f.extension().to_owned())]).unwrap_or_default();
    let limit = match &t {
        Transform::Preset(f) => f.deployment.quota.limits.max_input_bytes,
        Transform::AdHoc { .. } => app.config.cdn_limits.max_input_bytes,
    };
    if source.size > limit {
        return Err(pixflow_backends::ObjectError::TooLarge { limit, actual: source.size }.into());
    }
    let mut ticket = app.node.admit(0)?;
    ticket.grow(source.size)?;
    let (meta, input) = app.objects.read(&source.bucket, &source.key, limit).await?;
    if input.len() as u64 > source.size {
        ticket.grow(input.len() as u64 - source.size)?;
    }
    // Replaced since the lookup: serve what was read, but do not file it under the old ETag.
    let cacheable = meta.etag == source.etag;
    let renditions = match t {
        Transform::Preset(f) => {
            let call = crate::dispatch::Call {
                input: Some(crate::dispatch::Source::Read(input)),
                inputs: Default::default(),
                params: Vec::new(),
                platform,
                content_type: None,
                mode: crate::dispatch::Mode::Raw,
                output: crate::dispatch::Destination::Caller,
                background: false,
            };
            let done = crate::dispatch::call(app, f, call, Some(ticket), None).await?;
            match done.output.produced {
                pixflow_runtime::Produced::Renditions(r) => r,
                pixflow_runtime::Produced::Reply(_) => {
                    return Err(Problem::internal("a CDN preset answered as a process"));
                }
            }
        }
        Transform::AdHoc { mut steps, .. } => {
            if !platform.is_empty() {
                steps.push(("convert".to_owned(), platform));
            }
            let pipeline = build(&steps)?;
            let job = pixflow_runtime::EngineJob {
                pipeline,
                input,
                inputs: Default::default(),
                limits: app.config.cdn_limits,
                deadline: tokio::time::Instant::now() + app.config.cdn_timeout,
                timeout: app.config.cdn_timeout,
                max_response_bytes: MAX_RESULT_BYTES,
                foreign: app.foreign.clone(),
            };
            pixflow_runtime::run_engine(&app.node, job, ticket).await?.renditions
        }
    };
    let [r] = <[_; 1]>::try_from(renditions).map_err(|r: Vec<_>| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_one_image",
            format!("the transformation gave {} images; a CDN URL serves one", r.len()),
        )
    })?;
    app.cdn.transformations.fetch_add(1, Ordering::Relaxed);
    let etag = hex::encode(&sha2::Sha256::digest(&r.bytes)[..16]);
    let entry = CachedEntry {
        bytes: Bytes::from(r.bytes),
        content_type: r.format.mime().to_owned(),
        etag,
        created_ms: pixflow_backends::state::now_ms(),
    };
    // The source may have changed while this ran; its derivative is then not kept.
    if cacheable
        && app.objects.head(&source.bucket, &source.key).await.is_ok_and(|now| now.etag == meta.etag)
        && let Err(e) = app.cdn.cache.put(digest, &source.bucket, &source.key, &entry).await
    {
        tracing::warn!(error = %e, "keeping a transformed result in the edge cache");
    }
    Ok(entry)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeRequest {
    bucket: String,
    key: Option<String>,
    prefix: Option<String>,
}

/// `POST /v1/cdn/purge` (admin): `{"bucket", "key"}` or `{"bucket", "prefix"}`.
pub(crate) async fn purge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    let req: PurgeRequest = crate::functions::read_json(body, "purge request").await?;
    let purged = match (&req.key, &req.prefix) {
        (Some(k), None) => app.cdn.cache.purge(&req.bucket, k, false),
        (None, Some(p)) => app.cdn.cache.purge(&req.bucket, p, true),
        _ => return Err(Problem::bad_request("give `key` or `prefix`")),
    };
    Ok(Json(json!({"purged": purged})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignRequest {
    ops: String,
    bucket: String,
    key: String,
}

/// `POST /v1/cdn/sign` (any token): the signed URL of an ad-hoc transformation.
pub(crate) async fn sign(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, Problem> {
    auth::role(&app.catalogue, &headers).await?;
    let req: SignRequest = crate::functions::read_json(body, "sign request").await?;
    pixflow_backends::objects::check_bucket(&req.bucket)?;
    pixflow_backends::objects::check_key(&req.key)?;
    // Keep the ops as written (each key and value encoded the way the parser decodes them);
    // they are one path segment, so `/`, `?` and `#` must be percent-encoded.
    if req.ops.contains(['/', '?', '#']) {
        return Err(Problem::bad_request("ops: percent-encode `/`, `?` and `#`"));
    }
    let (steps, _) = parse_ops(&req.ops)?;
    build(&steps)?;
    let path = format!("{}/{}/{}", req.ops, req.bucket, key_path(&req.key));
    let signature = app.cdn.sign(&path);
    let url = format!("{}/cdn/t/{signature}/{path}", app.config.public_url.trim_end_matches('/'));
    Ok(Json(json!({"url": url, "signature": signature, "path": path})))
}

/// The change feed cursor of [`follow_changes`], saved in the object store.
pub const PURGE_CURSOR: &str = "cdn-purge";
/// Change records read at once.
const PURGE_BATCH: u32 = 512;

/// Purges the derivatives of every object that changes, for as long as the node runs: reads
/// the object store's change feed from the cursor [`PURGE_CURSOR`], purges each record's
/// derivatives, saves the cursor after each batch, and waits for the next commit when it has
/// seen everything. Changes made while the node was down are purged at the next start. A cursor
/// older than the feed's retention purges the whole edge cache (what it missed is unknown), then
/// goes on from the oldest record kept.
pub(crate) async fn follow_changes(app: Arc<App>) {
    let feed = app.objects.feed();
    let mut cursor = None;
    loop {
        let step = async {
            let after = match cursor {
                Some(c) => c,
                None => feed.cursor(PURGE_CURSOR).await?,
            };
            cursor = Some(after);
            match feed.read(after, PURGE_BATCH).await {
                Ok(batch) if batch.is_empty() => feed.wait(after).await?,
                Ok(batch) => {
                    for change in &batch {
                        app.cdn.cache.purge(&change.bucket, &change.key, false);
                    }
                    let last = batch.last().map_or(after, |c| c.seq);
                    feed.save_cursor(PURGE_CURSOR, last).await?;
                    cursor = Some(last);
                }
                Err(pixflow_backends::FeedError::Behind { cursor: behind, oldest }) => {
                    let purged = app.cdn.cache.purge_all();
                    tracing::warn!(
                        cursor = behind,
                        oldest,
                        purged,
                        "the edge cache's purge cursor is older than the change feed keeps; purged the whole cache"
                    );
                    let resume = oldest.saturating_sub(1);
                    feed.save_cursor(PURGE_CURSOR, resume).await?;
                    cursor = Some(resume);
                }
                Err(e) => return Err(e),
            }
            Ok::<(), pixflow_backends::FeedError>(())
        };
        let failed = tokio::select! {
            () = app.stopped() => return,
            r = step => r.err(),
        };
        if let Some(e) = failed {
            // Derivatives are keyed by their source's ETag, so nothing stale is served meanwhile.
            tracing::warn!(error = %e, "following the change feed for edge purges; retrying in a second");
            tokio::select! {
                () = app.stopped() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_preferred_format_it_allows() {
        let prefs = [OutFormat::Avif, OutFormat::Webp];
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h, &prefs), None);
        h.insert(header::ACCEPT, "image/avif,image/webp,image/apng,image/*,*/*;q=0.8".parse().unwrap());
        assert_eq!(negotiate(&h, &prefs), Some(OutFormat::Avif));
        h.insert(header::ACCEPT, "image/webp,*/*".parse().unwrap());
        assert_eq!(negotiate(&h, &prefs), Some(OutFormat::Webp));
        h.insert(header::ACCEPT, "image/avif;q=0, image/webp;q=0.5".parse().unwrap());
        assert_eq!(negotiate(&h, &prefs), Some(OutFormat::Webp));
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        assert_eq!(negotiate(&h, &prefs), None);
        assert_eq!(negotiate(&h, &[]), None);
    }

    #[test]
    fn ops_parse_into_steps_and_auto_format() {
        let (steps, auto) = parse_ops("resize,width=300,fit=cover+convert,format=auto").unwrap();
        assert!(auto);
        assert_eq!(
            steps,
            vec![("resize".to_owned(), vec![("width".into(), "300".into()), ("fit".into(), "cover".into())])]
        );
        let (steps, auto) = parse_ops("text,text=Hello%2C%20world%21+convert,format=webp,quality=70").unwrap();
        assert!(!auto);
        assert_eq!(steps[0].1[0].1, "Hello, world!");
        assert_eq!(steps[1].1.len(), 2);
        for bad in ["", "resize,width", "output,name=x", "frames,count=3", "resize,width=%FF"] {
            assert!(parse_ops(bad).is_err(), "{bad}");
        }
        assert!(parse_ops(&"a".repeat(2000)).is_err());
        // At most 16 steps.
        assert_eq!(parse_ops(&vec!["flip"; 16].join("+")).unwrap().0.len(), 16);
        assert!(parse_ops(&vec!["flip"; 17].join("+")).is_err());
    }
}
