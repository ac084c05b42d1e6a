//! The one writer of a SQLite state file: the queue's and the invocation log's writes all go
//! through it, and the writes that wait for it together share one commit (group commit).
//!
//! SQLite runs one writer at a time and, with `synchronous=FULL`, flushes the WAL at every
//! commit. An asynchronous invocation makes six statements on the file (the log row and the
//! queue message at acceptance; the claim, the start, the outcome and the settlement in the
//! worker), in three writes (each pair is one: [`Both`], [`Then`]).
//! Committed one by one, those writes queue for the file's lock in SQLite's busy handler (sleeps
//! of 1, 2, 5 ms ...) and pay a flush each. So they go through the file's one [`Writer`], one
//! write or one group at a time. A write that finds it idle runs at once in its caller's task, as
//! one statement (if the caller goes away meanwhile, the write finishes in a task of its own, so
//! nothing stops it between its statement and what follows the commit); writes that arrive
//! meanwhile wait in line, and when their turn comes the writer's task runs every write waiting
//! in one transaction (`BEGIN IMMEDIATE` ... `COMMIT`, one flush), in the order they came, then
//! answers each caller with its own result. Nobody is answered before the commit, so every
//! answer is as durable as before.
//!
//! What a write does is its module's business ([`Write`]: the queue's in `queue/sqlite.rs`, the
//! log's in `invocation_log/sqlite.rs`); the writer only orders, groups and commits them. A write
//! that must commit with another of another module ([`Both`]: an invocation's row and its queue
//! message; [`Then`]: a claim and the start of what it claimed, an outcome and the settlement of
//! its message) runs its statements in a transaction of its own when it runs alone. Each
//! write is one statement, so a later write of a group sees what the earlier ones did (two claims
//! never take the same row; a settlement or an outcome updates only the row its lease still
//! holds), and an answer such as "stale lease" or "already there" is a result, not an error: it
//! leaves the rest of the group alone. A statement that fails outright rolls the group back and
//! each write of the group then runs again alone, in a transaction of its own, so it fails
//! alone; a commit that fails fails the group (its outcome is unknown, as a failed commit of one
//! write always was). After a commit, each write's [`Write::committed`] runs, in commit order,
//! before its caller is answered (wake-ups, the queue's depth kept in memory); a write whose
//! outcome is unknown gets [`Write::unsure`] instead. Reads go straight to the pool (WAL readers
//! do not wait for writers).

use std::future::Future;
use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::AtomicU64;

use futures_util::future::BoxFuture;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// The most writes one commit takes; more wait for the next. A group holds the file's lock while
/// it runs, and the catalogue writes to the same file directly.
const MAX_GROUP: usize = 256;

/// One write, as the module that owns its table describes it. The writer may run it twice: in
/// its group, and alone when another write of the group failed.
pub(crate) trait Write: Send + Sync + 'static {
    /// What the write answers once committed.
    type Output: Send + 'static;

    /// Its name, for the logs.
    fn name(&self) -> &'static str;

    /// Runs the write on `conn` (in its group's transaction, or alone): one statement, so that
    /// alone it is its own transaction, unless [`Write::statements`] says more.
    fn run(&self, conn: &mut SqliteConnection) -> impl Future<Output = sqlx::Result<Self::Output>> + Send;

    /// Statements [`Write::run`] runs; a write of more than one runs alone in a transaction.
    fn statements(&self) -> usize {
        1
    }

    /// After the commit, before the caller is answered; the writes of the file come here one
    /// at a time, in the order they were committed.
    fn committed(&self, _output: &Self::Output) {}

    /// The write failed in a way that leaves unknown whether it was committed (its statement or
    /// its group's commit failed).
    fn unsure(&self) {}
}

/// Two writes committed together or not at all, each answered and hooked as if alone.
pub(crate) struct Both<A, B>(pub A, pub B);

impl<A: Write, B: Write> Write for Both<A, B> {
    type Output = (A::Output, B::Output);

    fn name(&self) -> &'static str {
        self.0.name()
    }

    async fn run(&self, conn: &mut SqliteConnection) -> sqlx::Result<Self::Output> {
        let a = self.0.run(conn).await?;
        let b = self.1.run(conn).await?;
        Ok((a, b))
    }

    fn statements(&self) -> usize {
        self.0.statements() + self.1.statements()
    }

    fn committed(&self, (a, b): &Self::Output) {
        self.0.committed(a);
        self.1.committed(b);
    }

    fn unsure(&self) {
        self.0.unsure();
        self.1.unsure();
    }
}

/// A write, then a second one made from the first's output (`None`: the first alone), committed
/// together; each hooked as if alone.
pub(crate) struct Then<A: Write, B: Write, F> {
    first: A,
    next: F,
    /// The second write, once made (for its hooks).
    second: std::sync::Mutex<Option<B>>,
}

impl<A: Write, B: Write, F> Then<A, B, F> {
    pub(crate) fn new(first: A, next: F) -> Self {
        Then { first, next, second: std::sync::Mutex::new(None) }
    }

    fn second(&self) -> std::sync::MutexGuard<'_, Option<B>> {
        self.second.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<A: Write, B: Write, F> Write for Then<A, B, F>
where
    F: Fn(&A::Output) -> Option<B> + Send + Sync + 'static,
{
    type Output = (A::Output, Option<B::Output>);

    fn name(&self) -> &'static str {
        self.first.name()
    }

    async fn run(&self, conn: &mut SqliteConnection) -> sqlx::Result<Self::Output> {
        let a = self.first.run(conn).await?;
        let Some(second) = (self.next)(&a) else {
            *self.second() = None;
            return Ok((a, None));
        };
        let b = second.run(conn).await?;
        *self.second() = Some(second);
        Ok((a, Some(b)))
    }

    fn statements(&self) -> usize {
        self.first.statements() + 1
    }

    fn committed(&self, (a, b): &Self::Output) {
        self.first.committed(a);
        if let (Some(b), Some(second)) = (b, self.second().as_ref()) {
            second.committed(b);
        }
    }

    fn unsure(&self) {
        self.first.unsure();
        if let Some(second) = self.second().as_ref() {
            second.unsure();
        }
    }
}

/// Why a write got no answer from the file.
#[derive(Debug, Clone)]
pub(crate) enum WriteError {
    /// Its statement failed, or its group could not begin or commit (shared by the group's writes).
    Sql(Arc<sqlx::Error>),
    /// The writer's task has ended (its runtime is shutting down).
    Stopped,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Sql(e) => e.fmt(f),
            WriteError::Stopped => f.write_str("the state file's writer has stopped"),
        }
    }
}

/// A write in line, its output type out of sight.
trait Job: Send {
    fn name(&self) -> &'static str;
    fn statements(&self) -> usize;
    /// Runs the write, keeping its output until [`Job::answer`].
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, sqlx::Result<()>>;
    /// `Ok`: the last run is committed. Runs the write's hook ([`Write::committed`], or
    /// [`Write::unsure`] after an error) and answers its caller.
    fn answer(self: Box<Self>, outcome: Result<(), WriteError>);
}

struct Pending<W: Write> {
    write: W,
    output: Option<W::Output>,
    answer: oneshot::Sender<Result<W::Output, WriteError>>,
}

impl<W: Write> Job for Pending<W> {
    fn name(&self) -> &'static str {
        self.write.name()
    }

    fn statements(&self) -> usize {
        self.write.statements()
    }

    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            self.output = Some(self.write.run(conn).await?);
            Ok(())
        })
    }

    fn answer(self: Box<Self>, outcome: Result<(), WriteError>) {
        let Pending { write, output, answer } = *self;
        let answered = match (outcome, output) {
            (Ok(()), Some(output)) => {
                write.committed(&output);
                Ok(output)
            }
            (Ok(()), None) => Err(WriteError::Stopped),
            (Err(e), _) => {
                write.unsure();
                Err(e)
            }
        };
        // A caller that went away (cancelled) does not need its answer.
        let _ = answer.send(answered);
    }
}

/// Work that runs in its caller's task and, if the caller goes away before it ends, finishes in a
/// task of its own: a write that began is never stopped between its statement and its hook.
struct Detaching(Option<BoxFuture<'static, ()>>);

impl Future for Detaching {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(work) = self.0.as_mut() else { return std::task::Poll::Ready(()) };
        let done = work.as_mut().poll(cx);
        if done.is_ready() {
            self.0 = None;
        }
        done
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        // Outside a runtime (it is shutting down) there is nothing left to finish it on.
        if let (Some(work), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(work);
        }
    }
}

/// The one writer of a state file. Cheap to clone; its task ends when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Writer {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
}

/// What the callers and the writer's task share.
struct Shared {
    db: SqlitePool,
    /// Held while a write or a group runs and until its callers are answered: the file's writes
    /// never meet each other at its lock (where SQLite's busy handler would make them sleep),
    /// and their hooks run in commit order.
    turn: Arc<tokio::sync::Mutex<()>>,
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
    Write(sqlx::Error),
    /// The commit failed: every write of the group gets this error, its outcome unknown.
    Commit(sqlx::Error),
}

impl Writer {
    /// Starts the writer of `db` (its task in the current tokio runtime).
    pub(crate) fn start(db: SqlitePool) -> Writer {
        let shared = Arc::new(Shared {
            db,
            turn: Arc::new(tokio::sync::Mutex::new(())),
            #[cfg(test)]
            commits: AtomicU64::new(0),
        });
        let (jobs, line) = mpsc::unbounded_channel();
        tokio::spawn(shared.clone().run(line));
        Writer { shared, jobs }
    }

    /// Runs `write` and answers once it is committed: at once (in the caller's task) when the
    /// writer is idle, else in the next group. Once begun, the write runs to its end even if the
    /// caller goes away.
    pub(crate) async fn write<W: Write>(&self, write: W) -> Result<W::Output, WriteError> {
        let (answer, answered) = oneshot::channel();
        let mut job = Box::new(Pending { write, output: None, answer });
        if let Ok(turn) = self.shared.turn.clone().try_lock_owned() {
            let shared = self.shared.clone();
            Detaching(Some(Box::pin(async move {
                let outcome = shared.alone(&mut *job).await;
                job.answer(outcome);
                drop(turn);
            })))
            .await;
        } else {
            self.jobs.send(job).map_err(|_| WriteError::Stopped)?;
        }
        answered.await.map_err(|_| WriteError::Stopped)?
    }

    /// Whether `other` is this file's writer too.
    pub(crate) fn same(&self, other: &Writer) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.shared.commits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Shared {
    /// The writer's task: takes every write waiting, waits for its turn, commits them.
    async fn run(self: Arc<Shared>, mut line: mpsc::UnboundedReceiver<Box<dyn Job>>) {
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
    async fn commit(&self, mut group: Vec<Box<dyn Job>>) {
        if group.len() == 1 {
            let outcome = self.alone(&mut *group[0]).await;
            if let Some(job) = group.pop() {
                job.answer(outcome);
            }
            return;
        }
        match self.together(&mut group).await {
            Ok(()) => {
                for job in group {
                    job.answer(Ok(()));
                }
            }
            Err(Failed::Write(_)) => {
                for mut job in group {
                    let outcome = self.alone(&mut *job).await;
                    job.answer(outcome);
                }
            }
            Err(Failed::Begin(e)) => {
                tracing::warn!(error = %e, writes = group.len(), "a state file's group could not begin");
                let e = WriteError::Sql(Arc::new(e));
                for job in group {
                    job.answer(Err(e.clone()));
                }
            }
            Err(Failed::Commit(e)) => {
                tracing::warn!(error = %e, writes = group.len(), "a state file's commit failed");
                let e = WriteError::Sql(Arc::new(e));
                for job in group {
                    job.answer(Err(e.clone()));
                }
            }
        }
    }

    /// One write alone: as one statement (its own transaction), or in a transaction of its own
    /// when it has more.
    async fn alone(&self, job: &mut (dyn Job + 'static)) -> Result<(), WriteError> {
        if job.statements() > 1 {
            return self.together(&mut [job]).await.map_err(|failed| match failed {
                Failed::Begin(e) | Failed::Write(e) | Failed::Commit(e) => WriteError::Sql(Arc::new(e)),
            });
        }
        let mut conn = self.db.acquire().await.map_err(|e| WriteError::Sql(Arc::new(e)))?;
        job.run(&mut conn).await.map_err(|e| WriteError::Sql(Arc::new(e)))?;
        self.counted();
        Ok(())
    }

    /// Every write of `group` in one transaction.
    async fn together<J: std::ops::DerefMut<Target = dyn Job> + Send>(&self, group: &mut [J]) -> Result<(), Failed> {
        let mut conn = self.db.acquire().await.map_err(Failed::Begin)?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(Failed::Begin)?;
        let mut failed = None;
        for job in group.iter_mut() {
            if let Err(e) = job.run(&mut tx).await {
                tracing::debug!(error = %e, write = job.name(), "a state file write failed; its group runs one by one");
                failed = Some(Failed::Write(e));
                break;
            }
        }
        let failed = match failed {
            None => match tx.commit().await {
                Ok(()) => {
                    self.counted();
                    return Ok(());
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

/// The queue's and the log's writes in one group. Each user's own cases are beside it
/// (`queue/sqlite.rs`); the behaviour every backend keeps is in `tests/`.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::future::join_all;

    use crate::invocation_log::{NewInvocation, Status};
    use crate::state::{State, StateError};

    const MINUTE: Duration = Duration::from_secs(60);

    fn inv(id: &str) -> NewInvocation {
        NewInvocation {
            id: id.into(),
            function: "thumb".into(),
            max_attempts: 3,
            meta: "{}".into(),
            payload: b"request".to_vec(),
            callback: None,
        }
    }

    /// What one write of a group answered, comparable across the two handles.
    #[derive(Debug, PartialEq)]
    enum Got {
        Done,
        Is(bool),
        Started(String, u32),
        Claimed(String),
        Failed(&'static str),
    }

    fn got<T>(r: Result<T, StateError>, ok: impl FnOnce(T) -> Got) -> Got {
        r.map_or_else(|e| Got::Failed(e.code()), ok)
    }

    #[tokio::test]
    async fn log_and_queue_writes_waiting_together_commit_together_each_with_its_own_answer() {
        let dir = std::env::temp_dir().join(format!("pixflow-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let state = State::sqlite(&path).await.unwrap();
        let (log, queue) = (state.invocations(), state.queue("local").await.unwrap());
        let (_, writer) = state.sqlite_parts().unwrap();
        // `late` was started under lease 1.1, then again under 1.2 (the first lease ran out):
        // only 1.2's outcome counts. `queued` waits for its start.
        for id in ["late", "queued", "taken"] {
            log.insert_invocation(&inv(id)).await.unwrap();
        }
        assert!(log.start("late", "1.1").await.unwrap().is_some());
        assert!(log.start("late", "1.2").await.unwrap().is_some());
        queue.enqueue("invocations", "queued", b"queued", Duration::ZERO).await.unwrap();

        // Sent before the writer runs (`join_all` polls each once before it waits): the first
        // finds it idle and runs alone, the others commit together.
        let before = writer.commits();
        let (log, queue) = (&log, &queue);
        let answers = join_all([
            Box::pin(async { got(log.insert_invocation(&inv("new")).await, |()| Got::Done) })
                as std::pin::Pin<Box<dyn Future<Output = Got>>>,
            Box::pin(async {
                let added = queue.enqueue("invocations", "new", b"new", Duration::ZERO).await;
                Got::Is(added.unwrap())
            }),
            // A stale lease's outcome is `false`, the holder's is recorded, in the same group.
            Box::pin(async { got(log.finish("late", "1.1", "stale", b"stale").await, Got::Is) }),
            Box::pin(async { got(log.finish("late", "1.2", "[]", b"result").await, Got::Is) }),
            Box::pin(async { got(log.bury("late", "1.2", "after it finished").await, Got::Is) }),
            Box::pin(async {
                let d = queue.claim("invocations", MINUTE).await.unwrap().unwrap();
                Got::Claimed(d.id)
            }),
            Box::pin(async {
                got(log.start("queued", "2.1").await, |s| {
                    s.map_or(Got::Is(false), |(row, payload)| {
                        assert_eq!(payload, b"request");
                        Got::Started(row.id, row.attempts)
                    })
                })
            }),
            // A statement that fails (the id is taken) fails alone: its group runs again, one
            // write at a time, and the others are committed.
            Box::pin(async { got(log.insert_invocation(&inv("taken")).await, |()| Got::Done) }),
            Box::pin(async { got(log.retry_at("queued", "2.1", "busy", MINUTE).await, Got::Is) }),
            Box::pin(async { got(log.delete_invocation("gone").await, |()| Got::Done) }),
        ])
        .await;
        assert_eq!(
            answers,
            [
                Got::Done,
                Got::Is(true),
                Got::Is(false),
                Got::Is(true),
                Got::Is(false),
                Got::Claimed("queued".into()),
                Got::Started("queued".into(), 1),
                Got::Failed("internal"),
                Got::Is(true),
                Got::Done,
            ]
        );
        // The first alone; the group rolled back at the taken id, then its nine writes one by one
        // (eight committed).
        assert_eq!(writer.commits() - before, 1 + 8);

        // Without the failing write: one commit for the whole group.
        let before = writer.commits();
        let answers = join_all([
            Box::pin(async { got(log.insert_invocation(&inv("first")).await, |()| Got::Done) })
                as std::pin::Pin<Box<dyn Future<Output = Got>>>,
            Box::pin(async { got(log.insert_invocation(&inv("second")).await, |()| Got::Done) }),
            Box::pin(async { Got::Is(queue.enqueue("invocations", "second", b"2", Duration::ZERO).await.unwrap()) }),
            Box::pin(async { got(log.start("second", "3.1").await, |s| Got::Is(s.is_some())) }),
            Box::pin(async { got(log.finish("second", "3.0", "stale", b"").await, Got::Is) }),
            Box::pin(async { got(log.finish("second", "3.1", "[]", b"ok").await, Got::Is) }),
            Box::pin(async { got(log.purge_finished(0).await, |n| Got::Is(n == 0)) }),
        ])
        .await;
        assert_eq!(
            answers,
            [Got::Done, Got::Done, Got::Is(true), Got::Is(true), Got::Is(false), Got::Is(true), Got::Is(true)]
        );
        assert_eq!(writer.commits() - before, 2, "the first write alone, then one commit for the others");
        state.close().await;

        // What was answered as committed is in the file.
        let state = State::sqlite(&path).await.unwrap();
        let log = state.invocations();
        let late = log.get("late").await.unwrap().unwrap();
        assert_eq!((late.status, late.result_meta.as_deref()), (Status::Succeeded, Some("[]")));
        assert_eq!(log.result("late").await.unwrap().unwrap(), b"result");
        let queued = log.get("queued").await.unwrap().unwrap();
        assert_eq!((queued.status, queued.attempts, queued.error.as_deref()), (Status::Queued, 1, Some("busy")));
        assert_eq!(log.get("second").await.unwrap().unwrap().status, Status::Succeeded);
        assert_eq!(log.get("new").await.unwrap().unwrap().status, Status::Queued);
        assert!(log.get("first").await.unwrap().is_some());
        let queue = state.queue("local").await.unwrap();
        assert_eq!(queue.depth("invocations").await.unwrap(), 3, "queued (claimed), new, second");
        state.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
