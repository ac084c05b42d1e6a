//! The invocation log in PostgreSQL, shared by every node on the same database. Every
//! operation is one statement; `start` is the same `UPDATE ... RETURNING` as in SQLite, and the
//! lease-checked updates (`finish`, `retry_at`, `bury`) name the lease in their `WHERE`: under
//! concurrent writers PostgreSQL re-checks that condition on the row's latest version before
//! it updates, so an outcome is recorded only for the lease that holds the row then. With the
//! queue on the same pool, the writes that go with a queue operation are one statement with it
//! (data-modifying CTEs, so one round trip and one commit): an acceptance's row and message, a
//! claim and its start, an outcome and its settlement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgPool;

use super::{Backend, Claimed, InvocationRow, NewInvocation, Outcome, Settled, read_row, row_columns};
use crate::queue::QueueError;
use crate::state::{Result, StateError, now_ms};

/// The schema, as a migration step of [`crate::pg`]. Ids sort byte-wise (`COLLATE "C"`), as in
/// SQLite, so dead letters page alike.
pub(crate) const MIGRATION: &str = r#"
    CREATE TABLE invocations (
        id TEXT COLLATE "C" PRIMARY KEY, function TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'dead')),
        attempts BIGINT NOT NULL DEFAULT 0, max_attempts BIGINT NOT NULL,
        meta TEXT NOT NULL, payload BYTEA NOT NULL, callback TEXT,
        result_meta TEXT, result BYTEA, error TEXT,
        created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, next_ms BIGINT NOT NULL,
        claim TEXT, message TEXT);
    CREATE INDEX invocations_unsettled ON invocations (created_ms) WHERE status IN ('queued', 'running');
    CREATE INDEX invocations_finished ON invocations (updated_ms) WHERE status IN ('succeeded', 'dead');
    CREATE INDEX invocations_dead ON invocations (id) WHERE status = 'dead';
"#;

pub(crate) struct PgLog {
    db: PgPool,
    /// Which pool `db` is (see `crate::pg::Postgres`).
    pool: Arc<()>,
    /// This handle's workers' claims, per queue ([`claim_line`]).
    claims: ClaimLines,
}

impl PgLog {
    pub(crate) fn new(db: PgPool, pool: Arc<()>) -> PgLog {
        PgLog { db, pool, claims: ClaimLines::default() }
    }
}

/// The most claims one statement takes.
const CLAIM_BATCH: usize = 32;

/// Claims that may share a statement: one queue, one holder, one lease.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClaimKey {
    queue: String,
    holder: String,
    lease: std::time::Duration,
}

/// Where a claim's answer goes: the message claimed and started, none due, or the error.
type ClaimAnswer = tokio::sync::oneshot::Sender<std::result::Result<Option<Claimed>, String>>;

/// The claims waiting on one [`ClaimKey`], and whether a task is running their statements.
#[derive(Default)]
struct ClaimLine {
    waiting: Vec<ClaimAnswer>,
    running: bool,
}

type ClaimLines = Arc<Mutex<HashMap<ClaimKey, ClaimLine>>>;

fn lock(lines: &ClaimLines) -> std::sync::MutexGuard<'_, HashMap<ClaimKey, ClaimLine>> {
    lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends a line's task: however it ends (a panic included), the line is removed, so its waiting
/// claims are answered (with an error, their senders dropped) and the next claim starts anew.
struct LineDone(ClaimLines, ClaimKey);

impl Drop for LineDone {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

/// Runs the claims of one line: every claim waiting, up to [`CLAIM_BATCH`], in one statement,
/// until none waits. A node's workers that look for work while a claim is in flight share the
/// next statement, its index scan, its round trip and its commit.
async fn claim_line(db: PgPool, lines: ClaimLines, key: ClaimKey) {
    let done = LineDone(lines, key);
    loop {
        let batch: Vec<ClaimAnswer> = {
            let mut lines = lock(&done.0);
            let Some(line) = lines.get_mut(&done.1) else { return };
            // A worker that stopped waiting takes no message.
            line.waiting.retain(|a| !a.is_closed());
            if line.waiting.is_empty() {
                return;
            }
            let n = line.waiting.len().min(CLAIM_BATCH);
            line.waiting.drain(..n).collect()
        };
        match claim_many(&db, &done.1, batch.len()).await {
            Ok(claimed) => {
                let mut claimed = claimed.into_iter();
                for answer in batch {
                    // A worker gone meanwhile leaves its message to the lease's end, as a claim
                    // in flight when a node stops always did.
                    let _ = answer.send(Ok(claimed.next()));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for answer in batch {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Claims up to `n` due messages of the key's queue and starts the invocation each names (the
/// payload is the id; `escape` leaves ASCII as it is, and anything else matches no id, so its
/// start is left to the caller) under its new lease's token, in one statement.
async fn claim_many(db: &PgPool, key: &ClaimKey, n: usize) -> sqlx::Result<Vec<Claimed>> {
    let now = now_ms();
    let rows = sqlx::query(concat!(
        "WITH claimed AS (
             UPDATE queue_messages SET state = 'leased', fence = fence + 1, due_ms = $1, holder = $2
             WHERE seq = ANY(ARRAY(SELECT seq FROM queue_messages
                                   WHERE queue = $3 AND state IN ('ready', 'leased') AND due_ms <= $4
                                   ORDER BY due_ms, seq LIMIT $5 FOR UPDATE SKIP LOCKED))
             RETURNING seq, dedup, payload, fence, enqueued_ms),
         started AS (
             UPDATE invocations SET status = 'running', attempts = attempts + 1,
                 claim = claimed.seq::TEXT || '.' || claimed.fence::TEXT, updated_ms = $4
             FROM claimed WHERE invocations.id = encode(claimed.payload, 'escape')
                 AND invocations.status IN ('queued', 'running')
             RETURNING ",
        row_columns!(),
        ", invocations.payload AS started_payload, claimed.seq AS started_seq)
         SELECT claimed.seq, claimed.dedup, claimed.payload, claimed.fence, claimed.enqueued_ms, started.*
         FROM claimed LEFT JOIN started ON started.started_seq = claimed.seq
         ORDER BY claimed.seq"
    ))
    .bind(now.saturating_add(i64::try_from(key.lease.as_millis()).unwrap_or(i64::MAX)))
    .bind(&key.holder)
    .bind(&key.queue)
    .bind(now)
    .bind(i64::try_from(n).unwrap_or(1))
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let delivery = crate::queue::postgres::delivery(&key.queue, r);
            let started = r
                .get::<Option<String>, _>("id")
                .is_some()
                .then(|| (read_row(r), r.get::<Vec<u8>, _>("started_payload")));
            Claimed { delivery, started }
        })
        .collect())
}

async fn insert_on(conn: &mut sqlx::PgConnection, inv: &NewInvocation) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms, updated_ms,
         next_ms, message)
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $7, $7, $1)",
    )
    .bind(&inv.id)
    .bind(&inv.function)
    .bind(i64::from(inv.max_attempts))
    .bind(&inv.meta)
    .bind(&inv.payload)
    .bind(&inv.callback)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Backend for PgLog {
    async fn insert(&self, inv: &NewInvocation) -> Result<()> {
        let mut conn = self.db.acquire().await?;
        Ok(insert_on(&mut conn, inv).await?)
    }

    async fn insert_queued(
        &self,
        inv: &NewInvocation,
        queue: &dyn crate::queue::Backend,
        name: &str,
    ) -> Option<Result<()>> {
        queue.postgres().filter(|q| q.on(&self.pool))?;
        // One statement, so one round trip and one commit: the message is added only with the
        // row (a taken id fails the whole statement), and its notification goes out at commit.
        let recorded = sqlx::query(
            "WITH inv AS (
                 INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms,
                 updated_ms, next_ms, message)
                 VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $7, $7, $1) RETURNING id),
             added AS (
                 INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
                 SELECT $8, id, 'ready', $9, $7, $7 FROM inv ON CONFLICT (queue, dedup) DO NOTHING RETURNING queue)
             SELECT pg_notify($10, queue)::text FROM added",
        )
        .bind(&inv.id)
        .bind(&inv.function)
        .bind(i64::from(inv.max_attempts))
        .bind(&inv.meta)
        .bind(&inv.payload)
        .bind(&inv.callback)
        .bind(now_ms())
        .bind(name)
        .bind(inv.id.as_bytes())
        .bind(crate::queue::postgres::CHANNEL)
        .fetch_optional(&self.db)
        .await;
        Some(recorded.map(|_| ()).map_err(StateError::from))
    }

    async fn settle(
        &self,
        id: &str,
        lease: &crate::Lease,
        outcome: Outcome<'_>,
        queue: &dyn crate::queue::Backend,
    ) -> Option<Result<Settled>> {
        queue.postgres().filter(|q| q.on(&self.pool))?;
        // The log's update and, only if it recorded the outcome, the message's, in one statement.
        // Both see the same snapshot and each re-checks its own row's condition (lease, fence)
        // on the row's latest version, as alone.
        let now = now_ms();
        let token = lease.token();
        let query = match outcome {
            Outcome::Succeeded { result_meta, result } => sqlx::query(
                "WITH logged AS (
                     UPDATE invocations SET status = 'succeeded', result_meta = $1, result = $2, error = NULL,
                     payload = ''::BYTEA, claim = NULL, updated_ms = $3
                     WHERE id = $4 AND claim = $5 AND status = 'running' RETURNING id),
                 settled AS (
                     UPDATE queue_messages SET state = 'done', payload = ''::BYTEA, settled_ms = $3, holder = NULL
                     WHERE seq = $6 AND fence = $7 AND state = 'leased' AND EXISTS (SELECT 1 FROM logged)
                     RETURNING queue)
                 SELECT (SELECT COUNT(*) FROM logged) AS recorded, (SELECT COUNT(*) FROM settled) AS settled",
            )
            .bind(result_meta)
            .bind(result)
            .bind(now)
            .bind(id)
            .bind(&token)
            .bind(lease.message)
            .bind(lease.fence),
            Outcome::Retry { error, delay } => sqlx::query(
                "WITH logged AS (
                     UPDATE invocations SET status = 'queued', error = $1, next_ms = $2, claim = NULL, updated_ms = $3
                     WHERE id = $4 AND claim = $5 AND status = 'running' RETURNING id),
                 settled AS (
                     UPDATE queue_messages SET state = 'ready', due_ms = $2, holder = NULL
                     WHERE seq = $6 AND fence = $7 AND state = 'leased' AND EXISTS (SELECT 1 FROM logged)
                     RETURNING queue)
                 SELECT (SELECT COUNT(*) FROM logged) AS recorded, (SELECT COUNT(*) FROM settled) AS settled,
                     (SELECT pg_notify($8, queue)::text FROM settled WHERE $2 <= $3) AS notified",
            )
            .bind(error)
            .bind(now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)))
            .bind(now)
            .bind(id)
            .bind(&token)
            .bind(lease.message)
            .bind(lease.fence)
            .bind(crate::queue::postgres::CHANNEL),
            Outcome::Dead { error, reason } => sqlx::query(
                "WITH logged AS (
                     UPDATE invocations SET status = 'dead', error = $1, claim = NULL, updated_ms = $2
                     WHERE id = $3 AND claim = $4 AND status = 'running' RETURNING id),
                 settled AS (
                     UPDATE queue_messages SET state = 'dead', reason = $5, settled_ms = $2, holder = NULL
                     WHERE seq = $6 AND fence = $7 AND state = 'leased' AND EXISTS (SELECT 1 FROM logged)
                     RETURNING queue)
                 SELECT (SELECT COUNT(*) FROM logged) AS recorded, (SELECT COUNT(*) FROM settled) AS settled",
            )
            .bind(error)
            .bind(now)
            .bind(id)
            .bind(&token)
            .bind(reason)
            .bind(lease.message)
            .bind(lease.fence),
        };
        let done = match query.fetch_one(&self.db).await {
            Ok(r) => r,
            Err(e) => return Some(Err(e.into())),
        };
        Some(Ok(Settled { recorded: done.get::<i64, _>("recorded") == 1, settled: done.get::<i64, _>("settled") == 1 }))
    }

    fn claims_on(&self, queue: &dyn crate::queue::Backend) -> bool {
        queue.postgres().is_some_and(|q| q.on(&self.pool))
    }

    async fn claim_started(
        &self,
        queue: &dyn crate::queue::Backend,
        name: &str,
        lease: std::time::Duration,
        holder: &str,
    ) -> crate::queue::Result<Option<Claimed>> {
        if !self.claims_on(queue) {
            return Ok(None);
        }
        let key = ClaimKey { queue: name.to_owned(), holder: holder.to_owned(), lease };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let lead = {
            let mut lines = lock(&self.claims);
            let line = lines.entry(key.clone()).or_default();
            line.waiting.push(answer);
            // The first claim of an idle line starts the task that runs its statements; the
            // others wait for that task's next one.
            !std::mem::replace(&mut line.running, true)
        };
        if lead {
            tokio::spawn(claim_line(self.db.clone(), self.claims.clone(), key));
        }
        match answered.await {
            Ok(claimed) => claimed.map_err(QueueError::Unavailable),
            Err(_) => Err(QueueError::Unavailable("the claims of this queue stopped".into())),
        }
    }

    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        let r = sqlx::query(concat!(
            "UPDATE invocations SET status = 'running', attempts = attempts + 1, claim = $1, updated_ms = $2
             WHERE id = $3 AND status IN ('queued', 'running')
             RETURNING ",
            row_columns!(),
            ", payload"
        ))
        .bind(lease)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&self.db)
        .await?;
        Ok(r.map(|r| (read_row(&r), r.get("payload"))))
    }

    async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'succeeded', result_meta = $1, result = $2, error = NULL,
             payload = ''::BYTEA, claim = NULL, updated_ms = $3 WHERE id = $4 AND claim = $5 AND status = 'running'",
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

    async fn retry_at(&self, id: &str, lease: &str, error: &str, next_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', error = $1, next_ms = $2, claim = NULL, updated_ms = $3
             WHERE id = $4 AND claim = $5 AND status = 'running'",
        )
        .bind(error)
        .bind(next_ms)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'dead', error = $1, claim = NULL, updated_ms = $2
             WHERE id = $3 AND claim = $4 AND status = 'running'",
        )
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .bind(lease)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn redrive(&self, id: &str, message: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE invocations SET status = 'queued', attempts = 0, next_ms = $1, updated_ms = $1, message = $2
             WHERE id = $3 AND status = 'dead'",
        )
        .bind(now_ms())
        .bind(message)
        .bind(id)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM invocations WHERE id = $1").bind(id).execute(&self.db).await?;
        Ok(())
    }

    async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT id, COALESCE(message, id) AS message FROM invocations WHERE status IN ('queued', 'running')
             ORDER BY created_ms, id",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(|r| (r.get("id"), r.get("message"))).collect())
    }

    async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        let r = sqlx::query(concat!("SELECT ", row_columns!(), " FROM invocations WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.as_ref().map(read_row))
    }

    async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT result FROM invocations WHERE id = $1 AND status = 'succeeded'")
            .bind(id)
            .fetch_optional(&self.db)
            .await?;
        Ok(r.map(|r| r.get("result")))
    }

    async fn dead_letters(&self, after: &str, limit: u32) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            row_columns!(),
            " FROM invocations WHERE status = 'dead' AND id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.db)
        .await?;
        Ok(rows.iter().map(read_row).collect())
    }

    async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM invocations WHERE status IN ('succeeded', 'dead') AND updated_ms < $1")
            .bind(before_ms)
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }
}
