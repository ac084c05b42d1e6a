//! The queue in PostgreSQL, shared by every node on the same database. A claim takes the
//! oldest due row with `FOR UPDATE SKIP LOCKED` (concurrent claims pass over each other's rows
//! instead of waiting); settlements update only the row whose fence they carry.
//!
//! Wake-ups: a message that falls due now, or is put back for later, is announced after its
//! commit. The node that wrote it wakes its own waiting consumers at once, and tells the others
//! with `NOTIFY pixflow_queue_announce`, payload `<queue>\n<origin>\n<count>`: one statement
//! per round trip for every announcement made meanwhile, whatever their queues, outside the
//! writes (decision 023). A `NOTIFY` inside a write would hold PostgreSQL's cluster-wide notify
//! lock through that write's commit, serialising every enqueue. A listener wakes up to `count`
//! of its consumers for another node's announcement; one that lost its connection wakes them
//! all once it listens again, so nothing enqueued meanwhile waits for the timer. Closing the
//! state sends what is still to be announced first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};

use super::{Backend, Delivery, Lease, QueueError, QueueStats, Result, Wakers, millis, span_ms};
use crate::state::now_ms;

/// The channel of announcements; the payload is `<queue>\n<origin>\n<count>`. Nodes that
/// notified `pixflow_queue` with a queue's name alone (before decision 023) hear none of these
/// and are not heard: run one version on a database, or their idle workers wait for their
/// timer.
pub(crate) const CHANNEL: &str = "pixflow_queue_announce";

/// The schema, as migration steps of [`crate::pg`].
///
/// A statement that looks a message up by its key (`seq`) names the states it excludes
/// (`state NOT IN ('ready', 'done', 'dead')` for a leased one), never a state a partial index
/// covers; a state added to the `CHECK` below must be added to those lists. Statistics gathered
/// while the queue was quiet say the partial indexes hold almost nothing; a plan that believed
/// them would scan a whole index for each row of a burst instead of looking the row up by its
/// key, and a prepared statement keeps such a plan (decision 023).
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
    wakers: Arc<Wakers>,
    announcer: Arc<Announcer>,
    listener: tokio::task::JoinHandle<()>,
    announcing: tokio::task::JoinHandle<()>,
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        self.listener.abort();
        self.announcing.abort();
    }
}

impl PgQueue {
    /// Starts listening before returning, so no enqueue after this is missed.
    pub(crate) async fn new(db: PgPool, wakers: Arc<Wakers>, pool: Arc<()>) -> Result<PgQueue> {
        let mut origin = [0u8; 12];
        getrandom::fill(&mut origin).map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let announcer = Arc::new(Announcer { origin: hex::encode(origin), ..Announcer::default() });
        let mut listener = PgListener::connect_with(&db).await?;
        listener.listen(CHANNEL).await?;
        let listener = tokio::spawn(listen(db.clone(), listener, wakers.clone(), announcer.origin.clone()));
        let announcing = tokio::spawn(announce(db.clone(), announcer.clone()));
        Ok(PgQueue { db, pool, wakers, announcer, listener, announcing })
    }

    /// What this queue's node still has to announce, for the state's close.
    pub(crate) fn announcer(&self) -> std::sync::Weak<Announcer> {
        Arc::downgrade(&self.announcer)
    }

    /// Whether this queue lives on the pool `pool` names.
    pub(crate) fn on(&self, pool: &Arc<()>) -> bool {
        Arc::ptr_eq(&self.pool, pool)
    }

    /// A message of `queue` was added, due now (committed): wakes one of this node's
    /// consumers, and tells the other nodes.
    pub(crate) fn announce(&self, queue: &str) {
        self.wakers.wake(queue);
        self.tell_others(queue);
    }

    /// Tells the other nodes that a message of `queue` fell due now, or was put back for later
    /// (committed), for a caller that wakes this node's consumers itself. A woken consumer
    /// looks, and sets its timer by what it finds.
    pub(crate) fn tell_others(&self, queue: &str) {
        self.announcer.add(queue, 1);
    }
}

/// Announcements waiting for the next `NOTIFY`, by queue, and who this node is in them.
#[derive(Default)]
pub(crate) struct Announcer {
    origin: String,
    pending: Mutex<HashMap<String, u64>>,
    added: tokio::sync::Notify,
}

impl Announcer {
    fn add(&self, queue: &str, n: u64) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            match pending.get_mut(queue) {
                Some(count) => *count = count.saturating_add(n),
                None => {
                    pending.insert(queue.to_owned(), n);
                }
            }
        }
        self.added.notify_one();
    }

    fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends what is waiting now, once (closing the state: the task would lose it with the
    /// pool).
    pub(crate) async fn flush(&self, db: &PgPool) {
        let due = self.take();
        if !due.is_empty()
            && let Err(e) = send(db, &self.origin, &due).await
        {
            tracing::warn!(error = %e, "queue announcements to other nodes not sent at close");
        }
    }
}

/// One `NOTIFY` per queue in `due`, in one statement.
async fn send(db: &PgPool, origin: &str, due: &HashMap<String, u64>) -> sqlx::Result<()> {
    let (queues, counts): (Vec<String>, Vec<i64>) =
        due.iter().map(|(q, n)| (q.clone(), i64::try_from(*n).unwrap_or(i64::MAX))).unzip();
    sqlx::query(
        "SELECT pg_notify($1, concat(q, E'\\n', $2::TEXT, E'\\n', n)) FROM UNNEST($3::TEXT[], $4::BIGINT[]) AS t(q, n)",
    )
    .bind(CHANNEL)
    .bind(origin)
    .bind(&queues)
    .bind(&counts)
    .execute(db)
    .await?;
    Ok(())
}

/// Sends what was announced since the last `NOTIFY` in one, one at a time: an announcement
/// made while one is in flight goes in the next. One that fails is kept for the next try.
async fn announce(db: PgPool, announcer: Arc<Announcer>) {
    loop {
        announcer.added.notified().await;
        loop {
            let due = announcer.take();
            if due.is_empty() {
                break;
            }
            match send(&db, &announcer.origin, &due).await {
                Ok(_) => {}
                Err(sqlx::Error::PoolClosed) => return,
                // Other nodes find the messages when PostgreSQL answers again (their listeners
                // lost the connection too, and look again once they listen) or by the timer;
                // the announcements are kept, and sent on the next try.
                Err(e) => {
                    tracing::warn!(error = %e, "queue announcements to other nodes not sent; trying again");
                    for (queue, n) in due {
                        announcer.add(&queue, n);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

/// Adds a message on `conn` (alone, or in its caller's transaction). `None`: its deduplication
/// id is in the queue already; else whether it is due now (the caller announces it once
/// committed).
pub(crate) async fn enqueue_on(
    conn: &mut sqlx::PgConnection,
    queue: &str,
    id: &str,
    payload: &[u8],
    delay: Duration,
) -> sqlx::Result<Option<bool>> {
    let now = now_ms();
    let due = now.saturating_add(millis(delay));
    let r = sqlx::query(
        "INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
         VALUES ($1, $2, 'ready', $3, $4, $5) ON CONFLICT (queue, dedup) DO NOTHING RETURNING seq",
    )
    .bind(queue)
    .bind(id)
    .bind(payload)
    .bind(due)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(r.map(|_| due <= now))
}

/// Parses an announcement: its queue, and how many consumers it wakes; `None` for this node's
/// own (its consumers were woken when it was made). A payload without a count wakes one.
fn announced<'a>(payload: &'a str, origin: &str) -> Option<(&'a str, u64)> {
    let mut parts = payload.split('\n');
    let queue = parts.next()?;
    match (parts.next(), parts.next()) {
        (Some(from), _) if from == origin => None,
        (_, Some(n)) => Some((queue, n.parse().unwrap_or(1))),
        _ => Some((queue, 1)),
    }
}

/// At most this many consumers woken by one announcement: each looks, and one that finds the
/// queue empty waits again.
const WAKE_AT_MOST: u64 = 64;

async fn listen(db: PgPool, mut listener: PgListener, wakers: Arc<Wakers>, origin: String) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if let Some((queue, count)) = announced(n.payload(), &origin) {
                    for _ in 0..count.clamp(1, WAKE_AT_MOST) {
                        wakers.wake(queue);
                    }
                }
            }
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
        let added = enqueue_on(&mut conn, queue, id, payload, delay).await?;
        if added == Some(true) {
            self.announce(queue);
        }
        Ok(added.is_some())
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
            sqlx::query("UPDATE queue_messages SET due_ms = $1 WHERE seq = $2 AND fence = $3 AND state NOT IN ('ready', 'done', 'dead')")
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
                 WHERE seq = $2 AND fence = $3 AND state NOT IN ('ready', 'done', 'dead')",
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
                 WHERE seq = $2 AND fence = $3 AND state NOT IN ('ready', 'done', 'dead')",
            )
            .bind(due)
            .bind(lease.message)
            .bind(lease.fence)
            .execute(&self.db)
            .await?,
        )?;
        // `Queue::retry` wakes this node's consumers; other nodes' may be the ones waiting, for
        // a message due now or with timers set for the lease's end.
        self.tell_others(&lease.queue);
        Ok(())
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        settled(
            sqlx::query(
                "UPDATE queue_messages SET state = 'dead', reason = $1, settled_ms = $2, holder = NULL
                 WHERE seq = $3 AND fence = $4 AND state NOT IN ('ready', 'done', 'dead')",
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
            // `Queue::release_held` wakes this node's consumers; other nodes' may be waiting.
            let due = sqlx::query("SELECT DISTINCT queue FROM queue_messages WHERE state = 'leased' AND due_ms <= $1")
                .bind(now)
                .fetch_all(&self.db)
                .await?;
            for r in due {
                self.tell_others(r.get("queue"));
            }
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

#[cfg(test)]
mod tests {
    use super::announced;

    #[test]
    fn announcements_name_their_queue_and_count_and_a_node_skips_its_own() {
        assert_eq!(announced("work\nabc\n3", "xyz"), Some(("work", 3)));
        assert_eq!(announced("work\nabc\n3", "abc"), None, "its consumers were woken already");
        assert_eq!(announced("work", "abc"), Some(("work", 1)), "a queue's name alone");
        assert_eq!(announced("work\nabc\nlots", "xyz"), Some(("work", 1)), "a count that is not one");
    }
}
