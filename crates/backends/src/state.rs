//! The node's state, opened as one backend and handed out as one handle per concern:
//! [`Catalogue`] (functions deployed through the API, token hashes, bucket settings of an S3
//! service), [`InvocationLog`] (asynchronous invocations) and [`Queue`] (their messages). Each
//! handle is a public type over a crate-private backend trait with a backend-neutral error
//! ([`StateError`]; the queue's is [`crate::QueueError`]), so callers never name SQLite or
//! PostgreSQL: they pick one by configuration through [`State`].
//!
//! - SQLite (the embedded default, one node): one file in the data folder holds every table.
//!   Commits are synchronous (`synchronous=FULL` with the WAL), the file is the node's user's
//!   only, and files written by earlier versions are migrated when opened (see [`SCHEMA`]).
//! - PostgreSQL (cargo feature `postgres`, many nodes): one database shared by every node,
//!   its schema brought up to date by versioned migrations at open ([`crate::pg`]).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::catalogue::Catalogue;
use crate::invocation_log::InvocationLog;
use crate::queue::{Queue, QueueError};

/// What can go wrong with the state, whatever its backend.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store is out of reach for now: a connection lost or refused, no free connection in
    /// time, the server shutting down or too busy. The operation may be retried once it is back.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store answered, with an error that retrying the same operation will not mend (a
    /// constraint, a value it cannot read).
    #[error("state store: {0}")]
    Failed(String),
    /// Opening: the store's address is not one it can use. The message never holds a password.
    #[error("{0}")]
    InvalidUrl(String),
    /// Opening: the store did not answer, or refused the connection or the login. The message
    /// never holds a password.
    #[error("cannot connect to {backend} at {at}: {reason}")]
    Connect { backend: &'static str, at: String, reason: String },
    /// This build lacks the backend (a cargo feature).
    #[error("{0}")]
    Unsupported(&'static str),
}

impl StateError {
    /// A stable name of the error, the one API answers carry.
    pub fn code(&self) -> &'static str {
        match self {
            StateError::Unavailable(_) | StateError::Connect { .. } => "state_unavailable",
            StateError::Failed(_) | StateError::InvalidUrl(_) | StateError::Unsupported(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for StateError {
    fn from(e: sqlx::Error) -> StateError {
        StateError::from(&e)
    }
}

impl From<&sqlx::Error> for StateError {
    fn from(e: &sqlx::Error) -> StateError {
        if out_of_reach(e) { StateError::Unavailable(e.to_string()) } else { StateError::Failed(e.to_string()) }
    }
}

/// A write through a SQLite file's writer ([`crate::sqlite_writer`]): its statement's error, or
/// its group's, as if it had run alone.
impl From<crate::sqlite_writer::WriteError> for StateError {
    fn from(e: crate::sqlite_writer::WriteError) -> StateError {
        match e {
            crate::sqlite_writer::WriteError::Sql(e) => StateError::from(&*e),
            crate::sqlite_writer::WriteError::Stopped => StateError::Unavailable(e.to_string()),
        }
    }
}

/// Whether `e` says the database is out of reach (or too busy) for now, rather than that it
/// refused what was asked: the difference between "retry later" and "this will not work".
pub(crate) fn out_of_reach(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_code(&code)),
        _ => false,
    }
}

/// A database error code that means "not now" rather than "not this". PostgreSQL's SQLSTATEs
/// have five characters: connection exceptions (class 08), insufficient resources (class 53:
/// too many connections, out of memory or disk) and the server shutting down or starting
/// (57P01-57P03). SQLite's codes are numbers: busy (5) and locked (6), with their extended codes.
fn transient_code(code: &str) -> bool {
    if code.len() == 5 {
        return code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

pub type Result<T> = std::result::Result<T, StateError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The tables of a SQLite state file, every statement safe to run on a file that has them.
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

/// The node's state store, open; hands out the handles. Cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Sqlite {
        db: SqlitePool,
        /// Shared by every [`Queue`] handle on this file, so an enqueue wakes any of their
        /// consumers and each queue's depth is kept once.
        queues: Arc<crate::queue::sqlite::FileQueues>,
        /// The file's one writer, shared by every [`Queue`] and [`InvocationLog`] handle on it:
        /// their writes are committed in groups (see `sqlite_writer.rs`).
        writer: crate::sqlite_writer::Writer,
    },
    #[cfg(feature = "postgres")]
    Postgres(crate::pg::Postgres),
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("backend", &self.backend()).finish_non_exhaustive()
    }
}

impl State {
    /// Opens (creating if needed) a SQLite state file. Commits are synchronous
    /// (`synchronous=FULL` with the WAL), so an accepted invocation survives a crash of the
    /// process or the machine. The file (and so its WAL) is readable by the node's user only.
    /// Starts the file's writer, a task of the current tokio runtime.
    pub async fn sqlite(path: &Path) -> Result<State> {
        crate::files::prepare_database(path)
            .map_err(|e| StateError::Unavailable(format!("{}: {e}", path.display())))?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        Self::connect_sqlite(opts, 4).await
    }

    /// A SQLite state that lives in memory (tests, throw-away nodes).
    pub async fn memory() -> Result<State> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: every connection to `:memory:` is a separate database.
        Self::connect_sqlite(opts, 1).await
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host:5432/db`)
    /// and brings its schema up to date. A URL that does not parse is [`StateError::InvalidUrl`]
    /// and a server that refuses or does not answer within seconds is [`StateError::Connect`],
    /// neither quoting the password.
    pub async fn postgres(url: &str) -> Result<State> {
        #[cfg(feature = "postgres")]
        return Ok(State { inner: Inner::Postgres(crate::pg::Postgres::open(url).await?) });
        #[cfg(not(feature = "postgres"))]
        {
            let _ = url;
            Err(StateError::Unsupported(
                "this pixflow was built without the `postgres` feature: only the SQLite state is available",
            ))
        }
    }

    async fn connect_sqlite(opts: SqliteConnectOptions, connections: u32) -> Result<State> {
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
        let queues = Arc::new(crate::queue::sqlite::FileQueues::default());
        let writer = crate::sqlite_writer::Writer::start(db.clone());
        Ok(State { inner: Inner::Sqlite { db, queues, writer } })
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match &self.inner {
            Inner::Sqlite { .. } => "sqlite",
            #[cfg(feature = "postgres")]
            Inner::Postgres(_) => "postgres",
        }
    }

    /// The catalogue: functions, tokens, bucket settings.
    pub fn catalogue(&self) -> Catalogue {
        match &self.inner {
            Inner::Sqlite { db, .. } => {
                Catalogue::new(Arc::new(crate::catalogue::sqlite::SqliteCatalogue::new(db.clone())))
            }
            #[cfg(feature = "postgres")]
            Inner::Postgres(pg) => pg.catalogue(),
        }
    }

    /// The invocation log.
    pub fn invocations(&self) -> InvocationLog {
        match &self.inner {
            Inner::Sqlite { db, writer, .. } => {
                InvocationLog::new(Arc::new(crate::invocation_log::sqlite::SqliteLog::new(db.clone(), writer.clone())))
            }
            #[cfg(feature = "postgres")]
            Inner::Postgres(pg) => pg.invocations(),
        }
    }

    /// The queues. `holder` names this node's leases (see [`Queue::release_held`]) and should
    /// stay the same across the node's restarts. A SQLite file has one node, its owner: every
    /// lease in it is this node's whatever `holder` says (they are recorded as `local`).
    pub async fn queue(&self, holder: &str) -> std::result::Result<Queue, QueueError> {
        match &self.inner {
            Inner::Sqlite { db, queues, writer } => {
                let _ = holder;
                let backend = crate::queue::sqlite::SqliteQueue::new(db.clone(), writer.clone(), queues.clone());
                Ok(Queue::new(Arc::new(backend), queues.wakers.clone(), "local"))
            }
            #[cfg(feature = "postgres")]
            Inner::Postgres(pg) => pg.queue(holder).await,
        }
    }

    /// A SQLite state's pool and writer (the writer's users' own tests look underneath).
    #[cfg(test)]
    pub(crate) fn sqlite_parts(&self) -> Option<(SqlitePool, crate::sqlite_writer::Writer)> {
        match &self.inner {
            Inner::Sqlite { db, writer, .. } => Some((db.clone(), writer.clone())),
            #[cfg(feature = "postgres")]
            Inner::Postgres(_) => None,
        }
    }

    /// What a SQLite state's queue handles share (the queue's own tests look underneath).
    #[cfg(test)]
    pub(crate) fn sqlite_queues(&self) -> Option<Arc<crate::queue::sqlite::FileQueues>> {
        match &self.inner {
            Inner::Sqlite { queues, .. } => Some(queues.clone()),
            #[cfg(feature = "postgres")]
            Inner::Postgres(_) => None,
        }
    }

    /// Closes the connections (for SQLite, flushing the WAL). Handles stop working.
    pub async fn close(&self) {
        match &self.inner {
            Inner::Sqlite { db, .. } => db.close().await,
            #[cfg(feature = "postgres")]
            Inner::Postgres(pg) => pg.close().await,
        }
    }
}

/// The SQLite file itself: reopening, permissions, and files of earlier versions. The behaviour
/// of the handles, on every backend, is in `tests/catalogue.rs`, `tests/invocation_log.rs` and
/// `tests/queue.rs`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::invocation_log::{NewInvocation, Status};

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

    #[test]
    fn lost_connections_are_unavailable_and_refusals_are_failures() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(StateError::from(refused), StateError::Unavailable(_)));
        assert!(matches!(StateError::from(sqlx::Error::PoolTimedOut), StateError::Unavailable(_)));
        assert!(matches!(StateError::from(sqlx::Error::PoolClosed), StateError::Unavailable(_)));
        assert!(matches!(StateError::from(sqlx::Error::RowNotFound), StateError::Failed(_)));
        // PostgreSQL: the connection broke, too many clients, the server shutting down.
        for code in ["08006", "08001", "53300", "57P01", "57P03"] {
            assert!(transient_code(code), "{code}");
        }
        // A unique violation, a syntax error, a serialization failure (the caller's to retry).
        for code in ["23505", "42601", "40001"] {
            assert!(!transient_code(code), "{code}");
        }
        // SQLite: busy, busy (snapshot), locked; not a constraint (19) or a full disk's I/O error (10).
        for (code, transient) in
            [("5", true), ("517", true), ("6", true), ("19", false), ("2067", false), ("10", false)]
        {
            assert_eq!(transient_code(code), transient, "{code}");
        }
    }

    #[tokio::test]
    async fn survives_reopening_the_file() {
        let dir = std::env::temp_dir().join(format!("pixflow-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let s = State::sqlite(&path).await.unwrap();
            s.invocations().insert_invocation(&inv("kept")).await.unwrap();
            s.catalogue().save_function("thumb", "1", "name: thumb").await.unwrap();
            s.catalogue().add_token(&[7; 32], "admin", "first").await.unwrap();
            s.close().await;
        }
        let s = State::sqlite(&path).await.unwrap();
        let (log, catalogue) = (s.invocations(), s.catalogue());
        assert_eq!(log.unsettled().await.unwrap(), vec![("kept".to_owned(), "kept".to_owned())]);
        assert_eq!(catalogue.functions().await.unwrap(), vec![("thumb".into(), "name: thumb".into())]);
        assert_eq!(catalogue.token_role(&[7; 32]).await.unwrap().as_deref(), Some("admin"));
        assert_eq!(catalogue.token_role(&[8; 32]).await.unwrap(), None);
        assert!(catalogue.has_role("admin").await.unwrap() && !catalogue.has_role("invoke").await.unwrap());
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
        let s = State::sqlite(&path).await.unwrap();
        s.invocations().insert_invocation(&inv("secret")).await.unwrap();
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
        let s = State::sqlite(&path).await.unwrap();
        let log = s.invocations();
        // Its message is enqueued again at start, named by its id.
        assert_eq!(log.unsettled().await.unwrap(), vec![("old".to_owned(), "old".to_owned())]);
        let (row, _) = log.start("old", "1.1").await.unwrap().unwrap();
        assert_eq!((row.id.as_str(), row.attempts), ("old", 2));
        assert!(log.finish("old", "1.1", "[]", b"").await.unwrap());
        s.close().await;
        // Opening a migrated file again changes nothing.
        let s = State::sqlite(&path).await.unwrap();
        assert_eq!(s.invocations().get("old").await.unwrap().unwrap().status, Status::Succeeded);
        s.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
