//! Large payloads by reference: a queued call's inline inputs and a kept result larger than
//! [`OVER`] are written to the node's object store, in the reserved spool bucket
//! (`--spool-bucket`, default [`DEFAULT_BUCKET`]), and the invocation log records where they are
//! instead of the bytes. The queue message only ever carries the invocation's id, so no backend
//! sees a message larger than it allows, and no state database row holds an image.
//!
//! Keys are `invocations/{id}/input`, `invocations/{id}/inputs/{n}` (named inputs, in name order)
//! and `invocations/{id}/result.{attempt}` (the attempt that produced it: an attempt whose lease
//! was taken over writes under its own number and never over the winner's result). Inputs are
//! read back pinned to the ETag they were written with. They are deleted when the invocation
//! succeeds; a dead letter keeps them for its re-drive. Whatever the log no longer names (the
//! retention purge removed its invocation, a stop between writing a part and recording the
//! invocation) is deleted by [`collect`], which the retention loop runs, once it is older than
//! [`GRACE`].
//!
//! The bucket is reserved: the API, the S3 endpoint and the CDN refuse it (`reserved_bucket`) and
//! do not list it; only the node's internal handle ([`pixflow_backends::Objects::internal`]) uses
//! it. Its writes appear in the change feed as the system's.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use pixflow_backends::{BucketConfig, Condition, Objects};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::App;

/// The spool bucket unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "pixflow-spool";

/// Inline inputs and kept results larger than this many bytes go to the spool.
pub(crate) const OVER: usize = 256 * 1024;

/// How old a part the log no longer names must be before [`collect`] deletes it: parts are
/// written just before their invocation is recorded.
pub(crate) const GRACE: Duration = Duration::from_secs(3600);

/// The common prefix of every spooled part.
const PREFIX: &str = "invocations/";

/// A spooled part, as the invocation log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Spooled {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

/// At start: creates the spool bucket in the embedded store, or registers the S3 service's
/// (which must exist there). A service that does not answer stops the start, as an unreachable
/// state or queue does.
pub(crate) async fn prepare(objects: &Objects, bucket: &str) -> anyhow::Result<()> {
    let internal = objects.internal();
    if internal.bucket(bucket).await?.is_none() {
        match internal.put_bucket(bucket, &BucketConfig::default()).await {
            Ok(_) => {}
            Err(e @ pixflow_backends::ObjectError::Service(_)) => {
                return Err(e).context("--objects-s3-endpoint: the S3 service does not answer");
            }
            Err(e) => return Err(e).with_context(|| format!("--spool-bucket: preparing the spool bucket `{bucket}`")),
        }
    }
    Ok(())
}

fn part_key(id: &str, part: &str) -> String {
    format!("{PREFIX}{id}/{part}")
}

/// The part of an invocation's result its `attempt` kept in the spool.
pub(crate) fn result_part(attempt: u32) -> String {
    format!("result.{attempt}")
}

/// The key of the result an invocation's `attempt` kept in the spool.
pub(crate) fn result_key(id: &str, attempt: u32) -> String {
    part_key(id, &result_part(attempt))
}

/// Writes one part of invocation `id`.
pub(crate) async fn put(app: &App, id: &str, part: &str, bytes: &[u8]) -> Result<Spooled, Error> {
    let key = part_key(id, part);
    let meta = app
        .objects
        .internal()
        .put(&app.config.spool_bucket, &key, "application/octet-stream", &BTreeMap::new(), &Condition::None, bytes)
        .await?;
    Ok(Spooled { key, etag: meta.etag, size: meta.size })
}

/// Reads a spooled input back; it must hold what was written.
pub(crate) async fn read(app: &App, part: &Spooled) -> Result<Vec<u8>, Error> {
    let bucket = &app.config.spool_bucket;
    let (meta, bytes) = app.objects.internal().read(bucket, &part.key, part.size).await?;
    if meta.etag != part.etag {
        return Err(Error::Changed { bucket: bucket.clone(), key: part.key.clone(), etag: part.etag.clone() });
    }
    Ok(bytes)
}

/// Reads a result kept in the spool (at most `limit` bytes).
pub(crate) async fn read_result(app: &App, key: &str, limit: u64) -> Result<Vec<u8>, Error> {
    Ok(app.objects.internal().read(&app.config.spool_bucket, key, limit).await?.1)
}

/// Deletes parts that are no longer needed; a failure is logged and left to [`collect`].
pub(crate) async fn forget<'a>(app: &App, keys: impl IntoIterator<Item = &'a str>) {
    let objects = app.objects.internal();
    for key in keys {
        if let Err(e) = objects.delete(&app.config.spool_bucket, key, &Condition::None).await {
            tracing::warn!(key, error = %e, "deleting a spooled part; the spool's collection retries");
        }
    }
}

/// Deletes the parts of invocations the log no longer holds, written more than `grace` ago.
/// Returns how many went.
pub(crate) async fn collect(app: &App, grace: Duration) -> Result<u64, Error> {
    let objects = app.objects.internal();
    let bucket = &app.config.spool_bucket;
    let before = pixflow_backends::state::now_ms().saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
    let (mut resume, mut deleted) = (None, 0u64);
    loop {
        // One entry per invocation: its parts rolled up under `invocations/{id}/`.
        let page =
            objects.list(bucket, PREFIX, Some("/"), resume.as_ref(), pixflow_backends::objects::MAX_LIST).await?;
        for prefix in &page.prefixes {
            let id = prefix.trim_start_matches(PREFIX).trim_end_matches('/');
            if app.invocations.get(id).await?.is_some() {
                continue;
            }
            let parts = objects.list(bucket, prefix, None, None, pixflow_backends::objects::MAX_LIST).await?;
            for part in parts.objects.iter().filter(|p| p.modified_ms < before) {
                if objects.delete(bucket, &part.key, &Condition::None).await? {
                    deleted += 1;
                }
            }
        }
        match page.next {
            Some(next) => resume = Some(next),
            None => return Ok(deleted),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use axum::http::{Request, StatusCode};
    use base64::Engine as _;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;
    use crate::dispatch::B64;

    /// The admin token of [`crate::dispatch::tests::flip_node`].
    const ADMIN: &str = "pfx_test-admin-token";

    /// A PNG of noise (incompressible), `side` pixels square: larger than [`OVER`] from 300 on.
    fn noise_png(side: u32, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let img = image::RgbImage::from_fn(side, side, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let [r, g, b, ..] = state.to_le_bytes();
            image::Rgb([r, g, b])
        });
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        png.into_inner()
    }

    async fn send(app: &Arc<App>, req: Request<axum::body::Body>) -> (StatusCode, Vec<u8>) {
        let resp = crate::router(app.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    async fn spooled(app: &App, key: &str) -> Option<u64> {
        match app.objects.internal().head(&app.config.spool_bucket, key).await {
            Ok(meta) => Some(meta.size),
            Err(pixflow_backends::ObjectError::NoSuchKey { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// A spooled part is read back only as it was written: other content under its key is
    /// refused (not retried), and a missing part is an error too.
    #[tokio::test]
    async fn a_spooled_part_is_read_only_as_written() {
        let (dir, mut c) = crate::dispatch::tests::flip_node("spool-pinned");
        c.in_memory = true;
        let app = crate::App::start(c, None).await.unwrap().app;
        let part = put(&app, "0a1b", "input", b"first").await.unwrap();
        assert_eq!(read(&app, &part).await.unwrap(), b"first");
        put(&app, "0a1b", "input", b"other").await.unwrap();
        let changed = read(&app, &part).await.unwrap_err();
        assert_eq!((changed.code(), changed.retryable()), ("precondition_failed", false));
        forget(&app, [part.key.as_str()]).await;
        assert_eq!(read(&app, &part).await.unwrap_err().code(), "no_such_key");
        app.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An asynchronous call whose input, named input and result are each larger than the log
    /// keeps: they travel through the reserved spool bucket, which clients cannot reach, come
    /// back intact, and go when no longer needed.
    #[tokio::test]
    async fn large_inputs_and_results_go_by_reference() {
        let (dir, c) = crate::dispatch::tests::flip_node("spool");
        let app = crate::App::start(c.clone(), None).await.unwrap().app;

        let (input, extra) = (noise_png(400, 7), noise_png(320, 11));
        assert!(input.len() > OVER && extra.len() > OVER);
        let body =
            json!({"input": {"base64": B64.encode(&input)}, "inputs": {"extra": {"base64": B64.encode(&extra)}}});
        let req = Request::post("/v1/functions/flip/invoke")
            .header("prefer", "respond-async")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let (status, body) = send(&app, req).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let id = serde_json::from_slice::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();

        // Recorded by reference: the parts are in the spool, the log names them.
        let input_key = format!("invocations/{id}/input");
        let extra_key = format!("invocations/{id}/inputs/0");
        assert_eq!(spooled(&app, &input_key).await, Some(input.len() as u64));
        assert_eq!(spooled(&app, &extra_key).await, Some(extra.len() as u64));
        let row = app.invocations.get(&id).await.unwrap().unwrap();
        let meta: Value = serde_json::from_str(&row.meta).unwrap();
        assert_eq!(meta["input_spooled"]["key"], input_key.as_str());
        assert_eq!(meta["inputs_spooled"]["extra"]["key"], extra_key.as_str());
        assert!(row.meta.len() < 1024, "the log keeps the bytes: {} bytes of meta", row.meta.len());

        // Clients cannot name the bucket, and do not see it.
        let bucket = app.config.spool_bucket.clone();
        let get = Request::get(format!("/v1/buckets/{bucket}/objects/{input_key}"))
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, body) = send(&app, get).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["code"], "reserved_bucket");
        let list = Request::get("/v1/buckets")
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, body) = send(&app, list).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!String::from_utf8_lossy(&body).contains(&bucket), "{}", String::from_utf8_lossy(&body));
        // The invocation is logged: its parts are not collected, however old.
        assert_eq!(collect(&app, Duration::ZERO).await.unwrap(), 0);
        app.shutdown().await;

        // A node with a worker runs it.
        let mut c = c;
        c.async_workers = 1;
        let app = crate::App::start(c, None).await.unwrap().app;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = app.invocations.get(&id).await.unwrap().unwrap();
            match row.status {
                pixflow_backends::Status::Succeeded => break,
                pixflow_backends::Status::Dead => panic!("dead-lettered: {:?}", row.error),
                _ => {}
            }
            assert!(Instant::now() < deadline, "not done within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Its inputs go right after the outcome is recorded (and its message settled); its
        // result, too large for the log, is in the spool and served.
        while spooled(&app, &input_key).await.is_some() || spooled(&app, &extra_key).await.is_some() {
            assert!(Instant::now() < deadline, "the spooled inputs of a success are still there after 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let result_key = result_key(&id, 1);
        assert!(spooled(&app, &result_key).await.is_some_and(|size| size > OVER as u64));
        let (status, bytes) =
            send(&app, Request::get(format!("/v1/invocations/{id}/result")).body(axum::body::Body::empty()).unwrap())
                .await;
        assert_eq!(status, StatusCode::OK);
        let got = image::load_from_memory(&bytes).unwrap().to_rgb8();
        let mut want = image::load_from_memory(&input).unwrap().to_rgb8();
        image::imageops::flip_vertical_in_place(&mut want);
        let mut mirrored = image::load_from_memory(&input).unwrap().to_rgb8();
        image::imageops::flip_horizontal_in_place(&mut mirrored);
        assert!(got == want || got == mirrored, "the result is not the input flipped");

        // Once the log forgets the invocation, its result is collected.
        app.invocations.delete_invocation(&id).await.unwrap();
        assert_eq!(collect(&app, Duration::from_secs(3600)).await.unwrap(), 0, "collected within the grace period");
        assert_eq!(collect(&app, Duration::ZERO).await.unwrap(), 1);
        assert_eq!(spooled(&app, &result_key).await, None);
        app.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
