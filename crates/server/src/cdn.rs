//! The CDN edge routes. Today: stored objects of public buckets at `/cdn/{bucket}/{key...}`,
//! without a token, with strong validators, 304s, ranges, the bucket's `Cache-Control` and an
//! optional `?download[=name]` attachment. A bucket that is private or missing answers like a
//! missing object, so the edge does not tell which buckets exist. URLs handed to callers (stored
//! results) are built here from the node's public base URL.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use crate::App;
use crate::delivery::{self, Extra};
use crate::problem::Problem;

/// Bytes of a key segment that stay as they are in a URL path (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

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

pub(crate) async fn get(
    State(app): State<Arc<App>>,
    Path((bucket, key)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    q: Result<Query<CdnQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let hidden = || Problem::not_found("no_such_key", format!("no object `{key}` in bucket `{bucket}`"));
    let b = match app.objects.bucket(&bucket).await? {
        Some(b) if b.config.public => b,
        _ => return Err(hidden()),
    };
    let (meta, file) = app.objects.get(&bucket, &key).await?;
    let content_disposition = q.download.map(|name| {
        let name = if name.is_empty() { key.rsplit('/').next().unwrap_or(&key).to_owned() } else { name };
        delivery::attachment(&name)
    });
    let cache_control = Some(b.config.cache_control.unwrap_or_else(|| app.config.cdn_cache_control.clone()));
    delivery::respond(&method, &headers, meta, file, Extra { cache_control, content_disposition, metadata: false })
        .await
}
