//! The queue in the node's SQLite state file: one table of messages. A claim is one
//! `UPDATE ... RETURNING` (SQLite runs one writer at a time, so two claims never take the same
//! row); settlements update only the row whose fence they carry. One process owns the file, so
//! an in-process notify is the whole wake-up path.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqlitePool, SqliteRow};

use super::{Backend, Delivery, Lease, QueueError, QueueStats, Result, Wakers, millis, span_ms};
use crate::state::now_ms;

/// The table, created with the rest of the state file's schema.
pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS queue_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL, dedup TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
        payload BLOB NOT NULL,
        due_ms INTEGER NOT NULL, fence INTEGER NOT NULL DEFAULT 0, holder TEXT,
        enqueued_ms INTEGER NOT NULL, settled_ms INTEGER, reason TEXT,
        UNIQUE (queue, dedup))",
    "CREATE INDEX IF NOT EXISTS queue_messages_due ON queue_messages (queue, due_ms, seq)
        WHERE state IN ('ready', 'leased')",
    "CREATE INDEX IF NOT EXISTS queue_messages_settled ON queue_messages (state, settled_ms)
        WHERE state IN ('done', 'dead')",
];

pub(crate) struct SqliteQueue {
    db: SqlitePool,
    wakers: Arc<Wakers>,
}

impl SqliteQueue {
    pub(crate) fn new(db: SqlitePool, wakers: Arc<Wakers>) -> SqliteQueue {
        SqliteQueue { db, wakers }
    }
}

fn delivery(queue: &str, r: &SqliteRow) -> Delivery {
    let fence: i64 = r.get("fence");
    Delivery {
        id: r.get("dedup"),
        payload: r.get("payload"),
        attempt: u32::try_from(fence).unwrap_or(u32::MAX),
        enqueued_ms: r.get("enqueued_ms"),
        lease: Lease { queue: queue.to_owned(), message: r.get("seq"), fence, reply: None },
    }
}

/// `Ok` when one row changed, [`QueueError::Stale`] when none did.
fn settled(done: sqlx::sqlite::SqliteQueryResult) -> Result<()> {
    if done.rows_affected() == 1 { Ok(()) } else { Err(QueueError::Stale) }
}

#[async_trait]
impl Backend for SqliteQueue {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }

    async fn remove(&self, queue: &str) -> Result<()> {
        sqlx::query("DELETE FROM queue_messages WHERE queue = ?").bind(queue).execute(&self.db).await?;
        Ok(())
    }

    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
             VALUES (?, ?, 'ready', ?, ?, ?) ON CONFLICT (queue, dedup) DO NOTHING",
        )
        .bind(queue)
        .bind(id)
        .bind(payload)
        .bind(now.saturating_add(millis(delay)))
        .bind(now)
        .execute(&self.db)
        .await?;
        let added = done.rows_affected() == 1;
        if added && delay.is_zero() {
            self.wakers.wake(queue);
        }
        Ok(added)
    }

    async fn claim(&self, queue: &str, lease: Duration, holder: &str) -> Result<Option<Delivery>> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE queue_messages SET state = 'leased', fence = fence + 1, due_ms = ?, holder = ?
             WHERE seq = (SELECT seq FROM queue_messages
                          WHERE queue = ? AND state IN ('ready', 'leased') AND due_ms <= ?
                          ORDER BY due_ms, seq LIMIT 1)
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
            "SELECT MIN(due_ms) AS due FROM queue_messages WHERE queue = ? AND state IN ('ready', 'leased')",
        )
        .bind(queue)
        .fetch_one(&self.db)
        .await?;
        Ok(r.get("due"))
    }

    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        settled(
            sqlx::query("UPDATE queue_messages SET due_ms = ? WHERE seq = ? AND fence = ? AND state = 'leased'")
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
                "UPDATE queue_messages SET state = 'done', payload = x'', settled_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
            )
            .bind(now_ms())
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )
    }

    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'ready', due_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
            )
            .bind(now_ms().saturating_add(millis(delay)))
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'dead', reason = ?, settled_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
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
            "SELECT COUNT(*) AS depth, COALESCE(SUM(state = 'leased'), 0) AS leased, MIN(enqueued_ms) AS oldest
             FROM queue_messages WHERE queue = ? AND state IN ('ready', 'leased')",
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
        let done = sqlx::query(
            "UPDATE queue_messages SET due_ms = enqueued_ms, holder = NULL WHERE state = 'leased' AND holder = ?",
        )
        .bind(holder)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected())
    }

    async fn purge(&self, done_before_ms: i64, dead_before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM queue_messages
             WHERE (state = 'done' AND settled_ms < ?) OR (state = 'dead' AND settled_ms < ?)",
        )
        .bind(done_before_ms)
        .bind(dead_before_ms)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected())
    }
}
