//! Object storage: one handle, [`Objects`], over the backend chosen in config.
//!
//! - The embedded store ([`embedded`], the local-disk default): a SQLite catalogue over
//!   write-once blob files, with multipart uploads for the S3-compatible endpoint.
//! - Any S3-compatible service ([`s3`], cargo feature `s3`, through `object_store`): a pixflow
//!   bucket is the service's bucket of the same name, and its settings (public, Cache-Control)
//!   live in the node's state store.
//!
//! Both give the same behaviour (the tests in `tests/objects.rs` run against each): keys and
//! attributes are checked here, once, before a backend sees them; uploads spool to a local
//! file while their MD5 and first bytes are taken, so a write reaches the backend whole or not
//! at all; readers get the metadata and the bytes of one version; every create, overwrite and
//! delete made through a handle is recorded in the store's change feed ([`Objects::feed`],
//! [`crate::feed`]), with who caused it ([`Objects::by`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::feed::{Actor, ChangeKind, Feed, Retention};

mod embedded;
pub mod multipart;
#[cfg(feature = "s3")]
mod s3;
#[cfg(feature = "s3-test-server")]
pub mod test_server;

/// Longest object key, in bytes (S3's limit).
pub const MAX_KEY_BYTES: usize = 1024;
/// Most bytes of user metadata (names and values) one object carries (S3's limit).
pub const MAX_METADATA_BYTES: usize = 2048;
/// Most entries (objects and common prefixes) one listing page returns.
pub const MAX_LIST: u32 = 1000;

/// What can go wrong with objects; the server maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("bucket name `{name}`: {reason}")]
    InvalidBucket { name: String, reason: &'static str },
    #[error("object key: {0}")]
    InvalidKey(&'static str),
    #[error("{0}")]
    InvalidMetadata(String),
    #[error("no bucket `{0}`")]
    NoSuchBucket(String),
    #[error("no object `{key}` in bucket `{bucket}`")]
    NoSuchKey { bucket: String, key: String },
    #[error("bucket `{0}` still holds objects")]
    BucketNotEmpty(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(&'static str),
    #[error("the object is {actual} bytes; at most {limit} are allowed here")]
    TooLarge { limit: u64, actual: u64 },
    #[error("no multipart upload `{0}`")]
    NoSuchUpload(String),
    #[error("{0}")]
    InvalidPart(String),
    #[error("list the parts in ascending order of their numbers")]
    InvalidPartOrder,
    #[error("part {part} is {size} bytes; every part but the last needs at least 5 MiB")]
    EntityTooSmall { part: u32, size: u64 },
    /// As many uploads as the node takes at once are under way.
    #[error("{0} object uploads are already in progress on this node; retry later")]
    TooManyUploads(usize),
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
    #[error("object catalogue: {0}")]
    Catalogue(#[from] sqlx::Error),
    /// The S3 service failed or could not be reached (the detail is for the log, not clients).
    #[error("object service: {0}")]
    Service(String),
    /// A bucket to register that the S3 service does not have (or will not list).
    #[error("the S3 service has no bucket `{0}` (or these credentials cannot list it); create it there first")]
    NotInService(String),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the listing cursor is not one this store made")]
    InvalidCursor,
    /// The bucket the node keeps its own objects in (spooled payloads), which clients may not
    /// name.
    #[error("bucket `{0}` is reserved for the platform's own use")]
    Reserved(String),
}

impl ObjectError {
    /// A stable name of the error, the one API answers carry.
    pub fn code(&self) -> &'static str {
        match self {
            ObjectError::InvalidBucket { .. } => "invalid_bucket_name",
            ObjectError::InvalidKey(_) => "invalid_key",
            ObjectError::InvalidMetadata(_) => "invalid_metadata",
            ObjectError::NoSuchBucket(_) => "no_such_bucket",
            ObjectError::NoSuchKey { .. } => "no_such_key",
            ObjectError::BucketNotEmpty(_) => "bucket_not_empty",
            ObjectError::PreconditionFailed(_) => "precondition_failed",
            ObjectError::TooLarge { .. } => "object_too_large",
            ObjectError::NoSuchUpload(_) => "no_such_upload",
            ObjectError::InvalidPart(_) | ObjectError::InvalidPartOrder | ObjectError::EntityTooSmall { .. } => {
                "invalid_part"
            }
            ObjectError::TooManyUploads(_) => "overloaded",
            ObjectError::Io(_) | ObjectError::Catalogue(_) => "internal",
            ObjectError::Service(_) => "object_service_failed",
            ObjectError::NotInService(_) => "bucket_not_in_service",
            ObjectError::Unsupported(_) => "not_supported_by_backend",
            ObjectError::InvalidCursor => "invalid_cursor",
            ObjectError::Reserved(_) => "reserved_bucket",
        }
    }
}

pub type Result<T> = std::result::Result<T, ObjectError>;

/// A bucket's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BucketConfig {
    /// Served without a token on the CDN routes.
    pub public: bool,
    /// `Cache-Control` of its objects on the CDN routes (the server's default when `None`).
    pub cache_control: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub config: BucketConfig,
    pub created_ms: i64,
}

/// An object's facts, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// Lowercase hex MD5 of the bytes, without quotes.
    pub etag: String,
    pub content_type: String,
    pub modified_ms: i64,
    /// User metadata, names lowercase.
    pub metadata: BTreeMap<String, String>,
    /// The embedded store's blob holding these bytes (empty for other backends).
    blob: String,
}

/// A listed object: what a listing page tells of each key (S3's ListObjectsV2 fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub modified_ms: i64,
}

impl From<ObjectMeta> for Listed {
    fn from(m: ObjectMeta) -> Listed {
        Listed { key: m.key, size: m.size, etag: m.etag, modified_ms: m.modified_ms }
    }
}

/// What a write requires of the object it replaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    None,
    /// `If-None-Match: *`: only if no object has this key.
    Absent,
    /// `If-Match`: only if the current object has one of these ETags (`*`: any object).
    Matches(Vec<String>),
}

impl Condition {
    fn check(&self, current: Option<&str>) -> Result<()> {
        let ok = match (self, current) {
            (Condition::None, _) => true,
            (Condition::Absent, c) => c.is_none(),
            (Condition::Matches(_), None) => false,
            (Condition::Matches(tags), Some(etag)) => tags.iter().any(|t| t == "*" || t == etag),
        };
        if ok {
            return Ok(());
        }
        Err(ObjectError::PreconditionFailed(match self {
            Condition::Absent => "an object with this key exists",
            _ => "the object's ETag does not match",
        }))
    }
}

/// Where a listing resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// After this key.
    After(String),
    /// At the first key not below this one (the end of a common prefix).
    From(String),
    /// An S3 service's own continuation token.
    Service(String),
}

impl Resume {
    /// The opaque continuation token of this position (the APIs' `cursor` and S3's
    /// continuation token).
    pub fn token(&self) -> String {
        use base64::Engine as _;
        let (tag, key) = match self {
            Resume::After(k) => ('a', k),
            Resume::From(k) => ('f', k),
            Resume::Service(t) => ('s', t),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{tag}{key}"))
    }

    /// The position a token names; `None` for anything [`Resume::token`] did not make.
    pub fn from_token(token: &str) -> Option<Resume> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut chars = text.chars();
        match chars.next()? {
            'a' => Some(Resume::After(chars.as_str().to_owned())),
            'f' => Some(Resume::From(chars.as_str().to_owned())),
            's' => Some(Resume::Service(chars.as_str().to_owned())),
            _ => None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub objects: Vec<Listed>,
    /// Keys rolled up at the delimiter (S3's `CommonPrefixes`), in order.
    pub prefixes: Vec<String>,
    /// Where the next page starts, when there is one.
    pub next: Option<Resume>,
}

/// Checks a bucket name against S3's rules for general purpose buckets: 3-63 of `a-z 0-9 . -`,
/// starting and ending with a letter or digit, no `..`, `.-` or `-.`, not shaped like an IPv4
/// address, and none of the prefixes and suffixes S3 reserves (so a name pixflow takes is one
/// an S3 service takes too, and no bucket poses as an access point alias or the like).
pub fn check_bucket(name: &str) -> Result<()> {
    /// Prefixes S3 reserves (`xn--`: punycode host names).
    const RESERVED_PREFIXES: &[&str] = &["xn--", "sthree-", "sthree-configurator", "amzn-s3-demo-"];
    /// Suffixes S3 reserves for access point, Object Lambda, Multi-Region Access Point,
    /// directory bucket and table bucket names.
    const RESERVED_SUFFIXES: &[&str] = &["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"];
    let bad = |reason| Err(ObjectError::InvalidBucket { name: name.chars().take(80).collect(), reason });
    if !(3..=63).contains(&name.len()) {
        return bad("use 3 to 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return bad("use lowercase letters, digits, `-` and `.`");
    }
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge(name.as_bytes()[0]) || !edge(name.as_bytes()[name.len() - 1]) {
        return bad("start and end with a letter or digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return bad("no `..`, `.-` or `-.`");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() == 4 && labels.iter().all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())) {
        return bad("not formatted as an IP address");
    }
    if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return bad("no prefix S3 reserves (`xn--`, `sthree-`, `amzn-s3-demo-`)");
    }
    if RESERVED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return bad("no suffix S3 reserves (`-s3alias`, `--ol-s3`, `.mrap`, `--x-s3`, `--table-s3`)");
    }
    Ok(())
}

/// Checks an object key: 1 to 1024 bytes of UTF-8 without control characters, made of
/// `/`-separated segments none of which is empty, `.` or `..` (such keys do not survive URL
/// normalisation on the way to the CDN, nor a path-based store).
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(ObjectError::InvalidKey("empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ObjectError::InvalidKey("longer than 1024 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(ObjectError::InvalidKey("control characters (NUL, newlines, ...) are not allowed"));
    }
    if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(ObjectError::InvalidKey("a segment between `/` is empty, `.` or `..`"));
    }
    Ok(())
}

/// Checks a content type and user metadata: visible ASCII (they travel as HTTP headers),
/// names of `a-z 0-9 - _`, at most 2 KiB of metadata.
pub fn check_attributes(content_type: &str, metadata: &BTreeMap<String, String>) -> Result<()> {
    let visible = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
    if content_type.is_empty() || content_type.len() > 255 || !visible(content_type) {
        return Err(ObjectError::InvalidMetadata("content type: 1 to 255 visible ASCII characters".into()));
    }
    let mut total = 0usize;
    for (name, value) in metadata {
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(ObjectError::InvalidMetadata(format!(
                "metadata name `{}`: use lowercase letters, digits, `-` and `_`",
                name.chars().take(64).collect::<String>()
            )));
        }
        if !visible(value) {
            return Err(ObjectError::InvalidMetadata(format!("metadata `{name}`: visible ASCII only")));
        }
        total = total.saturating_add(name.len() + value.len());
    }
    if total > MAX_METADATA_BYTES {
        return Err(ObjectError::InvalidMetadata(format!("metadata: {total} bytes; at most {MAX_METADATA_BYTES}")));
    }
    Ok(())
}

/// The smallest string above every string that starts with `prefix` (`None`: there is none).
/// UTF-8 orders like code points, so raising the last character that can be raised does it.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(c) = next {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn blob_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// What a write is recorded as in the change feed.
pub(crate) struct Cause<'a> {
    pub kind: ChangeKind,
    pub actor: &'a Actor,
}

/// An upload in progress: bytes stream into a temporary file while their MD5 is computed.
/// Dropped without [`Objects::commit`], it leaves nothing behind.
pub struct Upload {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    id: String,
    md5: Md5,
    size: u64,
    limit: u64,
    /// The first bytes, for sniffing a content type the writer did not give.
    prefix: Vec<u8>,
    /// This upload's place among those the node takes at once.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// How many leading bytes an upload keeps for sniffing.
const PREFIX_BYTES: usize = 4096;

impl Upload {
    /// Appends bytes; fails once the upload passes its limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.size = self.size.saturating_add(chunk.len() as u64);
        if self.size > self.limit {
            return Err(ObjectError::TooLarge { limit: self.limit, actual: self.size });
        }
        self.md5.update(chunk);
        let room = PREFIX_BYTES.saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&chunk[..room.min(chunk.len())]);
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        file.write_all(chunk).await?;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The first bytes written (up to 4 KiB).
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// MD5 of the bytes written so far (what `Content-MD5` declares).
    pub fn md5(&self) -> [u8; 16] {
        self.md5.clone().finalize().into()
    }

    /// Lowercase hex MD5 of the bytes written so far (the ETag they will get).
    fn md5_hex(&self) -> String {
        hex::encode(self.md5())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// How to reach an S3-compatible service (the `s3` backend).
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// The service's URL (`http://127.0.0.1:9000`); `None`: AWS, from the region.
    pub endpoint: Option<String>,
    /// `None`: from the environment (`AWS_REGION`), else `us-east-1`.
    pub region: Option<String>,
    /// Credentials; `None`: the AWS environment (`AWS_ACCESS_KEY_ID`, a session token, ...).
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// The bucket in the host name (AWS's default) instead of the path.
    pub virtual_hosted: bool,
}

/// The bytes of one stored version, read when the caller knows which of them it wants.
pub struct Reader(ReaderKind);

enum ReaderKind {
    File(tokio::fs::File),
    #[cfg(feature = "s3")]
    Service(s3::Version),
}

/// A stream of an object's bytes, in chunks of up to 64 KiB.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

impl Reader {
    /// `len` bytes from `start` (both within the object's size), as they are taken.
    pub async fn range(self, start: u64, len: u64) -> Result<ByteStream> {
        match self.0 {
            ReaderKind::File(mut file) => {
                if start > 0 {
                    file.seek(std::io::SeekFrom::Start(start)).await?;
                }
                Ok(tokio_util::io::ReaderStream::with_capacity(file.take(len), 64 << 10).boxed())
            }
            #[cfg(feature = "s3")]
            ReaderKind::Service(v) => v.range(start, len).await,
        }
    }
}

enum Backend {
    Embedded(embedded::Embedded),
    #[cfg(feature = "s3")]
    Service(s3::Service),
}

struct Inner {
    backend: Backend,
    /// Where uploads spool before they reach the backend.
    spool: PathBuf,
    /// Uploads under way (each spools to a file and holds a descriptor), at most `max_uploads`.
    uploads: Arc<tokio::sync::Semaphore>,
    max_uploads: usize,
    /// The bucket only [`Objects::internal`] handles may name.
    reserved: Option<String>,
}

/// Uploads a node takes at once unless configured otherwise.
pub const DEFAULT_MAX_UPLOADS: usize = 256;

/// The object store: a cheap handle, shared by every part of a node. Each handle carries the
/// [`Actor`] its changes are recorded under ([`Objects::by`]; the node itself by default).
#[derive(Clone)]
pub struct Objects {
    inner: Arc<Inner>,
    actor: Arc<Actor>,
    /// Whether this handle may name the reserved bucket.
    internal: bool,
}

impl Objects {
    /// Opens (creating if needed) the embedded store under `root`, emptying its `tmp/` (uploads
    /// a stop cut short). Blobs a crash left unnamed go with [`Objects::collect_garbage`].
    pub async fn open(root: &Path) -> Result<Objects> {
        let store = embedded::Embedded::open(root).await?;
        let spool = store.spool();
        Ok(Objects::with(Backend::Embedded(store), spool))
    }

    /// Connects to an S3-compatible service; bucket settings live in `settings` and uploads
    /// spool under `spool` (emptied first).
    #[cfg(feature = "s3")]
    pub async fn open_s3(config: &S3Config, settings: crate::Catalogue, spool: &Path) -> Result<Objects> {
        if spool.exists() {
            std::fs::remove_dir_all(spool)?;
        }
        crate::files::create_dir_all(spool)?;
        // The feed of this node's writes, in a file of its own beside the spool: the state may
        // be a shared database, and these records are the node's (decision 016).
        let feed = Feed::open_file(&spool.with_file_name("feed.db")).await?;
        let service = s3::Service::new(config, settings, feed)?;
        Ok(Objects::with(Backend::Service(service), spool.to_owned()))
    }

    fn with(backend: Backend, spool: PathBuf) -> Objects {
        let inner = Inner {
            backend,
            spool,
            uploads: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_UPLOADS)),
            max_uploads: DEFAULT_MAX_UPLOADS,
            reserved: None,
        };
        Objects { inner: Arc::new(inner), actor: Arc::new(Actor::system()), internal: false }
    }

    /// The same store, recording the changes made through the returned handle as `actor`'s.
    pub fn by(&self, actor: Actor) -> Objects {
        Objects { inner: self.inner.clone(), actor: Arc::new(actor), internal: self.internal }
    }

    /// The same store reserving bucket `name` for [`Objects::internal`] handles: every other
    /// handle is refused it ([`ObjectError::Reserved`]) and does not list it. Set at start, on a
    /// handle not yet shared (a shared one keeps what it has).
    pub fn with_reserved_bucket(mut self, name: &str) -> Objects {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.reserved = Some(name.to_owned());
        }
        self
    }

    /// A handle of the node itself that may use the reserved bucket, its changes recorded as
    /// the system's.
    pub fn internal(&self) -> Objects {
        Objects { inner: self.inner.clone(), actor: Arc::new(Actor::system()), internal: true }
    }

    /// The reserved bucket, if one is set.
    pub fn reserved_bucket(&self) -> Option<&str> {
        self.inner.reserved.as_deref()
    }

    /// Checks a bucket name, and refuses the reserved bucket unless this handle is internal.
    fn check(&self, bucket: &str) -> Result<()> {
        check_bucket(bucket)?;
        self.refuse_reserved(bucket)
    }

    /// Refuses the reserved bucket unless this handle is internal.
    fn refuse_reserved(&self, bucket: &str) -> Result<()> {
        if !self.internal && self.inner.reserved.as_deref() == Some(bucket) {
            return Err(ObjectError::Reserved(bucket.to_owned()));
        }
        Ok(())
    }

    /// Whom this handle's changes are recorded under.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The store's change feed: every create, overwrite and delete, in order, from a cursor.
    pub fn feed(&self) -> Feed {
        match &self.inner.backend {
            Backend::Embedded(e) => e.feed.clone(),
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.feed.clone(),
        }
    }

    /// The same store keeping `retention` of its change feed (default: the last
    /// [`crate::feed::DEFAULT_MAX_RECORDS`] records of the last 7 days). Applies to every
    /// handle of the store, from the next trim on.
    pub fn with_feed_retention(self, retention: Retention) -> Objects {
        self.feed().set_retention(retention);
        self
    }

    /// The same store taking at most `max` uploads at once (object PUTs, S3 objects and
    /// parts); beyond it [`Objects::upload`] answers [`ObjectError::TooManyUploads`]. Set at
    /// start, on a handle not yet shared (a shared one keeps the limit it has).
    pub fn with_max_uploads(mut self, max: usize) -> Objects {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            let max = max.max(1);
            inner.uploads = Arc::new(tokio::sync::Semaphore::new(max));
            inner.max_uploads = max;
        }
        self
    }

    /// `embedded` or `s3`.
    pub fn kind(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Embedded(_) => "embedded",
            #[cfg(feature = "s3")]
            Backend::Service(_) => "s3",
        }
    }

    /// The embedded store, for what only it does (multipart uploads of the S3 endpoint).
    fn embedded(&self) -> Result<&embedded::Embedded> {
        match &self.inner.backend {
            Backend::Embedded(e) => Ok(e),
            #[cfg(feature = "s3")]
            Backend::Service(_) => {
                Err(ObjectError::Unsupported("multipart uploads go to the S3 service itself, not through pixflow"))
            }
        }
    }

    /// Answers once the store did: a health probe. The embedded store is the node's own files
    /// and answers at once; an S3 service is asked for one key of the reserved bucket (with none
    /// reserved, there is nothing to ask and it answers at once too).
    pub async fn ping(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Embedded(_) => Ok(()),
            #[cfg(feature = "s3")]
            Backend::Service(s) => match &self.inner.reserved {
                Some(bucket) => s.ping(bucket).await,
                None => Ok(()),
            },
        }
    }

    pub async fn close(&self) {
        match &self.inner.backend {
            Backend::Embedded(e) => e.close().await,
            // The feed's own file (flushing its WAL).
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.feed.close().await,
        }
    }

    /// Removes what crashes and abandoned uploads left that no object names, written before
    /// `before` (later ones may belong to uploads committing right now; the embedded store
    /// allows a second's slack for the coarse clock of file times), and the change records
    /// retention no longer keeps. Returns how many blobs went. Only the embedded store keeps
    /// such leftovers; an S3 service's lifecycle rules clean multipart uploads a crash cut short
    /// (failed and abandoned ones are aborted).
    pub async fn collect_garbage(&self, before: SystemTime) -> Result<u64> {
        let trimmed = self.feed().trim().await.map_err(|e| ObjectError::Io(std::io::Error::other(e.to_string())))?;
        if trimmed > 0 {
            tracing::debug!(trimmed, "change records past retention removed");
        }
        match &self.inner.backend {
            Backend::Embedded(e) => {
                self.expire_uploads(crate::state::now_ms().saturating_sub(multipart::EXPIRE_AFTER_MS)).await?;
                e.collect_garbage(before).await
            }
            #[cfg(feature = "s3")]
            Backend::Service(_) => Ok(0),
        }
    }

    // ---- buckets ----

    /// Creates a bucket or updates its settings; `true` when it was created. With an S3
    /// service, the bucket must exist there: this registers it and keeps its settings.
    pub async fn put_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        self.check(name)?;
        if let Some(cc) = &config.cache_control {
            check_attributes(cc, &BTreeMap::new())
                .map_err(|_| ObjectError::InvalidMetadata("cache_control: 1 to 255 visible ASCII characters".into()))?;
        }
        match &self.inner.backend {
            Backend::Embedded(e) => e.put_bucket(name, config).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.put_bucket(name, config).await,
        }
    }

    pub async fn bucket(&self, name: &str) -> Result<Option<Bucket>> {
        self.refuse_reserved(name)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.bucket(name).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.bucket(name).await,
        }
    }

    pub async fn buckets(&self) -> Result<Vec<Bucket>> {
        let mut buckets = match &self.inner.backend {
            Backend::Embedded(e) => e.buckets().await?,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.buckets().await?,
        };
        if !self.internal {
            buckets.retain(|b| self.inner.reserved.as_deref() != Some(b.name.as_str()));
        }
        Ok(buckets)
    }

    /// Deletes an empty bucket (with an S3 service: forgets it; the service keeps its bucket).
    pub async fn delete_bucket(&self, name: &str) -> Result<()> {
        self.refuse_reserved(name)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.delete_bucket(name).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.delete_bucket(name).await,
        }
    }

    // ---- objects ----

    /// Starts an upload of at most `limit` bytes.
    pub async fn upload(&self, limit: u64) -> Result<Upload> {
        let slot = self
            .inner
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| ObjectError::TooManyUploads(self.inner.max_uploads))?;
        let id = blob_id()?;
        let tmp = self.inner.spool.join(&id);
        let file = crate::files::open_options_async().read(true).write(true).create_new(true).open(&tmp).await?;
        Ok(Upload { file: Some(file), tmp, id, md5: Md5::new(), size: 0, limit, prefix: Vec::new(), _slot: slot })
    }

    /// The most memory committing an upload of `size` bytes holds: none for the embedded store
    /// (the spooled file is renamed); for an S3 service, the single PUT or the parts in flight.
    pub fn commit_memory(&self, size: u64) -> u64 {
        match &self.inner.backend {
            Backend::Embedded(_) => 0,
            #[cfg(feature = "s3")]
            Backend::Service(_) => s3::commit_memory(size),
        }
    }

    /// Makes an upload the object at `bucket`/`key` if `condition` holds.
    pub async fn commit(
        &self,
        upload: Upload,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
    ) -> Result<ObjectMeta> {
        self.commit_as(upload, bucket, key, content_type, metadata, condition, ChangeKind::Put).await
    }

    /// [`Objects::commit`], recorded in the feed as a change of `kind`.
    #[allow(clippy::too_many_arguments, reason = "the arguments of `commit`, plus what its record says")]
    pub(crate) async fn commit_as(
        &self,
        upload: Upload,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
        kind: ChangeKind,
    ) -> Result<ObjectMeta> {
        self.check(bucket)?;
        check_key(key)?;
        check_attributes(content_type, metadata)?;
        let cause = Cause { kind, actor: &self.actor };
        match &self.inner.backend {
            Backend::Embedded(e) => e.commit(upload, bucket, key, content_type, metadata, condition, &cause).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.commit(upload, bucket, key, content_type, metadata, condition, &cause).await,
        }
    }

    /// Stores bytes held in memory (results of functions).
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
        bytes: &[u8],
    ) -> Result<ObjectMeta> {
        self.check(bucket)?;
        check_key(key)?;
        check_attributes(content_type, metadata)?;
        #[cfg(feature = "s3")]
        if let Backend::Service(s) = &self.inner.backend {
            let cause = Cause { kind: ChangeKind::Put, actor: &self.actor };
            let bytes = Bytes::copy_from_slice(bytes);
            return s.put(bucket, key, content_type, metadata, condition, bytes, None, &cause).await;
        }
        let mut upload = self.upload(u64::MAX).await?;
        upload.write(bytes).await?;
        self.commit(upload, bucket, key, content_type, metadata, condition).await
    }

    /// An object's facts.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<ObjectMeta> {
        self.check(bucket)?;
        check_key(key)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.head(bucket, key).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.head(bucket, key).await,
        }
    }

    /// An object's facts and a reader of that version's bytes (it reads that version whatever
    /// writers do next, or fails with [`ObjectError::PreconditionFailed`] where a service
    /// has dropped it).
    pub async fn get(&self, bucket: &str, key: &str) -> Result<(ObjectMeta, Reader)> {
        self.check(bucket)?;
        check_key(key)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.get(bucket, key).await.map(|(m, f)| (m, Reader(ReaderKind::File(f)))),
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.get(bucket, key).await.map(|(m, v)| (m, Reader(ReaderKind::Service(v)))),
        }
    }

    /// An object's bytes in memory, refused before reading when larger than `limit`.
    pub async fn read(&self, bucket: &str, key: &str, limit: u64) -> Result<(ObjectMeta, Vec<u8>)> {
        self.check(bucket)?;
        check_key(key)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.read(bucket, key, limit).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.read(bucket, key, limit).await,
        }
    }

    /// Deletes an object (if `condition` holds); `false` when there was none.
    pub async fn delete(&self, bucket: &str, key: &str, condition: &Condition) -> Result<bool> {
        self.check(bucket)?;
        check_key(key)?;
        match &self.inner.backend {
            Backend::Embedded(e) => e.delete(bucket, key, condition, &self.actor).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.delete(bucket, key, condition, &self.actor).await,
        }
    }

    /// One page of the keys under `prefix` (a plain string prefix, as S3's), rolled up at
    /// `delimiter` when one is given (S3's ListObjectsV2), at most `limit` entries (objects
    /// plus common prefixes), in byte order.
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        resume: Option<&Resume>,
        limit: u32,
    ) -> Result<Listing> {
        self.check(bucket)?;
        let limit = limit.clamp(1, MAX_LIST);
        let delimiter = delimiter.filter(|d| !d.is_empty());
        match &self.inner.backend {
            Backend::Embedded(e) => e.list(bucket, prefix, delimiter, resume, limit).await,
            #[cfg(feature = "s3")]
            Backend::Service(s) => s.list(bucket, prefix, delimiter, resume, limit).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_are_checked() {
        for good in [
            "media",
            "my-bucket.2026",
            "a1b",
            "192.168.5",
            "192.168.5.4.5",
            "1.2.3.a",
            "axn--b",
            "three-media",
            "amzn-s3-media",
            "media-s3alias-x",
            "media.mrapx",
            "x-s3",
        ] {
            check_bucket(good).unwrap();
        }
        for bad in [
            "ab",
            "Media",
            "-media",
            "media-",
            "me..dia",
            "me_dia",
            &"a".repeat(64),
            "192.168.5.4",
            "10.0.0.1",
            "999.999.999.999",
            "xn--media",
            "sthree-media",
            "sthree-configurator",
            "sthree-configurator-x",
            "amzn-s3-demo-bucket",
            "media-s3alias",
            "media--ol-s3",
            "media.mrap",
            "media--x-s3",
            "media--table-s3",
            "me.-dia",
            "me-.dia",
        ] {
            assert!(matches!(check_bucket(bad), Err(ObjectError::InvalidBucket { .. })), "{bad}");
        }
        for good in ["a", "photos/2026/cat.jpg", "ü/ñ 空.png", "a.b/..c/d..", &"k".repeat(1024)] {
            check_key(good).unwrap();
        }
        for bad in
            ["", "/abs", "a//b", "dir/", "../etc/passwd", "a/./b", "a/..", "nul\0", "line\nbreak", &"k".repeat(1025)]
        {
            assert!(matches!(check_key(bad), Err(ObjectError::InvalidKey(_))), "{bad:?}");
        }
        let mut m = BTreeMap::from([("origin".to_owned(), "cms".to_owned())]);
        check_attributes("image/jpeg", &m).unwrap();
        assert!(check_attributes("image/jpeg\r\nx: y", &m).is_err());
        m.insert("Bad Name".into(), "x".into());
        assert!(check_attributes("image/jpeg", &m).is_err());
        let big = BTreeMap::from([("big".to_owned(), "x".repeat(MAX_METADATA_BYTES))]);
        assert!(check_attributes("image/jpeg", &big).is_err());
    }

    #[test]
    fn resume_tokens_round_trip_and_refuse_what_they_did_not_make() {
        for r in [Resume::After("a/ü".into()), Resume::From("b".into()), Resume::Service("t0k=".into())] {
            assert_eq!(Resume::from_token(&r.token()), Some(r));
        }
        assert_eq!(Resume::from_token("!!"), None);
        assert_eq!(Resume::from_token("eA"), None);
    }

    #[test]
    fn prefix_end_is_the_least_upper_bound() {
        assert_eq!(prefix_end("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_end("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end(""), None);
        let bound = prefix_end("ab").unwrap();
        for k in ["ab", "ab\u{10FFFF}zz", "ab/c"] {
            assert!(k < bound.as_str());
        }
        assert!("ac" >= bound.as_str());
    }
}
