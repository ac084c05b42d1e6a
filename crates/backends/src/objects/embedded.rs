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
//! Folders are created `0700` and files `0600` ([`crate::files`]): only the node's user reads
//! private objects.
//!
//! A write streams into `tmp/`, fsyncs, renames into `blobs/`, fsyncs the folder, then swaps
//! the row with a compare-and-swap on the blob id (so `If-Match` / `If-None-Match: *` hold
//! under concurrent writers), appending its change record ([`crate::feed`]) in the same
//! statement (an `INSTEAD OF` trigger), so the feed holds a change if and only if the catalogue
//! does; only then is the replaced blob unlinked. A crash at any point
//! leaves either the old object or the new one, never a torn one: at the next open `tmp/` is
//! emptied and blobs no object or multipart part names are collected (with uploads left
//! incomplete for a week, as S3 lifecycle rules usually abort them). Readers that lose a race with an overwrite
//! (their blob was unlinked between the lookup and the open) look up again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::io::AsyncWriteExt;

use super::{
    Bucket, BucketConfig, Cause, Condition, Listed, Listing, ObjectError, ObjectMeta, Result, Resume, Upload,
    prefix_end,
};
use crate::catalogue::sqlite::bucket_rows;
use crate::feed::{Actor, Feed};
use crate::files;
use crate::state::now_ms;

/// How much older than a collection's `before` a blob's file time must be for the blob to be
/// collected: more than the tick the kernel's file timestamps may lag the wall clock by.
const FILE_CLOCK_SLACK: Duration = Duration::from_secs(1);

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

/// What a statement below aborts with when it changed no row (a concurrent writer won).
const LOST_RACE: &str = "pixflow: lost race";

/// Catalogue changes with their change records ([`crate::feed`]): an insert into one of these
/// views runs its `INSTEAD OF` trigger, which changes `objects` and, if a row changed, appends
/// the record, all in one statement (so in one transaction, and in one round trip to SQLite);
/// if no row changed it aborts with [`LOST_RACE`], changing nothing. Made again at every open,
/// so a catalogue always has the current definitions.
const WRITES: &[&str] = &[
    "DROP VIEW IF EXISTS object_creates",
    "DROP VIEW IF EXISTS object_overwrites",
    "DROP VIEW IF EXISTS object_deletes",
    "CREATE VIEW object_creates AS SELECT NULL AS blob, NULL AS size, NULL AS etag, NULL AS content_type,
        NULL AS metadata, NULL AS modified_ms, NULL AS bucket, NULL AS key, NULL AS kind, NULL AS actor_kind,
        NULL AS actor_name, NULL AS actor_depth WHERE 0",
    "CREATE TRIGGER object_create INSTEAD OF INSERT ON object_creates BEGIN
        INSERT INTO objects (blob, size, etag, content_type, metadata, modified_ms, bucket, key)
            VALUES (NEW.blob, NEW.size, NEW.etag, NEW.content_type, NEW.metadata, NEW.modified_ms, NEW.bucket, NEW.key)
            ON CONFLICT (bucket, key) DO NOTHING;
        SELECT RAISE(ABORT, 'pixflow: lost race') WHERE changes() = 0;
        INSERT INTO changes (kind, replaced, bucket, key, etag, size, time_ms, actor_kind, actor_name, actor_depth)
            VALUES (NEW.kind, 0, NEW.bucket, NEW.key, NEW.etag, NEW.size, NEW.modified_ms, NEW.actor_kind,
                    NEW.actor_name, NEW.actor_depth);
    END",
    "CREATE VIEW object_overwrites AS SELECT NULL AS blob, NULL AS size, NULL AS etag, NULL AS content_type,
        NULL AS metadata, NULL AS modified_ms, NULL AS bucket, NULL AS key, NULL AS old_blob, NULL AS kind,
        NULL AS actor_kind, NULL AS actor_name, NULL AS actor_depth WHERE 0",
    "CREATE TRIGGER object_overwrite INSTEAD OF INSERT ON object_overwrites BEGIN
        UPDATE objects SET blob = NEW.blob, size = NEW.size, etag = NEW.etag, content_type = NEW.content_type,
            metadata = NEW.metadata, modified_ms = NEW.modified_ms
            WHERE bucket = NEW.bucket AND key = NEW.key AND blob = NEW.old_blob;
        SELECT RAISE(ABORT, 'pixflow: lost race') WHERE changes() = 0;
        INSERT INTO changes (kind, replaced, bucket, key, etag, size, time_ms, actor_kind, actor_name, actor_depth)
            VALUES (NEW.kind, 1, NEW.bucket, NEW.key, NEW.etag, NEW.size, NEW.modified_ms, NEW.actor_kind,
                    NEW.actor_name, NEW.actor_depth);
    END",
    "CREATE VIEW object_deletes AS SELECT NULL AS bucket, NULL AS key, NULL AS blob, NULL AS time_ms,
        NULL AS actor_kind, NULL AS actor_name, NULL AS actor_depth WHERE 0",
    "CREATE TRIGGER object_delete INSTEAD OF INSERT ON object_deletes BEGIN
        DELETE FROM objects WHERE bucket = NEW.bucket AND key = NEW.key AND blob = NEW.blob;
        SELECT RAISE(ABORT, 'pixflow: lost race') WHERE changes() = 0;
        INSERT INTO changes (kind, replaced, bucket, key, etag, size, time_ms, actor_kind, actor_name, actor_depth)
            VALUES ('delete', 1, NEW.bucket, NEW.key, NULL, 0, NEW.time_ms, NEW.actor_kind, NEW.actor_name,
                    NEW.actor_depth);
    END",
];

/// Whether a write through [`WRITES`] changed nothing because another writer came first.
fn is_lost_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains(LOST_RACE))
}

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
pub(super) fn encode_metadata(m: &BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

pub(super) fn decode_metadata(s: &str) -> BTreeMap<String, String> {
    s.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

pub(super) fn is_foreign_key_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains("FOREIGN KEY"))
}

/// The embedded object store.
#[derive(Clone)]
pub(crate) struct Embedded {
    pub(super) db: SqlitePool,
    root: PathBuf,
    /// The change feed, in the catalogue.
    pub(super) feed: Feed,
}

/// A blob made durable, not yet named by any row.
pub(super) struct Persisted {
    pub(super) id: String,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) etag: String,
}

impl Embedded {
    /// Opens (creating if needed) the store under `root` and empties `tmp/` (uploads a stop
    /// cut short). Blobs a crash left unnamed go with [`Objects::collect_garbage`].
    pub(super) async fn open(root: &Path) -> Result<Embedded> {
        files::create_dir_all(&root.join("blobs"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        files::create_dir_all(&tmp)?;
        let catalogue = root.join("catalogue.db");
        files::prepare_database(&catalogue)?;
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(catalogue)
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let db = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        for statement in SCHEMA {
            sqlx::query(*statement).execute(&db).await?;
        }
        let feed = Feed::open(&db).await?;
        for statement in WRITES {
            sqlx::query(*statement).execute(&db).await?;
        }
        Ok(Embedded { db, root: root.to_owned(), feed })
    }

    /// Where uploads spool.
    pub(super) fn spool(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(super) async fn close(&self) {
        self.db.close().await;
    }

    pub(super) fn blob_path(&self, id: &str) -> PathBuf {
        self.root.join("blobs").join(&id[..2]).join(id)
    }

    /// Removes blobs no object names that were written before `before` (later ones may belong
    /// to uploads committing right now). Returns how many went.
    pub(super) async fn collect_garbage(&self, before: SystemTime) -> Result<u64> {
        // Files are stamped from the kernel's coarse clock, which runs up to a tick behind the
        // wall clock: a blob written just after `before` (an upload that has not committed yet)
        // can carry an earlier time. Only blobs clearly older than `before` are candidates.
        let before = before.checked_sub(FILE_CLOCK_SLACK).unwrap_or(SystemTime::UNIX_EPOCH);
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
    pub(super) async fn put_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        Ok(bucket_rows::save(&self.db, name, config).await?)
    }

    pub(super) async fn bucket(&self, name: &str) -> Result<Option<Bucket>> {
        Ok(bucket_rows::find(&self.db, Some(name)).await?.pop())
    }

    pub(super) async fn buckets(&self) -> Result<Vec<Bucket>> {
        Ok(bucket_rows::find(&self.db, None).await?)
    }

    /// Deletes an empty bucket.
    pub(super) async fn delete_bucket(&self, name: &str) -> Result<()> {
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

    /// Makes an upload durable as a blob: fsync, rename into `blobs/`, fsync of the folder.
    /// Returns the blob's id, size and MD5; on failure nothing is left behind.
    pub(super) async fn persist(&self, mut upload: Upload) -> Result<Persisted> {
        let mut file = upload.file.take().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        let tmp = upload.tmp.clone();
        let blob = self.blob_path(&upload.id);
        let result = async {
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            let dir = blob.parent().map(Path::to_owned).unwrap_or_default();
            files::create_dir_all_async(&dir).await?;
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
    #[allow(clippy::too_many_arguments, reason = "the arguments of `Objects::commit`, plus what its record says")]
    pub(super) async fn commit(
        &self,
        upload: Upload,
        bucket: &str,
        key: &str,
        content_type: &str,
        metadata: &BTreeMap<String, String>,
        condition: &Condition,
        cause: &Cause<'_>,
    ) -> Result<ObjectMeta> {
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
        match self.swap(&meta, condition, cause).await {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    remove_blob(&self.blob_path(&old)).await;
                }
                Ok(meta)
            }
            Err(e) => {
                remove_blob(&blob.path).await;
                Err(e)
            }
        }
    }

    /// Points the row at the new blob if the condition holds, recording the change in the same
    /// statement; returns the blob it replaced.
    async fn swap(&self, meta: &ObjectMeta, condition: &Condition, cause: &Cause<'_>) -> Result<Option<String>> {
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
            // Both views take the row's values in the same order; an overwrite then names the
            // blob it replaces, and both end with the record's kind and actor.
            let write = match &current {
                None => sqlx::query(
                    "INSERT INTO object_creates (blob, size, etag, content_type, metadata, modified_ms, bucket, key,
                     kind, actor_kind, actor_name, actor_depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ),
                Some(_) => sqlx::query(
                    "INSERT INTO object_overwrites (blob, size, etag, content_type, metadata, modified_ms, bucket, key,
                     old_blob, kind, actor_kind, actor_name, actor_depth)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ),
            }
            .bind(&meta.blob)
            .bind(size)
            .bind(&meta.etag)
            .bind(&meta.content_type)
            .bind(&metadata)
            .bind(meta.modified_ms)
            .bind(&meta.bucket)
            .bind(&meta.key);
            let write = match &current {
                None => write,
                Some((old, _)) => write.bind(old),
            };
            let done = write
                .bind(cause.kind.as_str())
                .bind(cause.actor.kind.as_str())
                .bind(&cause.actor.name)
                .bind(i64::from(cause.actor.depth))
                .execute(&self.db)
                .await;
            match done {
                Ok(_) => {
                    self.feed.committed().await;
                    return Ok(current.map(|(blob, _)| blob));
                }
                // Another writer came first: nothing was written; look again.
                Err(e) if is_lost_race(&e) => continue,
                Err(e) if is_foreign_key_error(&e) => return Err(ObjectError::NoSuchBucket(meta.bucket.clone())),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ObjectError::Io(std::io::Error::other("too many concurrent writers of one key")))
    }

    /// An object's facts.
    pub(super) async fn head(&self, bucket: &str, key: &str) -> Result<ObjectMeta> {
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
    pub(super) async fn get(&self, bucket: &str, key: &str) -> Result<(ObjectMeta, tokio::fs::File)> {
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
    pub(super) async fn read(&self, bucket: &str, key: &str, limit: u64) -> Result<(ObjectMeta, Vec<u8>)> {
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

    /// Deletes an object (if `condition` holds), recording the change in the same statement;
    /// `false` when there was none.
    pub(super) async fn delete(&self, bucket: &str, key: &str, condition: &Condition, actor: &Actor) -> Result<bool> {
        for _ in 0..64 {
            let current = match self.head(bucket, key).await {
                Ok(m) => Some(m),
                Err(ObjectError::NoSuchKey { .. }) => None,
                Err(e) => return Err(e),
            };
            condition.check(current.as_ref().map(|m| m.etag.as_str()))?;
            let Some(current) = current else { return Ok(false) };
            let done = sqlx::query(
                "INSERT INTO object_deletes (bucket, key, blob, time_ms, actor_kind, actor_name, actor_depth)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(bucket)
            .bind(key)
            .bind(&current.blob)
            .bind(now_ms())
            .bind(actor.kind.as_str())
            .bind(&actor.name)
            .bind(i64::from(actor.depth))
            .execute(&self.db)
            .await;
            match done {
                Ok(_) => {
                    self.feed.committed().await;
                    remove_blob(&self.blob_path(&current.blob)).await;
                    return Ok(true);
                }
                Err(e) if is_lost_race(&e) => {}
                Err(e) => return Err(e.into()),
            }
            // Replaced meanwhile: check the condition against the new object.
        }
        Err(ObjectError::Io(std::io::Error::other("too many concurrent writers of one key")))
    }

    /// One page of the keys under `prefix`, rolled up at `delimiter` when one is given (S3's
    /// ListObjectsV2), at most `limit` entries (objects plus common prefixes).
    pub(super) async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        resume: Option<&Resume>,
        limit: u32,
    ) -> Result<Listing> {
        self.require_bucket(bucket).await?;
        let limit = limit as usize;
        let end = prefix_end(prefix);
        let (mut from, mut inclusive) = match resume {
            None => (prefix.to_owned(), true),
            // A resume point below the prefix starts at the prefix itself, which may be a key.
            Some(Resume::After(k)) if k.as_str() < prefix => (prefix.to_owned(), true),
            Some(Resume::After(k)) => (k.clone(), false),
            Some(Resume::From(k)) => (k.clone().max(prefix.to_owned()), true),
            Some(Resume::Service(_)) => return Err(ObjectError::InvalidCursor),
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
                page.objects.push(Listed::from(meta));
            }
            if fetched < usize::try_from(want).unwrap_or(0) {
                break;
            }
        }
        Ok(page)
    }
}

pub(super) async fn remove_blob(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "removing a replaced blob; the next start collects it");
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::Objects;
    use super::*;

    pub(in super::super) struct Dir(pub(in super::super) PathBuf);

    impl Dir {
        pub(in super::super) fn new(name: &str) -> Dir {
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

    pub(in super::super) async fn store(dir: &Dir) -> Objects {
        let o = Objects::open(&dir.0).await.unwrap();
        o.put_bucket("media", &BucketConfig::default()).await.unwrap();
        o
    }

    async fn put(o: &Objects, key: &str, bytes: &[u8]) -> ObjectMeta {
        o.put("media", key, "image/png", &BTreeMap::new(), &Condition::None, bytes).await.unwrap()
    }

    pub(in super::super) fn blobs(dir: &Dir) -> usize {
        walk(&dir.0.join("blobs"))
    }

    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum()
        })
    }

    #[tokio::test]
    async fn every_stored_version_is_one_blob_and_refused_writes_leave_none() {
        let dir = Dir::new("blobs");
        let o = store(&dir).await;
        put(&o, "k", b"one").await;
        put(&o, "k", b"two").await;
        assert_eq!(blobs(&dir), 1);
        let none = BTreeMap::new();
        let stale = Condition::Matches(vec!["0000".into()]);
        assert!(o.put("media", "k", "text/plain", &none, &stale, b"three").await.is_err());
        assert!(o.put("media", "k", "text/plain", &none, &Condition::Absent, b"three").await.is_err());
        assert!(o.put("other", "k", "text/plain", &none, &Condition::None, b"three").await.is_err());
        assert_eq!(blobs(&dir), 1);
        let mut u = o.upload(4).await.unwrap();
        assert!(u.write(b"12345").await.is_err());
        drop(u);
        assert_eq!(walk(&dir.0.join("tmp")), 0);
        assert!(o.delete("media", "k", &Condition::None).await.unwrap());
        assert_eq!(blobs(&dir), 0);
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
    async fn a_cursor_of_an_s3_service_is_refused() {
        let dir = Dir::new("cursor");
        let o = store(&dir).await;
        let foreign = Resume::Service("token".into());
        assert!(matches!(o.list("media", "", None, Some(&foreign), 10).await, Err(ObjectError::InvalidCursor)));
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
            o.close().await;
        }
        let o = Objects::open(&dir.0).await.unwrap();
        assert_eq!(walk(&dir.0.join("tmp")), 0);
        let removed = o.collect_garbage(SystemTime::now() + Duration::from_secs(2)).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(o.read("media", "kept", 100).await.unwrap().1, b"whole");
        assert_eq!(blobs(&dir), 1);
    }
}
