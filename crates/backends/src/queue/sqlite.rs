//! The queue in the node's SQLite state file: one table of messages, written through the file's
//! one writer ([`crate::sqlite_writer`]), which commits the writes waiting for it together
//! (group commit) with the invocation log's.
//!
//! A message costs three writes (enqueue, claim, finish); each is one statement, described here
//! as a [`QueueWrite`]. Within a group, a claim sees the messages enqueued and settled before it
//! (two claims never take the same row), and a settlement updates only the row whose fence it
//! carries: a stale lease or a duplicate deduplication id is an answer (`Stale`, `false`), not an
//! error, and leaves the rest of the group alone. Reads (`next_due_ms`, `stats`) go straight to
//! the pool (WAL readers do not wait for writers).
//!
//! After each commit, in commit order, the write's hook does what follows it in this process: an
//! enqueue wakes a consumer (one process owns the file, so an in-process notify is the whole
//! wake-up path), and each queue's depth (messages ready or leased, what `stats` counts) is kept
//! in memory: counted once, by a `COUNT` through the writer at the first `depth` of the queue,
//! then moved by the writes that change it (an enqueue that added a message +1, a finish or a
//! burial that settled one -1, a removal to 0; claims, retries, extensions, releases and purges
//! of settled messages keep it). A write whose outcome is unknown (its statement or its commit
//! failed) forgets its queue's depth, so the next `depth` counts again. So an admission check
//! against the depth reads no row, however many wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};

use super::{Backend, Delivery, Lease, QueueError, QueueStats, Result, Wakers, millis, span_ms};
use crate::sqlite_writer::{Write, WriteError, Writer};
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

impl From<WriteError> for QueueError {
    fn from(e: WriteError) -> QueueError {
        QueueError::Unavailable(e.to_string())
    }
}

/// What every queue handle on one file shares: its consumers' wake-ups and each queue's depth.
#[derive(Default)]
pub(crate) struct FileQueues {
    pub(crate) wakers: Arc<Wakers>,
    /// Messages ready or leased per queue, as of the last write committed; a queue not here has
    /// not been counted yet (or its count was forgotten).
    depths: Mutex<HashMap<String, u64>>,
}

impl FileQueues {
    fn depths(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.depths.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn depth(&self, queue: &str) -> Option<u64> {
        self.depths().get(queue).copied()
    }

    /// Moves a counted queue's depth by one; a queue not counted stays so.
    fn moved(&self, queue: &str, up: bool) {
        let mut depths = self.depths();
        if let Some(n) = depths.get_mut(queue) {
            match if up { n.checked_add(1) } else { n.checked_sub(1) } {
                Some(m) => *n = m,
                // Below zero cannot be: count again rather than keep a wrong figure.
                None => {
                    depths.remove(queue);
                }
            }
        }
    }
}

/// How [`SqliteQueue::settle_after`] settles a message.
pub(crate) enum Settlement {
    Finish,
    Retry(Duration),
    Bury(String),
}

/// One write of the queue.
enum Op {
    Enqueue {
        queue: String,
        id: String,
        payload: Vec<u8>,
        delay: Duration,
    },
    Claim {
        queue: String,
        lease: Duration,
        holder: String,
    },
    Extend {
        message: i64,
        fence: i64,
        by: Duration,
    },
    Finish {
        queue: String,
        message: i64,
        fence: i64,
    },
    Retry {
        message: i64,
        fence: i64,
        delay: Duration,
    },
    Bury {
        queue: String,
        message: i64,
        fence: i64,
        reason: String,
    },
    Release {
        holder: String,
    },
    Purge {
        done_before_ms: i64,
        dead_before_ms: i64,
    },
    Remove {
        queue: String,
    },
    /// Counts a queue's depth, in line with the writes, so that no write falls between the
    /// count and the moment it is kept.
    Count {
        queue: String,
    },
}

/// What a write did once committed.
pub(crate) enum Done {
    /// Rows changed: an enqueue's 1 (added) or 0 (the id was there), a settlement's 1 or 0
    /// (stale), a release's or purge's count; a count's depth.
    Rows(u64),
    Claimed(Option<Delivery>),
}

/// A write of the queue, as the file's writer runs it, with what its commit moves in memory.
pub(crate) struct QueueWrite {
    op: Op,
    file: Arc<FileQueues>,
}

impl Write for QueueWrite {
    type Output = Done;

    fn name(&self) -> &'static str {
        match self.op {
            Op::Enqueue { .. } => "enqueue",
            Op::Claim { .. } => "claim",
            Op::Extend { .. } => "extend",
            Op::Finish { .. } => "finish",
            Op::Retry { .. } => "retry",
            Op::Bury { .. } => "bury",
            Op::Release { .. } => "release",
            Op::Purge { .. } => "purge",
            Op::Remove { .. } => "remove",
            Op::Count { .. } => "count",
        }
    }

    async fn run(&self, conn: &mut SqliteConnection) -> sqlx::Result<Done> {
        run(&self.op, conn).await
    }

    fn committed(&self, done: &Done) {
        let added_or_settled = matches!(done, Done::Rows(1));
        match &self.op {
            Op::Enqueue { queue, delay, .. } if added_or_settled => {
                self.file.moved(queue, true);
                if delay.is_zero() {
                    self.file.wakers.wake(queue);
                }
            }
            Op::Finish { queue, .. } | Op::Bury { queue, .. } if added_or_settled => self.file.moved(queue, false),
            Op::Remove { queue } => {
                self.file.depths().insert(queue.clone(), 0);
            }
            Op::Count { queue } => {
                if let Done::Rows(n) = done {
                    self.file.depths().insert(queue.clone(), *n);
                }
            }
            _ => {}
        }
    }

    fn unsure(&self) {
        match &self.op {
            Op::Enqueue { queue, .. } | Op::Finish { queue, .. } | Op::Bury { queue, .. } | Op::Remove { queue } => {
                self.file.depths().remove(queue);
            }
            _ => {}
        }
    }
}

/// Runs one write on `conn` (in the group's transaction, or alone).
async fn run(op: &Op, conn: &mut SqliteConnection) -> sqlx::Result<Done> {
    let rows = |r: sqlx::sqlite::SqliteQueryResult| Done::Rows(r.rows_affected());
    Ok(match op {
        Op::Enqueue { queue, id, payload, delay } => {
            let now = now_ms();
            rows(
                sqlx::query(
                    "INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, enqueued_ms)
                     VALUES (?, ?, 'ready', ?, ?, ?) ON CONFLICT (queue, dedup) DO NOTHING",
                )
                .bind(queue.as_str())
                .bind(id.as_str())
                .bind(payload.as_slice())
                .bind(now.saturating_add(millis(*delay)))
                .bind(now)
                .execute(&mut *conn)
                .await?,
            )
        }
        Op::Claim { queue, lease, holder } => {
            let now = now_ms();
            let r = sqlx::query(
                "UPDATE queue_messages SET state = 'leased', fence = fence + 1, due_ms = ?, holder = ?
                 WHERE seq = (SELECT seq FROM queue_messages
                              WHERE queue = ? AND state IN ('ready', 'leased') AND due_ms <= ?
                              ORDER BY due_ms, seq LIMIT 1)
                 RETURNING seq, dedup, payload, fence, enqueued_ms",
            )
            .bind(now.saturating_add(millis(*lease)))
            .bind(holder.as_str())
            .bind(queue.as_str())
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            Done::Claimed(r.map(|r| delivery(queue, &r)))
        }
        Op::Extend { message, fence, by } => rows(
            sqlx::query("UPDATE queue_messages SET due_ms = ? WHERE seq = ? AND fence = ? AND state = 'leased'")
                .bind(now_ms().saturating_add(millis(*by)))
                .bind(message)
                .bind(fence)
                .execute(&mut *conn)
                .await?,
        ),
        Op::Finish { message, fence, .. } => rows(
            sqlx::query(
                "UPDATE queue_messages SET state = 'done', payload = x'', settled_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
            )
            .bind(now_ms())
            .bind(message)
            .bind(fence)
            .execute(&mut *conn)
            .await?,
        ),
        Op::Retry { message, fence, delay } => rows(
            sqlx::query(
                "UPDATE queue_messages SET state = 'ready', due_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
            )
            .bind(now_ms().saturating_add(millis(*delay)))
            .bind(message)
            .bind(fence)
            .execute(&mut *conn)
            .await?,
        ),
        Op::Bury { message, fence, reason, .. } => rows(
            sqlx::query(
                "UPDATE queue_messages SET state = 'dead', reason = ?, settled_ms = ?, holder = NULL
                 WHERE seq = ? AND fence = ? AND state = 'leased'",
            )
            .bind(reason.as_str())
            .bind(now_ms())
            .bind(message)
            .bind(fence)
            .execute(&mut *conn)
            .await?,
        ),
        Op::Release { holder } => rows(
            sqlx::query(
                "UPDATE queue_messages SET due_ms = enqueued_ms, holder = NULL WHERE state = 'leased' AND holder = ?",
            )
            .bind(holder.as_str())
            .execute(&mut *conn)
            .await?,
        ),
        Op::Purge { done_before_ms, dead_before_ms } => rows(
            sqlx::query(
                "DELETE FROM queue_messages
                 WHERE (state = 'done' AND settled_ms < ?) OR (state = 'dead' AND settled_ms < ?)",
            )
            .bind(done_before_ms)
            .bind(dead_before_ms)
            .execute(&mut *conn)
            .await?,
        ),
        Op::Remove { queue } => rows(
            sqlx::query("DELETE FROM queue_messages WHERE queue = ?").bind(queue.as_str()).execute(&mut *conn).await?,
        ),
        Op::Count { queue } => {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM queue_messages WHERE queue = ? AND state IN ('ready', 'leased')",
            )
            .bind(queue.as_str())
            .fetch_one(&mut *conn)
            .await?;
            Done::Rows(u64::try_from(n).unwrap_or(0))
        }
    })
}

pub(crate) struct SqliteQueue {
    db: SqlitePool,
    writer: Writer,
    file: Arc<FileQueues>,
}

impl SqliteQueue {
    /// A queue handle on `db`, whose writes go through `writer` (the file's one writer); `file`
    /// is shared by every queue handle on the file.
    pub(crate) fn new(db: SqlitePool, writer: Writer, file: Arc<FileQueues>) -> SqliteQueue {
        SqliteQueue { db, writer, file }
    }

    /// Runs `first` and then adds a message, due now, in one commit, if this queue's file is
    /// the one `writer` writes (`None` if not): the write's output, and whether the message was
    /// added (`false`: its deduplication id was there already).
    pub(crate) async fn after<W: Write>(
        &self,
        writer: &Writer,
        first: W,
        queue: &str,
        id: &str,
        payload: &[u8],
    ) -> Option<std::result::Result<(W::Output, bool), WriteError>> {
        if !self.writer.same(writer) {
            return None;
        }
        let op = Op::Enqueue {
            queue: queue.to_owned(),
            id: id.to_owned(),
            payload: payload.to_vec(),
            delay: Duration::ZERO,
        };
        let both = crate::sqlite_writer::Both(first, QueueWrite { op, file: self.file.clone() });
        Some(self.writer.write(both).await.map(|(out, done)| (out, matches!(done, Done::Rows(1)))))
    }

    /// Whether this queue's file is the one `writer` writes.
    pub(crate) fn writes_with(&self, writer: &Writer) -> bool {
        self.writer.same(writer)
    }

    /// Claims the next message of `queue` and runs the write `then` makes of it (if any), in one
    /// commit, if this queue's file is the one `writer` writes (`None` if not).
    pub(crate) async fn claim_then<B: Write>(
        &self,
        writer: &Writer,
        queue: &str,
        lease: Duration,
        holder: &str,
        then: impl Fn(&Delivery) -> Option<B> + Send + Sync + 'static,
    ) -> Option<std::result::Result<Option<(Delivery, Option<B::Output>)>, WriteError>> {
        if !self.writer.same(writer) {
            return None;
        }
        let op = Op::Claim { queue: queue.to_owned(), lease, holder: holder.to_owned() };
        let claim = QueueWrite { op, file: self.file.clone() };
        let both = crate::sqlite_writer::Then::new(claim, move |done: &Done| match done {
            Done::Claimed(Some(d)) => then(d),
            _ => None,
        });
        Some(self.writer.write(both).await.map(|(claimed, then)| match claimed {
            Done::Claimed(Some(d)) => Some((d, then)),
            _ => None,
        }))
    }

    /// Runs `first` and then, if `settle` says so of its output, settles `lease`'s message as
    /// `how`, in one commit, if this queue's file is the one `writer` writes (`None` if not): the
    /// write's output, and whether the message was settled (`false`: not asked, or the lease is
    /// stale).
    pub(crate) async fn settle_after<W: Write>(
        &self,
        writer: &Writer,
        first: W,
        settle: impl Fn(&W::Output) -> bool + Send + Sync + 'static,
        lease: &Lease,
        how: Settlement,
    ) -> Option<std::result::Result<(W::Output, bool), WriteError>> {
        if !self.writer.same(writer) {
            return None;
        }
        let (queue, message, fence) = (lease.queue.clone(), lease.message, lease.fence);
        let file = self.file.clone();
        let both = crate::sqlite_writer::Then::new(first, move |out: &W::Output| {
            settle(out).then(|| {
                let op = match &how {
                    Settlement::Finish => Op::Finish { queue: queue.clone(), message, fence },
                    Settlement::Retry(delay) => Op::Retry { message, fence, delay: *delay },
                    Settlement::Bury(reason) => {
                        Op::Bury { queue: queue.clone(), message, fence, reason: reason.clone() }
                    }
                };
                QueueWrite { op, file: file.clone() }
            })
        });
        Some(self.writer.write(both).await.map(|(out, settled)| (out, matches!(settled, Some(Done::Rows(1))))))
    }

    async fn write(&self, op: Op) -> Result<Done> {
        Ok(self.writer.write(QueueWrite { op, file: self.file.clone() }).await?)
    }

    async fn rows(&self, op: Op) -> Result<u64> {
        match self.write(op).await? {
            Done::Rows(n) => Ok(n),
            Done::Claimed(_) => Err(QueueError::Unavailable("the queue's writer answered a claim".into())),
        }
    }

    /// A settlement: [`QueueError::Stale`] when it changed nothing.
    async fn settle(&self, op: Op) -> Result<()> {
        if self.rows(op).await? == 1 { Ok(()) } else { Err(QueueError::Stale) }
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

#[async_trait]
impl Backend for SqliteQueue {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.db).await?;
        Ok(())
    }

    fn sqlite(&self) -> Option<&SqliteQueue> {
        Some(self)
    }

    async fn remove(&self, queue: &str) -> Result<()> {
        self.rows(Op::Remove { queue: queue.to_owned() }).await?;
        Ok(())
    }

    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        let op = Op::Enqueue { queue: queue.to_owned(), id: id.to_owned(), payload: payload.to_vec(), delay };
        // The write's hook wakes a consumer after the commit.
        Ok(self.rows(op).await? == 1)
    }

    async fn claim(&self, queue: &str, lease: Duration, holder: &str) -> Result<Option<Delivery>> {
        match self.write(Op::Claim { queue: queue.to_owned(), lease, holder: holder.to_owned() }).await? {
            Done::Claimed(d) => Ok(d),
            Done::Rows(_) => Err(QueueError::Unavailable("the queue's writer answered a settlement".into())),
        }
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
        self.settle(Op::Extend { message: lease.message, fence: lease.fence, by }).await
    }

    async fn finish(&self, lease: &Lease) -> Result<()> {
        self.settle(Op::Finish { queue: lease.queue.clone(), message: lease.message, fence: lease.fence }).await
    }

    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        self.settle(Op::Retry { message: lease.message, fence: lease.fence, delay }).await
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.settle(Op::Bury {
            queue: lease.queue.clone(),
            message: lease.message,
            fence: lease.fence,
            reason: reason.to_owned(),
        })
        .await
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

    /// From memory once the queue was counted (see the module's documentation).
    async fn depth(&self, queue: &str) -> Result<u64> {
        if let Some(n) = self.file.depth(queue) {
            return Ok(n);
        }
        self.rows(Op::Count { queue: queue.to_owned() }).await
    }

    async fn release(&self, holder: &str) -> Result<u64> {
        self.rows(Op::Release { holder: holder.to_owned() }).await
    }

    async fn purge(&self, done_before_ms: i64, dead_before_ms: i64) -> Result<u64> {
        self.rows(Op::Purge { done_before_ms, dead_before_ms }).await
    }
}

/// Group commit and the depth kept in memory, underneath the handle: the behaviour every backend
/// keeps is `tests/queue.rs`.
#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures_util::FutureExt;
    use futures_util::future::join_all;

    use crate::queue::{Delivery, Queue, QueueError};
    use crate::state::State;

    const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);
    const NOW: std::time::Duration = std::time::Duration::ZERO;

    /// A write on its way, and what it answers.
    type Answering<'a> = std::pin::Pin<Box<dyn Future<Output = Got> + 'a>>;

    /// What one write of a group answered, comparable across kinds.
    #[derive(Debug, PartialEq)]
    enum Got {
        Added(bool),
        Settled,
        Stale,
        Claimed(String),
        Empty,
        Failed(&'static str),
    }

    fn got<T>(r: Result<T, QueueError>, ok: impl FnOnce(T) -> Got) -> Got {
        match r {
            Ok(v) => ok(v),
            Err(QueueError::Stale) => Got::Stale,
            Err(e) => Got::Failed(e.code()),
        }
    }

    fn settled((): ()) -> Got {
        Got::Settled
    }

    fn claimed(d: Option<Delivery>) -> Got {
        d.map_or(Got::Empty, |d| Got::Claimed(d.id))
    }

    /// A lease on `id` in `queue` that ran out and was taken over (stale), and the new holder's.
    async fn taken_over(q: &Queue, queue: &str, id: &str) -> (Delivery, Delivery) {
        q.enqueue(queue, id, b"t", NOW).await.unwrap();
        let stale = q.claim(queue, NOW).await.unwrap().unwrap();
        let owner = q.claim(queue, MINUTE).await.unwrap().unwrap();
        assert_eq!((stale.id.as_str(), owner.id.as_str(), owner.attempt), (id, id, 2));
        (stale, owner)
    }

    /// An invocation's row and its message go in one commit, hooks run (depth, wake-up), and
    /// a row that cannot be inserted leaves no message behind; a queue in another file is not
    /// written with the log's rows.
    #[tokio::test]
    async fn an_invocation_and_its_message_are_recorded_together_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("pixflow-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = State::sqlite(&dir.join("state.db")).await.unwrap();
        let (log, queue) = (state.invocations(), state.queue("local").await.unwrap());
        let (_, writer) = state.sqlite_parts().unwrap();
        let inv = |id: &str| crate::NewInvocation {
            id: id.to_owned(),
            function: "flip".into(),
            max_attempts: 3,
            meta: "{}".into(),
            payload: b"bytes".to_vec(),
            callback: None,
        };
        assert_eq!(queue.depth("work").await.unwrap(), 0);
        let waiting = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.next("work", MINUTE).await.unwrap() })
        };
        let before = writer.commits();
        log.insert_queued(&inv("inv-1"), &queue, "work").await.unwrap().unwrap();
        assert_eq!(writer.commits() - before, 1);
        assert_eq!(queue.depth("work").await.unwrap(), 1);
        let got = waiting.await.unwrap();
        assert_eq!((got.id.as_str(), got.payload.as_slice()), ("inv-1", b"inv-1".as_slice()));
        assert!(log.start("inv-1", &got.lease.token()).await.unwrap().is_some());

        // The same id again: the row is refused, and the message it would have added to
        // another queue is not there either.
        let refused = log.insert_queued(&inv("inv-1"), &queue, "other").await.unwrap();
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(queue.depth("other").await.unwrap(), 0);
        assert!(queue.claim("other", MINUTE).await.unwrap().is_none());

        // A queue in another file: the caller records and queues in two steps.
        let elsewhere = State::sqlite(&dir.join("other.db")).await.unwrap().queue("local").await.unwrap();
        assert!(log.insert_queued(&inv("inv-2"), &elsewhere, "work").await.is_none());
        assert!(log.get("inv-2").await.unwrap().is_none());
        state.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn writes_waiting_together_commit_together_each_with_its_own_answer() {
        let dir = std::env::temp_dir().join(format!("pixflow-group-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let state = State::sqlite(&path).await.unwrap();
        let (qa, qb) = (state.queue("local").await.unwrap(), state.queue("local").await.unwrap());
        let (a, b) = (&qa, &qb);
        let (db, writer) = state.sqlite_parts().unwrap();
        for i in 0..10 {
            a.enqueue("jobs", &format!("old-{i}"), b"o", NOW).await.unwrap();
        }
        let mut leases = Vec::new();
        for id in ["t0", "t1", "t2", "t3"] {
            leases.push(taken_over(a, "takeover", id).await);
        }

        // Every write below is sent before the writer runs (`join_all` polls each once before
        // it waits), from two handles: one group.
        let before = writer.commits();
        let mut writes: Vec<(Answering, Got)> = Vec::new();
        for i in 0..40 {
            let q = if i % 2 == 0 { a } else { b };
            writes.push((
                Box::pin(async move { got(q.enqueue("jobs", &format!("new-{i}"), b"n", NOW).await, Got::Added) }),
                Got::Added(true),
            ));
        }
        for i in 0..10 {
            let id = format!("old-{i}");
            writes.push((
                Box::pin(async move { got(b.enqueue("jobs", &id, b"x", NOW).await, Got::Added) }),
                Got::Added(false),
            ));
        }
        // The same new id twice in one group: the first is added, the second is the first's.
        for expect in [true, false] {
            writes.push((
                Box::pin(async { got(a.enqueue("jobs", "twice", b"2", NOW).await, Got::Added) }),
                Got::Added(expect),
            ));
        }
        // Stale leases are refused, each alone; the leases that hold settle.
        let [(s0, h0), (s1, h1), (s2, h2), (s3, h3)] = &leases[..] else { unreachable!() };
        writes.push((Box::pin(async { got(a.finish(&s0.lease).await, settled) }), Got::Stale));
        writes.push((Box::pin(async { got(a.extend(&s1.lease, MINUTE).await, settled) }), Got::Stale));
        writes.push((Box::pin(async { got(b.retry(&s2.lease, NOW).await, settled) }), Got::Stale));
        writes.push((Box::pin(async { got(b.bury(&s3.lease, "late").await, settled) }), Got::Stale));
        writes.push((Box::pin(async { got(a.finish(&h0.lease).await, settled) }), Got::Settled));
        // Settled earlier in the same group: the lease no longer holds it.
        writes.push((Box::pin(async { got(b.finish(&h0.lease).await, settled) }), Got::Stale));
        writes.push((Box::pin(async { got(a.extend(&h1.lease, MINUTE).await, settled) }), Got::Settled));
        writes.push((Box::pin(async { got(b.retry(&h2.lease, NOW).await, settled) }), Got::Settled));
        writes.push((Box::pin(async { got(a.bury(&h3.lease, "bad").await, settled) }), Got::Settled));
        // Claims in the group take distinct messages, oldest first.
        for i in 0..4 {
            let q = if i % 2 == 0 { a } else { b };
            writes.push((
                Box::pin(async move { got(q.claim("jobs", MINUTE).await, claimed) }),
                Got::Claimed(format!("old-{i}")),
            ));
        }
        let (futures, expected): (Vec<_>, Vec<_>) = writes.into_iter().unzip();
        assert_eq!(join_all(futures).await, expected);
        // The first write found the writer idle and ran alone; the rest waited for it and
        // committed together.
        assert_eq!(writer.commits() - before, 2, "the first write alone, then one commit for the others");

        // A write whose statement fails fails alone: the rest of its group commits.
        sqlx::query(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON queue_messages WHEN NEW.dedup = 'poison'
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&db)
        .await
        .unwrap();
        let ids = ["p0", "p1", "poison", "p2", "p3"];
        let answers =
            join_all(ids.iter().map(|id| async { got(a.enqueue("jobs", id, b"p", NOW).await, Got::Added) })).await;
        let mut expect: Vec<_> = ids.iter().map(|_| Got::Added(true)).collect();
        expect[2] = Got::Failed("queue_unavailable");
        assert_eq!(answers, expect);
        sqlx::query("DROP TRIGGER refuse_poison").execute(&db).await.unwrap();
        drop(db);
        state.close().await;

        // Everything answered as committed is in the file.
        let state = State::sqlite(&path).await.unwrap();
        let q = state.queue("local").await.unwrap();
        assert_eq!(q.release_held().await.unwrap(), 4 + 1, "the four claims and t1's extended lease");
        let mut jobs = HashSet::new();
        while let Some(d) = q.claim("jobs", MINUTE).await.unwrap() {
            assert!(jobs.insert(d.id.clone()), "{} twice", d.id);
        }
        let mut want: HashSet<String> = (0..10).map(|i| format!("old-{i}")).collect();
        want.extend((0..40).map(|i| format!("new-{i}")));
        want.extend(["twice", "p0", "p1", "p2", "p3"].map(String::from));
        assert_eq!(jobs, want);
        // t0 finished, t3 buried; t1 (its lease released) and t2 (retried) are due again.
        let mut takeover = Vec::new();
        while let Some(d) = q.claim("takeover", MINUTE).await.unwrap() {
            takeover.push((d.id, d.attempt));
        }
        takeover.sort();
        assert_eq!(takeover, [("t1".to_owned(), 3), ("t2".to_owned(), 3)]);
        state.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A small deterministic generator (xorshift), so a failing mix can be replayed.
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// What one random write of a mix answered: a claim's delivery, to settle later.
    type Mixed<'a> = std::pin::Pin<Box<dyn Future<Output = Option<Delivery>> + 'a>>;

    #[tokio::test]
    async fn the_depth_kept_in_memory_is_the_count_after_any_mix_of_writes() {
        let dir = std::env::temp_dir().join(format!("pixflow-queue-depth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = State::sqlite(&dir.join("state.db")).await.unwrap();
        let (qa, qb) = (state.queue("local").await.unwrap(), state.queue("local").await.unwrap());
        let (db, _) = state.sqlite_parts().unwrap();
        let kept = state.sqlite_queues().unwrap();
        let names = ["jobs", "other"];
        // Refused statements: an enqueue (fails in its group, which rolls back and runs again one
        // by one) and a burial (fails alone too: its outcome is unknown to the writer).
        sqlx::query(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON queue_messages WHEN NEW.dedup LIKE 'poison%'
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&db)
        .await
        .unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_poisoned_burial BEFORE UPDATE ON queue_messages WHEN NEW.reason = 'poison'
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&db)
        .await
        .unwrap();
        for name in names {
            assert_eq!(qa.depth(name).await.unwrap(), 0);
        }

        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        let mut leases: Vec<Delivery> = Vec::new();
        let (mut ids, mut from_memory, mut recounts) = (0u32, 0u32, 0u32);
        for batch in 0..120 {
            let mut writes: Vec<Mixed> = Vec::new();
            for _ in 0..=dice.below(12) {
                let q = if dice.below(2) == 0 { &qa } else { &qb };
                let name = names[usize::try_from(dice.below(2)).unwrap()];
                let lease = (!leases.is_empty())
                    .then(|| leases[usize::try_from(dice.below(leases.len() as u64)).unwrap()].lease.clone());
                let roll = dice.below(100);
                writes.push(match (roll, lease) {
                    (0..35, _) => {
                        ids += 1;
                        let id = if roll < 2 { format!("poison-{ids}") } else { format!("m{ids}") };
                        let delay = if roll.is_multiple_of(4) { MINUTE } else { NOW };
                        Box::pin(async move {
                            let _ = q.enqueue(name, &id, b"m", delay).await;
                            None
                        })
                    }
                    (35..42, _) => {
                        // An id enqueued before (perhaps settled, perhaps purged since).
                        let id = format!("m{}", 1 + dice.below(u64::from(ids.max(1))));
                        Box::pin(async move {
                            let _ = q.enqueue(name, &id, b"again", NOW).await;
                            None
                        })
                    }
                    (42..62, _) => {
                        // Some leases run out at once: their messages are claimed again and the
                        // old leases go stale.
                        let lease = if roll.is_multiple_of(3) { NOW } else { MINUTE };
                        Box::pin(async move { q.claim(name, lease).await.ok().flatten() })
                    }
                    (62..72, Some(l)) => Box::pin(async move {
                        let _ = q.finish(&l).await;
                        None
                    }),
                    (72..78, Some(l)) => Box::pin(async move {
                        let _ = q.retry(&l, if roll.is_multiple_of(2) { NOW } else { MINUTE }).await;
                        None
                    }),
                    (78..86, Some(l)) => Box::pin(async move {
                        let _ = q.bury(&l, if roll == 78 { "poison" } else { "bad" }).await;
                        None
                    }),
                    (86..92, Some(l)) => Box::pin(async move {
                        let _ = q.extend(&l, MINUTE).await;
                        None
                    }),
                    (92..95, _) => Box::pin(async move {
                        let _ = q.release_held().await;
                        None
                    }),
                    (95..98, _) => Box::pin(async move {
                        let _ = q.purge(NOW, NOW).await;
                        None
                    }),
                    (98, _) if batch % 30 == 29 => Box::pin(async move {
                        let _ = q.remove(name).await;
                        None
                    }),
                    _ => {
                        // A caller that goes away as soon as its write is handed over.
                        ids += 1;
                        let id = format!("m{ids}");
                        Box::pin(async move {
                            let mut gone = std::pin::pin!(q.enqueue(name, &id, b"gone", NOW));
                            let _ = gone.as_mut().now_or_never();
                            None
                        })
                    }
                });
            }
            // Sent before the writer runs: the first alone, the others as one group.
            leases.extend(join_all(writes).await.into_iter().flatten());
            // Every write handed over is answered before this one (a caller's that went away too);
            // it deletes nothing.
            qa.purge(std::time::Duration::MAX, std::time::Duration::MAX).await.unwrap();
            for name in names {
                let count: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM queue_messages WHERE queue = ? AND state IN ('ready', 'leased')",
                )
                .bind(name)
                .fetch_one(&db)
                .await
                .unwrap();
                let count = u64::try_from(count).unwrap();
                match kept.depth(name) {
                    Some(n) => {
                        assert_eq!(n, count, "batch {batch}, queue {name}: kept in memory");
                        from_memory += 1;
                    }
                    None => recounts += 1,
                }
                assert_eq!(qb.depth(name).await.unwrap(), count, "batch {batch}, queue {name}");
                assert_eq!(kept.depth(name), Some(count));
            }
        }
        // Mostly kept, counted again only after a write whose outcome was unknown.
        assert!(recounts > 0 && from_memory > 2 * recounts, "{from_memory} from memory, {recounts} recounts");
        state.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
