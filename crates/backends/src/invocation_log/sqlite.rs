//! The invocation log in the node's SQLite state file (table `invocations`, created and
//! migrated with the rest of the file's schema by [`crate::state`]). Its writes (insert, start,
//! outcomes, re-drive, deletions) go through the file's one writer ([`crate::sqlite_writer`]),
//! each one statement described here as a [`LogWrite`], so they share commits with the queue's
//! writes (a worker's start and claim, its outcome and settlement) rather than meet them at the
//! file's lock; an acceptance's row and its message are one write ([`Backend::insert_queued`]),
//! and so are a claim and its start ([`Backend::claim_started`]) and an outcome and its
//! settlement ([`Backend::settle`]).
//! The writer runs one write at a time, so each lease-checked update sees the row as the last
//! write left it, in a group as alone: an outcome under a lease that no longer holds the row is
//! an answer (`false`), not an error. Reads go straight to the pool.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

use super::{Backend, Claimed, InvocationRow, NewInvocation, Outcome, Settled, read_row, row_columns};
use crate::queue::sqlite::Settlement;
use crate::sqlite_writer::{Write, Writer};
use crate::state::{Result, StateError, now_ms};

/// One write of the log.
enum LogWrite {
    Insert(NewInvocation),
    Start { id: String, lease: String },
    Finish { id: String, lease: String, result_meta: String, result: Vec<u8> },
    RetryAt { id: String, lease: String, error: String, next_ms: i64 },
    Bury { id: String, lease: String, error: String },
    Redrive { id: String, message: String },
    Delete { id: String },
    PurgeFinished { before_ms: i64 },
}

/// What a write did once committed.
enum Done {
    /// Rows changed: an outcome's 1, or 0 when the lease no longer holds the row.
    Rows(u64),
    Started(Option<(InvocationRow, Vec<u8>)>),
}

impl Write for LogWrite {
    type Output = Done;

    fn name(&self) -> &'static str {
        match self {
            LogWrite::Insert(_) => "insert invocation",
            LogWrite::Start { .. } => "start invocation",
            LogWrite::Finish { .. } => "finish invocation",
            LogWrite::RetryAt { .. } => "retry invocation",
            LogWrite::Bury { .. } => "bury invocation",
            LogWrite::Redrive { .. } => "redrive invocation",
            LogWrite::Delete { .. } => "delete invocation",
            LogWrite::PurgeFinished { .. } => "purge invocations",
        }
    }

    async fn run(&self, conn: &mut SqliteConnection) -> sqlx::Result<Done> {
        let rows = |r: sqlx::sqlite::SqliteQueryResult| Done::Rows(r.rows_affected());
        Ok(match self {
            LogWrite::Insert(inv) => rows(
                sqlx::query(
                    "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms,
                     updated_ms, next_ms, message)
                     VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?1)",
                )
                .bind(&inv.id)
                .bind(&inv.function)
                .bind(i64::from(inv.max_attempts))
                .bind(&inv.meta)
                .bind(&inv.payload)
                .bind(&inv.callback)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?,
            ),
            LogWrite::Start { id, lease } => {
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
                .fetch_optional(&mut *conn)
                .await?;
                Done::Started(r.map(|r| (read_row(&r), r.get("payload"))))
            }
            LogWrite::Finish { id, lease, result_meta, result } => rows(
                sqlx::query(
                    "UPDATE invocations SET status = 'succeeded', result_meta = ?, result = ?, error = NULL,
                     payload = x'', claim = NULL, updated_ms = ? WHERE id = ? AND claim = ? AND status = 'running'",
                )
                .bind(result_meta)
                .bind(result)
                .bind(now_ms())
                .bind(id)
                .bind(lease)
                .execute(&mut *conn)
                .await?,
            ),
            LogWrite::RetryAt { id, lease, error, next_ms } => rows(
                sqlx::query(
                    "UPDATE invocations SET status = 'queued', error = ?, next_ms = ?, claim = NULL, updated_ms = ?
                     WHERE id = ? AND claim = ? AND status = 'running'",
                )
                .bind(error)
                .bind(next_ms)
                .bind(now_ms())
                .bind(id)
                .bind(lease)
                .execute(&mut *conn)
                .await?,
            ),
            LogWrite::Bury { id, lease, error } => rows(
                sqlx::query(
                    "UPDATE invocations SET status = 'dead', error = ?, claim = NULL, updated_ms = ?
                     WHERE id = ? AND claim = ? AND status = 'running'",
                )
                .bind(error)
                .bind(now_ms())
                .bind(id)
                .bind(lease)
                .execute(&mut *conn)
                .await?,
            ),
            LogWrite::Redrive { id, message } => rows(
                sqlx::query(
                    "UPDATE invocations SET status = 'queued', attempts = 0, next_ms = ?1, updated_ms = ?1, message = ?2
                     WHERE id = ?3 AND status = 'dead'",
                )
                .bind(now_ms())
                .bind(message)
                .bind(id)
                .execute(&mut *conn)
                .await?,
            ),
            LogWrite::Delete { id } => {
                rows(sqlx::query("DELETE FROM invocations WHERE id = ?").bind(id).execute(&mut *conn).await?)
            }
            LogWrite::PurgeFinished { before_ms } => rows(
                sqlx::query("DELETE FROM invocations WHERE status IN ('succeeded', 'dead') AND updated_ms < ?")
                    .bind(before_ms)
                    .execute(&mut *conn)
                    .await?,
            ),
        })
    }
}

pub(crate) struct SqliteLog {
    db: SqlitePool,
    writer: Writer,
}

impl SqliteLog {
    /// A log handle on `db`, whose writes go through `writer` (the file's one writer).
    pub(crate) fn new(db: SqlitePool, writer: Writer) -> SqliteLog {
        SqliteLog { db, writer }
    }

    async fn rows(&self, write: LogWrite) -> Result<u64> {
        match self.writer.write(write).await? {
            Done::Rows(n) => Ok(n),
            Done::Started(_) => Err(StateError::Failed("the state file's writer answered a start".into())),
        }
    }
}

#[async_trait]
impl Backend for SqliteLog {
    async fn insert(&self, inv: &NewInvocation) -> Result<()> {
        self.rows(LogWrite::Insert(inv.clone())).await?;
        Ok(())
    }

    async fn insert_queued(
        &self,
        inv: &NewInvocation,
        queue: &dyn crate::queue::Backend,
        name: &str,
    ) -> Option<Result<()>> {
        let queue = queue.sqlite()?;
        let done = queue.after(&self.writer, LogWrite::Insert(inv.clone()), name, &inv.id, inv.id.as_bytes()).await?;
        // A fresh invocation's id is in no queue; had it been, the row would have failed first.
        Some(done.map(|_| ()).map_err(StateError::from))
    }

    async fn settle(
        &self,
        id: &str,
        lease: &crate::Lease,
        outcome: Outcome<'_>,
        queue: &dyn crate::queue::Backend,
    ) -> Option<Result<Settled>> {
        let queue = queue.sqlite()?;
        let (id, token) = (id.to_owned(), lease.token());
        let (write, how) = match outcome {
            Outcome::Succeeded { result_meta, result } => (
                LogWrite::Finish { id, lease: token, result_meta: result_meta.to_owned(), result: result.to_vec() },
                Settlement::Finish,
            ),
            Outcome::Retry { error, delay } => {
                let next_ms = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                (LogWrite::RetryAt { id, lease: token, error: error.to_owned(), next_ms }, Settlement::Retry(delay))
            }
            Outcome::Dead { error, reason } => {
                (LogWrite::Bury { id, lease: token, error: error.to_owned() }, Settlement::Bury(reason.to_owned()))
            }
        };
        let recorded = |done: &Done| matches!(done, Done::Rows(1));
        let done = queue.settle_after(&self.writer, write, recorded, lease, how).await?;
        Some(done.map_err(StateError::from).map(|(logged, settled)| Settled { recorded: recorded(&logged), settled }))
    }

    fn shares(&self, queue: &dyn crate::queue::Backend) -> bool {
        queue.sqlite().is_some_and(|q| q.writes_with(&self.writer))
    }

    async fn claim_started(
        &self,
        queue: &dyn crate::queue::Backend,
        name: &str,
        lease: std::time::Duration,
        holder: &str,
    ) -> crate::queue::Result<Option<Claimed>> {
        let Some(queue) = queue.sqlite() else { return Ok(None) };
        // A message that is not an id starts nothing; the caller decides.
        let start = |d: &crate::Delivery| {
            let id = String::from_utf8(d.payload.clone()).ok()?;
            Some(LogWrite::Start { id, lease: d.lease.token() })
        };
        let Some(claimed) = queue.claim_then(&self.writer, name, lease, holder, start).await else {
            return Ok(None);
        };
        Ok(claimed?.map(|(delivery, started)| Claimed {
            delivery,
            started: match started {
                Some(Done::Started(started)) => started,
                _ => None,
            },
        }))
    }

    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        match self.writer.write(LogWrite::Start { id: id.to_owned(), lease: lease.to_owned() }).await? {
            Done::Started(started) => Ok(started),
            Done::Rows(_) => Err(StateError::Failed("the state file's writer answered an update".into())),
        }
    }

    async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool> {
        let write = LogWrite::Finish {
            id: id.to_owned(),
            lease: lease.to_owned(),
            result_meta: result_meta.to_owned(),
            result: result.to_vec(),
        };
        Ok(self.rows(write).await? == 1)
    }

    async fn retry_at(&self, id: &str, lease: &str, error: &str, next_ms: i64) -> Result<bool> {
        let write = LogWrite::RetryAt { id: id.to_owned(), lease: lease.to_owned(), error: error.to_owned(), next_ms };
        Ok(self.rows(write).await? == 1)
    }

    async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool> {
        let write = LogWrite::Bury { id: id.to_owned(), lease: lease.to_owned(), error: error.to_owned() };
        Ok(self.rows(write).await? == 1)
    }

    async fn redrive(&self, id: &str, message: &str) -> Result<bool> {
        Ok(self.rows(LogWrite::Redrive { id: id.to_owned(), message: message.to_owned() }).await? == 1)
    }

    async fn delete(&self, id: &str) -> Result<()> {
        self.rows(LogWrite::Delete { id: id.to_owned() }).await?;
        Ok(())
    }

    async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, COALESCE(message, id) AS message FROM invocations WHERE status IN ('queued', 'running')
             ORDER BY created_ms",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("message"))).collect())
    }

    async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        let r = sqlx::query(concat!("SELECT ", row_columns!(), " FROM invocations WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.as_ref().map(read_row))
    }

    async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT result FROM invocations WHERE id = ? AND status = 'succeeded'")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| r.get("result")))
    }

    async fn dead_letters(&self, after: &str, limit: u32) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            row_columns!(),
            " FROM invocations WHERE status = 'dead' AND id > ? ORDER BY id LIMIT ?"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(read_row).collect())
    }

    async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        self.rows(LogWrite::PurgeFinished { before_ms }).await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }
}
