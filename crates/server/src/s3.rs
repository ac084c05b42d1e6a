//! The S3-compatible endpoint of the embedded store, on its own listener (`--s3-listen`), so
//! any S3 client or SDK can fill and read it: path-style requests, SigV4 (checked by `s3s`
//! against the one configured key pair), and the operations a client needs for uploads and
//! downloads: buckets (create, head, list, delete), objects (put, get with ranges and ETag
//! conditions, head, delete, batch delete, ListObjectsV2) and multipart uploads; presigned
//! URLs valid for up to 7 days, as S3 takes them. Everything
//! goes through the same [`Objects`] store as the native API, so names, limits and atomicity
//! are the same; errors are S3's codes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::StreamExt;
use pixflow_backends::{Condition, ObjectError, ObjectMeta, Objects, Resume};
use s3s::dto::{self, ETag, ETagCondition, StreamingBlob, Timestamp};
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

/// The S3 operations over the embedded store.
pub struct Gateway {
    objects: Objects,
    max_object_bytes: u64,
}

impl Gateway {
    pub fn new(objects: Objects, max_object_bytes: u64) -> Gateway {
        Gateway { objects, max_object_bytes }
    }
}

impl Gateway {
    /// The store, recording changes under the request's access key.
    fn by<T>(&self, req: &S3Request<T>) -> Objects {
        match &req.credentials {
            Some(c) => self.objects.by(pixflow_backends::Actor::access_key(&c.access_key)),
            // Unsigned requests are refused before any operation (`Access`).
            None => self.objects.clone(),
        }
    }
}

fn s3_err(e: ObjectError) -> S3Error {
    let code = match &e {
        ObjectError::InvalidBucket { .. } => S3ErrorCode::InvalidBucketName,
        ObjectError::InvalidKey(_) | ObjectError::InvalidMetadata(_) => S3ErrorCode::InvalidArgument,
        ObjectError::NoSuchBucket(_) | ObjectError::NotInService(_) => S3ErrorCode::NoSuchBucket,
        ObjectError::NoSuchKey { .. } => S3ErrorCode::NoSuchKey,
        ObjectError::BucketNotEmpty(_) => S3ErrorCode::BucketNotEmpty,
        ObjectError::PreconditionFailed(_) => S3ErrorCode::PreconditionFailed,
        ObjectError::TooLarge { .. } => S3ErrorCode::EntityTooLarge,
        ObjectError::NoSuchUpload(_) => S3ErrorCode::NoSuchUpload,
        ObjectError::InvalidPart(_) => S3ErrorCode::InvalidPart,
        ObjectError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
        ObjectError::EntityTooSmall { .. } => S3ErrorCode::EntityTooSmall,
        ObjectError::InvalidCursor => S3ErrorCode::InvalidArgument,
        ObjectError::Reserved(_) => S3ErrorCode::AccessDenied,
        ObjectError::Unsupported(_) => S3ErrorCode::NotImplemented,
        ObjectError::TooManyUploads(_) => {
            metrics::counter!("pixflow_uploads_refused_total").increment(1);
            S3ErrorCode::SlowDown
        }
        ObjectError::Io(_) | ObjectError::Catalogue(_) | ObjectError::Service(_) => {
            tracing::error!(error = %e, "S3 endpoint");
            return s3_error!(InternalError, "internal error; the server log has the details");
        }
    };
    S3Error::with_message(code, e.to_string())
}

/// A body stream s3s can share between threads: only ever polled through `&mut`, so the lock
/// is never contended (`Mutex::get_mut`).
struct SyncBody(std::sync::Mutex<pixflow_backends::objects::ByteStream>);

impl futures_util::Stream for SyncBody {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let stream = self.get_mut().0.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        stream.as_mut().poll_next(cx)
    }
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

fn metadata(m: Option<dto::Metadata>) -> BTreeMap<String, String> {
    m.unwrap_or_default().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
}

fn s3_metadata(m: &BTreeMap<String, String>) -> Option<dto::Metadata> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn write_condition(if_match: Option<&ETagCondition>, if_none_match: Option<&ETagCondition>) -> S3Result<Condition> {
    match (if_match, if_none_match) {
        (Some(ETagCondition::Any), _) => Ok(Condition::Matches(vec!["*".into()])),
        (Some(ETagCondition::ETag(e)), _) => Ok(Condition::Matches(vec![e.value().to_owned()])),
        (None, Some(ETagCondition::Any)) => Ok(Condition::Absent),
        (None, Some(ETagCondition::ETag(_))) => {
            Err(s3_error!(NotImplemented, "a write takes If-None-Match: * (create only) or If-Match"))
        }
        (None, None) => Ok(Condition::None),
    }
}

/// Seconds since the epoch of an S3 timestamp.
fn epoch_seconds(t: &Timestamp) -> Option<i64> {
    let mut buf = Vec::new();
    t.format(dto::TimestampFormat::EpochSeconds, &mut buf).ok()?;
    std::str::from_utf8(&buf).ok()?.split('.').next()?.parse().ok()
}

/// A read's preconditions in RFC 9110's order (as S3 evaluates them): `If-Match`, else
/// `If-Unmodified-Since` (`PreconditionFailed`); `If-None-Match`, else `If-Modified-Since`
/// (`NotModified`).
struct ReadConditions<'a> {
    if_match: Option<&'a ETagCondition>,
    if_none_match: Option<&'a ETagCondition>,
    if_modified_since: Option<&'a Timestamp>,
    if_unmodified_since: Option<&'a Timestamp>,
}

impl ReadConditions<'_> {
    fn check(&self, meta: &ObjectMeta) -> S3Result<()> {
        let matches = |c: &ETagCondition| match c {
            ETagCondition::Any => true,
            ETagCondition::ETag(e) => e.value() == meta.etag,
        };
        let modified = meta.modified_ms.div_euclid(1000);
        match self.if_match {
            Some(c) if !matches(c) => return Err(s3_error!(PreconditionFailed)),
            Some(_) => {}
            None => {
                if self.if_unmodified_since.and_then(epoch_seconds).is_some_and(|t| modified > t) {
                    return Err(s3_error!(PreconditionFailed));
                }
            }
        }
        match self.if_none_match {
            Some(c) if matches(c) => Err(s3_error!(NotModified)),
            Some(_) => Ok(()),
            None if self.if_modified_since.and_then(epoch_seconds).is_some_and(|t| modified <= t) => {
                Err(s3_error!(NotModified))
            }
            None => Ok(()),
        }
    }
}

/// Streams a request body into an upload, checking `Content-MD5` when sent.
async fn receive(
    objects: &Objects,
    limit: u64,
    body: Option<StreamingBlob>,
    content_md5: Option<&str>,
) -> S3Result<pixflow_backends::Upload> {
    let mut upload = objects.upload(limit).await.map_err(s3_err)?;
    if let Some(mut body) = body {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "reading the body: {e}"))?;
            upload.write(&chunk).await.map_err(s3_err)?;
        }
    }
    if let Some(want) = content_md5 {
        let want = base64::engine::general_purpose::STANDARD
            .decode(want.trim())
            .map_err(|_| s3_error!(InvalidDigest, "Content-MD5 is not base64"))?;
        if upload.md5()[..] != want[..] {
            return Err(s3_error!(BadDigest));
        }
    }
    Ok(upload)
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        _req: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        let buckets = self.objects.buckets().await.map_err(s3_err)?;
        let buckets = buckets
            .into_iter()
            .map(|b| dto::Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(dto::ListBucketsOutput { buckets: Some(buckets), ..Default::default() }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<dto::CreateBucketInput>,
    ) -> S3Result<S3Response<dto::CreateBucketOutput>> {
        let name = req.input.bucket;
        if self.objects.bucket(&name).await.map_err(s3_err)?.is_some() {
            return Err(s3_error!(BucketAlreadyOwnedByYou));
        }
        self.objects.put_bucket(&name, &pixflow_backends::BucketConfig::default()).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::CreateBucketOutput { location: Some(format!("/{name}")) }))
    }

    async fn head_bucket(&self, req: S3Request<dto::HeadBucketInput>) -> S3Result<S3Response<dto::HeadBucketOutput>> {
        match self.objects.bucket(&req.input.bucket).await.map_err(s3_err)? {
            Some(_) => Ok(S3Response::new(dto::HeadBucketOutput::default())),
            None => Err(s3_error!(NoSuchBucket)),
        }
    }

    async fn delete_bucket(
        &self,
        req: S3Request<dto::DeleteBucketInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketOutput>> {
        self.objects.delete_bucket(&req.input.bucket).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::DeleteBucketOutput::default()))
    }

    async fn put_object(&self, req: S3Request<dto::PutObjectInput>) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let objects = self.by(&req);
        let input = req.input;
        pixflow_backends::objects::check_bucket(&input.bucket).map_err(s3_err)?;
        pixflow_backends::objects::check_key(&input.key).map_err(s3_err)?;
        if input.content_length.is_some_and(|n| u64::try_from(n).unwrap_or(0) > self.max_object_bytes) {
            return Err(s3_error!(EntityTooLarge));
        }
        let condition = write_condition(input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let meta = metadata(input.metadata);
        let declared = input.content_type.as_deref().unwrap_or("application/octet-stream");
        pixflow_backends::objects::check_attributes(declared, &meta).map_err(s3_err)?;
        let upload = receive(&objects, self.max_object_bytes, input.body, input.content_md5.as_deref()).await?;
        let content_type =
            input.content_type.unwrap_or_else(|| crate::objects::sniffed_type(upload.prefix()).to_owned());
        let m = objects
            .commit(upload, &input.bucket, &input.key, &content_type, &meta, &condition)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(dto::PutObjectOutput { e_tag: Some(ETag::Strong(m.etag)), ..Default::default() }))
    }

    async fn get_object(&self, req: S3Request<dto::GetObjectInput>) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let input = req.input;
        let (meta, reader) = self.objects.get(&input.bucket, &input.key).await.map_err(s3_err)?;
        ReadConditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        }
        .check(&meta)?;
        let (start, len, content_range) = match &input.range {
            None => (0, meta.size, None),
            Some(r) => {
                let r = r.check(meta.size).map_err(|_| s3_error!(InvalidRange))?;
                let range = format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1), meta.size);
                (r.start, r.end - r.start, Some(range))
            }
        };
        let body = reader.range(start, len).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::GetObjectOutput {
            body: Some(StreamingBlob::wrap(SyncBody(std::sync::Mutex::new(body)))),
            content_length: Some(i64::try_from(len).unwrap_or(i64::MAX)),
            content_range,
            content_type: Some(meta.content_type.clone()),
            e_tag: Some(ETag::Strong(meta.etag.clone())),
            last_modified: Some(timestamp(meta.modified_ms)),
            metadata: s3_metadata(&meta.metadata),
            ..Default::default()
        }))
    }

    async fn head_object(&self, req: S3Request<dto::HeadObjectInput>) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let input = req.input;
        let meta = self.objects.head(&input.bucket, &input.key).await.map_err(s3_err)?;
        ReadConditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        }
        .check(&meta)?;
        Ok(S3Response::new(dto::HeadObjectOutput {
            content_length: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            content_type: Some(meta.content_type.clone()),
            e_tag: Some(ETag::Strong(meta.etag.clone())),
            last_modified: Some(timestamp(meta.modified_ms)),
            metadata: s3_metadata(&meta.metadata),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectOutput>> {
        let objects = self.by(&req);
        let input = req.input;
        let condition = write_condition(input.if_match.as_ref(), None)?;
        objects.delete(&input.bucket, &input.key, &condition).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<dto::DeleteObjectsInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectsOutput>> {
        let objects = self.by(&req);
        let input = req.input;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(MalformedXML, "at most 1000 keys per request"));
        }
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for o in input.delete.objects {
            match objects.delete(&input.bucket, &o.key, &Condition::None).await {
                Ok(_) => deleted.push(dto::DeletedObject { key: Some(o.key), ..Default::default() }),
                Err(e) => {
                    let e = s3_err(e);
                    errors.push(dto::Error {
                        code: Some(e.code().as_str().to_owned()),
                        key: Some(o.key),
                        message: e.message().map(str::to_owned),
                        ..Default::default()
                    });
                }
            }
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        Ok(S3Response::new(dto::DeleteObjectsOutput {
            deleted: (!quiet).then_some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let from = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => Some(Resume::from_token(t).ok_or_else(|| {
                s3_error!(InvalidArgument, "the continuation token is not one this endpoint returned")
            })?),
            (None, Some(k)) => Some(Resume::After(k.clone())),
            (None, None) => None,
        };
        let max_keys = input.max_keys.unwrap_or(1000).clamp(1, 1000);
        let page = self
            .objects
            .list(&input.bucket, &prefix, input.delimiter.as_deref(), from.as_ref(), max_keys.unsigned_abs())
            .await
            .map_err(s3_err)?;
        let key_count = i32::try_from(page.objects.len() + page.prefixes.len()).unwrap_or(i32::MAX);
        let contents = page
            .objects
            .iter()
            .map(|m| dto::Object {
                key: Some(m.key.clone()),
                e_tag: Some(ETag::Strong(m.etag.clone())),
                size: Some(i64::try_from(m.size).unwrap_or(i64::MAX)),
                last_modified: Some(timestamp(m.modified_ms)),
                ..Default::default()
            })
            .collect();
        let common_prefixes =
            page.prefixes.iter().map(|p| dto::CommonPrefix { prefix: Some(p.clone()) }).collect::<Vec<_>>();
        Ok(S3Response::new(dto::ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            max_keys: Some(max_keys),
            key_count: Some(key_count),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(page.next.is_some()),
            next_continuation_token: page.next.as_ref().map(Resume::token),
            contents: Some(contents),
            common_prefixes: (!common_prefixes.is_empty()).then_some(common_prefixes),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        let input = req.input;
        let content_type = input.content_type.unwrap_or_else(|| "application/octet-stream".into());
        let id = self
            .objects
            .create_multipart(&input.bucket, &input.key, &content_type, &metadata(input.metadata))
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(dto::CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            ..Default::default()
        }))
    }

    async fn upload_part(&self, req: S3Request<dto::UploadPartInput>) -> S3Result<S3Response<dto::UploadPartOutput>> {
        let input = req.input;
        // As S3 answers: InvalidArgument before any byte is read.
        let number = u32::try_from(input.part_number).ok().filter(|n| (1..=10_000).contains(n)).ok_or_else(|| {
            s3_error!(InvalidArgument, "Part number must be an integer between 1 and 10000, inclusive")
        })?;
        let upload = receive(&self.objects, self.max_object_bytes, input.body, input.content_md5.as_deref()).await?;
        let part =
            self.objects.put_part(&input.upload_id, &input.bucket, &input.key, number, upload).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::UploadPartOutput { e_tag: Some(ETag::Strong(part.etag)), ..Default::default() }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        let objects = self.by(&req);
        let input = req.input;
        let parts = input.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        let mut listed = Vec::with_capacity(parts.len());
        for p in parts {
            let number = p.part_number.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| s3_error!(InvalidPart))?;
            let etag =
                p.e_tag.map(ETag::into_value).ok_or_else(|| s3_error!(InvalidPart, "part {number} has no ETag"))?;
            listed.push((number, etag));
        }
        let condition = write_condition(input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let m = objects
            .complete_multipart(&input.upload_id, &input.bucket, &input.key, &listed, &condition, self.max_object_bytes)
            .await
            .map_err(s3_err)?;
        Ok(S3Response::new(dto::CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(ETag::Strong(m.etag)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        let input = req.input;
        self.objects.abort_multipart(&input.upload_id, &input.bucket, &input.key).await.map_err(s3_err)?;
        Ok(S3Response::new(dto::AbortMultipartUploadOutput::default()))
    }
}

/// The longest a presigned URL may be valid (`X-Amz-Expires`, seconds): 7 days, as in S3.
pub const MAX_PRESIGNED_EXPIRES: u64 = 7 * 86_400;

/// Who may call the endpoint, checked right after `s3s` authenticated the request: signed
/// requests only (as `s3s`'s default check), and presigned URLs valid for at most 7 days, which
/// `s3s` does not check (S3 answers `AuthorizationQueryParametersError`).
struct Access;

#[async_trait::async_trait]
impl s3s::access::S3Access for Access {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        check_presigned_expiry(cx.uri().query())?;
        if cx.credentials().is_none() {
            return Err(s3_error!(AccessDenied, "Signature is required"));
        }
        Ok(())
    }
}

/// Refuses a presigned URL (`X-Amz-Signature` in the query) whose `X-Amz-Expires` is over
/// [`MAX_PRESIGNED_EXPIRES`].
fn check_presigned_expiry(query: Option<&str>) -> S3Result<()> {
    let pairs: Vec<(String, String)> = query.and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default();
    let value = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if value("X-Amz-Signature").is_none() {
        return Ok(());
    }
    match value("X-Amz-Expires").map(str::parse::<u64>) {
        Some(Ok(secs)) if secs > MAX_PRESIGNED_EXPIRES => Err(s3_error!(
            AuthorizationQueryParametersError,
            "X-Amz-Expires must be less than a week (in seconds) that is; {MAX_PRESIGNED_EXPIRES}"
        )),
        Some(Err(_)) => {
            Err(s3_error!(AuthorizationQueryParametersError, "X-Amz-Expires should be a number of seconds"))
        }
        _ => Ok(()),
    }
}

/// The endpoint as a hyper service, with SigV4 against one key pair.
pub fn service(objects: Objects, max_object_bytes: u64, access_key: &str, secret_key: &str) -> s3s::service::S3Service {
    let mut builder = s3s::service::S3ServiceBuilder::new(Gateway::new(objects, max_object_bytes));
    builder.set_auth(s3s::auth::SimpleAuth::from_single(access_key, secret_key));
    builder.set_access(Access);
    builder.build()
}

/// Serves the S3 endpoint on `listener` until the node stops; its connections finish their
/// current request, and the node's shutdown waits for them before closing the store.
pub async fn serve(app: Arc<crate::App>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    anyhow::ensure!(
        app.objects.kind() == "embedded",
        "the S3-compatible endpoint serves the embedded store; with an S3 service, clients talk to the service"
    );
    let (access, secret) = match (&app.config.s3_access_key, &app.config.s3_secret_key) {
        (Some(a), Some(s)) => (a.clone(), s.clone()),
        _ => anyhow::bail!("the S3 endpoint needs an access key and a secret key"),
    };
    let service = service(app.objects.clone(), app.config.max_object_bytes, &access, &secret);
    let handler = move |req: axum::http::Request<crate::conn::GuardedBody>| {
        let mut service = service.clone();
        tower::Service::call(&mut service, req)
    };
    let (deadlines, tracker) = (app.config.client_deadlines, app.connections.clone());
    crate::conn::serve(listener, handler, deadlines, tracker, app.stop_token()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use object_store::signer::Signer;

    use super::*;

    /// A GET of `url` as an HTTP client sends it (path and query; the tests' host).
    async fn get(service: &s3s::service::S3Service, url: &object_store::signer::Url) -> (u16, String) {
        assert_eq!((url.host_str(), url.port()), (Some("127.0.0.1"), Some(9000)));
        let target = format!("{}?{}", url.path(), url.query().unwrap_or_default());
        send(service, "GET", &target, &[], vec![]).await
    }

    /// A client of the `media` bucket signing as `cms` (the key `service` is made with).
    fn signer() -> object_store::aws::AmazonS3 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint("http://127.0.0.1:9000")
            .with_allow_http(true)
            .with_bucket_name("media")
            .with_region("us-east-1")
            .with_access_key_id("cms")
            .with_secret_access_key("0123456789abcdef")
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn presigned_urls_are_valid_for_at_most_seven_days() {
        let dir = std::env::temp_dir().join(format!("pixflow-s3-presigned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let objects = Objects::open(&dir).await.unwrap();
        objects.put_bucket("media", &pixflow_backends::BucketConfig::default()).await.unwrap();
        objects.put("media", "cat.txt", "text/plain", &BTreeMap::new(), &Condition::None, b"hello").await.unwrap();
        let service = service(objects.clone(), 1 << 20, "cms", "0123456789abcdef");
        let signer = signer();
        let path = object_store::path::Path::from("cat.txt");
        let url = |secs| signer.signed_url(object_store::signer::Method::GET, &path, Duration::from_secs(secs));
        assert_eq!(get(&service, &url(MAX_PRESIGNED_EXPIRES).await.unwrap()).await, (200, "hello".into()));
        let (status, body) = get(&service, &url(MAX_PRESIGNED_EXPIRES + 1).await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("<Code>AuthorizationQueryParametersError</Code>"), "{body}");
        // Unsigned requests are still refused.
        let (status, body) = get(&service, &"http://127.0.0.1:9000/media/cat.txt".parse().unwrap()).await;
        assert_eq!(status, 403, "{body}");
        objects.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn writes_are_recorded_under_the_access_key_that_signed_them() {
        let dir = std::env::temp_dir().join(format!("pixflow-s3-actor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let objects = Objects::open(&dir).await.unwrap();
        objects.put_bucket("media", &pixflow_backends::BucketConfig::default()).await.unwrap();
        let service = service(objects.clone(), 1 << 20, "cms", "0123456789abcdef");
        let signer = signer();
        let path = object_store::path::Path::from("cat.txt");
        let target = |url: object_store::signer::Url| format!("{}?{}", url.path(), url.query().unwrap_or_default());
        let put = signer.signed_url(object_store::signer::Method::PUT, &path, Duration::from_secs(60)).await.unwrap();
        let (status, body) = send(&service, "PUT", &target(put), &[], b"hello".to_vec()).await;
        assert_eq!(status, 200, "{body}");
        let delete =
            signer.signed_url(object_store::signer::Method::DELETE, &path, Duration::from_secs(60)).await.unwrap();
        let (status, body) = send(&service, "DELETE", &target(delete), &[], vec![]).await;
        assert_eq!(status, 204, "{body}");
        let records = objects.feed().read(0, 10).await.unwrap();
        let seen: Vec<_> = records.iter().map(|r| (r.kind, r.key.as_str(), &r.actor)).collect();
        let cms = pixflow_backends::Actor::access_key("cms");
        assert_eq!(
            seen,
            [
                (pixflow_backends::ChangeKind::Put, "cat.txt", &cms),
                (pixflow_backends::ChangeKind::Delete, "cat.txt", &cms)
            ]
        );
        objects.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One request to an endpoint without authentication (the protocol mapping alone):
    /// status, and the body as text.
    async fn send(
        service: &s3s::service::S3Service,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, String) {
        let mut req = axum::http::Request::builder().method(method).uri(target).header("host", "127.0.0.1:9000");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = service.call(req.body(s3s::Body::from(bytes::Bytes::from(body))).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let body = BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn code(body: &str) -> &str {
        body.split("<Code>").nth(1).and_then(|rest| rest.split("</Code>").next()).unwrap_or_default()
    }

    #[tokio::test]
    async fn refusals_carry_the_codes_s3_clients_expect() {
        let dir = std::env::temp_dir().join(format!("pixflow-s3-refusals-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let objects = Objects::open(&dir).await.unwrap();
        objects.put_bucket("media", &pixflow_backends::BucketConfig::default()).await.unwrap();
        objects.put("media", "cat.txt", "text/plain", &BTreeMap::new(), &Condition::None, b"hello").await.unwrap();
        let service = s3s::service::S3ServiceBuilder::new(Gateway::new(objects.clone(), 1024)).build();
        // Larger than the endpoint takes.
        let (status, body) = send(&service, "PUT", "/media/big.bin", &[], vec![0; 2048]).await;
        assert_eq!((status, code(&body)), (400, "EntityTooLarge"), "{body}");
        // Bytes that do not match their Content-MD5 (here, the digest of "other").
        let md5 = "eV8yArF8trw9S3cdjGyerw==";
        let (status, body) = send(&service, "PUT", "/media/x.txt", &[("content-md5", md5)], b"hello".to_vec()).await;
        assert_eq!((status, code(&body)), (400, "BadDigest"), "{body}");
        assert!(objects.head("media", "x.txt").await.is_err(), "a refused upload left an object");
        // A range past the end.
        let (status, body) = send(&service, "GET", "/media/cat.txt", &[("range", "bytes=100-200")], vec![]).await;
        assert_eq!((status, code(&body)), (416, "InvalidRange"), "{body}");
        // A listing cursor that is not one of ours.
        let (status, body) =
            send(&service, "GET", "/media?list-type=2&continuation-token=bm90LW91cnM", &[], vec![]).await;
        assert_eq!((status, code(&body)), (400, "InvalidArgument"), "{body}");
        // Multipart: part numbers start at 1; an aborted upload is gone.
        let (status, body) = send(&service, "POST", "/media/parts.bin?uploads", &[], vec![]).await;
        assert_eq!(status, 200, "{body}");
        let id = body.split("<UploadId>").nth(1).and_then(|r| r.split("</UploadId>").next()).unwrap().to_owned();
        let part = |n: u32| format!("/media/parts.bin?partNumber={n}&uploadId={id}");
        let (status, body) = send(&service, "PUT", &part(0), &[], b"p".to_vec()).await;
        assert_eq!((status, code(&body)), (400, "InvalidArgument"), "{body}");
        let (status, body) = send(&service, "DELETE", &format!("/media/parts.bin?uploadId={id}"), &[], vec![]).await;
        assert_eq!(status, 204, "{body}");
        let (status, body) = send(&service, "PUT", &part(1), &[], b"p".to_vec()).await;
        assert_eq!((status, code(&body)), (404, "NoSuchUpload"), "{body}");
        objects.close().await;
        // More uploads at once than the node takes: SlowDown, S3's 503.
        std::fs::remove_dir_all(&dir).unwrap();
        let objects = Objects::open(&dir).await.unwrap().with_max_uploads(1);
        objects.put_bucket("media", &pixflow_backends::BucketConfig::default()).await.unwrap();
        let service = s3s::service::S3ServiceBuilder::new(Gateway::new(objects.clone(), 1024)).build();
        let held = objects.upload(1024).await.unwrap();
        let (status, body) = send(&service, "PUT", "/media/y.txt", &[], b"y".to_vec()).await;
        assert_eq!((status, code(&body)), (503, "SlowDown"), "{body}");
        drop(held);
        assert_eq!(send(&service, "PUT", "/media/y.txt", &[], b"y".to_vec()).await.0, 200);
        objects.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
