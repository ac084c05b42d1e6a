//! The queue in PostgreSQL, shared by every node on the same database. A claim takes the
//! oldest due row with `FOR UPDATE SKIP LOCKED` (concurrent claims pass over each other's rows
//! instead of waiting); settlements update only the row whose fence they carry. An enqueue
//! sends `NOTIFY pixflow_queue` with the queue's name, delivered at commit to every node's
//! listener, which wakes one of its waiting consumers; a listener that lost its connection
//! wakes them all once it listens again, so nothing enqueued meanwhile waits for the timer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};

use super::{Backend, Delivery, Lease, QueueError, QueueStats, Result, Wakers, millis, span_ms};
use crate::state::now_ms;

/// The channel enqueues notify; the payload is the queue's name.
pub(crate) const CHANNEL: &str = "pixflow_queue";

/// The schema, as migration steps of [`crate::pg`].
pub(crate) const MIGRATION: &str = "
    CREATE TABLE queue_messages (
        seq BIGSERIAL PRIMARY KEY,
        queue TEXT NOT NULL, dedup TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
        payload BYTEA NOT NULL,
        due_ms BIGINT NOT NULL, fence BIGINT NOT NULL DEFAULT 0, holder TEXT,
        enqueued_ms BIGINT NOT NULL, settled_ms BIGINT, reason TEXT,
        UNIQUE (queue, dedup));
    CREATE INDEX queue_messages_due ON queue_messages (queue, due_ms, seq) WHERE state IN ('ready', 'leased');
    CREATE INDEX queue_messages_settled ON queue_messages (state, settled_ms) WHERE state IN ('done', 'dead');
";

pub(crate) struct PgQueue {
    db: PgPool,
    /// Which pool `db` is (see `crate::pg::Postgres`).
    pool: Arc<()>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgQueue {
    /// Starts listening before returning, so no enqueue after this is missed.
    pub(crate) async fn new(db: PgPool, wakers: Arc<Wakers>, pool: Arc<()>) -> Result<PgQueue> {
        let mut listener = PgListener::connect_with(&db).await?;
        listener.listen(CHANNEL).await?;
        let listener = tokio::spawn(listen(db.clone(), listener, wakers));
        Ok(PgQueue { db, pool, listener })
    }

    /// Whether this queue lives on the pool `pool` names.
    pub(crate) fn on(&self, pool: &Arc<()>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }
}

/// Adds a message on `conn` (alone, or in its caller's transaction); `false`: its deduplication
/// id is in the queue already. The notify rides in the same statement, so it goes out with the
/// commit, and only when a row was added that is due now.
pub(crate) async fn enqueue_on(
    conn: &mut sqlx::PgConnection,
    queue: &str,
    id: &str,
    payload: &[u8],
    delay: Duration,
) -> sqlx::Result<bool> {
    let now = now_ms();
    let due = now.saturating_add(millis(delay));
    let r = sqlx::query(
        "WITH added AS (
             INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
             VALUES ($1, $2, 'ready', $3, $4, $5) ON CONFLICT (queue, dedup) DO NOTHING RETURNING seq)
         SELECT seq, CASE WHEN $4 <= $5 THEN pg_notify($6, $1)::text END AS notified FROM added",
    )
    .bind(queue)
    .bind(id)
    .bind(payload)
    .bind(due)
    .bind(now)
    .bind(CHANNEL)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(r.is_some())
}

async fn listen(db: PgPool, mut listener: PgListener, wakers: Arc<Wakers>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => wakers.wake(n.payload()),
            // The connection dropped and the listener made a new one, listening again: what was
            // notified in between is lost, so every consumer looks again.
            Ok(None) => wakers.wake_all(),
            // The state is closing: give the connection back, or the close waits for it forever.
            Err(sqlx::Error::PoolClosed) => return,
            // The connection could not be made again (the server is out of reach), or failed in
            // a way the listener does not take for a lost one: a new listener, once the server
            // answers, and only then every consumer looks again (a look before that could miss
            // an enqueue notified to nobody).
            Err(e) => {
                tracing::warn!(error = %e, "queue notifications from PostgreSQL lost; listening again when it answers");
                drop(listener);
                let Some(again) = crate::pg::relisten(&db, CHANNEL).await else { return };
                listener = again;
                tracing::info!("queue notifications from PostgreSQL resumed");
                wakers.wake_all();
            }
        }
    }
}

pub(crate) fn delivery(queue: &str, r: &PgRow) -> Delivery {
    let fence: i64 = r.get("fence");
    Delivery {
        id: r.get("dedup"),
        payload: r.get("payload"),
        attempt: u32::try_from(fence).unwrap_or(u32::MAX),
        enqueued_ms: r.get("enqueued_ms"),
        lease: Lease { queue: queue.to_owned(), message: r.get("seq"), fence, reply: None },
    }
}

fn settled(done: sqlx::postgres::PgQueryResult) -> Result<()> {
    if done.rows_affected() == 1 { Ok(()) } else { Err(QueueError::Stale) }
}

#[async_trait]
impl Backend for PgQueue {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }

    async fn remove(&self, queue: &str) -> Result<()> {
        sqlx::query("DELETE FROM queue_messages WHERE queue = $1").bind(queue).execute(&self.db).await?;
        Ok(())
    }

    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        let mut conn = self.db.acquire().await?;
        Ok(enqueue_on(&mut conn, queue, id, payload, delay).await?)
    }

    fn postgres(&self) -> Option<&PgQueue> {
        Some(self)
    }

    async fn claim(&self, queue: &str, lease: Duration, holder: &str) -> Result<Option<Delivery>> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE queue_messages SET state = 'leased', fence = fence + 1, due_ms = $1, holder = $2
             WHERE seq = (SELECT seq FROM queue_messages
                          WHERE queue = $3 AND state IN ('ready', 'leased') AND due_ms <= $4
                          ORDER BY due_ms, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING seq, dedup, payload, fence, enqueued_ms",
        )
        .bind(now.saturating_add(millis(lease)))
        .bind(holder)
        .bind(queue)
        .bind(now)
        .fetch_optional(&self.db)
        .await?;
        Ok(r.map(|r| delivery(queue, &r)))
    }

    async fn next_due_ms(&self, queue: &str) -> Result<Option<i64>> {
        let r = sqlx::query(
            "SELECT MIN(due_ms) AS due FROM queue_messages WHERE queue = $1 AND state IN ('ready', 'leased')",
        )
        .bind(queue)
        .fetch_one(&self.db)
        .await?;
        Ok(r.get("due"))
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        settled(
            sqlx::query("UPDATE queue_messages SET due_ms = $1 WHERE seq = $2 AND fence = $3 AND state = 'leased'")
                .bind(now_ms().saturating_add(millis(by)))
                .bind(lease.message)
                .bind(lease.fence)
                .execute(&self.db)
                .await?,
        )
    }

    async fn finish(&self, lease: &Lease) -> Result<()> {
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'done', payload = '', settled_ms = $1, holder = NULL
                 WHERE seq = $2 AND fence = $3 AND state = 'leased'",
            )
            .bind(now_ms())
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )
    }

    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        let now = now_ms();
        let due = now.saturating_add(millis(delay));
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'ready', due_ms = $1, holder = NULL
                 WHERE seq = $2 AND fence = $3 AND state = 'leased'",
            )
            .bind(due)
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )?;
        if due <= now {
            // Other nodes' consumers may be the ones waiting.
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(&lease.queue).execute(&self.db).await?;
        }
        Ok(())
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'dead', reason = $1, settled_ms = $2, holder = NULL
                 WHERE seq = $3 AND fence = $4 AND state = 'leased'",
            )
            .bind(reason)
            .bind(now_ms())
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS depth, COUNT(*) FILTER (WHERE state = 'leased') AS leased, MIN(enqueued_ms) AS oldest
             FROM queue_messages WHERE queue = $1 AND state IN ('ready', 'leased')",
        )
        .bind(queue)
        .fetch_one(&self.db)
        .await?;
        let oldest: Option<i64> = r.get("oldest");
        Ok(QueueStats {
            depth: u64::try_from(r.get::<i64, _>("depth")).unwrap_or(0),
            leased: u64::try_from(r.get::<i64, _>("leased")).unwrap_or(0),
            oldest_age: oldest.map_or(Duration::ZERO, |t| span_ms(t, now_ms())),
        })
    }

    async fn release(&self, holder: &str) -> Result<u64> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE queue_messages SET due_ms = enqueued_ms, holder = NULL WHERE state = 'leased' AND holder = $1",
        )
        .bind(holder)
        .execute(&self.db)
        .await?;
        if done.rows_affected() > 0 {
            sqlx::query("SELECT pg_notify($1, queue) FROM (SELECT DISTINCT queue FROM queue_messages WHERE state = 'leased' AND due_ms <= $2) q")
                .bind(CHANNEL)
                .bind(now)
                .execute(&self.db)
                .await?;
        }
        Ok(done.rows_affected())
    }

    async fn purge(&self, done_before_ms: i64, dead_before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM queue_messages
             WHERE (state = 'done' AND settled_ms < $1) OR (state = 'dead' AND settled_ms < $2)",
        )
        .bind(done_before_ms)
        .bind(dead_before_ms)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected())
    }
}
