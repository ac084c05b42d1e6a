//! Serving stored objects over HTTP, shared by the object API and the CDN routes: strong
//! validators (`ETag` from the content's MD5, `Last-Modified`), conditional requests in RFC
//! 9110's order (§13.2.2: `If-Match`, `If-Unmodified-Since`, `If-None-Match`,
//! `If-Modified-Since`, then `Range` under `If-Range`), single byte ranges (206 / 416), and the
//! bytes streamed from the stored version in 64 KiB chunks, never read whole into memory.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pixflow_backends::ObjectMeta;

use crate::problem::Problem;

/// Prefix of user-metadata headers (`x-amz-meta-` in S3).
pub(crate) const META_PREFIX: &str = "x-pixflow-meta-";

/// What the caller of [`respond`] adds to the stored facts.
#[derive(Default)]
pub(crate) struct Extra {
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    /// Send user metadata as `x-pixflow-meta-*` headers.
    pub metadata: bool,
    /// `Vary` (the CDN's negotiated formats vary on `Accept`).
    pub vary: Option<&'static str>,
    /// `X-Cache: HIT` / `MISS` of the edge cache.
    pub cache_status: Option<&'static str>,
    /// The name an active type (HTML, SVG, XML, JavaScript) is forced to download as.
    pub file_name: Option<String>,
    /// Serve active types inline (the operator allowed it for this bucket).
    pub active_inline: bool,
}

/// Content-Security-Policy of every stored or transformed answer: nothing it holds may run
/// scripts, load resources or reach the origin's storage, even when opened as a page.
pub(crate) const CONTENT_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; sandbox";

/// Media types a browser runs or renders as a document that can hold scripts.
pub(crate) fn is_active(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "text/html"
            | "application/xhtml+xml"
            | "image/svg+xml"
            | "text/xml"
            | "application/xml"
            | "text/xsl"
            | "text/javascript"
            | "application/javascript"
            | "application/x-javascript"
            | "application/ecmascript"
            | "text/ecmascript"
            | "multipart/x-mixed-replace"
    ) || essence.ends_with("+xml")
}

/// What is served: a stored object, or a transformed result of one.
pub(crate) struct Representation<'a> {
    /// Strong validator, hex without quotes.
    pub etag: &'a str,
    pub modified_ms: i64,
    pub size: u64,
    pub content_type: &'a str,
    pub metadata: Option<&'a BTreeMap<String, String>>,
}

impl<'a> From<&'a ObjectMeta> for Representation<'a> {
    fn from(m: &'a ObjectMeta) -> Representation<'a> {
        Representation {
            etag: &m.etag,
            modified_ms: m.modified_ms,
            size: m.size,
            content_type: &m.content_type,
            metadata: Some(&m.metadata),
        }
    }
}

/// Where the bytes come from.
pub(crate) enum Payload {
    /// A stored version, read only for the bytes the answer carries.
    Object(pixflow_backends::objects::Reader),
    Bytes(bytes::Bytes),
}

/// The quoted strong entity tag of an object.
pub(crate) fn etag(meta: &ObjectMeta) -> String {
    format!("\"{}\"", meta.etag)
}

fn quoted(etag: &str) -> String {
    format!("\"{etag}\"")
}

fn modified(meta: &Representation<'_>) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(meta.modified_ms).unwrap_or(0))
}

fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

fn seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Entity tags of an `If-Match` / `If-None-Match` list: `(weak, opaque tag without quotes)`;
/// `*` comes back as `(false, "*")`.
pub(crate) fn tags(headers: &HeaderMap, name: HeaderName) -> Option<Vec<(bool, String)>> {
    let mut out = Vec::new();
    let mut any = false;
    for v in headers.get_all(name) {
        any = true;
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',') {
            let t = t.trim();
            if t == "*" {
                out.push((false, "*".to_owned()));
            } else if let Some(rest) = t.strip_prefix("W/") {
                out.push((true, rest.trim_matches('"').to_owned()));
            } else if !t.is_empty() {
                out.push((false, t.trim_matches('"').to_owned()));
            }
        }
    }
    any.then_some(out)
}

fn date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    headers.get(name)?.to_str().ok().and_then(|v| httpdate::parse_http_date(v).ok())
}

/// What the preconditions decide.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Proceed,
    NotModified,
    Failed,
}

/// Evaluates the request's preconditions against the current object (RFC 9110 §13.2.2).
pub(crate) fn preconditions(method: &Method, headers: &HeaderMap, meta: &Representation<'_>) -> Verdict {
    let safe = method == Method::GET || method == Method::HEAD;
    if let Some(list) = tags(headers, header::IF_MATCH) {
        // Strong comparison: a weak tag never matches.
        if !list.iter().any(|(weak, t)| !weak && (t == "*" || *t == meta.etag)) {
            return Verdict::Failed;
        }
    } else if let Some(since) = date(headers, header::IF_UNMODIFIED_SINCE)
        && seconds(modified(meta)) > seconds(since)
    {
        return Verdict::Failed;
    }
    if let Some(list) = tags(headers, header::IF_NONE_MATCH) {
        // Weak comparison.
        if list.iter().any(|(_, t)| t == "*" || *t == meta.etag) {
            return if safe { Verdict::NotModified } else { Verdict::Failed };
        }
    } else if safe
        && let Some(since) = date(headers, header::IF_MODIFIED_SINCE)
        && seconds(modified(meta)) <= seconds(since)
    {
        return Verdict::NotModified;
    }
    Verdict::Proceed
}

/// A byte range to serve, resolved against the size.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Range {
    Full,
    /// `start..=end`.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a `Range` header for a representation of `size` bytes. One range only: several, or
/// a syntax we do not know, are ignored and the whole object is served (RFC 9110 §14.2 allows it).
pub(crate) fn range(value: Option<&str>, size: u64) -> Range {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return Range::Full };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Range::Full };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| if s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.is_empty(), b.is_empty()) {
        // `bytes=-n`: the last n bytes.
        (true, false) => match num(b) {
            Some(0) => Range::Unsatisfiable,
            Some(_) if size == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part(size.saturating_sub(n), size - 1),
            None => Range::Full,
        },
        (false, _) => {
            let Some(start) = num(a) else { return Range::Full };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            match end {
                None => Range::Full,
                Some(end) if end < start => Range::Full,
                Some(_) if start >= size => Range::Unsatisfiable,
                Some(end) => Range::Part(start, end.min(size - 1)),
            }
        }
        (true, true) => Range::Full,
    }
}

/// Whether `If-Range` lets a range through: it must name the current object (strong ETag, or
/// exactly its `Last-Modified`).
fn if_range_holds(headers: &HeaderMap, meta: &Representation<'_>) -> bool {
    let Some(v) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else { return true };
    let v = v.trim();
    if v.starts_with('"') {
        return v.trim_matches('"') == meta.etag;
    }
    httpdate::parse_http_date(v).is_ok_and(|d| seconds(d) == seconds(modified(meta)))
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Headers every answer about the object carries (200, 206, 304).
fn validators(h: &mut HeaderMap, meta: &Representation<'_>, extra: &Extra) {
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_POLICY));
    insert(h, header::ETAG, &quoted(meta.etag));
    insert(h, header::LAST_MODIFIED, &http_date(modified(meta)));
    if let Some(cc) = &extra.cache_control {
        insert(h, header::CACHE_CONTROL, cc);
    }
    if let Some(v) = extra.vary {
        h.insert(header::VARY, HeaderValue::from_static(v));
    }
    if let Some(v) = extra.cache_status {
        h.insert("x-cache", HeaderValue::from_static(v));
    }
}

/// The answer to a GET or HEAD of a representation.
pub(crate) async fn respond(
    method: &Method,
    headers: &HeaderMap,
    meta: Representation<'_>,
    payload: Payload,
    extra: Extra,
) -> Result<Response, Problem> {
    match preconditions(method, headers, &meta) {
        Verdict::Proceed => {}
        Verdict::NotModified => {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            validators(resp.headers_mut(), &meta, &extra);
            return Ok(resp);
        }
        Verdict::Failed => {
            return Err(Problem::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                "the object does not match the request's preconditions",
            ));
        }
    }
    let wanted = if if_range_holds(headers, &meta) {
        range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), meta.size)
    } else {
        Range::Full
    };
    let (status, start, len) = match wanted {
        Range::Full => (StatusCode::OK, 0, meta.size),
        Range::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Range::Unsatisfiable => {
            let mut resp = Problem::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the object is {} bytes", meta.size),
            )
            .into_response();
            insert(resp.headers_mut(), header::CONTENT_RANGE, &format!("bytes */{}", meta.size));
            return Ok(resp);
        }
    };
    let body = match payload {
        _ if method == Method::HEAD => Body::empty(),
        Payload::Bytes(b) => {
            let (a, z) =
                (usize::try_from(start).unwrap_or(usize::MAX), usize::try_from(start + len).unwrap_or(usize::MAX));
            Body::from(b.slice(a.min(b.len())..z.min(b.len())))
        }
        Payload::Object(reader) => Body::from_stream(reader.range(start, len).await?),
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    validators(h, &meta, &extra);
    insert(h, header::CONTENT_TYPE, meta.content_type);
    insert(h, header::CONTENT_LENGTH, &len.to_string());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        insert(h, header::CONTENT_RANGE, &format!("bytes {}-{}/{}", start, start + len - 1, meta.size));
    }
    if let Some(d) = &extra.content_disposition {
        insert(h, header::CONTENT_DISPOSITION, d);
    } else if is_active(meta.content_type) && !extra.active_inline {
        insert(h, header::CONTENT_DISPOSITION, &attachment(extra.file_name.as_deref().unwrap_or("download")));
    }
    if extra.metadata
        && let Some(m) = meta.metadata
    {
        for (k, v) in m {
            if let Ok(name) = HeaderName::from_bytes(format!("{META_PREFIX}{k}").as_bytes()) {
                insert(h, name, v);
            }
        }
    }
    Ok(resp)
}

/// `Content-Disposition: attachment` with the file name in both forms (RFC 6266): a plain
/// ASCII fallback and the exact UTF-8 name percent-encoded (RFC 8187).
pub(crate) fn attachment(name: &str) -> String {
    let fallback: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_the_size() {
        assert_eq!(range(None, 10), Range::Full);
        assert_eq!(range(Some("bytes=0-3"), 10), Range::Part(0, 3));
        assert_eq!(range(Some("bytes=5-"), 10), Range::Part(5, 9));
        assert_eq!(range(Some("bytes=-3"), 10), Range::Part(7, 9));
        assert_eq!(range(Some("bytes=-30"), 10), Range::Part(0, 9));
        assert_eq!(range(Some("bytes=8-100"), 10), Range::Part(8, 9));
        assert_eq!(range(Some("bytes=10-"), 10), Range::Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 10), Range::Unsatisfiable);
        assert_eq!(range(Some("bytes=0-"), 0), Range::Unsatisfiable);
        // Unknown or multiple ranges: the whole object.
        for v in ["items=0-1", "bytes=0-1,4-5", "bytes=3-1", "bytes=a-b", "bytes=-", "bytes=+1-2"] {
            assert_eq!(range(Some(v), 10), Range::Full, "{v}");
        }
    }

    #[test]
    fn attachment_names_survive_any_characters() {
        assert_eq!(attachment("a b.jpg"), "attachment; filename=\"a b.jpg\"; filename*=UTF-8''a%20b.jpg");
        let d = attachment("猫\"x\r\n.png");
        assert!(d.starts_with("attachment; filename=\"__x__.png\""), "{d}");
        assert!(d.contains("%E7%8C%AB%22x%0D%0A.png"), "{d}");
        assert!(HeaderValue::from_str(&d).is_ok());
    }
}
