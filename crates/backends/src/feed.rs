//! The change feed of the object store: every object create, overwrite and delete made through
//! an [`Objects`](crate::Objects) handle, as numbered records in a `changes` table, read in
//! order from a cursor that readers save by name.
//!
//! Where the records live, and so what they promise, depends on the backend:
//! - the embedded store appends a record in the same SQLite statement (so the same transaction)
//!   as the catalogue change (`catalogue.db`): a change is recorded if and only if it happened;
//! - the S3 backend appends to the same tables in the node's state store once the service has
//!   acknowledged the write: a crash between the acknowledgement and the append loses the
//!   record, and writes other clients make to the service's bucket are not seen.
//!
//! Sequence numbers come from `AUTOINCREMENT`: monotonic, never reused, and (SQLite serialising
//! writers) committed in order, so a reader that saw `n` has seen everything before it.
//! Retention keeps the last [`Retention::max_records`] records younger than
//! [`Retention::max_age`], trimmed every [`TRIM_EVERY`] changes and by
//! [`Objects::collect_garbage`](crate::Objects::collect_garbage); a reader whose cursor is older
//! than what is kept gets [`FeedError::Behind`] instead of a silent gap. Waiting for new records
//! is in-process: each commit bumps a `watch`, and [`Feed::wait`] subscribes before it looks at
//! the newest number, so a wait after an empty [`Feed::read`] misses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Row, SqliteExecutor};

use crate::state::now_ms;

/// Records kept unless configured otherwise.
pub const DEFAULT_MAX_RECORDS: u64 = 100_000;
/// How long records are kept unless configured otherwise (7 days).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// Changes (made through one process's handles) between two trims of what retention no longer
/// keeps.
pub const TRIM_EVERY: u64 = 256;

pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, replaced INTEGER,
        bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT, size INTEGER NOT NULL, time_ms INTEGER NOT NULL,
        actor_kind TEXT NOT NULL, actor_name TEXT NOT NULL, actor_depth INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS feed_cursors (
        name TEXT PRIMARY KEY, seq INTEGER NOT NULL, updated_ms INTEGER NOT NULL)",
];

/// What happened to the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A write of a whole object (native API, S3 PutObject, a function's output).
    Put,
    /// The completion of a multipart upload (the embedded store's S3 endpoint).
    Multipart,
    Delete,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Multipart => "multipart",
            ChangeKind::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<ChangeKind> {
        match s {
            "put" => Some(ChangeKind::Put),
            "multipart" => Some(ChangeKind::Multipart),
            "delete" => Some(ChangeKind::Delete),
            _ => None,
        }
    }
}

/// What kind of caller made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// A client of the native API, by its token.
    Token,
    /// A client of the S3 endpoint, by its access key id.
    AccessKey,
    /// A function storing its results.
    Function,
    /// A trigger acting on a change.
    Trigger,
    /// The node itself (and callers that named nobody).
    System,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Token => "token",
            ActorKind::AccessKey => "access_key",
            ActorKind::Function => "function",
            ActorKind::Trigger => "trigger",
            ActorKind::System => "system",
        }
    }

    fn parse(s: &str) -> Option<ActorKind> {
        match s {
            "token" => Some(ActorKind::Token),
            "access_key" => Some(ActorKind::AccessKey),
            "function" => Some(ActorKind::Function),
            "trigger" => Some(ActorKind::Trigger),
            "system" => Some(ActorKind::System),
            _ => None,
        }
    }
}

/// Who caused a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub kind: ActorKind,
    /// The token's label and id, the access key id, the function's or trigger's name.
    pub name: String,
    /// How many function and trigger hops led to this write: 0 for a client's own write.
    pub depth: u32,
}

impl Actor {
    /// The node itself: what a handle carries until [`Objects::by`](crate::Objects::by) names
    /// someone else.
    pub fn system() -> Actor {
        Actor { kind: ActorKind::System, name: "system".into(), depth: 0 }
    }

    /// A client of the native API: its token's label, then `#` and the first 8 hex digits of
    /// the token's SHA-256 (labels need not be unique).
    pub fn token(label: &str, id: &str) -> Actor {
        Actor { kind: ActorKind::Token, name: format!("{label}#{id}"), depth: 0 }
    }

    /// A client of the S3 endpoint.
    pub fn access_key(id: &str) -> Actor {
        Actor { kind: ActorKind::AccessKey, name: id.to_owned(), depth: 0 }
    }

    /// A function's output, `depth` hops from a client (1 when a client invoked it).
    pub fn function(name: &str, depth: u32) -> Actor {
        Actor { kind: ActorKind::Function, name: name.to_owned(), depth }
    }

    /// A trigger's write, `depth` hops from a client.
    pub fn trigger(name: &str, depth: u32) -> Actor {
        Actor { kind: ActorKind::Trigger, name: name.to_owned(), depth }
    }
}

impl Default for Actor {
    fn default() -> Actor {
        Actor::system()
    }
}

/// One change, as the feed keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Position in the feed: increasing, never reused.
    pub seq: u64,
    pub kind: ChangeKind,
    /// Whether an object with this key existed before (always for a delete); `None` when the
    /// backend cannot tell (an unconditional write to an S3 service).
    pub replaced: Option<bool>,
    pub bucket: String,
    pub key: String,
    /// The new version's ETag; `None` for a delete.
    pub etag: Option<String>,
    /// The new version's bytes; 0 for a delete.
    pub size: u64,
    /// When the change was recorded (ms since the epoch).
    pub time_ms: i64,
    pub actor: Actor,
}

/// A change to record (the feed gives its number and time): the S3 backend's, which records
/// changes apart from making them.
#[cfg(feature = "s3")]
pub(crate) struct NewChange<'a> {
    pub kind: ChangeKind,
    pub replaced: Option<bool>,
    pub bucket: &'a str,
    pub key: &'a str,
    pub etag: Option<&'a str>,
    pub size: u64,
    pub actor: &'a Actor,
}

/// How much of the feed is kept: the newest `max_records` records, of those younger than
/// `max_age` (`Duration::ZERO`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_records: u64,
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention { max_records: DEFAULT_MAX_RECORDS, max_age: DEFAULT_MAX_AGE }
    }
}

/// What can go wrong reading the feed.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Records after `cursor` were trimmed by retention before this reader saw them; `oldest`
    /// is the first one kept. The reader must make up for what it missed (a cache: drop
    /// everything), then go on from `oldest - 1`.
    #[error("change feed cursor {cursor} is behind retention: the oldest change kept is {oldest}")]
    Behind { cursor: u64, oldest: u64 },
    /// The database holding the feed failed.
    #[error("change feed: {0}")]
    Storage(Box<dyn std::error::Error + Send + Sync>),
}

fn storage(e: sqlx::Error) -> FeedError {
    FeedError::Storage(Box::new(e))
}

/// What every handle of one store shares: a count of the changes committed through it (the
/// waiters' wake-up), and retention.
struct Shared {
    commits: tokio::sync::watch::Sender<u64>,
    max_records: AtomicU64,
    max_age_ms: AtomicU64,
}

/// The change feed of one store: a cheap handle (clones share it).
#[derive(Clone)]
pub struct Feed {
    db: SqlitePool,
    shared: Arc<Shared>,
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn record(r: &SqliteRow) -> ChangeRecord {
    let count = |c: &str| u64::try_from(r.get::<i64, _>(c)).unwrap_or(0);
    ChangeRecord {
        seq: count("seq"),
        kind: ChangeKind::parse(r.get("kind")).unwrap_or(ChangeKind::Put),
        replaced: r.get::<Option<bool>, _>("replaced"),
        bucket: r.get("bucket"),
        key: r.get("key"),
        etag: r.get("etag"),
        size: count("size"),
        time_ms: r.get("time_ms"),
        actor: Actor {
            kind: ActorKind::parse(r.get("actor_kind")).unwrap_or(ActorKind::System),
            name: r.get("actor_name"),
            depth: u32::try_from(r.get::<i64, _>("actor_depth")).unwrap_or(u32::MAX),
        },
    }
}

/// The highest sequence number ever given (0 before the first), trimmed records included.
async fn high_water(db: impl SqliteExecutor<'_>) -> sqlx::Result<u64> {
    let r = sqlx::query("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetch_optional(db).await?;
    Ok(r.map_or(0, |r| u64::try_from(r.get::<i64, _>("seq")).unwrap_or(0)))
}

impl Feed {
    /// The feed kept in `db` (its tables created if needed).
    pub(crate) async fn open(db: &SqlitePool) -> sqlx::Result<Feed> {
        for statement in SCHEMA {
            sqlx::query(*statement).execute(db).await?;
        }
        let retention = Retention::default();
        let shared = Shared {
            commits: tokio::sync::watch::Sender::new(0),
            max_records: AtomicU64::new(retention.max_records),
            max_age_ms: AtomicU64::new(u64::try_from(retention.max_age.as_millis()).unwrap_or(u64::MAX)),
        };
        Ok(Feed { db: db.clone(), shared: Arc::new(shared) })
    }

    /// Wakes the waiters once a change is committed (its record with it); every
    /// [`TRIM_EVERY`] changes, trims too (a failure to trim is only logged: the next one
    /// catches up).
    pub(crate) async fn committed(&self) {
        let mut count = 0;
        self.shared.commits.send_modify(|n| {
            *n += 1;
            count = *n;
        });
        if count.is_multiple_of(TRIM_EVERY)
            && let Err(e) = self.trim().await
        {
            tracing::warn!(error = %e, "trimming the change feed; the next trim catches up");
        }
    }

    /// The feed in a SQLite file of its own at `path` (the S3 backend's: the node's own writes),
    /// with synchronous commits, readable by the node's user only.
    #[cfg(feature = "s3")]
    pub(crate) async fn open_file(path: &std::path::Path) -> sqlx::Result<Feed> {
        crate::files::prepare_database(path).map_err(sqlx::Error::Io)?;
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let db = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect_with(opts).await?;
        Feed::open(&db).await
    }

    /// Closes a feed that has a file of its own ([`Feed::open_file`]).
    #[cfg(feature = "s3")]
    pub(crate) async fn close(&self) {
        self.db.close().await;
    }

    /// Appends a record in one statement of its own (a change that happened elsewhere: an S3
    /// service acknowledged it) and wakes the waiters.
    #[cfg(feature = "s3")]
    pub(crate) async fn record(&self, change: &NewChange<'_>) -> sqlx::Result<u64> {
        let r = sqlx::query(
            "INSERT INTO changes (kind, replaced, bucket, key, etag, size, time_ms, actor_kind, actor_name, actor_depth)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(change.kind.as_str())
        .bind(change.replaced)
        .bind(change.bucket)
        .bind(change.key)
        .bind(change.etag)
        .bind(int(change.size))
        .bind(now_ms())
        .bind(change.actor.kind.as_str())
        .bind(&change.actor.name)
        .bind(i64::from(change.actor.depth))
        .fetch_one(&self.db)
        .await?;
        self.committed().await;
        Ok(u64::try_from(r.get::<i64, _>("seq")).unwrap_or(0))
    }

    /// Keeps at most `max_records` records, none older than `max_age`, from now on.
    pub(crate) fn set_retention(&self, retention: Retention) {
        self.shared.max_records.store(retention.max_records, Ordering::Relaxed);
        let age = u64::try_from(retention.max_age.as_millis()).unwrap_or(u64::MAX);
        self.shared.max_age_ms.store(age, Ordering::Relaxed);
    }

    /// What the feed keeps ([`Objects::with_feed_retention`](crate::Objects::with_feed_retention)).
    pub fn retention(&self) -> Retention {
        Retention {
            max_records: self.shared.max_records.load(Ordering::Relaxed),
            max_age: Duration::from_millis(self.shared.max_age_ms.load(Ordering::Relaxed)),
        }
    }

    /// Drops what retention no longer keeps now (every [`TRIM_EVERY`] changes and the store's
    /// garbage collection do it too). One statement deletes below both the count's cut and the
    /// first record young enough, so the records kept stay one unbroken run ending at the
    /// newest. Returns how many records went.
    pub async fn trim(&self) -> Result<u64, FeedError> {
        let r = self.retention();
        let cutoff = now_ms().saturating_sub(i64::try_from(r.max_age.as_millis()).unwrap_or(i64::MAX));
        let done = sqlx::query(
            "DELETE FROM changes WHERE seq < MAX(
                 (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'changes') - ?1 + 1,
                 COALESCE((SELECT seq FROM changes WHERE time_ms > ?2 ORDER BY seq LIMIT 1),
                          (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'changes') + 1))",
        )
        .bind(int(r.max_records))
        .bind(cutoff)
        .execute(&self.db)
        .await
        .map_err(storage)?;
        Ok(done.rows_affected())
    }

    /// Up to `limit` records after `after`, in order; [`FeedError::Behind`] when some records
    /// after `after` are no longer kept.
    pub async fn read(&self, after: u64, limit: u32) -> Result<Vec<ChangeRecord>, FeedError> {
        // One snapshot for the records and the bounds they are checked against.
        let mut tx = self.db.begin().await.map_err(storage)?;
        let rows = sqlx::query(
            "SELECT seq, kind, replaced, bucket, key, etag, size, time_ms, actor_kind, actor_name, actor_depth
             FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(int(after))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        let oldest = self.oldest_on(&mut tx).await.map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        if after.saturating_add(1) < oldest {
            return Err(FeedError::Behind { cursor: after, oldest });
        }
        Ok(rows.iter().map(record).collect())
    }

    /// The number of the oldest record kept (one past the newest when none is).
    pub async fn oldest(&self) -> Result<u64, FeedError> {
        let mut conn = self.db.acquire().await.map_err(storage)?;
        self.oldest_on(&mut conn).await.map_err(storage)
    }

    async fn oldest_on(&self, conn: &mut SqliteConnection) -> sqlx::Result<u64> {
        let min = sqlx::query("SELECT MIN(seq) AS seq FROM changes").fetch_one(&mut *conn).await?;
        match min.get::<Option<i64>, _>("seq") {
            Some(seq) => Ok(u64::try_from(seq).unwrap_or(0)),
            None => Ok(high_water(&mut *conn).await?.saturating_add(1)),
        }
    }

    /// The number of the newest record (trimmed or not; 0 before the first).
    pub async fn last(&self) -> Result<u64, FeedError> {
        high_water(&self.db).await.map_err(storage)
    }

    /// Resolves once a record after `after` is committed (at once if one already is). Made for
    /// an empty [`Feed::read`] of `after`: it subscribes to commits before it looks at the
    /// newest record, so one committed in between is not missed. Only changes made through this
    /// process's handles wake it.
    pub async fn wait(&self, after: u64) -> Result<(), FeedError> {
        let mut commits = self.shared.commits.subscribe();
        loop {
            if self.last().await? > after {
                return Ok(());
            }
            // The sender lives as long as `self`, so this only ends with a commit.
            if commits.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Where the reader `name` left off (0 when it never saved a cursor).
    pub async fn cursor(&self, name: &str) -> Result<u64, FeedError> {
        let r = sqlx::query("SELECT seq FROM feed_cursors WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.db)
            .await
            .map_err(storage)?;
        Ok(r.map_or(0, |r| u64::try_from(r.get::<i64, _>("seq")).unwrap_or(0)))
    }

    /// Saves where the reader `name` is: it has handled every record up to `seq`.
    pub async fn save_cursor(&self, name: &str, seq: u64) -> Result<(), FeedError> {
        sqlx::query(
            "INSERT INTO feed_cursors (name, seq, updated_ms) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
        )
        .bind(name)
        .bind(int(seq))
        .bind(now_ms())
        .execute(&self.db)
        .await
        .map_err(storage)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn memory() -> Feed {
        // One connection: every connection to `:memory:` is a database of its own.
        let db = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
        Feed::open(&db).await.unwrap()
    }

    fn change<'a>(key: &'a str, actor: &'a Actor) -> NewChange<'a> {
        NewChange {
            kind: ChangeKind::Put,
            replaced: Some(false),
            bucket: "media",
            key,
            etag: Some("e"),
            size: 1,
            actor,
        }
    }

    #[tokio::test]
    async fn records_are_trimmed_to_retention_every_so_often() {
        let feed = memory().await;
        feed.set_retention(Retention { max_records: 10, max_age: DEFAULT_MAX_AGE });
        let actor = Actor::trigger("resize-on-upload", 2);
        for i in 0..TRIM_EVERY - 1 {
            feed.record(&change(&i.to_string(), &actor)).await.unwrap();
        }
        assert_eq!(feed.oldest().await.unwrap(), 1, "no trim before the {TRIM_EVERY}th change");
        feed.record(&change("last", &actor)).await.unwrap();
        assert_eq!(feed.oldest().await.unwrap(), TRIM_EVERY - 9);
        let kept = feed.read(TRIM_EVERY - 10, 100).await.unwrap();
        assert_eq!(kept.len(), 10);
        assert_eq!((kept[9].seq, kept[9].key.as_str(), &kept[9].actor), (TRIM_EVERY, "last", &actor));
        assert!(
            matches!(feed.read(0, 1).await, Err(FeedError::Behind { cursor: 0, oldest }) if oldest == TRIM_EVERY - 9)
        );
        assert_eq!(feed.last().await.unwrap(), TRIM_EVERY);
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_newer_record_only() {
        let feed = memory().await;
        let actor = Actor::system();
        let seq = feed.record(&change("a", &actor)).await.unwrap();
        // A record already there answers at once.
        tokio::time::timeout(Duration::from_secs(5), feed.wait(0)).await.unwrap().unwrap();
        let waiter = tokio::spawn({
            let feed = feed.clone();
            async move { feed.wait(seq).await }
        });
        tokio::task::yield_now().await;
        // A wake-up without a newer record (a commit elsewhere in the store) is not enough.
        feed.committed().await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        feed.record(&change("b", &actor)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in [ChangeKind::Put, ChangeKind::Multipart, ChangeKind::Delete] {
            assert_eq!(ChangeKind::parse(k.as_str()), Some(k));
        }
        for k in [ActorKind::Token, ActorKind::AccessKey, ActorKind::Function, ActorKind::Trigger, ActorKind::System] {
            assert_eq!(ActorKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Actor::token("cms", "0a1b2c3d").name, "cms#0a1b2c3d");
        assert_eq!(Actor::default(), Actor::system());
    }
}
