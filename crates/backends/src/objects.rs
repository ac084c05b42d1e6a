//! The embedded object store (the local-disk default): buckets and objects with content type,
//! ETag (MD5, as S3 computes it for a single upload), size, last-modified and user metadata.
//!
//! Layout under the store's root:
//! - `catalogue.db` (SQLite, `synchronous=FULL`): one row per bucket and per object, naming the
//!   blob file that holds its bytes. The row is the truth: an object exists once its row is
//!   committed, and not before.
//! - `blobs/<2 hex>/<32 hex>`: write-once files, one per stored version, never named after keys,
//!   so no key can reach a path outside the store (keys are still validated: S3's rules plus no
//!   control characters and no empty, `.` or `..` segments).
//! - `tmp/`: uploads in progress.
//!
//! A write streams into `tmp/`, fsyncs, renames into `blobs/`, fsyncs the folder, then swaps
//! the row with a compare-and-swap on the blob id (so `If-Match` / `If-None-Match: *` hold
//! under concurrent writers); only then is the replaced blob unlinked. A crash at any point
//! leaves either the old object or the new one, never a torn one: at the next open `tmp/` is
//! emptied and blobs no object or multipart part names are collected (with uploads left
//! incomplete for a week, as S3 lifecycle rules usually abort them). Readers that lose a race with an overwrite
//! (their blob was unlinked between the lookup and the open) look up again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use md5::{Digest, Md5};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::io::AsyncWriteExt;

use crate::state::now_ms;

pub mod multipart;

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
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
    #[error("object catalogue: {0}")]
    Catalogue(#[from] sqlx::Error),
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
    blob: String,
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
}

impl Resume {
    /// The opaque continuation token of this position (the APIs' `cursor` and S3's
    /// continuation token).
    pub fn token(&self) -> String {
        use base64::Engine as _;
        let (tag, key) = match self {
            Resume::After(k) => ('a', k),
            Resume::From(k) => ('f', k),
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
            _ => None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    /// Keys rolled up at the delimiter (S3's `CommonPrefixes`), in order.
    pub prefixes: Vec<String>,
    /// Where the next page starts, when there is one.
    pub next: Option<Resume>,
}

/// Checks a bucket name: S3's rules (3-63 of `a-z 0-9 . -`, starting and ending with a
/// letter or digit, no `..`).
pub fn check_bucket(name: &str) -> Result<()> {
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
    if name.contains("..") {
        return bad("no `..`");
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

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS buckets (
        name TEXT PRIMARY KEY, public INTEGER NOT NULL, cache_control TEXT, created_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS objects (
        bucket TEXT NOT NULL REFERENCES buckets (name), key TEXT NOT NULL, blob TEXT NOT NULL,
        size INTEGER NOT NULL, etag TEXT NOT NULL, content_type TEXT NOT NULL, metadata TEXT NOT NULL,
        modified_ms INTEGER NOT NULL, PRIMARY KEY (bucket, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS objects_blob ON objects (blob)",
    "CREATE TABLE IF NOT EXISTS uploads (
        id TEXT PRIMARY KEY, bucket TEXT NOT NULL REFERENCES buckets (name), key TEXT NOT NULL,
        content_type TEXT NOT NULL, metadata TEXT NOT NULL, created_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS parts (
        upload TEXT NOT NULL REFERENCES uploads (id), number INTEGER NOT NULL, blob TEXT NOT NULL,
        size INTEGER NOT NULL, etag TEXT NOT NULL, PRIMARY KEY (upload, number)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS parts_blob ON parts (blob)",
];

const OBJECT_COLUMNS: &str = "bucket, key, blob, size, etag, content_type, metadata, modified_ms";

fn object(r: &sqlx::sqlite::SqliteRow) -> ObjectMeta {
    let metadata: String = r.get("metadata");
    ObjectMeta {
        bucket: r.get("bucket"),
        key: r.get("key"),
        size: u64::try_from(r.get::<i64, _>("size")).unwrap_or(0),
        etag: r.get("etag"),
        content_type: r.get("content_type"),
        modified_ms: r.get("modified_ms"),
        metadata: decode_metadata(&metadata),
        blob: r.get("blob"),
    }
}

/// Metadata is stored as `name=value` lines (names and values are checked visible ASCII).
fn encode_metadata(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

fn decode_metadata(s: &str) -> BTreeMap<String, String> {
    s.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn blob_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

fn is_foreign_key_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains("FOREIGN KEY"))
}

/// An object that was written or deleted (for caches of what derives from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub bucket: String,
    pub key: String,
}

/// The embedded object store.
#[derive(Clone)]
pub struct Objects {
    db: SqlitePool,
    root: PathBuf,
    changes: tokio::sync::broadcast::Sender<Change>,
}

/// A blob made durable, not yet named by any row.
struct Persisted {
    id: String,
    path: PathBuf,
    size: u64,
    etag: String,
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

impl Objects {
    /// Opens (creating if needed) the store under `root` and empties `tmp/` (uploads a stop
    /// cut short). Blobs a crash left unnamed go with [`Objects::collect_garbage`].
    pub async fn open(root: &Path) -> Result<Objects> {
        std::fs::create_dir_all(root.join("blobs"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(root.join("catalogue.db"))
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let db = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        for statement in SCHEMA {
            sqlx::query(*statement).execute(&db).await?;
        }
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        Ok(Objects { db, root: root.to_owned(), changes })
    }

    /// Every later write and delete, as it commits. A receiver that falls more than 1024
    /// changes behind misses some (`Lagged`).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn changed(&self, bucket: &str, key: &str) {
        let _ = self.changes.send(Change { bucket: bucket.to_owned(), key: key.to_owned() });
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    fn blob_path(&self, id: &str) -> PathBuf {
        self.root.join("blobs").join(&id[..2]).join(id)
    }

    /// Removes blobs no object names that were written before `before` (later ones may belong
    /// to uploads committing right now). Returns how many went.
    pub async fn collect_garbage(&self, before: SystemTime) -> Result<u64> {
        self.expire_uploads(now_ms().saturating_sub(multipart::EXPIRE_AFTER_MS)).await?;
        let root = self.root.join("blobs");
        let candidates = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(String, PathBuf)>> {
            let mut found = Vec::new();
            for dir in std::fs::read_dir(&root)? {
                let dir = dir?.path();
                if !dir.is_dir() {
                    continue;
                }
                for f in std::fs::read_dir(&dir)? {
                    let f = f?;
                    let old = f.metadata()?.modified().is_ok_and(|m| m < before);
                    if let (true, Some(name)) = (old, f.file_name().to_str()) {
                        found.push((name.to_owned(), f.path()));
                    }
                }
            }
            Ok(found)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        let mut removed = 0;
        for (id, path) in candidates {
            // Objects and multipart parts both name blobs.
            let used = sqlx::query(
                "SELECT 1 FROM objects WHERE blob = ?1 UNION ALL SELECT 1 FROM parts WHERE blob = ?1 LIMIT 1",
            )
            .bind(&id)
            .fetch_optional(&self.db)
            .await?;
            if used.is_none() {
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }

    // ---- buckets ----

    /// Creates a bucket or updates its settings; `true` when it was created.
    pub async fn put_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        check_bucket(name)?;
        if let Some(cc) = &config.cache_control {
            check_attributes(cc, &BTreeMap::new())
                .map_err(|_| ObjectError::InvalidMetadata("cache_control: 1 to 255 visible ASCII characters".into()))?;
        }
        let created = sqlx::query(
            "INSERT INTO buckets (name, public, cache_control, created_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(config.public)
        .bind(&config.cache_control)
        .bind(now_ms())
        .execute(&self.db)
        .await?
        .rows_affected()
            == 1;
        if !created {
            sqlx::query("UPDATE buckets SET public = ?, cache_control = ? WHERE name = ?")
                .bind(config.public)
                .bind(&config.cache_control)
                .bind(name)
                .execute(&self.db)
                .await?;
        }
        Ok(created)
    }

    pub async fn bucket(&self, name: &str) -> Result<Option<Bucket>> {
        let r = sqlx::query("SELECT name, public, cache_control, created_ms FROM buckets WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| Bucket {
            name: r.get("name"),
            config: BucketConfig { public: r.get("public"), cache_control: r.get("cache_control") },
            created_ms: r.get("created_ms"),
        }))
    }

    pub async fn buckets(&self) -> Result<Vec<Bucket>> {
        let rows = sqlx::query("SELECT name, public, cache_control, created_ms FROM buckets ORDER BY name")
            .fetch_all(&self.db)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Bucket {
                name: r.get("name"),
                config: BucketConfig { public: r.get("public"), cache_control: r.get("cache_control") },
                created_ms: r.get("created_ms"),
            })
            .collect())
    }

    /// Deletes an empty bucket.
    pub async fn delete_bucket(&self, name: &str) -> Result<()> {
        match sqlx::query("DELETE FROM buckets WHERE name = ?").bind(name).execute(&self.db).await {
            Ok(r) if r.rows_affected() == 1 => Ok(()),
            Ok(_) => Err(ObjectError::NoSuchBucket(name.to_owned())),
            Err(e) if is_foreign_key_error(&e) => Err(ObjectError::BucketNotEmpty(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    async fn require_bucket(&self, bucket: &str) -> Result<()> {
        match self.bucket(bucket).await? {
            Some(_) => Ok(()),
            None => Err(ObjectError::NoSuchBucket(bucket.to_owned())),
        }
    }

    // ---- objects ----

    /// Starts an upload of at most `limit` bytes.
    pub async fn upload(&self, limit: u64) -> Result<Upload> {
        let id = blob_id()?;
        let tmp = self.root.join("tmp").join(&id);
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).await?;
        Ok(Upload { file: Some(file), tmp, id, md5: Md5::new(), size: 0, limit, prefix: Vec::new() })
    }

    /// Makes an upload durable as a blob: fsync, rename into `blobs/`, fsync of the folder.
    /// Returns the blob's id, size and MD5; on failure nothing is left behind.
    async fn persist(&self, mut upload: Upload) -> Result<Persisted> {
        let mut file = upload.file.take().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        let tmp = upload.tmp.clone();
        let blob = self.blob_path(&upload.id);
        let result = async {
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            let dir = blob.parent().map(Path::to_owned).unwrap_or_default();
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::rename(&tmp, &blob).await?;
            tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            remove_blob(&blob).await;
            return Err(e.into());
        }
        Ok(Persisted { id: upload.id.clone(), path: blob, size: upload.size, etag: upload.md5_hex() })
    }

    /// Makes an upload the object at `bucket`/`key` if `condition` holds, atomically.
    pub async fn commit(
        &self,
        upload: Upload,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
    ) -> Result<ObjectMeta> {
        check_bucket(bucket)?;
        check_key(key)?;
        check_attributes(content_type, metadata)?;
        let blob = self.persist(upload).await?;
        let meta = ObjectMeta {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            size: blob.size,
            etag: blob.etag,
            content_type: content_type.to_owned(),
            modified_ms: now_ms(),
            metadata: metadata.clone(),
            blob: blob.id,
        };
        match self.swap(&meta, condition).await {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    remove_blob(&self.blob_path(&old)).await;
                }
                self.changed(bucket, key);
                Ok(meta)
            }
            Err(e) => {
                remove_blob(&blob.path).await;
                Err(e)
            }
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
        check_bucket(bucket)?;
        check_key(key)?;
        check_attributes(content_type, metadata)?;
        let mut upload = self.upload(u64::MAX).await?;
        upload.write(bytes).await?;
        self.commit(upload, bucket, key, content_type, metadata, condition).await
    }

    /// Points the row at the new blob if the condition holds; returns the blob it replaced.
    async fn swap(&self, meta: &ObjectMeta, condition: &Condition) -> Result<Option<String>> {
        let size = i64::try_from(meta.size).unwrap_or(i64::MAX);
        let metadata = encode_metadata(&meta.metadata);
        // Compare-and-swap on the blob id: a writer that lost the race re-reads and re-checks.
        for _ in 0..64 {
            let current = sqlx::query("SELECT blob, etag FROM objects WHERE bucket = ? AND key = ?")
                .bind(&meta.bucket)
                .bind(&meta.key)
                .fetch_optional(&self.db)
                .await?
                .map(|r| (r.get::<String, _>("blob"), r.get::<String, _>("etag")));
            condition.check(current.as_ref().map(|(_, e)| e.as_str()))?;
            // Both statements take the row's values in the same order; the update then names
            // the blob it replaces.
            let row = |sql| {
                sqlx::query(sql)
                    .bind(&meta.blob)
                    .bind(size)
                    .bind(&meta.etag)
                    .bind(&meta.content_type)
                    .bind(&metadata)
                    .bind(meta.modified_ms)
                    .bind(&meta.bucket)
                    .bind(&meta.key)
            };
            let done = match &current {
                None => {
                    let r =
                        row("INSERT INTO objects (blob, size, etag, content_type, metadata, modified_ms, bucket, key)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bucket, key) DO NOTHING")
                        .execute(&self.db)
                        .await;
                    match r {
                        Ok(r) => r.rows_affected() == 1,
                        Err(e) if is_foreign_key_error(&e) => {
                            return Err(ObjectError::NoSuchBucket(meta.bucket.clone()));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Some((old, _)) => row(
                    "UPDATE objects SET blob = ?, size = ?, etag = ?, content_type = ?, metadata = ?, modified_ms = ?
                         WHERE bucket = ? AND key = ? AND blob = ?",
                )
                .bind(old)
                .execute(&self.db)
                .await?
                .rows_affected()
                    == 1,
            };
            if done {
                return Ok(current.map(|(blob, _)| blob));
            }
        }
        Err(ObjectError::Io(std::io::Error::other("too many concurrent writers of one key")))
    }

    /// An object's facts.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<ObjectMeta> {
        check_bucket(bucket)?;
        check_key(key)?;
        let sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = ? AND key = ?");
        let r = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(bucket).bind(key).fetch_optional(&self.db).await?;
        match r {
            Some(r) => Ok(object(&r)),
            None => {
                self.require_bucket(bucket).await?;
                Err(ObjectError::NoSuchKey { bucket: bucket.to_owned(), key: key.to_owned() })
            }
        }
    }

    /// An object's facts and an open file of its bytes (the file stays readable whatever
    /// writers do next).
    pub async fn get(&self, bucket: &str, key: &str) -> Result<(ObjectMeta, tokio::fs::File)> {
        for _ in 0..8 {
            let meta = self.head(bucket, key).await?;
            match tokio::fs::File::open(self.blob_path(&meta.blob)).await {
                Ok(f) => return Ok((meta, f)),
                // Overwritten or deleted between the lookup and the open: look again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ObjectError::Io(std::io::Error::other("the object changed under every read")))
    }

    /// An object's bytes in memory, refused before reading when larger than `limit`.
    pub async fn read(&self, bucket: &str, key: &str, limit: u64) -> Result<(ObjectMeta, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let (meta, file) = self.get(bucket, key).await?;
        if meta.size > limit {
            return Err(ObjectError::TooLarge { limit, actual: meta.size });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes).await?;
        if bytes.len() as u64 != meta.size {
            return Err(ObjectError::Io(std::io::Error::other("object file and catalogue disagree on its size")));
        }
        Ok((meta, bytes))
    }

    /// Deletes an object (if `condition` holds); `false` when there was none.
    pub async fn delete(&self, bucket: &str, key: &str, condition: &Condition) -> Result<bool> {
        check_bucket(bucket)?;
        check_key(key)?;
        for _ in 0..64 {
            let current = match self.head(bucket, key).await {
                Ok(m) => Some(m),
                Err(ObjectError::NoSuchKey { .. }) => None,
                Err(e) => return Err(e),
            };
            condition.check(current.as_ref().map(|m| m.etag.as_str()))?;
            let Some(current) = current else { return Ok(false) };
            let r = sqlx::query("DELETE FROM objects WHERE bucket = ? AND key = ? AND blob = ?")
                .bind(bucket)
                .bind(key)
                .bind(&current.blob)
                .execute(&self.db)
                .await?;
            if r.rows_affected() == 1 {
                remove_blob(&self.blob_path(&current.blob)).await;
                self.changed(bucket, key);
                return Ok(true);
            }
            // Replaced meanwhile: check the condition against the new object.
        }
        Err(ObjectError::Io(std::io::Error::other("too many concurrent writers of one key")))
    }

    /// One page of the keys under `prefix`, rolled up at `delimiter` when one is given (S3's
    /// ListObjectsV2), at most `limit` entries (objects plus common prefixes).
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        resume: Option<&Resume>,
        limit: u32,
    ) -> Result<Listing> {
        check_bucket(bucket)?;
        self.require_bucket(bucket).await?;
        let limit = limit.clamp(1, MAX_LIST) as usize;
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let end = prefix_end(prefix);
        let (mut from, mut inclusive) = match resume {
            None => (prefix.to_owned(), true),
            // A resume point below the prefix starts at the prefix itself, which may be a key.
            Some(Resume::After(k)) if k.as_str() < prefix => (prefix.to_owned(), true),
            Some(Resume::After(k)) => (k.clone(), false),
            Some(Resume::From(k)) => (k.clone().max(prefix.to_owned()), true),
        };
        let mut page = Listing::default();
        let entries = |p: &Listing| p.objects.len() + p.prefixes.len();
        'scan: loop {
            let want = i64::try_from(limit - entries(&page) + 1).unwrap_or(1);
            let sql = format!(
                "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = ? AND key {} ? {} ORDER BY key LIMIT ?",
                if inclusive { ">=" } else { ">" },
                if end.is_some() { "AND key < ?" } else { "" },
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(bucket).bind(&from);
            if let Some(end) = &end {
                q = q.bind(end);
            }
            let rows = q.bind(want).fetch_all(&self.db).await?;
            let fetched = rows.len();
            for r in &rows {
                let meta = object(r);
                if entries(&page) == limit {
                    page.next = Some(match (page.objects.last(), page.prefixes.last()) {
                        (Some(o), Some(p)) if p.as_str() > o.key.as_str() => {
                            Resume::From(prefix_end(p).unwrap_or_default())
                        }
                        (Some(o), _) => Resume::After(o.key.clone()),
                        (None, Some(p)) => Resume::From(prefix_end(p).unwrap_or_default()),
                        (None, None) => Resume::After(meta.key.clone()),
                    });
                    break 'scan;
                }
                let rest = meta.key.get(prefix.len()..).unwrap_or_default();
                if let Some(i) = delimiter.and_then(|d| rest.find(d).map(|i| i + d.len())) {
                    let common = meta.key[..prefix.len() + i].to_owned();
                    // Skip everything under this common prefix with a fresh query.
                    match prefix_end(&common) {
                        Some(next) => {
                            page.prefixes.push(common);
                            from = next;
                            inclusive = true;
                            continue 'scan;
                        }
                        None => {
                            page.prefixes.push(common);
                            break 'scan;
                        }
                    }
                }
                from = meta.key.clone();
                inclusive = false;
                page.objects.push(meta);
            }
            if fetched < usize::try_from(want).unwrap_or(0) {
                break;
            }
        }
        Ok(page)
    }
}

async fn remove_blob(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "removing a replaced blob; the next start collects it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) struct Dir(pub(super) PathBuf);

    impl Dir {
        pub(super) fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("pixflow-objects-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(super) async fn store(dir: &Dir) -> Objects {
        let o = Objects::open(&dir.0).await.unwrap();
        o.put_bucket("media", &BucketConfig::default()).await.unwrap();
        o
    }

    async fn put(o: &Objects, key: &str, bytes: &[u8]) -> ObjectMeta {
        o.put("media", key, "image/png", &BTreeMap::new(), &Condition::None, bytes).await.unwrap()
    }

    pub(super) fn blobs(dir: &Dir) -> usize {
        walk(&dir.0.join("blobs"))
    }

    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()
        })
    }

    #[test]
    fn names_and_keys_are_checked() {
        for good in ["media", "my-bucket.2026", "a1b"] {
            check_bucket(good).unwrap();
        }
        for bad in ["ab", "Media", "-media", "media-", "me..dia", "me_dia", &"a".repeat(64)] {
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

    #[tokio::test]
    async fn objects_round_trip_with_their_facts() {
        let dir = Dir::new("round-trip");
        let o = store(&dir).await;
        let meta = BTreeMap::from([("origin".to_owned(), "cms".to_owned())]);
        let m = o.put("media", "a/b.png", "image/png", &meta, &Condition::None, b"hello").await.unwrap();
        assert_eq!((m.size, m.etag.as_str()), (5, "5d41402abc4b2a76b9719d911017c592"));
        let head = o.head("media", "a/b.png").await.unwrap();
        assert_eq!(head, m);
        assert_eq!(head.metadata["origin"], "cms");
        let (_, bytes) = o.read("media", "a/b.png", 100).await.unwrap();
        assert_eq!(bytes, b"hello");
        assert!(matches!(o.read("media", "a/b.png", 4).await, Err(ObjectError::TooLarge { limit: 4, actual: 5 })));
        assert!(matches!(o.head("media", "nope").await, Err(ObjectError::NoSuchKey { .. })));
        assert!(matches!(o.head("other", "a/b.png").await, Err(ObjectError::NoSuchBucket(_))));
        assert!(matches!(
            o.put("other", "k", "image/png", &BTreeMap::new(), &Condition::None, b"x").await,
            Err(ObjectError::NoSuchBucket(_))
        ));
        // Overwrite: one blob left, new bytes served.
        put(&o, "a/b.png", b"world!").await;
        assert_eq!(o.read("media", "a/b.png", 100).await.unwrap().1, b"world!");
        assert_eq!(blobs(&dir), 1);
        assert!(o.delete("media", "a/b.png", &Condition::None).await.unwrap());
        assert!(!o.delete("media", "a/b.png", &Condition::None).await.unwrap());
        assert_eq!(blobs(&dir), 0);
    }

    #[tokio::test]
    async fn writes_and_deletes_are_announced() {
        let dir = Dir::new("changes");
        let o = store(&dir).await;
        let mut rx = o.changes();
        put(&o, "a", b"1").await;
        o.delete("media", "a", &Condition::None).await.unwrap();
        // A refused write announces nothing.
        let _ = o.put("media", "b", "text/plain", &BTreeMap::new(), &Condition::Matches(vec!["x".into()]), b"2").await;
        let change = |k: &str| Change { bucket: "media".into(), key: k.into() };
        assert_eq!(rx.try_recv().unwrap(), change("a"));
        assert_eq!(rx.try_recv().unwrap(), change("a"));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn conditions_hold() {
        let dir = Dir::new("conditions");
        let o = store(&dir).await;
        let none = BTreeMap::new();
        let first = o.put("media", "k", "text/plain", &none, &Condition::Absent, b"one").await.unwrap();
        let again = o.put("media", "k", "text/plain", &none, &Condition::Absent, b"two").await;
        assert!(matches!(again, Err(ObjectError::PreconditionFailed(_))));
        let stale = Condition::Matches(vec!["0000".into()]);
        assert!(matches!(
            o.put("media", "k", "text/plain", &none, &stale, b"two").await,
            Err(ObjectError::PreconditionFailed(_))
        ));
        let fresh = Condition::Matches(vec![first.etag.clone()]);
        o.put("media", "k", "text/plain", &none, &fresh, b"two").await.unwrap();
        assert!(matches!(o.delete("media", "k", &fresh).await, Err(ObjectError::PreconditionFailed(_))));
        assert_eq!(o.read("media", "k", 10).await.unwrap().1, b"two");
        // Refused writes leave no blob behind.
        assert_eq!(blobs(&dir), 1);
        assert!(walk(&dir.0.join("tmp")) == 0);
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_key_let_exactly_one_win() {
        let dir = Dir::new("race");
        let o = store(&dir).await;
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let o = o.clone();
                tokio::spawn(async move {
                    o.put("media", "once", "text/plain", &BTreeMap::new(), &Condition::Absent, &[i]).await.is_ok()
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await.unwrap());
        }
        assert_eq!(wins, 1);
        assert_eq!(blobs(&dir), 1);
    }

    #[tokio::test]
    async fn uploads_stream_with_a_limit_and_leave_nothing_when_dropped() {
        let dir = Dir::new("upload");
        let o = store(&dir).await;
        let mut u = o.upload(10).await.unwrap();
        u.write(b"12345").await.unwrap();
        assert!(matches!(u.write(b"678901").await, Err(ObjectError::TooLarge { limit: 10, actual: 11 })));
        drop(u);
        assert_eq!(walk(&dir.0.join("tmp")), 0);
        let mut u = o.upload(10).await.unwrap();
        u.write(b"12").await.unwrap();
        u.write(b"34").await.unwrap();
        let m = o.commit(u, "media", "k", "text/plain", &BTreeMap::new(), &Condition::None).await.unwrap();
        assert_eq!(m.size, 4);
        assert_eq!(o.read("media", "k", 10).await.unwrap().1, b"1234");
    }

    #[tokio::test]
    async fn buckets_are_created_updated_and_deleted_only_when_empty() {
        let dir = Dir::new("buckets");
        let o = store(&dir).await;
        let public = BucketConfig { public: true, cache_control: Some("public, max-age=60".into()) };
        assert!(!o.put_bucket("media", &public).await.unwrap());
        assert_eq!(o.bucket("media").await.unwrap().unwrap().config, public);
        put(&o, "k", b"x").await;
        assert!(matches!(o.delete_bucket("media").await, Err(ObjectError::BucketNotEmpty(_))));
        o.delete("media", "k", &Condition::None).await.unwrap();
        o.delete_bucket("media").await.unwrap();
        assert!(matches!(o.delete_bucket("media").await, Err(ObjectError::NoSuchBucket(_))));
        assert!(o.buckets().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn listing_pages_through_prefixes_and_delimiters() {
        let dir = Dir::new("list");
        let o = store(&dir).await;
        for k in ["a/1", "a/2", "a/x/1", "a/x/2", "a/y/1", "a-b", "b", "ab/1"] {
            put(&o, k, b"x").await;
        }
        let keys = |l: &Listing| l.objects.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
        let all = o.list("media", "", None, None, 1000).await.unwrap();
        // Byte order, as S3 lists.
        assert_eq!(keys(&all), ["a-b", "a/1", "a/2", "a/x/1", "a/x/2", "a/y/1", "ab/1", "b"]);
        assert!(all.next.is_none());
        let under_a = o.list("media", "a/", Some("/"), None, 1000).await.unwrap();
        assert_eq!(keys(&under_a), ["a/1", "a/2"]);
        assert_eq!(under_a.prefixes, ["a/x/", "a/y/"]);
        let top = o.list("media", "", Some("/"), None, 1000).await.unwrap();
        assert_eq!(keys(&top), ["a-b", "b"]);
        assert_eq!(top.prefixes, ["a/", "ab/"]);
        // Pages of two, following `next`, give the same entries in the same order.
        let mut seen = Vec::new();
        let mut resume = None;
        loop {
            let page = o.list("media", "a/", Some("/"), resume.as_ref(), 2).await.unwrap();
            assert!(page.objects.len() + page.prefixes.len() <= 2);
            seen.extend(keys(&page));
            seen.extend(page.prefixes.clone());
            match page.next {
                Some(n) => resume = Some(n),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["a/1", "a/2", "a/x/", "a/y/"]);
        let mut flat = Vec::new();
        let mut resume = None;
        loop {
            let page = o.list("media", "", None, resume.as_ref(), 3).await.unwrap();
            flat.extend(keys(&page));
            match page.next {
                Some(n) => resume = Some(n),
                None => break,
            }
        }
        assert_eq!(flat, keys(&all));
        for r in [Resume::After("a/ü".into()), Resume::From("b".into())] {
            assert_eq!(Resume::from_token(&r.token()), Some(r));
        }
        assert_eq!(Resume::from_token("!!"), None);
        // A key equal to the prefix is listed even when resuming from below the prefix.
        let from_below = o.list("media", "b", None, Some(&Resume::After("a".into())), 10).await.unwrap();
        assert_eq!(keys(&from_below), ["b"]);
    }

    #[tokio::test]
    async fn a_crash_leaves_whole_objects_and_collects_the_rest() {
        let dir = Dir::new("crash");
        {
            let o = store(&dir).await;
            put(&o, "kept", b"whole").await;
            // A torn upload and a blob renamed but never committed.
            std::fs::write(dir.0.join("tmp").join("0123"), b"torn").unwrap();
            let orphan = dir.0.join("blobs").join("ff");
            std::fs::create_dir_all(&orphan).unwrap();
            std::fs::write(orphan.join("ff00000000000000000000000000000000"), b"orphan").unwrap();
            o.db.close().await;
        }
        let o = Objects::open(&dir.0).await.unwrap();
        assert_eq!(walk(&dir.0.join("tmp")), 0);
        let removed = o.collect_garbage(SystemTime::now() + Duration::from_secs(1)).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(o.read("media", "kept", 100).await.unwrap().1, b"whole");
        assert_eq!(blobs(&dir), 1);
    }
}
