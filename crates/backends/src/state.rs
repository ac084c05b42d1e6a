//! The node's durable state in one SQLite file (the embedded default): functions deployed
//! through the API, API tokens (hashes only), bucket settings of an S3 service, the invocation
//! log, and (in the same file, through [`Store::queue`]) the queues.
//!
//! The invocation log keeps each asynchronous invocation's request, status, attempts, result
//! and error; its queue message carries only the id. A consumer that claimed the message
//! `start`s the invocation with the delivery's attempt number and lease token, and records the
//! outcome with `finish`, `retry_at` or `bury`: each changes the row only while it is still that
//! lease's, so a consumer whose lease ran out and whose message another claim took over changes
//! nothing (the fencing of [`crate::queue`], applied to the log). The store knows nothing of
//! functions' payload formats: payloads, results and errors are opaque bytes and text.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, sqlite::SqliteRow};

use crate::objects::{Bucket, BucketConfig};
use crate::queue::{Queue, Wakers};

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(#[from] sqlx::Error);

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where an invocation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    /// Dead-lettered: failed on its last attempt, or with an error retrying cannot fix.
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Dead => "dead",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "dead" => Status::Dead,
            _ => Status::Queued,
        }
    }
}

/// A new asynchronous invocation.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: String,
    pub function: String,
    pub max_attempts: u32,
    /// Request description (parameters, content type), opaque to the store.
    pub meta: String,
    /// Request bytes, opaque to the store.
    pub payload: Vec<u8>,
    /// Where to report completion, if anywhere.
    pub callback: Option<String>,
}

/// An invocation as stored (without its payload and result bytes).
#[derive(Debug, Clone)]
pub struct InvocationRow {
    pub id: String,
    pub function: String,
    pub status: Status,
    pub attempts: u32,
    pub max_attempts: u32,
    pub meta: String,
    pub callback: Option<String>,
    pub result_meta: Option<String>,
    pub error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// When a retried invocation's next attempt is due (ms since the epoch).
    pub next_ms: i64,
}

/// The columns [`row`] reads, spliced into queries at compile time.
macro_rules! row_columns {
    () => {
        "id, function, status, attempts, max_attempts, meta, callback, result_meta, error, created_ms, updated_ms, next_ms"
    };
}

fn row(r: &SqliteRow) -> InvocationRow {
    let int = |c: &str| r.get::<i64, _>(c);
    InvocationRow {
        id: r.get("id"),
        function: r.get("function"),
        status: Status::parse(r.get::<&str, _>("status")),
        attempts: u32::try_from(int("attempts")).unwrap_or(0),
        max_attempts: u32::try_from(int("max_attempts")).unwrap_or(1),
        meta: r.get("meta"),
        callback: r.get("callback"),
        result_meta: r.get("result_meta"),
        error: r.get("error"),
        created_ms: int("created_ms"),
        updated_ms: int("updated_ms"),
        next_ms: int("next_ms"),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Bucket settings rows (`name, public, cache_control, created_ms`): the state store keeps
/// them for an S3 service's buckets, the embedded catalogue for its own.
pub(crate) mod bucket_rows {
    use super::{Bucket, BucketConfig, Row, SqlitePool, now_ms};

    /// Inserts or updates; `true` when the row is new.
    pub(crate) async fn save(db: &SqlitePool, name: &str, config: &BucketConfig) -> sqlx::Result<bool> {
        let created = sqlx::query(
            "INSERT INTO buckets (name, public, cache_control, created_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(config.public)
        .bind(&config.cache_control)
        .bind(now_ms())
        .execute(db)
        .await?
        .rows_affected()
            == 1;
        if !created {
            sqlx::query("UPDATE buckets SET public = ?, cache_control = ? WHERE name = ?")
                .bind(config.public)
                .bind(&config.cache_control)
                .bind(name)
                .execute(db)
                .await?;
        }
        Ok(created)
    }

    /// The rows named `name` (all when `None`), by name.
    pub(crate) async fn find(db: &SqlitePool, name: Option<&str>) -> sqlx::Result<Vec<Bucket>> {
        let rows = sqlx::query(
            "SELECT name, public, cache_control, created_ms FROM buckets WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
        )
        .bind(name)
        .fetch_all(db)
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
}

/// The node's state.
#[derive(Clone)]
pub struct Store {
    db: SqlitePool,
    /// Shared by every [`Queue`] handle on this file, so an enqueue wakes any of their consumers.
    wakers: Arc<Wakers>,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS functions (
        name TEXT PRIMARY KEY, version TEXT NOT NULL, manifest TEXT NOT NULL, updated_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tokens (
        hash BLOB PRIMARY KEY, role TEXT NOT NULL, label TEXT NOT NULL, created_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS invocations (
        id TEXT PRIMARY KEY, function TEXT NOT NULL, status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
        meta TEXT NOT NULL, payload BLOB NOT NULL, callback TEXT,
        result_meta TEXT, result BLOB, error TEXT,
        created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
        next_ms INTEGER NOT NULL, claim TEXT, message TEXT)",
    "CREATE INDEX IF NOT EXISTS invocations_due ON invocations (status, next_ms)",
    "CREATE TABLE IF NOT EXISTS buckets (
        name TEXT PRIMARY KEY, public INTEGER NOT NULL, cache_control TEXT, created_ms INTEGER NOT NULL)",
];

impl Store {
    /// Opens (creating if needed) the state file. Commits are synchronous (`synchronous=FULL`
    /// with the WAL), so an accepted invocation survives a crash of the process or the machine.
    /// The file (and so its WAL) is readable by the node's user only.
    pub async fn open(path: &Path) -> Result<Store> {
        crate::files::prepare_database(path).map_err(|e| StoreError(sqlx::Error::Io(e)))?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        Self::connect(opts, 4).await
    }

    /// A store that lives in memory (tests).
    pub async fn memory() -> Result<Store> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: every connection to `:memory:` is a separate database.
        Self::connect(opts, 1).await
    }

    async fn connect(opts: SqliteConnectOptions, connections: u32) -> Result<Store> {
        let db = SqlitePoolOptions::new().max_connections(connections).connect_with(opts).await?;
        for statement in SCHEMA.iter().chain(crate::queue::sqlite::SCHEMA) {
            sqlx::query(*statement).execute(&db).await?;
        }
        // State files made before leases were recorded (`claim`, the lease token) and before
        // invocations named their queue message (`message`; NULL: the invocation's own id).
        for column in ["claim", "message"] {
            let present = sqlx::query("SELECT 1 AS one FROM pragma_table_info('invocations') WHERE name = ?")
                .bind(column)
                .fetch_optional(&db)
                .await?
                .is_some();
            if !present {
                sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE invocations ADD COLUMN {column} TEXT")))
                    .execute(&db)
                    .await?;
            }
        }
        Ok(Store { db, wakers: Arc::new(Wakers::default()) })
    }

    /// The queues in this state file. One process owns the file, so its leases are all this
    /// node's.
    pub fn queue(&self) -> Queue {
        let backend = crate::queue::sqlite::SqliteQueue::new(self.db.clone(), self.wakers.clone());
        Queue::new(Arc::new(backend), self.wakers.clone(), "local")
    }

    // ---- functions deployed through the API ----

    pub async fn save_function(&self, name: &str, version: &str, manifest: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO functions (name, version, manifest, updated_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, manifest = excluded.manifest,
             updated_ms = excluded.updated_ms",
        )
        .bind(name)
        .bind(version)
        .bind(manifest)
        .bind(now_ms())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    pub async fn delete_function(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM functions WHERE name = ?").bind(name).execute(&self.db).await?;
        Ok(())
    }

    /// `(name, manifest)` of every function deployed through the API.
    pub async fn functions(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT name, manifest FROM functions ORDER BY name").fetch_all(&self.db).await?;
        Ok(rows.iter().map(|r| (r.get("name"), r.get("manifest"))).collect())
    }

    // ---- settings of the buckets of an S3 service ----

    /// Saves a bucket's settings; `true` when the bucket was new.
    pub async fn save_bucket(&self, name: &str, config: &BucketConfig) -> Result<bool> {
        Ok(bucket_rows::save(&self.db, name, config).await?)
    }

    /// The buckets whose name is `name` (all of them when `None`), by name.
    pub async fn buckets(&self, name: Option<&str>) -> Result<Vec<Bucket>> {
        Ok(bucket_rows::find(&self.db, name).await?)
    }

    /// Forgets a bucket; `false` when there was none.
    pub async fn delete_bucket(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM buckets WHERE name = ?").bind(name).execute(&self.db).await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- API tokens (SHA-256 hashes; the tokens themselves are never stored) ----

    pub async fn add_token(&self, hash: &[u8], role: &str, label: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO tokens (hash, role, label, created_ms) VALUES (?, ?, ?, ?)")
            .bind(hash)
            .bind(role)
            .bind(label)
            .bind(now_ms())
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// The role of the token with this hash.
    pub async fn token_role(&self, hash: &[u8]) -> Result<Option<String>> {
        let r = sqlx::query("SELECT role FROM tokens WHERE hash = ?").bind(hash).fetch_optional(&self.db).await?;
        Ok(r.map(|r| r.get("role")))
    }

    /// Whether any token has `role`.
    pub async fn has_role(&self, role: &str) -> Result<bool> {
        let r = sqlx::query("SELECT 1 AS one FROM tokens WHERE role = ? LIMIT 1")
            .bind(role)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.is_some())
    }

    // ---- the invocation log (the queue carries only their ids: see [`crate::queue`]) ----

    /// Records a new invocation, queued; its queue message's deduplication id is its own id.
    /// Returns once it is committed.
    pub async fn insert_invocation(&self, inv: &NewInvocation) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms, updated_ms,
             next_ms, message)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?1)",
        )
        .bind(&inv.id)
        .bind(&inv.function)
        .bind(i64::from(inv.max_attempts))
        .bind(&inv.meta)
        .bind(&inv.payload)
        .bind(&inv.callback)
        .bind(now)
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Marks a queued (or interrupted) invocation running under `lease` (the queue lease's
    /// token), counts the attempt, and returns it with its payload. `None`: it is settled
    /// already, or gone. The latest start owns the row: an earlier lease's outcome is refused.
    pub async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        let r = sqlx::query(concat!(
            "UPDATE invocations SET status = 'running', attempts = attempts + 1, claim = ?1, updated_ms = ?2
             WHERE id = ?3 AND status IN ('queued', 'running')
             RETURNING ",
            row_columns!(),
            ", payload"
        ))
        .bind(lease)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&self.db)
        .await?;
        Ok(r.map(|r| (row(&r), r.get("payload"))))
    }

    /// Records success; the payload is dropped (it is no longer needed). `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'succeeded', result_meta = ?, result = ?, error = NULL,
             payload = x'', claim = NULL, updated_ms = ? WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(result_meta)
        .bind(result)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed attempt that will be retried after `delay`. `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn retry_at(&self, id: &str, lease: &str, error: &str, delay: Duration) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', error = ?, next_ms = ?, claim = NULL, updated_ms = ?
             WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(error)
        .bind(now.saturating_add(millis(delay)))
        .bind(now)
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Dead-letters an invocation (its payload is kept for a re-drive). `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'dead', error = ?, claim = NULL, updated_ms = ?
             WHERE id = ? AND claim = ? AND status = 'running'",
        )
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Puts a dead letter back with a fresh set of attempts, under a new queue message whose
    /// deduplication id this returns (`None`: it was not dead-lettered). The caller enqueues it.
    pub async fn redrive(&self, id: &str) -> Result<Option<String>> {
        let now = now_ms();
        let message = format!("{id}.{now}");
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', attempts = 0, next_ms = ?1, updated_ms = ?1, message = ?2
             WHERE id = ?3 AND status = 'dead'",
        )
        .bind(now)
        .bind(&message)
        .bind(id)
        .execute(&self.db)
        .await?;
        Ok((done.rows_affected() == 1).then_some(message))
    }

    /// Forgets an invocation whose message could not be queued (it was never accepted).
    pub async fn delete_invocation(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM invocations WHERE id = ?").bind(id).execute(&self.db).await?;
        Ok(())
    }

    /// `(invocation id, message deduplication id)` of every invocation not settled: what the
    /// queue must hold. Enqueueing them again at start is harmless (deduplicated) and repairs
    /// a stop between recording an invocation and enqueueing its message.
    pub async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, COALESCE(message, id) AS message FROM invocations WHERE status IN ('queued', 'running')
             ORDER BY created_ms",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("message"))).collect())
    }

    pub async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        let r = sqlx::query(concat!("SELECT ", row_columns!(), " FROM invocations WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.as_ref().map(row))
    }

    /// The result bytes of a succeeded invocation.
    pub async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT result FROM invocations WHERE id = ? AND status = 'succeeded'")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| r.get("result")))
    }

    /// Dead letters, oldest first, after the id `after` (pagination).
    pub async fn dead_letters(&self, after: Option<&str>, limit: u32) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            row_columns!(),
            " FROM invocations WHERE status = 'dead' AND id > ? ORDER BY id LIMIT ?"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(row).collect())
    }

    /// Deletes finished invocations (succeeded or dead) last updated before `before_ms`.
    pub async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM invocations WHERE status IN ('succeeded', 'dead') AND updated_ms < ?")
            .bind(before_ms)
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected())
    }

    /// Forgets every token with this label (a configured admin token replaced by another).
    pub async fn delete_tokens_labelled(&self, label: &str) -> Result<()> {
        sqlx::query("DELETE FROM tokens WHERE label = ?").bind(label).execute(&self.db).await?;
        Ok(())
    }

    /// Closes the connections, flushing the WAL.
    pub async fn close(&self) {
        self.db.close().await;
    }

    // ---- for the change feed of the object store (`crate::feed`) ----
    //
    // The feed keeps its own tables; with the S3 backend they live in this file. Kept apart from
    // the sections above on purpose.

    /// The connections, for the change feed's tables (their schema is the feed's).
    #[cfg(feature = "s3")]
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.db
    }

    /// The role and label of the token with this hash (who a change is recorded under).
    pub async fn token_role_and_label(&self, hash: &[u8]) -> Result<Option<(String, String)>> {
        let r =
            sqlx::query("SELECT role, label FROM tokens WHERE hash = ?").bind(hash).fetch_optional(&self.db).await?;
        Ok(r.map(|r| (r.get("role"), r.get("label"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(id: &str) -> NewInvocation {
        NewInvocation {
            id: id.into(),
            function: "thumb".into(),
            max_attempts: 3,
            meta: "{}".into(),
            payload: vec![1, 2, 3],
            callback: None,
        }
    }

    #[tokio::test]
    async fn invocation_log_life_cycle() {
        let s = Store::memory().await.unwrap();
        s.insert_invocation(&inv("a")).await.unwrap();
        s.insert_invocation(&inv("b")).await.unwrap();
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect::<Vec<_>>();
        assert_eq!(s.unsettled().await.unwrap(), pairs(&[("a", "a"), ("b", "b")]));
        let (row, payload) = s.start("a", "1.1").await.unwrap().unwrap();
        assert_eq!((row.status, row.attempts, payload.as_slice()), (Status::Running, 1, &[1u8, 2, 3][..]));
        assert!(s.finish("a", "1.1", "{\"ok\":true}", b"out").await.unwrap());
        assert_eq!(s.result("a").await.unwrap().unwrap(), b"out");
        assert_eq!(s.get("a").await.unwrap().unwrap().status, Status::Succeeded);
        // A settled invocation is not started again (a late redelivery of its message).
        assert!(s.start("a", "1.2").await.unwrap().is_none());
        s.start("b", "2.1").await.unwrap().unwrap();
        assert!(s.retry_at("b", "2.1", "boom", Duration::from_secs(3600)).await.unwrap());
        let row = s.get("b").await.unwrap().unwrap();
        assert_eq!(row.status, Status::Queued);
        assert!(row.next_ms > now_ms() + 3_500_000);
        // Its lease ended with the retry.
        assert!(!s.retry_at("b", "2.1", "boom", Duration::ZERO).await.unwrap());
        let (again, _) = s.start("b", "2.2").await.unwrap().unwrap();
        assert_eq!(again.attempts, 2);
        assert!(s.bury("b", "2.2", "dead").await.unwrap());
        let dead = s.dead_letters(None, 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].error.as_deref()), (1, Some("dead")));
        assert_eq!(s.unsettled().await.unwrap(), vec![]);
        let message = s.redrive("b").await.unwrap().unwrap();
        assert!(message.starts_with("b.") && message != "b");
        assert!(s.redrive("b").await.unwrap().is_none());
        assert_eq!(s.unsettled().await.unwrap(), vec![("b".to_owned(), message)]);
        let (redriven, payload) = s.start("b", "3.1").await.unwrap().unwrap();
        assert_eq!((redriven.attempts, payload.len()), (1, 3));
    }

    #[tokio::test]
    async fn a_stale_lease_does_not_overwrite_the_new_owners_outcome() {
        let s = Store::memory().await.unwrap();
        s.insert_invocation(&inv("a")).await.unwrap();
        // The first consumer's lease ran out (it hung); the message's next claim started it.
        s.start("a", "7.1").await.unwrap().unwrap();
        let (owner, _) = s.start("a", "7.2").await.unwrap().unwrap();
        assert_eq!(owner.attempts, 2);
        assert!(!s.retry_at("a", "7.1", "late", Duration::ZERO).await.unwrap());
        assert!(!s.bury("a", "7.1", "late").await.unwrap());
        assert!(!s.finish("a", "7.1", "[\"stale\"]", b"stale").await.unwrap());
        assert_eq!(s.get("a").await.unwrap().unwrap().status, Status::Running);
        assert!(s.finish("a", "7.2", "[\"owner\"]", b"owner").await.unwrap());
        // Nor after the owner finished.
        assert!(!s.finish("a", "7.1", "[\"stale\"]", b"stale").await.unwrap());
        assert!(!s.bury("a", "7.1", "late").await.unwrap());
        let row = s.get("a").await.unwrap().unwrap();
        assert_eq!((row.status, row.result_meta.as_deref()), (Status::Succeeded, Some("[\"owner\"]")));
        assert_eq!(s.result("a").await.unwrap().unwrap(), b"owner");
    }

    #[tokio::test]
    async fn finished_invocations_are_purged_after_retention() {
        let s = Store::memory().await.unwrap();
        s.insert_invocation(&inv("a")).await.unwrap();
        s.insert_invocation(&inv("b")).await.unwrap();
        s.start("a", "1.1").await.unwrap().unwrap();
        assert!(s.finish("a", "1.1", "[]", b"x").await.unwrap());
        assert_eq!(s.purge_finished(now_ms() - 60_000).await.unwrap(), 0);
        assert_eq!(s.purge_finished(now_ms() + 1).await.unwrap(), 1);
        assert!(s.get("a").await.unwrap().is_none() && s.get("b").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn survives_reopening_the_file() {
        let dir = std::env::temp_dir().join(format!("pixflow-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let s = Store::open(&path).await.unwrap();
            s.insert_invocation(&inv("kept")).await.unwrap();
            s.save_function("thumb", "1", "name: thumb").await.unwrap();
            s.add_token(&[7; 32], "admin", "first").await.unwrap();
            s.close().await;
        }
        let s = Store::open(&path).await.unwrap();
        assert_eq!(s.unsettled().await.unwrap(), vec![("kept".to_owned(), "kept".to_owned())]);
        assert_eq!(s.functions().await.unwrap(), vec![("thumb".into(), "name: thumb".into())]);
        assert_eq!(s.token_role(&[7; 32]).await.unwrap().as_deref(), Some("admin"));
        assert_eq!(s.token_role(&[8; 32]).await.unwrap(), None);
        assert!(s.has_role("admin").await.unwrap() && !s.has_role("invoke").await.unwrap());
        s.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_state_file_and_its_journal_are_private() {
        let dir = std::env::temp_dir().join(format!("pixflow-state-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::files::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let s = Store::open(&path).await.unwrap();
        s.insert_invocation(&inv("secret")).await.unwrap();
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(crate::files::mode(&dir.join(f)).unwrap(), 0o600, "{f}");
        }
        s.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_state_file_from_before_leases_and_messages_is_migrated() {
        let dir = std::env::temp_dir().join(format!("pixflow-state-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            // The invocations table as it was, with a row a stopped node left running.
            let opts = SqliteConnectOptions::new().filename(&path).create_if_missing(true);
            let db = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
            sqlx::query(
                "CREATE TABLE invocations (
                    id TEXT PRIMARY KEY, function TEXT NOT NULL, status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
                    meta TEXT NOT NULL, payload BLOB NOT NULL, callback TEXT,
                    result_meta TEXT, result BLOB, error TEXT,
                    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                    next_ms INTEGER NOT NULL, lease_ms INTEGER NOT NULL DEFAULT 0)",
            )
            .execute(&db)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO invocations (id, function, status, attempts, max_attempts, meta, payload, created_ms,
                 updated_ms, next_ms, lease_ms) VALUES ('old', 'thumb', 'running', 1, 3, '{}', x'01', 1, 1, 1, 9000000000000000)",
            )
            .execute(&db)
            .await
            .unwrap();
            db.close().await;
        }
        let s = Store::open(&path).await.unwrap();
        // Its message is enqueued again at start, named by its id.
        assert_eq!(s.unsettled().await.unwrap(), vec![("old".to_owned(), "old".to_owned())]);
        let (row, _) = s.start("old", "1.1").await.unwrap().unwrap();
        assert_eq!((row.id.as_str(), row.attempts), ("old", 2));
        assert!(s.finish("old", "1.1", "[]", b"").await.unwrap());
        s.close().await;
        // Opening a migrated file again changes nothing.
        let s = Store::open(&path).await.unwrap();
        assert_eq!(s.get("old").await.unwrap().unwrap().status, Status::Succeeded);
        s.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
