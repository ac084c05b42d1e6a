//! The queue in the node's SQLite state file: one table of messages, written through one
//! writer per file that commits the writes waiting for it together (group commit).
//!
//! SQLite runs one writer at a time and, with `synchronous=FULL`, flushes the WAL at every
//! commit; a message costs three writes (enqueue, claim, finish). Committed one by one, those
//! writes queue for the file's lock in SQLite's busy handler (sleeps of 1, 2, 5 ms ...) and pay a
//! flush each. So every write of the queue (enqueue, claim, extend, finish, retry, bury, release,
//! purge, remove) goes through the file's one [`Writer`], one write or one group at a time. A
//! write that finds it idle runs at once in its caller's task, as one statement, as it always
//! did; writes that arrive meanwhile wait in line, and when their turn comes the writer's task
//! runs every write waiting in one transaction (`BEGIN IMMEDIATE` ... `COMMIT`, one flush), in
//! the order they came, then answers each caller with its own result. Nobody is answered before
//! the commit, so every answer is as durable as before. Reads (`next_due_ms`, `stats`, `depth`)
//! go straight to the pool (WAL readers do not wait for writers).
//!
//! Within a group, a claim sees the messages enqueued and settled before it (two claims never
//! take the same row), and a settlement updates only the row whose fence it carries: a stale
//! lease or a duplicate deduplication id is an answer (`Stale`, `false`), not an error, and
//! leaves the rest of the group alone. A statement that fails outright rolls the group back and
//! each write of the group then runs again alone, in a transaction of its own, so it fails alone;
//! a commit that fails fails the group (its outcome is unknown, as a failed commit of one write
//! always was). Wake-ups follow the commit: one process owns the file, so an in-process notify is
//! the whole wake-up path.

use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

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

/// The most writes one commit takes; more wait for the next. A group holds the file's lock while
/// it runs, and the invocation log and the catalogue write to the same file.
const MAX_GROUP: usize = 256;

/// One write of the queue, as the writer runs it (possibly twice: in its group, and alone when
/// another write of the group failed).
enum Write {
    Enqueue { queue: String, id: String, payload: Vec<u8>, delay: Duration },
    Claim { queue: String, lease: Duration, holder: String },
    Extend { message: i64, fence: i64, by: Duration },
    Finish { message: i64, fence: i64 },
    Retry { message: i64, fence: i64, delay: Duration },
    Bury { message: i64, fence: i64, reason: String },
    Release { holder: String },
    Purge { done_before_ms: i64, dead_before_ms: i64 },
    Remove { queue: String },
}

/// What a write did once committed.
enum Done {
    /// Rows changed: an enqueue's 1 (added) or 0 (the id was there), a settlement's 1 or 0
    /// (stale), a release's or purge's count.
    Rows(u64),
    Claimed(Option<Delivery>),
}

impl Write {
    fn name(&self) -> &'static str {
        match self {
            Write::Enqueue { .. } => "enqueue",
            Write::Claim { .. } => "claim",
            Write::Extend { .. } => "extend",
            Write::Finish { .. } => "finish",
            Write::Retry { .. } => "retry",
            Write::Bury { .. } => "bury",
            Write::Release { .. } => "release",
            Write::Purge { .. } => "purge",
            Write::Remove { .. } => "remove",
        }
    }
}

struct Job {
    write: Write,
    answer: oneshot::Sender<Result<Done>>,
}

/// The one writer of a state file's queue. A write that finds the writer idle runs at once in
/// its caller's task, as one statement (no hand-over, so an idle queue is as quick as ever);
/// writes that arrive while another runs wait in line for the writer's task, which commits all
/// of them together when their turn comes. Cheap to clone; the task ends when the last handle
/// is dropped.
#[derive(Clone)]
pub(crate) struct Writer {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
}

/// What the callers and the writer's task share.
struct Shared {
    db: SqlitePool,
    wakers: Arc<Wakers>,
    /// Held while a write or a group runs: the queue's writes never meet each other at the
    /// file's lock (where SQLite's busy handler would make them sleep).
    turn: tokio::sync::Mutex<()>,
    /// Transactions committed (a group, or one write alone), for the tests.
    #[cfg(test)]
    commits: AtomicU64,
}

/// How a group failed.
enum Failed {
    /// No transaction began (no connection, or the file stayed locked): every write of the group
    /// gets this error.
    Begin(sqlx::Error),
    /// A write's statement failed: the group was rolled back, nothing of it committed.
    Write,
    /// The commit failed: every write of the group gets this error.
    Commit(sqlx::Error),
}

impl Writer {
    /// Starts the writer of `db` (its task in the current tokio runtime).
    pub(crate) fn start(db: SqlitePool, wakers: Arc<Wakers>) -> Writer {
        let shared = Arc::new(Shared {
            db,
            wakers,
            turn: tokio::sync::Mutex::new(()),
            #[cfg(test)]
            commits: AtomicU64::new(0),
        });
        let (jobs, line) = mpsc::unbounded_channel();
        tokio::spawn(shared.clone().run(line));
        Writer { shared, jobs }
    }

    /// Runs `write` and answers once it is committed: at once when the writer is idle, else in
    /// the next group.
    async fn write(&self, write: Write) -> Result<Done> {
        if let Ok(_turn) = self.shared.turn.try_lock() {
            let done = self.shared.alone(&write).await;
            self.shared.wake(&write, &done);
            return done;
        }
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job { write, answer })
            .map_err(|_| QueueError::Unavailable("the queue's writer has stopped".into()))?;
        answered.await.map_err(|_| QueueError::Unavailable("the queue's writer has stopped".into()))?
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.shared.commits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Shared {
    /// The writer's task: takes every write waiting, waits for its turn, commits them.
    async fn run(self: Arc<Shared>, mut line: mpsc::UnboundedReceiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while line.recv_many(&mut group, MAX_GROUP).await > 0 {
            let _turn = self.turn.lock().await;
            // Callers just answered (the last group's) are often about to write again: let
            // them, so their writes share this commit rather than wait for the next.
            tokio::task::yield_now().await;
            // Those that came meanwhile join too.
            while group.len() < MAX_GROUP
                && let Ok(job) = line.try_recv()
            {
                group.push(job);
            }
            self.commit(std::mem::take(&mut group)).await;
        }
    }

    /// Runs `group` and answers each of its callers after the commit.
    async fn commit(&self, group: Vec<Job>) {
        let answers: Vec<Result<Done>> = if group.len() == 1 {
            vec![self.alone(&group[0].write).await]
        } else {
            match self.together(&group).await {
                Ok(done) => done.into_iter().map(Ok).collect(),
                Err(Failed::Write) => {
                    let mut answers = Vec::with_capacity(group.len());
                    for job in &group {
                        answers.push(self.alone(&job.write).await);
                    }
                    answers
                }
                Err(Failed::Begin(e) | Failed::Commit(e)) => {
                    tracing::warn!(error = %e, writes = group.len(), "queue commit failed");
                    group.iter().map(|_| Err(QueueError::Unavailable(e.to_string()))).collect()
                }
            }
        };
        for (job, answer) in group.iter().zip(&answers) {
            self.wake(&job.write, answer);
        }
        for (job, answer) in group.into_iter().zip(answers) {
            // A caller that went away (cancelled) does not need its answer.
            let _ = job.answer.send(answer);
        }
    }

    /// After the commit: an enqueue that added a message due now wakes a consumer.
    fn wake(&self, write: &Write, done: &Result<Done>) {
        if let (Write::Enqueue { queue, delay, .. }, Ok(Done::Rows(1))) = (write, done)
            && delay.is_zero()
        {
            self.wakers.wake(queue);
        }
    }

    /// One write as one statement (its own transaction).
    async fn alone(&self, write: &Write) -> Result<Done> {
        let mut conn = self.db.acquire().await?;
        let done = run(write, &mut conn).await?;
        self.counted();
        Ok(done)
    }

    /// Every write of `group` in one transaction.
    async fn together(&self, group: &[Job]) -> std::result::Result<Vec<Done>, Failed> {
        let mut conn = self.db.acquire().await.map_err(Failed::Begin)?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(Failed::Begin)?;
        let mut done = Vec::with_capacity(group.len());
        let mut failed = None;
        for job in group {
            match run(&job.write, &mut tx).await {
                Ok(d) => done.push(d),
                Err(e) => {
                    tracing::debug!(error = %e, write = job.write.name(), "a queue write failed; its group runs one by one");
                    failed = Some(Failed::Write);
                    break;
                }
            }
        }
        let failed = match failed {
            None => match tx.commit().await {
                Ok(()) => {
                    self.counted();
                    return Ok(done);
                }
                Err(e) => Failed::Commit(e),
            },
            Some(f) => {
                // An error SQLite answers by rolling the transaction back itself (a full disk,
                // an I/O error) makes this rollback fail; either way nothing of the group stays.
                let _ = tx.rollback().await;
                f
            }
        };
        // A transaction SQLite ended by itself leaves sqlx believing the connection is in one:
        // such a connection is closed rather than handed to the next user.
        if conn.ping().await.is_err() || conn.is_in_transaction() {
            let _ = conn.close().await;
        }
        Err(failed)
    }

    fn counted(&self) {
        #[cfg(test)]
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs one write on `conn` (in the group's transaction, or alone).
async fn run(write: &Write, conn: &mut SqliteConnection) -> sqlx::Result<Done> {
    let rows = |r: sqlx::sqlite::SqliteQueryResult| Done::Rows(r.rows_affected());
    Ok(match write {
        Write::Enqueue { queue, id, payload, delay } => {
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
        Write::Claim { queue, lease, holder } => {
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
        Write::Extend { message, fence, by } => rows(
            sqlx::query("UPDATE queue_messages SET due_ms = ? WHERE seq = ? AND fence = ? AND state = 'leased'")
                .bind(now_ms().saturating_add(millis(*by)))
                .bind(message)
                .bind(fence)
                .execute(&mut *conn)
                .await?,
        ),
        Write::Finish { message, fence } => rows(
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
        Write::Retry { message, fence, delay } => rows(
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
        Write::Bury { message, fence, reason } => rows(
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
        Write::Release { holder } => rows(
            sqlx::query(
                "UPDATE queue_messages SET due_ms = enqueued_ms, holder = NULL WHERE state = 'leased' AND holder = ?",
            )
            .bind(holder.as_str())
            .execute(&mut *conn)
            .await?,
        ),
        Write::Purge { done_before_ms, dead_before_ms } => rows(
            sqlx::query(
                "DELETE FROM queue_messages
                 WHERE (state = 'done' AND settled_ms < ?) OR (state = 'dead' AND settled_ms < ?)",
            )
            .bind(done_before_ms)
            .bind(dead_before_ms)
            .execute(&mut *conn)
            .await?,
        ),
        Write::Remove { queue } => rows(
            sqlx::query("DELETE FROM queue_messages WHERE queue = ?").bind(queue.as_str()).execute(&mut *conn).await?,
        ),
    })
}

pub(crate) struct SqliteQueue {
    db: SqlitePool,
    writer: Writer,
}

impl SqliteQueue {
    /// A queue handle on `db`, whose writes go through `writer` (the file's one writer).
    pub(crate) fn new(db: SqlitePool, writer: Writer) -> SqliteQueue {
        SqliteQueue { db, writer }
    }

    async fn rows(&self, write: Write) -> Result<u64> {
        match self.writer.write(write).await? {
            Done::Rows(n) => Ok(n),
            Done::Claimed(_) => Err(QueueError::Unavailable("the queue's writer answered a claim".into())),
        }
    }

    /// A settlement: [`QueueError::Stale`] when it changed nothing.
    async fn settle(&self, write: Write) -> Result<()> {
        if self.rows(write).await? == 1 { Ok(()) } else { Err(QueueError::Stale) }
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

    async fn remove(&self, queue: &str) -> Result<()> {
        self.rows(Write::Remove { queue: queue.to_owned() }).await?;
        Ok(())
    }

    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        let write = Write::Enqueue { queue: queue.to_owned(), id: id.to_owned(), payload: payload.to_vec(), delay };
        // The writer wakes a consumer after the commit.
        Ok(self.rows(write).await? == 1)
    }

    async fn claim(&self, queue: &str, lease: Duration, holder: &str) -> Result<Option<Delivery>> {
        match self.writer.write(Write::Claim { queue: queue.to_owned(), lease, holder: holder.to_owned() }).await? {
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
        self.settle(Write::Extend { message: lease.message, fence: lease.fence, by }).await
    }

    async fn finish(&self, lease: &Lease) -> Result<()> {
        self.settle(Write::Finish { message: lease.message, fence: lease.fence }).await
    }

    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        self.settle(Write::Retry { message: lease.message, fence: lease.fence, delay }).await
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.settle(Write::Bury { message: lease.message, fence: lease.fence, reason: reason.to_owned() }).await
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
        self.rows(Write::Release { holder: holder.to_owned() }).await
    }

    async fn purge(&self, done_before_ms: i64, dead_before_ms: i64) -> Result<u64> {
        self.rows(Write::Purge { done_before_ms, dead_before_ms }).await
    }
}

/// Group commit underneath the handle: the behaviour every backend keeps is `tests/queue.rs`.
#[cfg(test)]
mod tests {
    use std::collections::HashSet;

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
}
