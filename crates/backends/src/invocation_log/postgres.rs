//! The invocation log in PostgreSQL, shared by every node on the same database. Every
//! operation is one statement; `start` is the same `UPDATE ... RETURNING` as in SQLite, and the
//! lease-checked updates (`finish`, `retry_at`, `bury`) name the lease in their `WHERE`: under
//! concurrent writers PostgreSQL re-checks that condition on the row's latest version before
//! it updates, so an outcome is recorded only for the lease that holds the row then. With the
//! queue on the same pool, the writes that go with a queue operation are one statement with it
//! (data-modifying CTEs, so one round trip and one commit): an acceptance's row and message, a
//! claim and its start, an outcome and its settlement.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgPool;

use super::{Backend, Claimed, InvocationRow, NewInvocation, Outcome, Settled, read_row, row_columns};
use crate::queue::QueueError;
use crate::state::{Result, StateError, now_ms};

/// The schema, as a migration step of [`crate::pg`]. Ids sort byte-wise (`COLLATE "C"`), as in
/// SQLite, so dead letters page alike. A statement that looks an invocation up by its id names
/// the statuses it excludes (`status NOT IN ('succeeded', 'dead')`), never a status a partial
/// index covers, as the queue's statements do (see `crate::queue::postgres::MIGRATION`); a
/// status added to the `CHECK` below must be added to those lists.
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
    /// This handle's workers' claims waiting to share a statement, per queue.
    claims: crate::batch::Lines<ClaimKey, (), Option<Claimed>>,
    /// Successes waiting to be recorded and settled together, per queue.
    successes: crate::batch::Lines<String, Success, Settled>,
}

impl PgLog {
    pub(crate) fn new(db: PgPool, pool: Arc<()>) -> PgLog {
        PgLog { db, pool, claims: Default::default(), successes: Default::default() }
    }
}

/// The most claims, or settlements, one statement takes.
const BATCH: usize = 32;

/// Claims that may share a statement: one queue, one holder, one lease.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClaimKey {
    queue: String,
    holder: String,
    lease: std::time::Duration,
}

/// A success to record and settle: the invocation, its lease, and its result.
struct Success {
    id: String,
    token: String,
    message: i64,
    fence: i64,
    result_meta: String,
    result: Vec<u8>,
}

/// Records the successes of one queue's messages and settles each message whose success was
/// recorded, in one statement: what [`PgLog::settle`] does for one, for many (each row checks
/// its own lease and fence, as alone; the messages' rows locked first, in order).
async fn settle_successes(db: PgPool, all: Vec<Success>) -> crate::batch::Answer<Vec<Settled>> {
    // The same lease settled twice at once: the first counts, and the others are answered as a
    // second settlement alone would be (the first recorded it already).
    let mut seen = std::collections::HashSet::new();
    let first: Vec<bool> = all.iter().map(|s| seen.insert((s.message, s.fence))).collect();
    let successes: Vec<&Success> = all.iter().zip(&first).filter(|(_, f)| **f).map(|(s, _)| s).collect();
    let column = |f: fn(&Success) -> String| successes.iter().map(|s| f(s)).collect::<Vec<String>>();
    let rows = sqlx::query(
        "WITH v AS (
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[], $6::BYTEA[])
                 AS v(id, token, seq, fence, result_meta, result)),
         held AS (
             SELECT queue_messages.seq, queue_messages.fence FROM queue_messages
             JOIN v ON queue_messages.seq = v.seq AND queue_messages.fence = v.fence
             WHERE queue_messages.state NOT IN ('ready', 'done', 'dead') ORDER BY queue_messages.seq FOR UPDATE OF queue_messages),
         logged AS (
             UPDATE invocations SET status = 'succeeded', result_meta = v.result_meta, result = v.result,
                 error = NULL, payload = ''::BYTEA, claim = NULL, updated_ms = $7
             FROM v WHERE invocations.id = v.id AND invocations.claim = v.token AND invocations.status NOT IN ('queued', 'succeeded', 'dead')
                 AND (v.seq, v.fence) IN (SELECT seq, fence FROM held)
             RETURNING v.seq, v.fence),
         settled AS (
             UPDATE queue_messages SET state = 'done', payload = ''::BYTEA, settled_ms = $7, holder = NULL
             FROM v WHERE queue_messages.seq = v.seq AND queue_messages.fence = v.fence
                 AND queue_messages.state NOT IN ('ready', 'done', 'dead') AND (v.seq, v.fence) IN (SELECT seq, fence FROM logged)
             RETURNING queue_messages.seq, queue_messages.fence)
         SELECT v.seq, v.fence,
             (v.seq, v.fence) IN (SELECT seq, fence FROM logged) AS recorded,
             (v.seq, v.fence) IN (SELECT seq, fence FROM settled) AS settled
         FROM v",
    )
    .bind(column(|s| s.id.clone()))
    .bind(column(|s| s.token.clone()))
    .bind(successes.iter().map(|s| s.message).collect::<Vec<i64>>())
    .bind(successes.iter().map(|s| s.fence).collect::<Vec<i64>>())
    .bind(column(|s| s.result_meta.clone()))
    .bind(successes.iter().map(|s| s.result.clone()).collect::<Vec<Vec<u8>>>())
    .bind(now_ms())
    .fetch_all(&db)
    .await
    .map_err(|e| e.to_string())?;
    let done: std::collections::HashMap<(i64, i64), Settled> = rows
        .iter()
        .map(|r| {
            let settled = Settled { recorded: r.get("recorded"), settled: r.get("settled") };
            ((r.get("seq"), r.get("fence")), settled)
        })
        .collect();
    let not = Settled { recorded: false, settled: false };
    Ok(all
        .iter()
        .zip(first)
        .map(|(s, first)| if first { done.get(&(s.message, s.fence)).copied().unwrap_or(not) } else { not })
        .collect())
}

/// Where a claim's batch runs ([`claim_many`]).
async fn claim_batch(db: PgPool, key: ClaimKey, n: usize) -> crate::batch::Answer<Vec<Option<Claimed>>> {
    let claimed = claim_many(&db, &key, n).await.map_err(|e| e.to_string())?;
    let mut answers: Vec<Option<Claimed>> = claimed.into_iter().map(Some).collect();
    // Fewer due than asked: the rest found none.
    answers.resize_with(n, || None);
    Ok(answers)
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
                 AND invocations.status NOT IN ('succeeded', 'dead')
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

/// Binds a new invocation as `$1` to `$7` of an insert: id, function, attempts, meta, payload,
/// callback, and now.
fn bind_new<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    inv: &'q NewInvocation,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(&inv.id)
        .bind(&inv.function)
        .bind(i64::from(inv.max_attempts))
        .bind(&inv.meta)
        .bind(&inv.payload)
        .bind(&inv.callback)
        .bind(now_ms())
}

async fn insert_on(conn: &mut sqlx::PgConnection, inv: &NewInvocation) -> sqlx::Result<()> {
    let insert = sqlx::query(
        "INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms, updated_ms,
         next_ms, message)
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $7, $7, $1)",
    );
    bind_new(insert, inv).execute(&mut *conn).await?;
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
        if !self.shares(queue) {
            return None;
        }
        // One statement, so one round trip and one commit: the message is added only with the
        // row (a taken id fails the whole statement). It is announced once committed.
        let recorded = bind_new(
            sqlx::query(
                "WITH inv AS (
                 INSERT INTO invocations (id, function, status, max_attempts, meta, payload, callback, created_ms,
                 updated_ms, next_ms, message)
                 VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $7, $7, $1) RETURNING id)
             INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
             SELECT $8, id, 'ready', $9, $7, $7 FROM inv ON CONFLICT (queue, dedup) DO NOTHING RETURNING seq",
            ),
            inv,
        )
        .bind(name)
        .bind(inv.id.as_bytes())
        .fetch_optional(&self.db)
        .await;
        Some(match recorded {
            Ok(added) => {
                if added.is_some()
                    && let Some(q) = queue.postgres()
                {
                    q.announce(name);
                }
                Ok(())
            }
            Err(e) => Err(StateError::from(e)),
        })
    }

    async fn settle(
        &self,
        id: &str,
        lease: &crate::Lease,
        outcome: Outcome<'_>,
        queue: &dyn crate::queue::Backend,
    ) -> Option<Result<Settled>> {
        if !self.shares(queue) {
            return None;
        }
        // The log's update and, only if it recorded the outcome, the message's, in one statement.
        // Both see the same snapshot and each re-checks its own row's condition (lease, fence)
        // on the row's latest version, as alone. The message's row is locked first (`held`), as a
        // claim locks it before the invocation it starts: two statements never wait for each
        // other's rows. An outcome is recorded only while the lease still holds the message.
        let now = now_ms();
        let token = lease.token();
        let query = match outcome {
            Outcome::Succeeded { result_meta, result } => {
                // Successes recorded while one is in flight share the next statement and commit.
                let success = Success {
                    id: id.to_owned(),
                    token,
                    message: lease.message,
                    fence: lease.fence,
                    result_meta: result_meta.to_owned(),
                    result: result.to_vec(),
                };
                let db = self.db.clone();
                let settled = self
                    .successes
                    .run(lease.queue.clone(), success, BATCH, move |_, all| settle_successes(db.clone(), all))
                    .await;
                return Some(settled.map_err(StateError::Unavailable));
            }
            Outcome::Retry { error, delay } => sqlx::query(
                "WITH held AS (
                     SELECT seq FROM queue_messages WHERE seq = $6 AND fence = $7 AND state NOT IN ('ready', 'done', 'dead') FOR UPDATE),
                 logged AS (
                     UPDATE invocations SET status = 'queued', error = $1, next_ms = $2, claim = NULL, updated_ms = $3
                     WHERE id = $4 AND claim = $5 AND status NOT IN ('queued', 'succeeded', 'dead') AND EXISTS (SELECT 1 FROM held)
                     RETURNING id),
                 settled AS (
                     UPDATE queue_messages SET state = 'ready', due_ms = $2, holder = NULL
                     WHERE seq = $6 AND fence = $7 AND state NOT IN ('ready', 'done', 'dead') AND EXISTS (SELECT 1 FROM logged)
                     RETURNING queue)
                 SELECT (SELECT COUNT(*) FROM logged) AS recorded, (SELECT COUNT(*) FROM settled) AS settled",
            )
            .bind(error)
            .bind(now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)))
            .bind(now)
            .bind(id)
            .bind(&token)
            .bind(lease.message)
            .bind(lease.fence),
            Outcome::Dead { error, reason } => sqlx::query(
                "WITH held AS (
                     SELECT seq FROM queue_messages WHERE seq = $6 AND fence = $7 AND state NOT IN ('ready', 'done', 'dead') FOR UPDATE),
                 logged AS (
                     UPDATE invocations SET status = 'dead', error = $1, claim = NULL, updated_ms = $2
                     WHERE id = $3 AND claim = $4 AND status NOT IN ('queued', 'succeeded', 'dead') AND EXISTS (SELECT 1 FROM held)
                     RETURNING id),
                 settled AS (
                     UPDATE queue_messages SET state = 'dead', reason = $5, settled_ms = $2, holder = NULL
                     WHERE seq = $6 AND fence = $7 AND state NOT IN ('ready', 'done', 'dead') AND EXISTS (SELECT 1 FROM logged)
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
        let settled =
            Settled { recorded: done.get::<i64, _>("recorded") == 1, settled: done.get::<i64, _>("settled") == 1 };
        if settled.settled
            && matches!(outcome, Outcome::Retry { .. })
            && let Some(q) = queue.postgres()
        {
            // `InvocationLog::settle` wakes this node's consumers; other nodes' may be waiting.
            q.tell_others(&lease.queue);
        }
        Some(Ok(settled))
    }

    fn shares(&self, queue: &dyn crate::queue::Backend) -> bool {
        queue.postgres().is_some_and(|q| q.on(&self.pool))
    }

    async fn claim_started(
        &self,
        queue: &dyn crate::queue::Backend,
        name: &str,
        lease: std::time::Duration,
        holder: &str,
    ) -> crate::queue::Result<Option<Claimed>> {
        if !self.shares(queue) {
            return Ok(None);
        }
        // A node's workers that look for work while a claim is in flight share the next claim
        // statement, its index scan, its round trip and its commit; a claim answered with no
        // message found none due.
        let key = ClaimKey { queue: name.to_owned(), holder: holder.to_owned(), lease };
        let db = self.db.clone();
        let claimed = self
            .claims
            .run(key, (), BATCH, move |key, waiting: Vec<()>| claim_batch(db.clone(), key, waiting.len()))
            .await;
        claimed.map_err(QueueError::Unavailable)
    }

    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        let r = sqlx::query(concat!(
            "UPDATE invocations SET status = 'running', attempts = attempts + 1, claim = $1, updated_ms = $2
             WHERE id = $3 AND status NOT IN ('succeeded', 'dead')
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
             payload = ''::BYTEA, claim = NULL, updated_ms = $3 WHERE id = $4 AND claim = $5 AND status NOT IN ('queued', 'succeeded', 'dead')",
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
             WHERE id = $4 AND claim = $5 AND status NOT IN ('queued', 'succeeded', 'dead')",
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
             WHERE id = $3 AND claim = $4 AND status NOT IN ('queued', 'succeeded', 'dead')",
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
        let r =
            sqlx::query("SELECT result FROM invocations WHERE id = $1 AND status NOT IN ('queued', 'running', 'dead')")
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
