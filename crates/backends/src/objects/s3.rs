//! The S3 backend: any S3-compatible service, through `object_store`.
//!
//! A pixflow bucket is the service's bucket of the same name; `put_bucket` registers a bucket
//! that exists there and keeps its settings in the state store. Writes are single PUTs up to
//! [`SINGLE_PUT_BYTES`] (conditions ride on `If-None-Match: *` / `If-Match`, so they are as
//! atomic as the service makes them) and multipart uploads above it (conditions checked just
//! before the upload). Reads take the version's ETag and ask for exactly that version
//! (`If-Match`), so a reader never mixes two versions.
//!
//! The change feed ([`crate::feed`]) lives in the state store: a write or delete is recorded
//! once the service has acknowledged it. There is no transaction spanning both, so a crash
//! between the acknowledgement and the append (or a failing state store) loses the record; and
//! changes other clients make to the service's bucket are not seen at all (the service's event
//! notifications are not ingested).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as Location;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions,
    PutPayload, RetryConfig, UpdateVersion, WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    Bucket, BucketConfig, ByteStream, Cause, Condition, Listed, Listing, ObjectError, ObjectMeta, Result, Resume,
    S3Config, Upload,
};
use crate::catalogue::Catalogue;
use crate::feed::{Actor, ChangeKind, Feed, NewChange};
use crate::state::now_ms;

/// Uploads up to this size go in one PUT; larger ones in parts.
pub const SINGLE_PUT_BYTES: u64 = 16 << 20;
/// Size of each part of a multipart upload.
const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once for one upload.
const PARTS_IN_FLIGHT: usize = 2;

/// The most memory a commit of `size` bytes holds: the whole body up to [`SINGLE_PUT_BYTES`],
/// else the parts in flight and the one being filled.
pub(crate) fn commit_memory(size: u64) -> u64 {
    if size <= SINGLE_PUT_BYTES { size } else { (PART_BYTES * (PARTS_IN_FLIGHT + 1)) as u64 }
}

pub(crate) struct Service {
    config: S3Config,
    settings: Catalogue,
    clients: Mutex<HashMap<String, Arc<AmazonS3>>>,
    /// The change feed, in the state store.
    pub(super) feed: Feed,
}

/// A multipart upload in progress; dropped unfinished, it is aborted in the background.
struct Parts(Option<WriteMultipart>);

impl Drop for Parts {
    fn drop(&mut self) {
        if let (Some(w), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "aborting an unfinished multipart upload; the service's lifecycle rules must clean it");
                }
            });
        }
    }
}

/// One stored version of an object, read in ranges.
pub(crate) struct Version {
    client: Arc<AmazonS3>,
    location: Location,
    etag: String,
}

impl Version {
    pub(crate) async fn range(self, start: u64, len: u64) -> Result<ByteStream> {
        if len == 0 {
            return Ok(futures_util::stream::empty().boxed());
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..start + len)),
            if_match: Some(quoted(&self.etag)),
            ..Default::default()
        };
        let got = self.client.get_opts(&self.location, options).await.map_err(|e| match e {
            object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. } => {
                ObjectError::PreconditionFailed("the object changed while it was read")
            }
            e => ObjectError::Service(e.to_string()),
        })?;
        // Services that ignore `If-Match` on reads still name the version they sent.
        if got.meta.e_tag.as_deref().is_some_and(|e| unquoted(Some(e)) != self.etag) {
            return Err(ObjectError::PreconditionFailed("the object changed while it was read"));
        }
        Ok(got.into_stream().map_err(std::io::Error::other).boxed())
    }
}

/// The region: the configuration's, else the AWS environment's, else `us-east-1`.
fn region(configured: Option<&str>, env: impl Fn(&str) -> Option<String>) -> String {
    configured
        .map(str::to_owned)
        .or_else(|| ["AWS_REGION", "AWS_DEFAULT_REGION"].iter().find_map(|v| env(v).filter(|r| !r.is_empty())))
        .unwrap_or_else(|| "us-east-1".into())
}

fn quoted(etag: &str) -> String {
    format!("\"{etag}\"")
}

fn unquoted(etag: Option<&str>) -> String {
    etag.unwrap_or_default().trim_start_matches("W/").trim_matches('"').to_owned()
}

fn location(key: &str) -> Result<Location> {
    // Keys are checked already (no control characters, no empty, `.` or `..` segments), so
    // the path is the key itself, byte for byte.
    Location::parse(key).map_err(|_| ObjectError::InvalidKey("not a path an S3 service keeps"))
}

fn object_error(bucket: &str, key: &str, e: object_store::Error) -> ObjectError {
    match e {
        object_store::Error::NotFound { .. } => {
            ObjectError::NoSuchKey { bucket: bucket.to_owned(), key: key.to_owned() }
        }
        object_store::Error::AlreadyExists { .. } => ObjectError::PreconditionFailed("an object with this key exists"),
        object_store::Error::Precondition { .. } => ObjectError::PreconditionFailed("the object's ETag does not match"),
        e => ObjectError::Service(e.to_string()),
    }
}

fn meta(bucket: &str, key: &str, m: &object_store::ObjectMeta, attributes: &Attributes) -> ObjectMeta {
    let mut content_type = "application/octet-stream".to_owned();
    let mut metadata = BTreeMap::new();
    for (a, v) in attributes {
        match a {
            Attribute::ContentType => content_type = v.to_string(),
            Attribute::Metadata(name) => {
                metadata.insert(name.to_ascii_lowercase(), v.to_string());
            }
            _ => {}
        }
    }
    ObjectMeta {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        size: m.size,
        etag: unquoted(m.e_tag.as_deref()),
        content_type,
        modified_ms: m.last_modified.timestamp_millis(),
        metadata,
        blob: String::new(),
    }
}

fn attributes(content_type: &str, metadata: &BTreeMap<String, String>) -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::ContentType, content_type.to_owned().into());
    for (k, v) in metadata {
        a.insert(Attribute::Metadata(Cow::Owned(k.clone())), v.clone().into());
    }
    a
}

/// What a write stored: the service's ETag (else the bytes' MD5), and the moment it answered
/// (the service's own Last-Modified has whole seconds).
fn written(
    bucket: &str,
    key: &str,
    content_type: &str,
    metadata: &BTreeMap<String, String>,
    size: u64,
    etag: Option<&str>,
    md5: String,
) -> ObjectMeta {
    ObjectMeta {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        size,
        etag: etag.map_or(md5, |e| unquoted(Some(e))),
        content_type: content_type.to_owned(),
        modified_ms: now_ms(),
        metadata: metadata.clone(),
        blob: String::new(),
    }
}

impl Service {
    pub(crate) fn new(config: &S3Config, settings: Catalogue, feed: Feed) -> Result<Service> {
        // One TLS stack for the whole process: rustls over ring (a second call is a no-op).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let service = Service { config: config.clone(), settings, clients: Mutex::new(HashMap::new()), feed };
        // Build one client now so that a bad configuration fails at start, not at first use.
        service.build("pixflow-check")?;
        Ok(service)
    }

    fn build(&self, bucket: &str) -> Result<AmazonS3> {
        let c = &self.config;
        // Keys given in the configuration replace the environment's whole credential (no stale
        // session token rides along with them).
        let base = match (&c.access_key, &c.secret_key) {
            (Some(a), Some(s)) => {
                AmazonS3Builder::new().with_access_key_id(a.clone()).with_secret_access_key(s.clone())
            }
            _ => AmazonS3Builder::from_env(),
        };
        let mut b = base
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(c.virtual_hosted)
            .with_retry(RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() });
        if let Some(e) = &c.endpoint {
            b = b.with_endpoint(e.clone()).with_allow_http(e.starts_with("http://"));
        }
        b = b.with_region(region(c.region.as_deref(), |v| std::env::var(v).ok()));
        b.build().map_err(|e| ObjectError::Service(format!("configuration: {e}")))
    }

    fn client(&self, bucket: &str) -> Result<Arc<AmazonS3>> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(bucket) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.build(bucket)?);
        clients.insert(bucket.to_owned(), c.clone());
        Ok(c)
    }

    /// The client of a registered bucket.
    async fn registered(&self, bucket: &str) -> Result<Arc<AmazonS3>> {
        match self.bucket(bucket).await? {
            Some(_) => self.client(bucket),
            None => Err(ObjectError::NoSuchBucket(bucket.to_owned())),
        }
    }

    fn settings_error(e: crate::state::StateError) -> ObjectError {
        ObjectError::Io(std::io::Error::other(format!("bucket settings: {e}")))
    }

    /// Whether the service's bucket holds any object (and answers at all).
    async fn holds_objects(&self, bucket: &str) -> Result<bool> {
        let client = self.client(bucket)?;
        let opts = PaginatedListOptions { max_keys: Some(1), ..Default::default() };
        match client.list_paginated(None, opts).await {
            Ok(page) => Ok(!page.result.objects.is_empty() || !page.result.common_prefixes.is_empty()),
            // Listings report a missing bucket as S3's `NoSuchBucket` error code.
            Err(e) if matches!(e, object_store::Error::NotFound { .. }) || e.to_string().contains("NoSuchBucket") => {
                Err(ObjectError::NoSuchBucket(bucket.to_owned()))
            }
            Err(e) => Err(ObjectError::Service(e.to_string())),
        }
    }

    /// One listing of at most one key of `bucket`: a health probe.
    pub(crate) async fn ping(&self, bucket: &str) -> Result<()> {
        self.holds_objects(bucket).await.map(drop)
    }

    pub(crate) async fn put_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        // The bucket must exist in the service (pixflow does not create it there).
        self.holds_objects(name).await.map_err(|e| match e {
            ObjectError::NoSuchBucket(b) => ObjectError::NotInService(b),
            e => e,
        })?;
        self.settings.save_bucket(name, config).await.map_err(Self::settings_error)
    }

    pub(crate) async fn bucket(&self, name: &str) -> Result<Option<Bucket>> {
        Ok(self.settings.buckets(Some(name)).await.map_err(Self::settings_error)?.pop())
    }

    pub(crate) async fn buckets(&self) -> Result<Vec<Bucket>> {
        self.settings.buckets(None).await.map_err(Self::settings_error)
    }

    pub(crate) async fn delete_bucket(&self, name: &str) -> Result<()> {
        if self.bucket(name).await?.is_none() {
            return Err(ObjectError::NoSuchBucket(name.to_owned()));
        }
        // A bucket the service no longer has is forgotten like an empty one.
        match self.holds_objects(name).await {
            Ok(true) => return Err(ObjectError::BucketNotEmpty(name.to_owned())),
            Ok(false) | Err(ObjectError::NoSuchBucket(_)) => {}
            Err(e) => return Err(e),
        }
        self.settings.delete_bucket(name).await.map_err(Self::settings_error)?;
        Ok(())
    }

    /// The write mode a condition asks for; `If-Match` becomes a swap of the version it
    /// matched, so it holds as atomically as the service's own `If-Match`.
    async fn mode(&self, client: &AmazonS3, bucket: &str, key: &str, condition: &Condition) -> Result<PutMode> {
        match condition {
            Condition::None => Ok(PutMode::Overwrite),
            Condition::Absent => Ok(PutMode::Create),
            Condition::Matches(_) => {
                let current = self.current(client, bucket, key).await?;
                condition.check(current.as_deref())?;
                Ok(PutMode::Update(UpdateVersion { e_tag: current.as_deref().map(quoted), version: None }))
            }
        }
    }

    /// Records a change the service acknowledged. The object is written whatever happens here,
    /// so a failure to record is logged, not returned (the feed of this backend is best effort).
    async fn record(&self, change: NewChange<'_>) {
        if let Err(e) = self.feed.record(&change).await {
            tracing::error!(
                error = %e, bucket = change.bucket, key = change.key, kind = change.kind.as_str(),
                "recording an object change in the change feed; its readers will not see it"
            );
        }
    }

    /// Records a write the service acknowledged. Whether it replaced an object is known only
    /// when a condition said so.
    async fn record_write(&self, meta: &ObjectMeta, condition: &Condition, cause: &Cause<'_>) {
        let replaced = match condition {
            Condition::None => None,
            Condition::Absent => Some(false),
            Condition::Matches(_) => Some(true),
        };
        self.record(NewChange {
            kind: cause.kind,
            replaced,
            bucket: &meta.bucket,
            key: &meta.key,
            etag: Some(&meta.etag),
            size: meta.size,
            actor: cause.actor,
        })
        .await;
    }

    #[allow(clippy::too_many_arguments, reason = "a write's target, attributes, condition, bytes and record")]
    pub(crate) async fn put(
        &self,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
        bytes: Bytes,
        md5: Option<String>,
        cause: &Cause<'_>,
    ) -> Result<ObjectMeta> {
        let client = self.registered(bucket).await?;
        let mode = self.mode(&client, bucket, key, condition).await?;
        let size = bytes.len() as u64;
        let md5 = md5.unwrap_or_else(|| hex::encode(<md5::Md5 as md5::Digest>::digest(&bytes)));
        let opts = PutOptions { mode, attributes: attributes(content_type, metadata), ..Default::default() };
        let done = client.put_opts(&location(key)?, PutPayload::from(bytes), opts).await;
        let done = done.map_err(|e| object_error(bucket, key, e))?;
        let meta = written(bucket, key, content_type, metadata, size, done.e_tag.as_deref(), md5);
        self.record_write(&meta, condition, cause).await;
        Ok(meta)
    }

    #[allow(clippy::too_many_arguments, reason = "the arguments of `Objects::commit`, plus what its record says")]
    pub(crate) async fn commit(
        &self,
        mut upload: Upload,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
        cause: &Cause<'_>,
    ) -> Result<ObjectMeta> {
        let size = upload.size;
        let md5 = upload.md5_hex();
        let file = upload.file.as_mut().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        // A write that failed in the background shows here, before any byte is sent.
        file.flush().await?;
        file.seek(std::io::SeekFrom::Start(0)).await?;
        let short = || ObjectError::Io(std::io::Error::other("the spooled upload is shorter than what was written"));
        if size <= SINGLE_PUT_BYTES {
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut bytes).await?;
            if bytes.len() as u64 != size {
                return Err(short());
            }
            return self
                .put(bucket, key, content_type, metadata, condition, Bytes::from(bytes), Some(md5), cause)
                .await;
        }
        let client = self.registered(bucket).await?;
        // Multipart uploads take no condition: check it just before.
        if *condition != Condition::None {
            condition.check(self.current(&client, bucket, key).await?.as_deref())?;
        }
        let opts = PutMultipartOptions { attributes: attributes(content_type, metadata), ..Default::default() };
        let parts = client.put_multipart_opts(&location(key)?, opts).await.map_err(|e| object_error(bucket, key, e))?;
        // Aborted if this future is dropped (a client gone) or fails, so no parts linger.
        let mut writer = Parts(Some(WriteMultipart::new_with_chunk_size(parts, PART_BYTES)));
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            let w = writer.0.as_mut().ok_or_else(short)?;
            w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| object_error(bucket, key, e))?;
            w.write(&buf[..n]);
        }
        if sent != size {
            return Err(short());
        }
        let w = writer.0.take().ok_or_else(short)?;
        let done = w.finish().await.map_err(|e| object_error(bucket, key, e))?;
        let meta = written(bucket, key, content_type, metadata, size, done.e_tag.as_deref(), md5);
        self.record_write(&meta, condition, cause).await;
        Ok(meta)
    }

    /// The ETag of the object at `key`, `None` when there is none (any other failure is one).
    async fn current(&self, client: &AmazonS3, bucket: &str, key: &str) -> Result<Option<String>> {
        match self.head_with(client, bucket, key).await {
            Ok(m) => Ok(Some(m.etag)),
            Err(ObjectError::NoSuchKey { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn head_with(&self, client: &AmazonS3, bucket: &str, key: &str) -> Result<ObjectMeta> {
        let options = GetOptions { head: true, ..Default::default() };
        let got = client.get_opts(&location(key)?, options).await.map_err(|e| object_error(bucket, key, e))?;
        Ok(meta(bucket, key, &got.meta, &got.attributes))
    }

    pub(crate) async fn head(&self, bucket: &str, key: &str) -> Result<ObjectMeta> {
        let client = self.registered(bucket).await?;
        self.head_with(&client, bucket, key).await
    }

    pub(crate) async fn get(&self, bucket: &str, key: &str) -> Result<(ObjectMeta, Version)> {
        let client = self.registered(bucket).await?;
        let m = self.head_with(&client, bucket, key).await?;
        let version = Version { client, location: location(key)?, etag: m.etag.clone() };
        Ok((m, version))
    }

    pub(crate) async fn read(&self, bucket: &str, key: &str, limit: u64) -> Result<(ObjectMeta, Vec<u8>)> {
        let client = self.registered(bucket).await?;
        let got =
            client.get_opts(&location(key)?, GetOptions::default()).await.map_err(|e| object_error(bucket, key, e))?;
        let m = meta(bucket, key, &got.meta, &got.attributes);
        if m.size > limit {
            return Err(ObjectError::TooLarge { limit, actual: m.size });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(m.size).unwrap_or(0));
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ObjectError::Service(e.to_string()))?;
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(ObjectError::TooLarge { limit, actual: (bytes.len() + chunk.len()) as u64 });
            }
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != m.size {
            return Err(ObjectError::Service("the service sent fewer bytes than the object's size".into()));
        }
        Ok((m, bytes))
    }

    /// Deletes an object; a condition is checked just before (S3 deletes take none).
    pub(crate) async fn delete(&self, bucket: &str, key: &str, condition: &Condition, actor: &Actor) -> Result<bool> {
        let client = self.registered(bucket).await?;
        let current = self.current(&client, bucket, key).await?;
        condition.check(current.as_deref())?;
        if current.is_none() {
            return Ok(false);
        }
        client.delete(&location(key)?).await.map_err(|e| object_error(bucket, key, e))?;
        let change =
            NewChange { kind: ChangeKind::Delete, replaced: Some(true), bucket, key, etag: None, size: 0, actor };
        self.record(change).await;
        Ok(true)
    }

    pub(crate) async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        resume: Option<&Resume>,
        limit: u32,
    ) -> Result<Listing> {
        let client = self.registered(bucket).await?;
        // `object_store` reads common prefixes as paths, which only `/` keeps intact.
        if delimiter.is_some_and(|d| d != "/") {
            return Err(ObjectError::Unsupported("with an S3 service, listings roll up at `/` only"));
        }
        let (offset, page_token) = match resume {
            None => (None, None),
            Some(Resume::After(k)) => (Some(k.clone()), None),
            Some(Resume::Service(t)) => (None, Some(t.clone())),
            Some(Resume::From(_)) => return Err(ObjectError::InvalidCursor),
        };
        let opts = PaginatedListOptions {
            offset,
            page_token,
            delimiter: delimiter.map(|d| Cow::Owned(d.to_owned())),
            max_keys: Some(limit as usize),
            ..Default::default()
        };
        let page = client.list_paginated((!prefix.is_empty()).then_some(prefix), opts).await.map_err(|e| {
            match e.to_string() {
                // A continuation token the service did not make.
                m if resume.is_some_and(|r| matches!(r, Resume::Service(_))) && m.contains("InvalidArgument") => {
                    ObjectError::InvalidCursor
                }
                m => ObjectError::Service(m),
            }
        })?;
        let mut listed = Vec::with_capacity(page.result.objects.len());
        for m in &page.result.objects {
            listed.push(Listed {
                key: m.location.to_string(),
                size: m.size,
                etag: unquoted(m.e_tag.as_deref()),
                modified_ms: m.last_modified.timestamp_millis(),
            });
        }
        // A service that leaves ETags out of listings (S3 itself never does) gets asked per key.
        let objects: Vec<Listed> = futures_util::stream::iter(listed)
            .map(|mut l| {
                let client = &client;
                async move {
                    if !l.etag.is_empty() {
                        return Ok(Some(l));
                    }
                    // Gone since the listing: left out, as a listing a moment later would.
                    Ok::<_, ObjectError>(self.current(client, bucket, &l.key).await?.map(|etag| {
                        l.etag = etag;
                        l
                    }))
                }
            })
            .buffered(8)
            .try_filter_map(|l| async move { Ok(l) })
            .try_collect()
            .await?;
        // Paths drop the trailing `/` a common prefix ends with.
        let prefixes = page.result.common_prefixes.iter().map(|p| format!("{p}/")).collect();
        Ok(Listing { objects, prefixes, next: page.page_token.map(Resume::Service) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_comes_from_the_configuration_then_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(region(Some("eu-west-3"), env(&[("AWS_REGION", "us-west-2")])), "eu-west-3");
        assert_eq!(region(None, env(&[("AWS_REGION", "us-west-2"), ("AWS_DEFAULT_REGION", "x")])), "us-west-2");
        assert_eq!(region(None, env(&[("AWS_REGION", ""), ("AWS_DEFAULT_REGION", "ap-south-1")])), "ap-south-1");
        assert_eq!(region(None, env(&[])), "us-east-1");
        assert_eq!(unquoted(Some("\"abc\"")), "abc");
        assert_eq!(unquoted(Some("W/\"abc\"")), "abc");
        assert_eq!(unquoted(None), "");
    }
}
