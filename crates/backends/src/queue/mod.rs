//! The work queue: named queues of small messages, delivered at least once to one consumer at a
//! time, over the backend chosen in configuration (one handle, [`Queue`], over a crate-private
//! [`Backend`] trait, the way [`crate::Objects`] is one handle over its stores).
//!
//! The contract every backend keeps (the behaviour suite in `tests/queue.rs` runs against each):
//! - [`Queue::enqueue`] commits before it returns and carries a deduplication id: the same id
//!   twice in one queue is one message (for as long as the message is live, and for the
//!   deduplication window after it settled). A message may be delayed: no claim sees it before.
//! - [`Queue::claim`] leases one due message to one consumer and returns a [`Lease`] with a
//!   fencing token: the lease's `fence` grows with every claim of that message. While the lease
//!   runs no other claim sees the message; when it runs out unrenewed, the message is due again
//!   (its consumer died or hung) and the next claim gets a higher fence.
//! - [`Queue::extend`], [`Queue::finish`], [`Queue::retry`] and [`Queue::bury`] act only for the
//!   lease that holds the message now; any other gets [`QueueError::Stale`] and changes nothing,
//!   so a consumer whose lease moved on cannot overwrite the new holder's outcome.
//! - A waiting consumer ([`Queue::next`]) is woken by an enqueue without polling (SQLite: an
//!   in-process notify, since one process owns the file; PostgreSQL: the same on the enqueuing
//!   node, and LISTEN/NOTIFY sent after the commit for the others; JetStream: its pull
//!   consumer), and by its own timer when a delayed message or a lease falls due. A message put
//!   back for later wakes the waiting consumers, so that their timers follow it.
//! - Messages are small (at most [`MAX_MESSAGE`] bytes): large payloads go by reference.
//! - [`Queue::stats`] reads depth and the age of the oldest message, for metrics and scaling.
//!
//! Queue names are per use (`invocations` today; trigger deliveries and workflow steps later).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

#[cfg(feature = "nats")]
pub(crate) mod nats;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod sqlite;

#[cfg(feature = "nats")]
pub use nats::NatsOptions;

/// The largest message a queue carries, in bytes. Bigger payloads are stored elsewhere (the
/// object store, the invocation log) and the message names them.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Longest queue name, in bytes.
pub const MAX_QUEUE_NAME: usize = 64;

/// Longest namespace of a deployment's queues on a shared server, in bytes.
pub const MAX_NAMESPACE: usize = 32;

/// How long a waiting consumer sleeps at most before it looks again without being woken: a
/// backstop for a wake-up lost with a connection, not the way work is found.
const RECHECK: Duration = Duration::from_secs(30);

/// What can go wrong with a queue, whatever its backend.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease no longer holds the message: it ran out and another claim took the message,
    /// or the message was settled already.
    #[error("the lease no longer holds the message (it ran out and was claimed again, or the message was settled)")]
    Stale,
    #[error("a message of {size} bytes; a queue carries at most {limit} (pass large payloads by reference)")]
    TooLarge { size: usize, limit: usize },
    #[error("queue name `{0}`: use 1 to 64 characters a-z, 0-9, `_` and `-`")]
    InvalidName(String),
    #[error("deduplication id: use 1 to 200 bytes of visible ASCII")]
    InvalidId,
    #[error("queue namespace `{0}`: use 1 to {MAX_NAMESPACE} characters a-z, 0-9 and `-`")]
    InvalidNamespace(String),
    /// The backend could not be reached or failed; the operation may be retried.
    #[error("queue backend: {0}")]
    Unavailable(String),
}

impl QueueError {
    /// A stable name of the error, the one API answers carry.
    pub fn code(&self) -> &'static str {
        match self {
            QueueError::Stale => "stale_lease",
            QueueError::TooLarge { .. } => "message_too_large",
            QueueError::InvalidName(_) => "invalid_queue_name",
            QueueError::InvalidId => "invalid_deduplication_id",
            QueueError::InvalidNamespace(_) => "invalid_queue_namespace",
            QueueError::Unavailable(_) => "queue_unavailable",
        }
    }
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> QueueError {
        QueueError::Unavailable(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// Names one claim of one message: what [`Queue::finish`] and the other settlements act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) queue: String,
    /// The message's identity in its backend (never reused).
    pub(crate) message: i64,
    /// The fencing token: grows with every claim of the message.
    pub(crate) fence: i64,
    /// Where the backend takes the settlement (JetStream's ack subject), if it needs one.
    pub(crate) reply: Option<String>,
}

impl Lease {
    /// The fencing token, for stores outside the queue that record the outcome: accept a write
    /// only from the highest fence seen for the message.
    pub fn fence(&self) -> u64 {
        u64::try_from(self.fence).unwrap_or(0)
    }

    /// The lease as text (`message.fence`), unique across the queue's life.
    pub fn token(&self) -> String {
        format!("{}.{}", self.message, self.fence)
    }
}

/// A claimed message.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The deduplication id it was enqueued with.
    pub id: String,
    pub payload: Vec<u8>,
    /// How many times it has been claimed, this time included (1 on the first delivery).
    pub attempt: u32,
    /// When it was enqueued (ms since the Unix epoch).
    pub enqueued_ms: i64,
    pub lease: Lease,
}

/// Depth and age of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages not settled: due, delayed or leased.
    pub depth: u64,
    /// Of those, the ones leased to a consumer now.
    pub leased: u64,
    /// How long the oldest of them has waited since it was enqueued.
    pub oldest_age: Duration,
}

/// What a backend does; [`Queue`] checks arguments and does the waiting.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// `sqlite`, `postgres` or `nats`.
    fn kind(&self) -> &'static str;
    /// `false`: a message with this id is in the queue already (nothing changed).
    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool>;
    async fn claim(&self, queue: &str, lease: Duration, holder: &str) -> Result<Option<Delivery>>;
    /// Whether [`Backend::claim_waiting`] waits on the server (a JetStream pull); otherwise the
    /// handle waits with its notifier and timer.
    fn waits(&self) -> bool {
        false
    }
    /// Claims, waiting up to `max` for a message to arrive.
    async fn claim_waiting(
        &self,
        queue: &str,
        lease: Duration,
        holder: &str,
        _max: Duration,
    ) -> Result<Option<Delivery>> {
        self.claim(queue, lease, holder).await
    }
    /// When the next message of `queue` falls due (delayed, or leased and unrenewed), if any.
    async fn next_due_ms(&self, queue: &str) -> Result<Option<i64>>;
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()>;
    async fn finish(&self, lease: &Lease) -> Result<()>;
    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()>;
    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()>;
    async fn stats(&self, queue: &str) -> Result<QueueStats>;
    /// Messages not settled (what [`Backend::stats`] counts as depth), where a backend can tell
    /// it more cheaply than the whole of `stats`.
    async fn depth(&self, queue: &str) -> Result<u64> {
        Ok(self.stats(queue).await?.depth)
    }
    /// Makes every message `holder` leases due again now (a node's previous run held them).
    async fn release(&self, holder: &str) -> Result<u64>;
    /// Deletes settled messages: finished before `done_before_ms`, buried before `dead_before_ms`.
    async fn purge(&self, done_before_ms: i64, dead_before_ms: i64) -> Result<u64>;
    /// Deletes a queue and every message in it.
    async fn remove(&self, queue: &str) -> Result<()>;
    /// One trivial round trip to the server that holds the queues.
    async fn ping(&self) -> Result<()>;
    /// The queue as it lives in a SQLite state file, if it does.
    fn sqlite(&self) -> Option<&sqlite::SqliteQueue> {
        None
    }
    /// The queue as it lives in a PostgreSQL state, if it does.
    #[cfg(feature = "postgres")]
    fn postgres(&self) -> Option<&postgres::PgQueue> {
        None
    }
}

/// Wake-ups, one per queue name, shared by a backend and the waiting consumers.
#[derive(Default)]
pub(crate) struct Wakers(Mutex<Vec<(String, Arc<Notify>)>>);

impl Wakers {
    pub(crate) fn get(&self, queue: &str) -> Arc<Notify> {
        let mut all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, n)) = all.iter().find(|(q, _)| q == queue) {
            return n.clone();
        }
        let n = Arc::new(Notify::new());
        all.push((queue.to_owned(), n.clone()));
        n
    }

    /// Wakes one consumer of `queue` (or the next one to wait).
    pub(crate) fn wake(&self, queue: &str) {
        self.get(queue).notify_one();
    }

    /// Wakes every consumer waiting on `queue` (what is due changed; look again).
    pub(crate) fn wake_every(&self, queue: &str) {
        self.get(queue).notify_waiters();
    }

    /// Wakes every waiting consumer of every queue (a connection came back; look again).
    pub(crate) fn wake_all(&self) {
        let all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, n) in all.iter() {
            n.notify_waiters();
        }
    }
}

/// A handle on the node's queues; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    backend: Arc<dyn Backend>,
    wakers: Arc<Wakers>,
    /// Who this node's leases are recorded as (see [`Queue::release_held`]).
    holder: Arc<str>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("holder", &self.holder).finish_non_exhaustive()
    }
}

fn check_name(queue: &str) -> Result<()> {
    let ok = !queue.is_empty()
        && queue.len() <= MAX_QUEUE_NAME
        && queue.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(QueueError::InvalidName(queue.chars().take(80).collect())) }
}

/// Checks the namespace that keeps one deployment's queues apart from others' on a shared
/// server (JetStream: `NatsOptions::namespace`): 1 to [`MAX_NAMESPACE`] characters a-z, 0-9
/// and `-`, so that it fits stream, subject and bucket names and no two namespaces (or none
/// at all) give the same name.
pub fn check_namespace(namespace: &str) -> Result<()> {
    let ok = !namespace.is_empty()
        && namespace.len() <= MAX_NAMESPACE
        && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(QueueError::InvalidNamespace(namespace.chars().take(80).collect())) }
}

/// What [`Queue::enqueue`] refuses before the backend sees it.
pub(crate) fn check_message(queue: &str, id: &str, payload: &[u8]) -> Result<()> {
    check_name(queue)?;
    check_id(id)?;
    if payload.len() > MAX_MESSAGE {
        return Err(QueueError::TooLarge { size: payload.len(), limit: MAX_MESSAGE });
    }
    Ok(())
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic());
    if ok { Ok(()) } else { Err(QueueError::InvalidId) }
}

impl Queue {
    pub(crate) fn new(backend: Arc<dyn Backend>, wakers: Arc<Wakers>, holder: &str) -> Queue {
        Queue { backend, wakers, holder: holder.into() }
    }

    /// The queues in NATS JetStream at `url` (`nats://host:4222`), shared by every node that
    /// connects there; `holder` names this node's leases (see [`Queue::release_held`]).
    #[cfg(feature = "nats")]
    pub async fn nats(url: &str, options: nats::NatsOptions, holder: &str) -> Result<Queue> {
        let backend = nats::NatsQueue::connect(url, options).await?;
        Ok(Queue::new(Arc::new(backend), Arc::new(Wakers::default()), holder))
    }

    /// The backend: `sqlite`, `postgres` or `nats`.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Deletes a queue with every message in it, leased or not (an operator's clean-up; the
    /// tests' too).
    pub async fn remove(&self, queue: &str) -> Result<()> {
        check_name(queue)?;
        self.backend.remove(queue).await
    }

    /// Who this handle's leases are recorded as.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Adds a message, due after `delay`; returns once it is committed. `false`: a message with
    /// this deduplication id is in the queue already, and nothing changed.
    pub async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        check_message(queue, id, payload)?;
        self.backend.enqueue(queue, id, payload, delay).await
    }

    /// The backend, for writes another handle makes in the same commit as its own
    /// (`InvocationLog::insert_queued`).
    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Leases the oldest due message of `queue` for `lease`, if there is one.
    pub async fn claim(&self, queue: &str, lease: Duration) -> Result<Option<Delivery>> {
        check_name(queue)?;
        self.backend.claim(queue, lease, &self.holder).await
    }

    /// Waits for a message of `queue` and leases it: woken by enqueues, and by a timer when a
    /// delayed message or an unrenewed lease falls due.
    pub async fn next(&self, queue: &str, lease: Duration) -> Result<Delivery> {
        check_name(queue)?;
        if self.backend.waits() {
            loop {
                if let Some(d) = self.backend.claim_waiting(queue, lease, &self.holder, RECHECK).await? {
                    return Ok(d);
                }
            }
        }
        let claim = || self.backend.claim(queue, lease, &self.holder);
        let claimed = self.wait_for(queue, claim, std::future::pending()).await?;
        claimed.ok_or_else(|| QueueError::Unavailable("stopped waiting".into()))
    }

    /// Waits as [`Queue::next`] does on a backend that does not wait on its server (SQLite,
    /// PostgreSQL), claiming with `claim`: a claim that also does what follows it in the same
    /// database (the invocation log's start). `stop` ends the wait (`None`), never a claim in
    /// flight: a claim that began is answered.
    pub(crate) async fn wait_for<T, F, C>(
        &self,
        queue: &str,
        mut claim: F,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> C,
        C: Future<Output = Result<Option<T>>>,
    {
        check_name(queue)?;
        let wake = self.wakers.get(queue);
        tokio::pin!(stop);
        loop {
            // Registered before looking, so an enqueue between the look and the wait is not missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = claim().await? {
                return Ok(Some(d));
            }
            let wait = match self.backend.next_due_ms(queue).await? {
                Some(due) => span_ms(crate::state::now_ms(), due).min(RECHECK),
                None => RECHECK,
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => return Ok(None),
            }
        }
    }

    /// Renews a lease to `by` from now. [`QueueError::Stale`]: the message is no longer this
    /// lease's; give the work up.
    pub async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        self.backend.extend(lease, by).await
    }

    /// Settles a message as done.
    pub async fn finish(&self, lease: &Lease) -> Result<()> {
        self.backend.finish(lease).await
    }

    /// Puts a message back, due after `delay`; its next claim counts another attempt.
    pub async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        self.backend.retry(lease, delay).await?;
        self.woken(&lease.queue, delay);
        Ok(())
    }

    /// Wakes this process's consumers of `queue` for a message put back due after `delay` (by
    /// this handle, or by a write that went around it). Due now: one consumer takes it. Later:
    /// every waiting consumer looks again and sets its timer by it, since each may have set its
    /// timer while the message was leased, for the lease's end.
    pub(crate) fn woken(&self, queue: &str, delay: Duration) {
        if delay.is_zero() {
            self.wakers.wake(queue);
        } else {
            self.wakers.wake_every(queue);
        }
    }

    /// Settles a message as dead (kept, with `reason`, until purged; never delivered again).
    pub async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.backend.bury(lease, reason).await
    }

    pub async fn stats(&self, queue: &str) -> Result<QueueStats> {
        check_name(queue)?;
        self.backend.stats(queue).await
    }

    /// Messages not settled (due, delayed or leased): an admission check's cheaper `stats`. On
    /// SQLite it is kept in memory and reads no row; on PostgreSQL it is a count of them; on
    /// JetStream the stream's message count.
    pub async fn depth(&self, queue: &str) -> Result<u64> {
        check_name(queue)?;
        self.backend.depth(queue).await
    }

    /// Makes every message this node's previous run leased due again at once, in its place in
    /// line (by enqueue time): call it at start, before claiming. Leases of other nodes are
    /// left to run out.
    pub async fn release_held(&self) -> Result<u64> {
        let n = self.backend.release(&self.holder).await?;
        if n > 0 {
            self.wakers.wake_all();
        }
        Ok(n)
    }

    /// Answers once the backend did (a trivial query, or a JetStream request): a health probe.
    /// [`QueueError::Unavailable`] while it is out of reach.
    pub async fn ping(&self) -> Result<()> {
        self.backend.ping().await
    }

    /// Deletes settled messages: finished ones older than `dedup_window` (their ids may then be
    /// enqueued again), buried ones older than `keep_dead`.
    pub async fn purge(&self, dedup_window: Duration, keep_dead: Duration) -> Result<u64> {
        let now = crate::state::now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.backend.purge(now.saturating_sub(ms(dedup_window)), now.saturating_sub(ms(keep_dead))).await
    }
}

/// The time from `from_ms` to `to_ms` (ms since the epoch); zero when `to_ms` is not later.
pub(crate) fn span_ms(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(to_ms.saturating_sub(from_ms)).unwrap_or(0))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
