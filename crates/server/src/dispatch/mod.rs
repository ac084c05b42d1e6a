//! The dispatch layer of asynchronous invocations, from acceptance to outcome, whoever asks
//! (the HTTP API today; triggers and workflows later): the queued request's stored form
//! ([`QueuedMeta`]), recording it in the invocation log and its id in the `invocations` queue,
//! the workers that claim, run and settle it, and the decisions on attempt outcomes.
//!
//! A worker takes the next message of the queue (woken by an enqueue, never polling), starts
//! the invocation in the log under the message's lease, runs it through the same path as a
//! synchronous call (so quotas, queues and node limits apply alike), then records the result,
//! puts it back with exponential backoff (errors a retry can fix: overload, timeouts, internal
//! failures), or dead-letters it (its last attempt failed, or the input itself is wrong, which
//! no retry fixes). The log is written first and the queue message settled after, both only
//! for the lease that holds the message: a consumer whose lease moved on changes neither. Where
//! the log and the queue share a database, the claim and the start are one commit, and so are
//! the outcome and the settlement (decision 022); elsewhere (JetStream) they follow each other.
//! While an attempt runs, a heartbeat renews the lease, so a node that dies leaves its work to
//! other consumers within [`LEASE`] (and its own next start takes it back at once).

mod call;
mod error;
pub(crate) mod spool;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use pixflow_backends::invocation_log::Outcome;
use pixflow_backends::{Delivery, InvocationRow, Lease, Queue, QueueError, Status};
use pixflow_runtime::{Function, Produced};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub(crate) use call::{Call, Destination, Mode, ObjectRef, OutputRequest, Remote, Source, call, rendition_meta};
pub(crate) use error::Error;

use crate::App;
use crate::auth;
use crate::problem::Problem;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The queue of asynchronous invocations; its messages carry an invocation's id.
pub(crate) const QUEUE: &str = "invocations";

/// How long a claim is leased without a heartbeat: the longest a running invocation whose node
/// died waits before another consumer takes it (its own node's next start takes it back at
/// once). A worker renews the lease every third of it while the attempt runs, however long.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

/// How old the queue's depth may be when admission compares it with `max_async_queued`.
const BACKLOG_AGE: Duration = Duration::from_millis(100);

/// Admission's view of the queue's depth: read from the queue at most every [`BACKLOG_AGE`]
/// (on PostgreSQL a count over the waiting messages, on JetStream a round trip), plus what this
/// node accepted since. What other nodes accepted or any node settled meanwhile shows at the
/// next read, so the bound is soft by at most [`BACKLOG_AGE`] of other nodes' acceptances.
#[derive(Default)]
pub(crate) struct Backlog {
    seen: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, u64)>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn depth(&self, queue: &Queue) -> Result<u64, Error> {
        if let Some((at, depth)) = *self.lock()
            && at.elapsed() < BACKLOG_AGE
        {
            return Ok(depth);
        }
        let depth = queue.depth(QUEUE).await?;
        *self.lock() = Some((std::time::Instant::now(), depth));
        Ok(depth)
    }

    fn accepted(&self) {
        if let Some((_, depth)) = self.lock().as_mut() {
            *depth += 1;
        }
    }
}

/// The stored form of a queued request's parameters.
#[derive(Serialize, Deserialize)]
pub(crate) struct QueuedMeta {
    pub mode: Mode,
    #[serde(default)]
    pub content_type: Option<String>,
    pub params: Vec<(String, String)>,
    /// Extra named inputs, base64.
    pub inputs: BTreeMap<String, String>,
    /// The main input, when the node reads it itself (the payload is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_remote: Option<Remote>,
    /// Extra named inputs the node reads itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs_remote: BTreeMap<String, Remote>,
    /// Where the results go (the request's; the manifest's applies when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputRequest>,
    /// The main input, when it was too large to keep in the log (the payload is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_spooled: Option<spool::Spooled>,
    /// Extra named inputs too large to keep in the log.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs_spooled: BTreeMap<String, spool::Spooled>,
}

impl QueuedMeta {
    /// The call again, as it was accepted (spooled inputs read back).
    pub(crate) async fn into_call(self, app: &App, payload: Vec<u8>) -> Result<Call, Error> {
        let mut inputs = BTreeMap::new();
        for (name, b64) in self.inputs {
            let bytes = B64.decode(b64).map_err(|e| Error::Internal(format!("stored input {name}: {e}")))?;
            inputs.insert(name, Source::Inline(bytes));
        }
        for (name, part) in &self.inputs_spooled {
            inputs.insert(name.clone(), Source::Inline(spool::read(app, part).await?));
        }
        inputs.extend(self.inputs_remote.into_iter().map(|(name, r)| (name, Source::Remote(r))));
        let input = match (self.input_remote, &self.input_spooled) {
            (Some(r), _) => Source::Remote(r),
            (None, Some(part)) => Source::Inline(spool::read(app, part).await?),
            (None, None) => Source::Inline(payload),
        };
        let input = Some(input);
        Ok(Call {
            input,
            inputs,
            params: self.params,
            platform: Vec::new(),
            content_type: self.content_type,
            mode: self.mode,
            output: self.output.map_or(Destination::Default, Destination::To),
            background: true,
        })
    }

    /// The keys of its spooled inputs.
    fn spooled_keys(&self) -> impl Iterator<Item = &str> {
        self.input_spooled.iter().chain(self.inputs_spooled.values()).map(|p| p.key.as_str())
    }
}

/// Accepts an asynchronous call: checks what would only fail later, records it in the log
/// and queues its id, which it returns.
pub(crate) async fn accept(app: &App, f: &Function, call: Call, callback: Option<String>) -> Result<String, Error> {
    if app.stopping() {
        return Err(pixflow_runtime::InvokeError::Rejected(pixflow_runtime::Rejected::Closed).into());
    }
    let depth = app.backlog.depth(&app.queue).await?;
    if depth >= app.config.max_async_queued {
        return Err(Error::QueueFull { depth, max: app.config.max_async_queued });
    }
    // Refuse now what would only fail later: parameters, stored inputs and the output.
    if f.processes.is_none() {
        f.pipeline(&call.params)?;
    }
    let id = auth::invocation_id().map_err(|e| Error::Internal(e.to_string()))?;
    let (mut payload, mut input_remote) = (Vec::new(), None);
    match call.input {
        Some(Source::Inline(b) | Source::Read(b)) => payload = b,
        Some(Source::Remote(r)) => {
            r.check(app).await?;
            input_remote = Some(r);
        }
        None => {}
    }
    let (mut inputs, mut inputs_remote, mut large) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (name, source) in call.inputs {
        match source {
            Source::Inline(b) | Source::Read(b) if b.len() > spool::OVER => {
                large.insert(name, b);
            }
            Source::Inline(b) | Source::Read(b) => {
                inputs.insert(name, B64.encode(b));
            }
            Source::Remote(r) => {
                r.check(app).await?;
                inputs_remote.insert(name, r);
            }
        }
    }
    let output = match call.output {
        Destination::To(o) => Some(o),
        Destination::Default => None,
        Destination::Caller => {
            return Err(Error::Invalid("an asynchronous call's results are kept or stored, not answered".into()));
        }
    };
    let mut meta = QueuedMeta {
        mode: call.mode,
        content_type: call.content_type,
        params: call.params,
        inputs,
        input_remote,
        inputs_remote,
        output,
        input_spooled: None,
        inputs_spooled: BTreeMap::new(),
    };
    // What is too large for the log goes to the spool first, so a recorded invocation always
    // finds its parts there.
    let spooled = async {
        if payload.len() > spool::OVER {
            meta.input_spooled = Some(spool::put(app, &id, "input", &payload).await?);
            payload = Vec::new();
        }
        for (n, (name, bytes)) in large.into_iter().enumerate() {
            meta.inputs_spooled.insert(name, spool::put(app, &id, &format!("inputs/{n}"), &bytes).await?);
        }
        Ok::<_, Error>(())
    }
    .await;
    let recorded = match spooled {
        Ok(()) => record(app, f, &id, &meta, payload, callback).await,
        Err(e) => Err(e),
    };
    if let Err(e) = recorded {
        // Not accepted: nothing of it stays (the spool's collection would get what this misses).
        spool::forget(app, meta.spooled_keys()).await;
        return Err(e);
    }
    app.backlog.accepted();
    metrics::counter!("pixflow_async_accepted_total", "function" => f.deployment.name.clone()).increment(1);
    Ok(id)
}

/// Records an accepted invocation in the log and queues its id.
async fn record(
    app: &App,
    f: &Function,
    id: &str,
    meta: &QueuedMeta,
    payload: Vec<u8>,
    callback: Option<String>,
) -> Result<(), Error> {
    let new = pixflow_backends::NewInvocation {
        id: id.to_owned(),
        function: f.deployment.name.clone(),
        max_attempts: f.deployment.retry.attempts,
        meta: serde_json::to_string(meta).map_err(|e| Error::Internal(e.to_string()))?,
        payload,
        callback,
    };
    // One commit where the queue lives in the state's own database (SQLite file, PostgreSQL).
    if let Some(recorded) = app.invocations.insert_queued(&new, &app.queue, QUEUE).await {
        return Ok(recorded?);
    }
    app.invocations.insert_invocation(&new).await?;
    if let Err(e) = app.queue.enqueue(QUEUE, id, id.as_bytes(), Duration::ZERO).await {
        // Not queued, so not accepted: the caller may send it again.
        if let Err(e) = app.invocations.delete_invocation(id).await {
            tracing::error!(%id, error = %e, "forgetting an invocation that could not be queued");
        }
        return Err(e.into());
    }
    Ok(())
}

/// Re-drives a dead-lettered invocation: a fresh set of attempts under a new message. `false`:
/// it was not dead-lettered.
pub(crate) async fn redrive(app: &App, id: &str) -> Result<bool, Error> {
    let Some(message) = app.invocations.redrive(id).await? else {
        return Ok(false);
    };
    // Should this fail, the next start queues it (see [`reconcile`]).
    app.queue.enqueue(QUEUE, &message, id.as_bytes(), Duration::ZERO).await?;
    Ok(true)
}

/// At start, before the workers: takes back what this node's previous run held (at once, not
/// after its leases), and queues every unsettled invocation whose message is missing (a stop
/// between recording and queueing; deduplication makes the others no-ops).
pub(crate) async fn reconcile(app: &App) -> anyhow::Result<()> {
    let released = app.queue.release_held().await?;
    if released > 0 {
        tracing::info!(released, "asynchronous invocations interrupted by a stop are queued again");
    }
    let mut repaired = 0u64;
    for (id, message) in app.invocations.unsettled().await? {
        if app.queue.enqueue(QUEUE, &message, id.as_bytes(), Duration::ZERO).await? {
            repaired += 1;
        }
    }
    if repaired > 0 {
        tracing::warn!(repaired, "recorded asynchronous invocations were missing from the queue; queued");
    }
    Ok(())
}

/// One worker: claims and runs queued invocations until the node stops.
pub(crate) async fn worker(app: Arc<App>) {
    work(app, LEASE).await;
}

/// A worker whose claims are leased for `lease`. It records an attempt's outcome while it
/// claims and runs its next message (under that message's lease heartbeat): each round waits
/// for both, so at most one conclusion per worker is in flight, and a stop still waits for the
/// last one.
async fn work(app: Arc<App>, lease: Duration) {
    let mut concluding: Option<Conclusion> = None;
    loop {
        let previous = async {
            if let Some(c) = concluding.take() {
                c.await;
            }
        };
        // `None`: the node stops. Polled after `previous`, so a conclusion's write is usually
        // asked for before the claim's (both may wait for a connection or a batch).
        let this = async {
            match next(&app, lease).await {
                Ok(None) => None,
                Ok(Some((delivery, started))) => Some(run(&app, delivery, started, lease).await),
                Err(e) => {
                    tracing::error!(error = %e, "claiming queued invocations");
                    tokio::select! {
                        () = app.stopped() => None,
                        () = tokio::time::sleep(Duration::from_secs(1)) => Some(None),
                    }
                }
            }
        };
        let ((), ran) = tokio::join!(previous, this);
        match ran {
            None => return,
            Some(conclusion) => concluding = conclusion,
        }
    }
}

/// The rest of a message's handling once its attempt ended: its outcome recorded, its message
/// settled, then its spooled inputs forgotten or its callback sent.
type Conclusion = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// An invocation started, with its payload, as [`pixflow_backends::InvocationLog::start`]
/// returns it.
type Started = (InvocationRow, Vec<u8>);

/// The next message, and the invocation it names started in the same commit where the log and
/// the queue share a database (`None`: the caller starts it). `None` once the node stops: the
/// stop ends a wait, never a claim in flight, which has counted an attempt where it started
/// the invocation too.
async fn next(app: &App, lease: Duration) -> Result<Option<(Delivery, Option<Started>)>, QueueError> {
    match app.invocations.next_started(&app.queue, QUEUE, lease, app.stopped()).await {
        Some(claimed) => claimed.map(|c| c.map(|c| (c.delivery, c.started))),
        None => tokio::select! {
            () = app.stopped() => Ok(None),
            next = app.queue.next(QUEUE, lease) => next.map(|d| Some((d, None))),
        },
    }
}

/// An error as the invocation log keeps it: as the API will show it (problem JSON).
fn recorded_error(e: Error) -> String {
    serde_json::to_string(&Problem::from(e)).unwrap_or_default()
}

/// Deletes finished invocations past the retention period, and settled queue messages past
/// it, hourly.
pub(crate) async fn retention(app: Arc<App>) {
    while !app.stopping() {
        let keep = app.config.async_retention;
        let before =
            pixflow_backends::state::now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        match app.invocations.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "finished asynchronous invocations past retention deleted"),
            Err(e) => tracing::error!(error = %e, "purging finished invocations"),
        }
        if let Err(e) = app.queue.purge(keep, keep).await {
            tracing::error!(error = %e, "purging settled queue messages");
        }
        match spool::collect(&app, spool::GRACE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "spooled parts of invocations no longer logged deleted"),
            Err(e) => tracing::error!(error = %e, "collecting the spool"),
        }
        tokio::select! {
            () = app.stopped() => {}
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Runs `work` while renewing `held` every third of `lease`. `None`: the message was taken over
/// by another claim (this one's lease ran out unrenewed, the queue out of reach or the node
/// stalled), and `work` was dropped, as the new holder runs the invocation.
async fn with_lease<F: Future>(queue: &Queue, held: &Lease, lease: Duration, work: F) -> Option<F::Output> {
    let heartbeat = async {
        let period = (lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(period).await;
            match queue.extend(held, lease).await {
                Ok(()) => {}
                Err(QueueError::Stale) => return,
                // Renewed at the next beat, if the lease has not run out by then.
                Err(e) => tracing::warn!(lease = %held.token(), error = %e, "renewing an invocation's lease"),
            }
        }
    };
    tokio::select! {
        out = work => Some(out),
        () = heartbeat => None,
    }
}

/// An attempt's end, owned by its [`Conclusion`].
enum Ended {
    Succeeded { meta: String, bytes: Vec<u8> },
    Retry { error: String, delay: Duration },
    Dead { error: String, reason: &'static str },
}

impl Ended {
    fn outcome(&self) -> Outcome<'_> {
        match self {
            Ended::Succeeded { meta, bytes } => Outcome::Succeeded { result_meta: meta, result: bytes },
            Ended::Retry { error, delay } => Outcome::Retry { error, delay: *delay },
            Ended::Dead { error, reason } => Outcome::Dead { error, reason },
        }
    }
}

/// Starts (where the claim did not) and attempts the invocation a message names, and returns
/// what concludes it; `None` when nothing is left to do (the message settled, or left to its
/// lease).
async fn run(app: &Arc<App>, delivery: Delivery, started: Option<Started>, lease: Duration) -> Option<Conclusion> {
    let held = delivery.lease;
    let Ok(id) = String::from_utf8(delivery.payload) else {
        settle_queue(app, &held, Outcome::Dead { error: "", reason: "the message is not an invocation id" }).await;
        return None;
    };
    let (row, payload) = match started {
        Some(started) => started,
        None => match app.invocations.start(&id, &held.token()).await {
            Ok(Some(started)) => started,
            // Settled already (its outcome was recorded, then the node stopped before the
            // message was), or gone: the message is spent.
            Ok(None) => {
                settle_queue(app, &held, SUCCEEDED).await;
                return None;
            }
            // The lease runs out and brings the message back; nothing is lost.
            Err(e) => {
                tracing::error!(%id, error = %e, "starting a queued invocation");
                return None;
            }
        },
    };
    let dead = || metrics::counter!("pixflow_dead_letters_total", "function" => row.function.clone()).increment(1);
    let ended = if row.attempts > row.max_attempts {
        // Its last attempt was lost with its node (stopped while running it, maybe because of
        // it). It is not run again.
        dead();
        let error = Error::Lost;
        let reason = error.code();
        Ended::Dead { error: recorded_error(error), reason }
    } else {
        let Some(outcome) = with_lease(&app.queue, &held, lease, attempt(app, &row, payload)).await else {
            tracing::warn!(%id, function = %row.function, "another claim took this invocation over; attempt given up");
            return None;
        };
        match outcome {
            Ok((meta, bytes)) => Ended::Succeeded { meta, bytes },
            Err(e) => {
                let reason = e.code();
                let retry = if e.retryable() && row.attempts < row.max_attempts {
                    app.registry.get(&row.function).map(|f| f.deployment.retry.delay(row.attempts + 1))
                } else {
                    None
                };
                let error = recorded_error(e);
                match retry {
                    Some(delay) => {
                        metrics::counter!("pixflow_async_retries_total", "function" => row.function.clone())
                            .increment(1);
                        Ended::Retry { error, delay }
                    }
                    _ => {
                        dead();
                        tracing::warn!(%id, function = %row.function, code = reason, "dead-lettered");
                        Ended::Dead { error, reason }
                    }
                }
            }
        }
    };
    let app = app.clone();
    Some(Box::pin(async move { concluded(&app, &id, &held, &row, &ended).await }))
}

/// Records an attempt's end and settles its message ([`conclude`]), then forgets the spooled
/// inputs of a success and sends the completion callback, if one was asked for.
async fn concluded(app: &Arc<App>, id: &str, held: &Lease, row: &InvocationRow, ended: &Ended) {
    match conclude(app, id, held, ended.outcome()).await {
        Ok(Some(succeeded)) => {
            if succeeded {
                // A dead letter keeps its spooled inputs for a re-drive; a success needs them no more.
                if let Ok(meta) = serde_json::from_str::<QueuedMeta>(&row.meta) {
                    spool::forget(app, meta.spooled_keys()).await;
                }
            }
            if row.callback.is_some() {
                notify(app, id).await;
            }
        }
        // Another claim owns the invocation now; its outcome is the one that counts.
        Ok(None) => {
            tracing::warn!(%id, function = %row.function, "another claim took this invocation over; outcome dropped");
        }
        // The lease runs out and brings the message back; nothing is lost.
        Err(e) => tracing::error!(%id, error = %e, "recording an invocation's outcome"),
    }
}

/// A success without result, for settling a spent message.
const SUCCEEDED: Outcome<'static> = Outcome::Succeeded { result_meta: "", result: &[] };

/// Records an attempt's outcome in the log under `held` and, if the log recorded it, settles
/// the message: in one commit where the log and the queue share a database, else one after the
/// other. `Some(succeeded)`: recorded; `None`: the invocation is another lease's now, and
/// neither changed.
async fn conclude(
    app: &App,
    id: &str,
    held: &Lease,
    outcome: Outcome<'_>,
) -> Result<Option<bool>, pixflow_backends::StateError> {
    let succeeded = matches!(outcome, Outcome::Succeeded { .. });
    if let Some(done) = app.invocations.settle(id, held, outcome, &app.queue).await {
        let done = done?;
        if done.recorded && !done.settled {
            tracing::warn!(lease = %held.token(), "an invocation's queue message was taken over after its outcome");
        }
        return Ok(done.recorded.then_some(succeeded));
    }
    let token = held.token();
    let recorded = match outcome {
        Outcome::Succeeded { result_meta, result } => app.invocations.finish(id, &token, result_meta, result).await?,
        Outcome::Retry { error, delay } => app.invocations.retry_at(id, &token, error, delay).await?,
        Outcome::Dead { error, .. } => app.invocations.bury(id, &token, error).await?,
    };
    if !recorded {
        return Ok(None);
    }
    settle_queue(app, held, outcome).await;
    Ok(Some(succeeded))
}

/// Settles the message after the log recorded the outcome. A failure here is harmless: the
/// message comes back when its lease runs out, and the log tells its next consumer it is done.
async fn settle_queue(app: &App, held: &Lease, outcome: Outcome<'_>) {
    let settled = match outcome {
        Outcome::Succeeded { .. } => app.queue.finish(held).await,
        Outcome::Retry { delay, .. } => app.queue.retry(held, delay).await,
        Outcome::Dead { reason, .. } => app.queue.bury(held, reason).await,
    };
    if let Err(e) = settled {
        tracing::warn!(lease = %held.token(), error = %e, "settling an invocation's queue message");
    }
}

/// Sends the completion callback of a finished invocation, if it asked for one.
async fn notify(app: &Arc<App>, id: &str) {
    match app.invocations.get(id).await {
        Ok(Some(row)) if matches!(row.status, Status::Succeeded | Status::Dead) => {
            if let Some(url) = row.callback.clone() {
                crate::callback::send(app, row.id.clone(), url, crate::invocations::describe(&row));
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(%id, error = %e, "reading an invocation for its callback"),
    }
}

/// A result kept in the invocation log: the renditions' metadata, and their bytes back to back.
fn inline_result(produced: Produced) -> (String, Vec<u8>) {
    match produced {
        Produced::Renditions(renditions) => {
            let metas: Vec<Value> = renditions.iter().map(rendition_meta).collect();
            let bytes = renditions.into_iter().flat_map(|r| r.bytes).collect();
            (serde_json::to_string(&metas).unwrap_or_default(), bytes)
        }
        Produced::Reply(reply) => {
            let metas =
                json!([{"content_type": reply.content_type, "size": reply.bytes.len(), "status": reply.status}]);
            (metas.to_string(), reply.bytes)
        }
    }
}

/// Runs one attempt through [`call`], as a synchronous call runs: the result as the log keeps
/// it (the stored objects, else the renditions' metadata and their bytes back to back).
async fn attempt(app: &Arc<App>, row: &InvocationRow, payload: Vec<u8>) -> Result<(String, Vec<u8>), Error> {
    let f = app.registry.get(&row.function).ok_or_else(|| Error::NoFunction(row.function.clone()))?;
    let meta: QueuedMeta =
        serde_json::from_str(&row.meta).map_err(|e| Error::Internal(format!("stored invocation {}: {e}", row.id)))?;
    let call = meta.into_call(app, payload).await?;
    let done = call::call(app, f, call, None, Some(&row.id)).await?;
    match (done.stored, done.output.produced) {
        (Some(objects), _) => Ok((serde_json::to_string(&objects).unwrap_or_default(), Vec::new())),
        // The program answered with an error: its own 5xx may pass on a retry, 4xx not.
        (None, Produced::Reply(reply)) if !(200..300).contains(&reply.status) => {
            let text = String::from_utf8_lossy(&reply.bytes[..reply.bytes.len().min(500)]).into_owned();
            Err(Error::Answered { status: reply.status, text })
        }
        (None, produced) => {
            let (meta, bytes) = inline_result(produced);
            if bytes.len() <= spool::OVER {
                return Ok((meta, bytes));
            }
            // Kept in the spool; the log's empty bytes under non-empty renditions say so.
            spool::put(app, &row.id, &spool::result_part(row.attempts), &bytes).await?;
            Ok((meta, Vec::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::http::StatusCode;
    use pixflow_backends::state::now_ms;

    use super::*;

    /// Polls `done` until it holds, for at most 20 s.
    async fn eventually<F: Future<Output = bool>>(mut done: impl FnMut() -> F) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(Instant::now() < deadline, "not done within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_heartbeat_keeps_the_lease_of_a_long_attempt() {
        let queue = pixflow_backends::State::memory().await.unwrap().queue("local").await.unwrap();
        queue.enqueue(QUEUE, "a", b"a", Duration::ZERO).await.unwrap();
        let lease = Duration::from_millis(1500);
        let claimed = queue.claim(QUEUE, lease).await.unwrap().unwrap();
        let first_end = now_ms() + 1500;
        // An attempt that runs until its first lease is long over.
        let long = eventually(|| async { now_ms() > first_end + 2_000 });
        let out = with_lease(&queue, &claimed.lease, lease, async {
            long.await;
            // Renewed all along: no other claim can take the message.
            queue.claim(QUEUE, lease).await.unwrap().map(|d| d.id)
        })
        .await;
        assert_eq!(out, Some(None), "the message was taken over while its attempt ran");
        queue.finish(&claimed.lease).await.unwrap();
    }

    #[tokio::test]
    async fn an_attempt_whose_message_was_taken_over_is_given_up() {
        let queue = pixflow_backends::State::memory().await.unwrap().queue("local").await.unwrap();
        queue.enqueue(QUEUE, "a", b"a", Duration::ZERO).await.unwrap();
        let lease = Duration::from_millis(150);
        let stale = queue.claim(QUEUE, lease).await.unwrap().unwrap();
        let taker = queue.clone();
        let owner = tokio::spawn(async move {
            // Another run of the node takes the message back and claims it.
            taker.release_held().await.unwrap();
            taker.claim(QUEUE, Duration::from_secs(60)).await.unwrap().unwrap()
        });
        let given_up = tokio::time::timeout(
            Duration::from_secs(20),
            with_lease(&queue, &stale.lease, lease, std::future::pending::<()>()),
        )
        .await
        .unwrap();
        assert_eq!(given_up, None);
        let owner = owner.await.unwrap();
        assert!(matches!(queue.finish(&stale.lease).await, Err(QueueError::Stale)));
        queue.finish(&owner.lease).await.unwrap();
    }

    /// A message that names no invocation is spent (an unknown id) or buried (not an id at
    /// all), never redelivered in a loop.
    #[tokio::test]
    async fn messages_that_name_no_invocation_are_settled() {
        let mut c = crate::Config::new(std::env::temp_dir().join(format!("pixflow-stray-{}", std::process::id())));
        c.in_memory = true;
        c.admin_token = Some("pfx_test-admin-token".into());
        c.async_workers = 1;
        let app = crate::App::start(c, None).await.unwrap().app;
        app.queue.enqueue(QUEUE, "stray", b"0123abcd", Duration::ZERO).await.unwrap();
        app.queue.enqueue(QUEUE, "junk", &[0xff, 0xfe], Duration::ZERO).await.unwrap();
        let queue = app.queue.clone();
        eventually(|| async { queue.depth(QUEUE).await.unwrap() == 0 }).await;
        // Past the deduplication window a finished id is free again and a buried one is not:
        // the unknown id was finished, the bytes that are no id were buried.
        tokio::time::sleep(Duration::from_millis(5)).await;
        queue.purge(Duration::ZERO, Duration::from_secs(3600)).await.unwrap();
        assert!(queue.enqueue(QUEUE, "stray", b"0123abcd", Duration::ZERO).await.unwrap());
        assert!(!queue.enqueue(QUEUE, "junk", &[0xff, 0xfe], Duration::ZERO).await.unwrap());
        app.shutdown().await;
    }

    /// A node's configuration in a fresh folder named after `name` (returned too): a `flip`
    /// function anyone may call, the admin token `pfx_test-admin-token`, no asynchronous worker.
    pub(super) fn flip_node(name: &str) -> (std::path::PathBuf, crate::Config) {
        let dir = std::env::temp_dir().join(format!("pixflow-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("functions")).unwrap();
        std::fs::write(dir.join("functions/flip.yaml"), "name: flip\nversion: '1'\nbuiltin: flip\nauth: none\n")
            .unwrap();
        let mut c = crate::Config::new(dir.join("data"));
        c.functions_dir = Some(dir.join("functions"));
        c.admin_token = Some("pfx_test-admin-token".into());
        c.async_workers = 0;
        (dir, c)
    }

    /// Admission's depth: read once, then this node's acceptances added to it, and read again
    /// once it is older than `BACKLOG_AGE` (what the queue counted meanwhile shows then).
    #[tokio::test]
    async fn admission_counts_its_own_acceptances_and_rereads_the_depth_when_it_is_old() {
        let queue = pixflow_backends::State::memory().await.unwrap().queue("local").await.unwrap();
        let backlog = Backlog::default();
        assert_eq!(backlog.depth(&queue).await.unwrap(), 0);
        for id in ["a", "b", "c"] {
            queue.enqueue(QUEUE, id, id.as_bytes(), Duration::ZERO).await.unwrap();
        }
        backlog.accepted();
        // Fresh: the last read plus this node's acceptance, not the queue's count.
        assert_eq!(backlog.depth(&queue).await.unwrap(), 1);
        tokio::time::sleep(BACKLOG_AGE + Duration::from_millis(20)).await;
        assert_eq!(backlog.depth(&queue).await.unwrap(), 3);
    }

    /// Queued invocations of a function with no free slot wait for one behind synchronous
    /// callers, past the function's queue bound and timeout, without spending attempts; a
    /// synchronous caller meanwhile is neither refused nor put behind them.
    #[tokio::test]
    async fn queued_invocations_wait_for_a_busy_function_without_spending_attempts() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let (dir, mut c) = flip_node("busy");
        std::fs::write(
            dir.join("functions/flip.yaml"),
            "name: flip\nversion: '1'\nbuiltin: flip\nauth: none\n\
             quota: {concurrency: 1, max_queue: 1, timeout: 1s}\nscaling: {min: 1, max: 1}\n\
             retry: {attempts: 3, backoff: 1s}\n",
        )
        .unwrap();
        c.async_workers = 4;
        let app = crate::App::start(c, None).await.unwrap().app;
        let f = app.registry.get("flip").unwrap();
        // The function's one slot is taken (a long synchronous call).
        let held = f.pool.acquire(Duration::from_secs(1)).await.unwrap();
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(4, 4).write_to(&mut png, image::ImageFormat::Png).unwrap();
        let png = png.into_inner();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let req = axum::http::Request::post("/v1/functions/flip/invoke")
                .header("prefer", "respond-async")
                .body(axum::body::Body::from(png.clone()))
                .unwrap();
            let resp = crate::router(app.clone()).oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            ids.push(body["id"].as_str().unwrap().to_owned());
        }
        let pool = f.pool.clone();
        eventually(|| async { pool.stats().queued == 4 }).await;
        // More than the queue bound wait, and a caller would still be let in line.
        assert_eq!(f.pool.refusal(), None);
        // Longer than the function's timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(f.pool.stats().queued, 4);
        drop(held);
        let log = app.invocations.clone();
        for id in &ids {
            eventually(|| async { log.get(id).await.unwrap().unwrap().status == Status::Succeeded }).await;
            assert_eq!(log.get(id).await.unwrap().unwrap().attempts, 1);
        }
        app.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A node killed while running an invocation (its claim's lease still far from over) runs it
    /// again as soon as it starts.
    #[tokio::test]
    async fn a_restarted_node_reruns_its_interrupted_invocations_at_once() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let (dir, mut c) = flip_node("interrupted");
        let app = crate::App::start(c.clone(), None).await.unwrap().app;
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(4, 4).write_to(&mut png, image::ImageFormat::Png).unwrap();
        let req = axum::http::Request::post("/v1/functions/flip/invoke")
            .header("prefer", "respond-async")
            .body(axum::body::Body::from(png.into_inner()))
            .unwrap();
        let resp = crate::router(app.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let id = body["id"].as_str().unwrap().to_owned();
        // A worker claims it for an hour and starts it, and the node dies.
        let d = app.queue.claim(QUEUE, Duration::from_secs(3600)).await.unwrap().unwrap();
        app.invocations.start(&id, &d.lease.token()).await.unwrap().unwrap();
        app.shutdown().await;
        c.async_workers = 1;
        let app = crate::App::start(c, None).await.unwrap().app;
        let log = app.invocations.clone();
        eventually(|| async { log.get(&id).await.unwrap().unwrap().status == Status::Succeeded }).await;
        assert_eq!(log.get(&id).await.unwrap().unwrap().attempts, 2);
        app.shutdown().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
