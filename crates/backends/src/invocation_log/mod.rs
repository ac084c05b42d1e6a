//! The invocation log: each asynchronous invocation's request, status, attempts, result and
//! error. One handle, [`InvocationLog`], over a crate-private [`Backend`] trait (SQLite: the
//! node's state file; PostgreSQL: shared by every node), opened by [`crate::State`].
//!
//! Its queue message carries only the id. A consumer that claimed the message [`start`]s the
//! invocation with the delivery's lease token, and records the outcome with [`finish`],
//! [`retry_at`] or [`bury`]: each changes the row only while it is still that lease's, so a
//! consumer whose lease ran out and whose message another claim took over changes nothing (the
//! fencing of [`crate::queue`], applied to the log). Where the queue lives in the log's own
//! database, [`next_started`] claims a message and starts its invocation in one commit, and
//! [`settle`] records an outcome and settles the message in one (decision 022). The log knows
//! nothing of functions'
//! payload formats: payloads, results and errors are opaque bytes and text.
//!
//! The contract every backend keeps (the behaviour suite in `tests/invocation_log.rs` runs
//! against each): every write is committed when it returns; `start` is one atomic update that
//! returns the row it changed, so of two starts the later one owns the row; ids compare byte
//! for byte (dead letters page in byte order of their ids).
//!
//! [`start`]: InvocationLog::start
//! [`finish`]: InvocationLog::finish
//! [`retry_at`]: InvocationLog::retry_at
//! [`bury`]: InvocationLog::bury
//! [`next_started`]: InvocationLog::next_started
//! [`settle`]: InvocationLog::settle

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::state::{Result, StateError};

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sqlite;

/// Where an invocation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    /// Dead-lettered: failed on its last attempt, or with an error retrying cannot fix.
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Dead => "dead",
        }
    }

    pub(crate) fn parse(s: &str) -> Status {
        match s {
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "dead" => Status::Dead,
            _ => Status::Queued,
        }
    }
}

/// A new asynchronous invocation.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub id: String,
    pub function: String,
    pub max_attempts: u32,
    /// Request description (parameters, content type), opaque to the log.
    pub meta: String,
    /// Request bytes, opaque to the log.
    pub payload: Vec<u8>,
    /// Where to report completion, if anywhere.
    pub callback: Option<String>,
}

/// An invocation as stored (without its payload and result bytes).
#[derive(Debug, Clone)]
pub struct InvocationRow {
    pub id: String,
    pub function: String,
    pub status: Status,
    pub attempts: u32,
    pub max_attempts: u32,
    pub meta: String,
    pub callback: Option<String>,
    pub result_meta: Option<String>,
    pub error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// When a retried invocation's next attempt is due (ms since the epoch).
    pub next_ms: i64,
}

/// How an attempt ended, as [`InvocationLog::settle`] records it in the log and settles its
/// queue message.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Succeeded ([`InvocationLog::finish`]); the message is finished.
    Succeeded { result_meta: &'a str, result: &'a [u8] },
    /// Tried again after `delay` ([`InvocationLog::retry_at`]); the message comes back then.
    Retry { error: &'a str, delay: Duration },
    /// Dead-lettered ([`InvocationLog::bury`]); the message is buried with `reason`.
    Dead { error: &'a str, reason: &'a str },
}

/// What [`InvocationLog::settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The log recorded the outcome (`false`: the invocation is no longer the lease's, and
    /// nothing changed, neither in the log nor in the queue).
    pub recorded: bool,
    /// The message was settled (`false` only if the queue's lease moved on meanwhile).
    pub settled: bool,
}

/// A message claimed and, in the same commit, its invocation started
/// ([`InvocationLog::next_started`]).
#[derive(Debug)]
pub struct Claimed {
    pub delivery: crate::Delivery,
    /// The invocation as [`InvocationLog::start`] returns it. `None`: the message names no
    /// invocation that could start (settled already, gone, or not an id); the caller decides.
    pub started: Option<(InvocationRow, Vec<u8>)>,
}

/// The columns every backend reads into an [`InvocationRow`], spliced into queries at compile
/// time.
macro_rules! row_columns {
    () => {
        "id, function, status, attempts, max_attempts, meta, callback, result_meta, error, created_ms, updated_ms, next_ms"
    };
}
pub(crate) use row_columns;

/// Reads the [`row_columns`] of a result row, whichever backend made it.
pub(crate) fn read_row<'r, R>(r: &'r R) -> InvocationRow
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let int = |c: &str| r.get::<i64, _>(c);
    InvocationRow {
        id: r.get("id"),
        function: r.get("function"),
        status: Status::parse(&r.get::<String, _>("status")),
        attempts: u32::try_from(int("attempts")).unwrap_or(0),
        max_attempts: u32::try_from(int("max_attempts")).unwrap_or(1),
        meta: r.get("meta"),
        callback: r.get("callback"),
        result_meta: r.get("result_meta"),
        error: r.get("error"),
        created_ms: int("created_ms"),
        updated_ms: int("updated_ms"),
        next_ms: int("next_ms"),
    }
}

/// What a backend does; [`InvocationLog`] documents each operation.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    async fn insert(&self, inv: &NewInvocation) -> Result<()>;
    async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>>;
    async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool>;
    /// `next_ms`: when the next attempt is due.
    async fn retry_at(&self, id: &str, lease: &str, error: &str, next_ms: i64) -> Result<bool>;
    async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool>;
    async fn redrive(&self, id: &str, message: &str) -> Result<bool>;
    async fn delete(&self, id: &str) -> Result<()>;
    async fn unsettled(&self) -> Result<Vec<(String, String)>>;
    async fn get(&self, id: &str) -> Result<Option<InvocationRow>>;
    async fn result(&self, id: &str) -> Result<Option<Vec<u8>>>;
    async fn dead_letters(&self, after: &str, limit: u32) -> Result<Vec<InvocationRow>>;
    async fn purge_finished(&self, before_ms: i64) -> Result<u64>;
    /// One trivial round trip to the store.
    async fn ping(&self) -> Result<()>;
    /// Inserts `inv` and adds its message to `queue`'s queue `name` in one commit, if `queue`
    /// lives in the log's own database (`None` if not).
    async fn insert_queued(
        &self,
        _inv: &NewInvocation,
        _queue: &dyn crate::queue::Backend,
        _name: &str,
    ) -> Option<Result<()>> {
        None
    }
    /// Records `outcome` under `lease` and, if recorded, settles the lease's message, in one
    /// commit, if `queue` lives in the log's own database (`None` if not).
    async fn settle(
        &self,
        _id: &str,
        _lease: &crate::Lease,
        _outcome: Outcome<'_>,
        _queue: &dyn crate::queue::Backend,
    ) -> Option<Result<Settled>> {
        None
    }
    /// Whether `queue` lives in the log's own database, where [`Backend::claim_started`] and
    /// [`Backend::settle`] work.
    fn shares(&self, _queue: &dyn crate::queue::Backend) -> bool {
        false
    }
    /// Claims the next message of `name` and starts the invocation it names, in one commit.
    async fn claim_started(
        &self,
        _queue: &dyn crate::queue::Backend,
        _name: &str,
        _lease: Duration,
        _holder: &str,
    ) -> crate::queue::Result<Option<Claimed>> {
        Ok(None)
    }
}

/// A handle on the invocation log; cheap to clone.
#[derive(Clone)]
pub struct InvocationLog {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for InvocationLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvocationLog").finish_non_exhaustive()
    }
}

impl InvocationLog {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> InvocationLog {
        InvocationLog { backend }
    }

    /// Records a new invocation, queued; its queue message's deduplication id is its own id.
    /// Returns once it is committed.
    pub async fn insert_invocation(&self, inv: &NewInvocation) -> Result<()> {
        self.backend.insert(inv).await
    }

    /// Records a new invocation and queues its message (deduplication id and payload: the
    /// invocation's id) on `queue`'s queue `name`, in one commit, when the queue lives in the
    /// log's own database (the state's SQLite file or PostgreSQL pool): then both are recorded
    /// or neither. `None`: the queue lives elsewhere (another database, JetStream), and the
    /// caller records and queues one after the other ([`InvocationLog::insert_invocation`],
    /// `Queue::enqueue`).
    pub async fn insert_queued(&self, inv: &NewInvocation, queue: &crate::Queue, name: &str) -> Option<Result<()>> {
        if let Err(e) = crate::queue::check_message(name, &inv.id, inv.id.as_bytes()) {
            return Some(Err(StateError::Failed(e.to_string())));
        }
        self.backend.insert_queued(inv, queue.backend(), name).await
    }

    /// Marks a queued (or interrupted) invocation running under `lease` (the queue lease's
    /// token), counts the attempt, and returns it with its payload. `None`: it is settled
    /// already, or gone. The latest start owns the row: an earlier lease's outcome is refused.
    pub async fn start(&self, id: &str, lease: &str) -> Result<Option<(InvocationRow, Vec<u8>)>> {
        self.backend.start(id, lease).await
    }

    /// Waits for the next message of `queue`'s queue `name` as [`crate::Queue::next`] does, and
    /// starts the invocation it names in the same commit as the claim, when the queue lives in
    /// the log's own database (`None` if not: the caller claims, then [`InvocationLog::start`]s).
    /// The start is [`InvocationLog::start`]'s under the delivery's lease token. `stop` ends the
    /// wait (`Some(Ok(None))`) but never a claim in flight, which has counted an attempt: drop
    /// this future only through `stop`, or the claimed invocation waits for its lease to run
    /// out and its next claim counts another attempt.
    pub async fn next_started(
        &self,
        queue: &crate::Queue,
        name: &str,
        lease: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<crate::queue::Result<Option<Claimed>>> {
        if !self.backend.shares(queue.backend()) {
            return None;
        }
        let claim = || self.backend.claim_started(queue.backend(), name, lease, queue.holder());
        Some(queue.wait_for(name, claim, stop).await)
    }

    /// Records `outcome` under `lease` (its token, as [`InvocationLog::finish`],
    /// [`InvocationLog::retry_at`] and [`InvocationLog::bury`] do) and, if the log recorded it,
    /// settles the lease's message on `queue` (finished, back after the retry's delay, or
    /// buried), in one commit, when the queue lives in the log's own database. `None`: it lives
    /// elsewhere, and the caller records, then settles.
    pub async fn settle(
        &self,
        id: &str,
        lease: &crate::Lease,
        outcome: Outcome<'_>,
        queue: &crate::Queue,
    ) -> Option<Result<Settled>> {
        let settled = self.backend.settle(id, lease, outcome, queue.backend()).await?;
        if let (Ok(Settled { settled: true, .. }), Outcome::Retry { delay, .. }) = (&settled, outcome) {
            queue.woken(&lease.queue, delay);
        }
        Some(settled)
    }

    /// Records success; the payload is dropped (it is no longer needed). `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn finish(&self, id: &str, lease: &str, result_meta: &str, result: &[u8]) -> Result<bool> {
        self.backend.finish(id, lease, result_meta, result).await
    }

    /// Records a failed attempt that will be retried after `delay`. `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn retry_at(&self, id: &str, lease: &str, error: &str, delay: Duration) -> Result<bool> {
        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        self.backend.retry_at(id, lease, error, crate::state::now_ms().saturating_add(delay)).await
    }

    /// Dead-letters an invocation (its payload is kept for a re-drive). `false` (and nothing
    /// changed): the invocation is no longer this lease's.
    pub async fn bury(&self, id: &str, lease: &str, error: &str) -> Result<bool> {
        self.backend.bury(id, lease, error).await
    }

    /// Puts a dead letter back with a fresh set of attempts, under a new queue message whose
    /// deduplication id this returns (`None`: it was not dead-lettered). The caller enqueues it.
    pub async fn redrive(&self, id: &str) -> Result<Option<String>> {
        let message = format!("{id}.{}", crate::state::now_ms());
        Ok(self.backend.redrive(id, &message).await?.then_some(message))
    }

    /// Forgets an invocation whose message could not be queued (it was never accepted).
    pub async fn delete_invocation(&self, id: &str) -> Result<()> {
        self.backend.delete(id).await
    }

    /// `(invocation id, message deduplication id)` of every invocation not settled, oldest
    /// first: what the queue must hold. Enqueueing them again at start is harmless
    /// (deduplicated) and repairs a stop between recording an invocation and enqueueing its
    /// message.
    pub async fn unsettled(&self) -> Result<Vec<(String, String)>> {
        self.backend.unsettled().await
    }

    pub async fn get(&self, id: &str) -> Result<Option<InvocationRow>> {
        self.backend.get(id).await
    }

    /// The result bytes of a succeeded invocation.
    pub async fn result(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.backend.result(id).await
    }

    /// Dead letters, by id, after the id `after` (pagination).
    pub async fn dead_letters(&self, after: Option<&str>, limit: u32) -> Result<Vec<InvocationRow>> {
        self.backend.dead_letters(after.unwrap_or(""), limit).await
    }

    /// Deletes finished invocations (succeeded or dead) last updated before `before_ms`.
    pub async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        self.backend.purge_finished(before_ms).await
    }

    /// Answers once the store did (a trivial query): a health probe.
    /// [`crate::StateError::Unavailable`] while it is out of reach.
    pub async fn ping(&self) -> Result<()> {
        self.backend.ping().await
    }
}
