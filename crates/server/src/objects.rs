//! The native object API: buckets (`/v1/buckets/{bucket}`: create or configure, show, delete
//! when empty; admin) and objects (`/v1/buckets/{bucket}/objects/{key...}`: PUT streamed to
//! disk with user metadata from `x-pixflow-meta-*` and `If-Match` / `If-None-Match: *`,
//! GET/HEAD with conditional requests and ranges, DELETE), plus listing with prefix, delimiter
//! and cursor pagination. Object reads and writes need an API token of any role; public reads
//! go through the CDN routes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http_body_util::BodyExt;
use pixflow_backends::{Bucket, BucketConfig, Condition, ObjectMeta, Resume};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::App;
use crate::auth;
use crate::delivery::{self, Extra, META_PREFIX};
use crate::problem::Problem;

pub(crate) fn describe_bucket(app: &App, b: &Bucket) -> Value {
    json!({
        "name": b.name,
        "public": b.config.public,
        "cache_control": b.config.cache_control.as_deref().unwrap_or(&app.config.cdn_cache_control),
        "created_at_ms": b.created_ms,
    })
}

/// An object as the API shows it; `url` is its CDN address when its bucket is public.
pub(crate) fn describe_object(app: &App, m: &ObjectMeta, public: bool) -> Value {
    let mut v = json!({
        "bucket": m.bucket,
        "key": m.key,
        "etag": m.etag,
        "size": m.size,
        "content_type": m.content_type,
        "last_modified_ms": m.modified_ms,
    });
    if !m.metadata.is_empty() {
        v["metadata"] = json!(m.metadata);
    }
    if public {
        v["url"] = Value::String(crate::cdn::url(app, &m.bucket, &m.key));
    }
    v
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct BucketBody {
    #[serde(default)]
    public: bool,
    cache_control: Option<String>,
}

pub(crate) async fn list_buckets(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, Problem> {
    auth::role(&app.catalogue, &headers).await?;
    let buckets = app.objects.buckets().await?;
    Ok(Json(json!({"buckets": buckets.iter().map(|b| describe_bucket(&app, b)).collect::<Vec<_>>()})))
}

pub(crate) async fn put_bucket(
    State(app): State<Arc<App>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    let body = crate::functions::read_body(body, 16 << 10).await?;
    let spec: BucketBody = if body.iter().all(u8::is_ascii_whitespace) {
        BucketBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| Problem::bad_request(format!("bucket settings: {e}")))?
    };
    let config = BucketConfig { public: spec.public, cache_control: spec.cache_control };
    let created = app.objects.put_bucket(&bucket, &config).await?;
    let b = app.objects.bucket(&bucket).await?.ok_or_else(|| Problem::internal("bucket vanished after its write"))?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(describe_bucket(&app, &b))).into_response())
}

pub(crate) async fn show_bucket(
    State(app): State<Arc<App>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    auth::role(&app.catalogue, &headers).await?;
    let b = app.objects.bucket(&bucket).await?.ok_or_else(|| no_such_bucket(&bucket))?;
    Ok(Json(describe_bucket(&app, &b)))
}

pub(crate) async fn delete_bucket(
    State(app): State<Arc<App>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    auth::admin(&app.catalogue, &headers).await?;
    app.objects.delete_bucket(&bucket).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn no_such_bucket(bucket: &str) -> Problem {
    pixflow_backends::ObjectError::NoSuchBucket(bucket.to_owned()).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    prefix: String,
    delimiter: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn list_objects(
    State(app): State<Arc<App>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Problem> {
    auth::role(&app.catalogue, &headers).await?;
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    if q.prefix.len() > pixflow_backends::objects::MAX_KEY_BYTES || q.delimiter.as_ref().is_some_and(|d| d.len() > 16) {
        return Err(Problem::bad_request("prefix: at most 1024 bytes; delimiter: at most 16"));
    }
    let resume = q
        .cursor
        .as_deref()
        .map(|c| Resume::from_token(c).ok_or_else(|| Problem::bad_request("cursor: not one this API returned")))
        .transpose()?;
    let limit = q.limit.unwrap_or(pixflow_backends::objects::MAX_LIST);
    let page = app.objects.list(&bucket, &q.prefix, q.delimiter.as_deref(), resume.as_ref(), limit).await?;
    let public = app.objects.bucket(&bucket).await?.is_some_and(|b| b.config.public);
    Ok(Json(json!({
        "bucket": bucket,
        "prefix": q.prefix,
        "objects": page.objects.iter().map(|m| {
            let mut v = json!({"key": m.key, "etag": m.etag, "size": m.size, "last_modified_ms": m.modified_ms});
            if public {
                v["url"] = Value::String(crate::cdn::url(&app, &bucket, &m.key));
            }
            v
        }).collect::<Vec<_>>(),
        "prefixes": page.prefixes,
        "next_cursor": page.next.as_ref().map(Resume::token),
    })))
}

const OCTET_STREAM: &str = "application/octet-stream";

/// The content type of an upload that declared none: the media format its first bytes show
/// (so the CDN serves `curl -T photo.jpg` uploads as images), else `application/octet-stream`.
pub(crate) fn sniffed_type(prefix: &[u8]) -> &'static str {
    pixflow_imageops::sniff(prefix).map_or(OCTET_STREAM, pixflow_imageops::Format::mime)
}

/// The write condition of a request's `If-Match` / `If-None-Match: *`.
fn write_condition(headers: &HeaderMap) -> Result<Condition, Problem> {
    if let Some(tags) = delivery::tags(headers, header::IF_MATCH) {
        return Ok(Condition::Matches(tags.into_iter().filter(|(weak, _)| !weak).map(|(_, t)| t).collect()));
    }
    match delivery::tags(headers, header::IF_NONE_MATCH) {
        None => Ok(Condition::None),
        Some(tags) if tags.len() == 1 && tags[0].1 == "*" => Ok(Condition::Absent),
        Some(_) => Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "a write takes `If-None-Match: *` (create only) or `If-Match`",
        )),
    }
}

/// User metadata from `x-pixflow-meta-*` headers.
fn user_metadata(headers: &HeaderMap) -> Result<BTreeMap<String, String>, Problem> {
    let mut m = BTreeMap::new();
    for (name, value) in headers {
        if let Some(k) = name.as_str().strip_prefix(META_PREFIX) {
            let v = value.to_str().map_err(|_| Problem::bad_request(format!("{name}: visible ASCII only")))?;
            m.insert(k.to_owned(), v.to_owned());
        }
    }
    Ok(m)
}

pub(crate) async fn put_object(
    State(app): State<Arc<App>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let (_, actor) = auth::caller(&app.catalogue, &headers).await?;
    let objects = app.objects.by(actor);
    pixflow_backends::objects::check_bucket(&bucket)?;
    pixflow_backends::objects::check_key(&key)?;
    let declared_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let metadata = user_metadata(&headers)?;
    pixflow_backends::objects::check_attributes(declared_type.as_deref().unwrap_or(OCTET_STREAM), &metadata)?;
    let condition = write_condition(&headers)?;
    let max = app.config.max_object_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max) {
        return Err(pixflow_backends::ObjectError::TooLarge { limit: max, actual: n }.into());
    }
    let md5 = match headers.get("content-md5") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok())
                .filter(|d| d.len() == 16)
                .ok_or_else(|| Problem::bad_request("Content-MD5: the base64 of 16 bytes"))?,
        ),
    };
    // An upload is a request like any other: it takes a slot on the node, and the memory its
    // commit holds (sending to an S3 service buffers up to one PUT or a few parts).
    let mut ticket = app.node.admit(0)?;
    let mut upload = objects.upload(max).await?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| crate::functions::body_problem(&e))?;
        if let Ok(data) = frame.into_data() {
            upload.write(&data).await?;
        }
    }
    if md5.is_some_and(|want| upload.md5()[..] != want[..]) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "bad_digest",
            "Content-MD5 does not match the bytes received",
        ));
    }
    let content_type = declared_type.unwrap_or_else(|| sniffed_type(upload.prefix()).to_owned());
    ticket.grow(objects.commit_memory(upload.size()))?;
    let meta = objects.commit(upload, &bucket, &key, &content_type, &metadata, &condition).await?;
    drop(ticket);
    let public = app.objects.bucket(&bucket).await?.is_some_and(|b| b.config.public);
    let mut resp = Json(describe_object(&app, &meta, public)).into_response();
    if let Ok(v) = delivery::etag(&meta).parse() {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

pub(crate) async fn get_object(
    State(app): State<Arc<App>>,
    Path((bucket, key)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    auth::role(&app.catalogue, &headers).await?;
    let (meta, file) = app.objects.get(&bucket, &key).await?;
    let extra = Extra { metadata: true, file_name: Some(crate::cdn::file_name(&key).to_owned()), ..Extra::default() };
    delivery::respond(&method, &headers, (&meta).into(), delivery::Payload::Object(file), extra).await
}

pub(crate) async fn delete_object(
    State(app): State<Arc<App>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    let (_, actor) = auth::caller(&app.catalogue, &headers).await?;
    let condition = write_condition(&headers)?;
    // Deleting what is not there succeeds (S3's behaviour): a retried DELETE stays a success.
    app.objects.by(actor).delete(&bucket, &key, &condition).await?;
    Ok(StatusCode::NO_CONTENT)
}
