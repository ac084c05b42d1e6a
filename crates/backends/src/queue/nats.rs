//! The queue in NATS JetStream (cargo feature `nats`), shared by every node on the same
//! server or cluster. Each queue is a work-queue stream (`PIXFLOW_Q_<queue>`, subject
//! `pixflow.q.<queue>`) with one durable pull consumer (`workers`, explicit acks) that all
//! nodes share; a message leaves the stream when it is acked or terminated. A namespace
//! ([`NatsOptions::namespace`]) keeps one deployment's streams, subjects and lease bucket apart
//! from another's on the same server: `PIXFLOW-<ns>_Q_<queue>`, `pixflow-<ns>.q.<queue>`,
//! `PIXFLOW-<ns>_DEAD`, `pixflow-<ns>_leases`.
//!
//! How the contract maps onto JetStream:
//! - Deduplication: the id is the `Nats-Msg-Id` header; the stream's duplicate window
//!   ([`NatsOptions::duplicate_window`]) counts from the first publish, not from settling.
//! - Delayed messages: a `Pixflow-Not-Before` header; a claim that meets one early gives it back
//!   with a negative ack delayed to that time (the server redelivers it then; no attempt counted).
//! - Leases: the consumer's `AckWait` ([`NatsOptions::ack_wait`]) is every lease's length; a
//!   heartbeat's in-progress ack restarts it. A claim asking for a shorter lease gets `AckWait`.
//! - Fencing: JetStream accepts an ack from any holder of the ack subject, so the node keeps
//!   each leased message's lease entry in a key-value bucket (`pixflow_leases`), written with a
//!   compare-and-set at every claim; the entry's revision is the fence. A message's first
//!   delivery creates its entry in one round trip (no entry can exist yet); a redelivery reads
//!   the entry and replaces it. `finish` deletes the entry only at the lease's revision (one
//!   round trip that is both the check and the release), then acks; a heartbeat, `retry` or
//!   `bury` reads the entry first. A settlement or heartbeat whose fence is not the current one
//!   is refused before it reaches the server. (A redelivery in the moment between that check
//!   and the ack can still let an old holder's ack through; the invocation log's own lease
//!   check refuses that holder's outcome.)
//! - Waiting: a pull request that the server holds open until a message arrives. A pull request
//!   goes with the connection it was sent on: when the client connects again after losing the
//!   server, every waiting consumer asks again at once (not after its request's expiry).
//! - Retry: a negative ack with the delay. Bury: the message is copied to the dead-letter
//!   stream `PIXFLOW_DEAD` (subject `pixflow.dead.<queue>`, with its reason) and terminated.
//! - A node's own leases after a restart: the lease entries name their holder and ack subject,
//!   so [`super::Queue::release_held`] sends each a negative ack, and the server redelivers them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Backend, Delivery, Lease, QueueError, QueueStats, Result};
use crate::state::now_ms;

const NOT_BEFORE: &str = "Pixflow-Not-Before";
const CONSUMER: &str = "workers";
/// The longest a request to the server (JetStream's API, a publish's ack, an ack's confirmation)
/// waits for its answer: a caller learns within seconds that the server is out of reach.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the JetStream queues.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// How long a claim holds a message without a heartbeat (the consumers' `AckWait`).
    pub ack_wait: Duration,
    /// How long a deduplication id is remembered after its first publish.
    pub duplicate_window: Duration,
    /// How long dead letters stay in `PIXFLOW_DEAD`.
    pub keep_dead: Duration,
    /// Keeps this deployment's streams, subjects and lease bucket apart from other
    /// deployments' on the same server (see [`super::check_namespace`]); every node sharing a
    /// state uses the same. `None`: the `PIXFLOW_...` names.
    pub namespace: Option<String>,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(3600),
            keep_dead: Duration::from_secs(7 * 24 * 3600),
            namespace: None,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// What the lease bucket holds for a leased message (the entry's revision is its fence).
#[derive(Serialize, Deserialize)]
struct Held {
    /// Claims of the message so far, this one included (entries written before the revision
    /// became the fence counted claims as `fence`).
    #[serde(alias = "fence")]
    attempt: i64,
    holder: String,
    reply: String,
}

pub(crate) struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    leases: kv::Store,
    options: NatsOptions,
    names: Names,
    /// Each queue's consumer, made (with its stream) at first use.
    consumers: tokio::sync::Mutex<HashMap<String, consumer::PullConsumer>>,
    /// Bumped whenever the client connects again: pull requests sent before are gone with the
    /// connection they went on.
    connected: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The names of one deployment's streams, subjects and lease bucket: rooted at `PIXFLOW` and
/// `pixflow`, or at `PIXFLOW-<ns>` and `pixflow-<ns>` in a namespace. A namespace has no `_`
/// or `.`, so the root ends at the first of them and no two roots share a name.
struct Names {
    streams: String,
    subjects: String,
}

impl Names {
    fn new(namespace: Option<&str>) -> Names {
        match namespace {
            None => Names { streams: "PIXFLOW".to_owned(), subjects: "pixflow".to_owned() },
            Some(ns) => Names { streams: format!("PIXFLOW-{ns}"), subjects: format!("pixflow-{ns}") },
        }
    }

    fn stream(&self, queue: &str) -> String {
        format!("{}_Q_{queue}", self.streams)
    }

    fn subject(&self, queue: &str) -> String {
        format!("{}.q.{queue}", self.subjects)
    }

    fn dead_stream(&self) -> String {
        format!("{}_DEAD", self.streams)
    }

    fn dead_subject(&self, queue: &str) -> String {
        format!("{}.dead.{queue}", self.subjects)
    }

    fn leases(&self) -> String {
        format!("{}_leases", self.subjects)
    }
}

fn lease_key(queue: &str, seq: i64) -> String {
    format!("{queue}.{seq}")
}

impl NatsQueue {
    pub(crate) async fn connect(url: &str, options: NatsOptions) -> Result<NatsQueue> {
        if let Some(ns) = &options.namespace {
            super::check_namespace(ns)?;
        }
        let names = Names::new(options.namespace.as_deref());
        let (dead, leases) = (names.dead_stream(), names.leases());
        let connected = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (bump, first) = (connected.clone(), Arc::new(std::sync::atomic::AtomicBool::new(true)));
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .name("pixflow")
            // The client reconnects by itself, forever, with backoff (up to 4 s between tries).
            .event_callback(move |event| {
                let (bump, first) = (bump.clone(), first.clone());
                async move {
                    match event {
                        // The first connection has no waiting consumer to tell.
                        async_nats::Event::Connected if first.swap(false, std::sync::atomic::Ordering::AcqRel) => {}
                        async_nats::Event::Connected => {
                            tracing::info!("connected to the NATS server again");
                            bump.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("lost the NATS server; reconnecting");
                        }
                        other => tracing::debug!(event = %other, "NATS client"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        js.get_or_create_stream(stream::Config {
            name: dead.clone(),
            subjects: vec![names.dead_subject(">")],
            max_age: options.keep_dead,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(format!("the dead-letter stream {dead}: {e}")))?;
        // The bucket's stream made the way key-value buckets are (one value per key, rollups,
        // direct gets): the client's own bucket creation first asks for the account's limits
        // in a form servers before 2.10 do not answer.
        js.get_or_create_stream(stream::Config {
            name: format!("KV_{leases}"),
            subjects: vec![format!("$KV.{leases}.>")],
            max_messages_per_subject: 1,
            // Entries of messages settled by a node that stopped before deleting them.
            max_age: options.keep_dead,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(format!("the lease bucket {leases}: {e}")))?;
        let bucket =
            js.get_key_value(&leases).await.map_err(|e| unavailable(format!("the lease bucket {leases}: {e}")))?;
        Ok(NatsQueue {
            client,
            js,
            leases: bucket,
            options,
            names,
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            connected,
        })
    }

    /// Fails at once while the client has no connection (it is reconnecting), rather than letting
    /// a request wait for one until its timeout.
    fn reachable(&self) -> Result<()> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(QueueError::Unavailable("not connected to the NATS server (reconnecting)".into()))
        }
    }

    async fn consumer(&self, queue: &str) -> Result<consumer::PullConsumer> {
        self.reachable()?;
        let mut all = self.consumers.lock().await;
        if let Some(c) = all.get(queue) {
            return Ok(c.clone());
        }
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.names.stream(queue),
                subjects: vec![self.names.subject(queue)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: self.options.duplicate_window,
                max_message_size: i32::try_from(super::MAX_MESSAGE + 4096).unwrap_or(i32::MAX),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let c = stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        all.insert(queue.to_owned(), c.clone());
        Ok(c)
    }

    /// Takes `msg` as a claim, or gives it back when it is not due yet (`None`).
    async fn take(&self, queue: &str, msg: jetstream::Message, holder: &str) -> Result<Option<Delivery>> {
        let now = now_ms();
        let not_before =
            msg.headers.as_ref().and_then(|h| h.get(NOT_BEFORE)).and_then(|v| v.as_str().parse::<i64>().ok());
        if let Some(due) = not_before.filter(|due| *due > now) {
            let delay = Duration::from_millis(u64::try_from(due - now).unwrap_or(0));
            msg.ack_with(jetstream::AckKind::Nak(Some(delay))).await.map_err(unavailable)?;
            return Ok(None);
        }
        let (seq, published) = {
            let info = msg.info().map_err(unavailable)?;
            (i64::try_from(info.stream_sequence).unwrap_or(i64::MAX), info.published)
        };
        let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else {
            return Err(QueueError::Unavailable("a JetStream message without an ack subject".into()));
        };
        let key = lease_key(queue, seq);
        let first = msg.info().map_err(unavailable)?.delivered == 1;
        let (attempt, fence) = match self.lease(&key, first, holder, &reply).await {
            Ok(lease) => lease,
            Err(e) => {
                // Another claim raced this one for the lease entry: give the delivery back.
                let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                return Err(e);
            }
        };
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        Ok(Some(Delivery {
            id,
            payload: msg.payload.to_vec(),
            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
            enqueued_ms: i64::try_from(published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            lease: Lease {
                queue: queue.to_owned(),
                message: seq,
                fence: i64::try_from(fence).unwrap_or(i64::MAX),
                reply: Some(reply),
            },
        }))
    }

    /// Writes a claim's lease entry for the message under `key`: `(attempt, fence)`, the fence
    /// being the entry's new revision. `first`: the message's first delivery, whose entry no
    /// claim can have written, so it is created at once (one round trip); otherwise, or when an
    /// entry is there after all (a queue removed and made again numbers its messages anew), the
    /// entry is read and replaced at its revision.
    async fn lease(&self, key: &str, first: bool, holder: &str, reply: &str) -> Result<(i64, u64)> {
        let held = |attempt: i64| {
            serde_json::to_vec(&Held { attempt, holder: holder.to_owned(), reply: reply.to_owned() })
                .map(Bytes::from)
                .map_err(unavailable)
        };
        if first && let Ok(revision) = self.leases.update(key, held(1)?, 0).await {
            return Ok((1, revision));
        }
        let entry = self.leases.entry(key).await.map_err(unavailable)?;
        let previous = entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice::<Held>(&e.value).ok());
        let attempt = previous.map_or(1, |h| h.attempt + 1);
        let revision = entry.map_or(0, |e| e.revision);
        let written = self.leases.update(key, held(attempt)?, revision).await.map_err(unavailable)?;
        Ok((attempt, written))
    }

    /// The lease entry's key of `lease`, if `lease` still holds its message.
    async fn holding(&self, lease: &Lease) -> Result<String> {
        self.reachable()?;
        let key = lease_key(&lease.queue, lease.message);
        let entry = self.leases.entry(key.as_str()).await.map_err(unavailable)?.ok_or(QueueError::Stale)?;
        if entry.operation != kv::Operation::Put || entry.revision != lease.fence() {
            return Err(QueueError::Stale);
        }
        Ok(key)
    }

    /// Sends `ack` for the message and waits for the server's confirmation.
    async fn acknowledge(&self, lease: &Lease, ack: jetstream::AckKind) -> Result<()> {
        let reply = lease.reply.clone().ok_or(QueueError::Stale)?;
        self.client.request(reply, ack.into()).await.map_err(unavailable)?;
        Ok(())
    }

    /// Settles `lease` with `ack`: deletes its lease entry at the lease's revision (refused when
    /// another claim wrote the entry since: stale), then acks.
    async fn settle(&self, lease: &Lease, ack: jetstream::AckKind) -> Result<()> {
        self.reachable()?;
        let key = lease_key(&lease.queue, lease.message);
        if let Err(e) = self.leases.delete_expect_revision(key.as_str(), Some(lease.fence())).await {
            // Refused, or the server did not answer: a look tells which.
            self.holding(lease).await?;
            return Err(unavailable(e));
        }
        self.acknowledge(lease, ack).await
    }
}

#[async_trait]
impl Backend for NatsQueue {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn ping(&self) -> Result<()> {
        self.reachable()?;
        // A JetStream request, not only the connection: the stream info of the dead letters.
        self.js.get_stream(self.names.dead_stream()).await.map_err(unavailable)?;
        Ok(())
    }

    async fn remove(&self, queue: &str) -> Result<()> {
        self.reachable()?;
        self.consumers.lock().await.remove(queue);
        match self.js.delete_stream(self.names.stream(queue)).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn enqueue(&self, queue: &str, id: &str, payload: &[u8], delay: Duration) -> Result<bool> {
        self.consumer(queue).await?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        if !delay.is_zero() {
            let due = now_ms().saturating_add(super::millis(delay));
            headers.insert(NOT_BEFORE, due.to_string().as_str());
        }
        let ack = self
            .js
            .publish_with_headers(self.names.subject(queue), headers, Bytes::copy_from_slice(payload))
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(!ack.duplicate)
    }

    async fn claim(&self, queue: &str, _lease: Duration, holder: &str) -> Result<Option<Delivery>> {
        let consumer = self.consumer(queue).await?;
        // Messages met before their time go back; a few of them in a row end the look.
        for _ in 0..16 {
            let mut batch = consumer.fetch().max_messages(1).messages().await.map_err(unavailable)?;
            let Some(msg) = batch.next().await else {
                return Ok(None);
            };
            if let Some(d) = self.take(queue, msg.map_err(unavailable)?, holder).await? {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    fn waits(&self) -> bool {
        true
    }

    async fn claim_waiting(
        &self,
        queue: &str,
        _lease: Duration,
        holder: &str,
        max: Duration,
    ) -> Result<Option<Delivery>> {
        let consumer = self.consumer(queue).await?;
        let end = tokio::time::Instant::now() + max;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if left < Duration::from_millis(10) {
                return Ok(None);
            }
            // Subscribed before the request goes out, so a reconnect after it is seen.
            let mut connected = self.connected.subscribe();
            self.reachable()?;
            let mut batch = consumer.batch().max_messages(1).expires(left).messages().await.map_err(unavailable)?;
            let next = tokio::select! {
                next = batch.next() => next,
                // The request went with the lost connection: ask again on the new one.
                Ok(()) = connected.changed() => continue,
            };
            match next {
                None => return Ok(None),
                Some(msg) => {
                    if let Some(d) = self.take(queue, msg.map_err(unavailable)?, holder).await? {
                        return Ok(Some(d));
                    }
                }
            }
        }
    }

    async fn next_due_ms(&self, _queue: &str) -> Result<Option<i64>> {
        Ok(None)
    }

    async fn extend(&self, lease: &Lease, _by: Duration) -> Result<()> {
        self.holding(lease).await?;
        self.acknowledge(lease, jetstream::AckKind::Progress).await
    }

    async fn finish(&self, lease: &Lease) -> Result<()> {
        self.settle(lease, jetstream::AckKind::Ack).await
    }

    async fn retry(&self, lease: &Lease, delay: Duration) -> Result<()> {
        let ack = jetstream::AckKind::Nak((!delay.is_zero()).then_some(delay));
        self.holding(lease).await?;
        self.acknowledge(lease, ack).await
    }

    async fn bury(&self, lease: &Lease, reason: &str) -> Result<()> {
        self.holding(lease).await?;
        let stream = self.js.get_stream(self.names.stream(&lease.queue)).await.map_err(unavailable)?;
        let original = stream.get_raw_message(u64::try_from(lease.message).unwrap_or(0)).await.map_err(unavailable)?;
        let mut headers = original.headers.clone();
        headers.insert(
            "Pixflow-Reason",
            reason.chars().filter(|c| !c.is_control()).take(500).collect::<String>().as_str(),
        );
        headers.insert("Pixflow-Queue", lease.queue.as_str());
        // Not deduplicated against the live queue's ids.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("dead.{}.{}", lease.queue, lease.message).as_str());
        self.js
            .publish_with_headers(self.names.dead_subject(&lease.queue), headers, original.payload.clone())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        self.settle(lease, jetstream::AckKind::Term).await
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        let mut consumer = self.consumer(queue).await?;
        let leased = consumer.info().await.map_err(unavailable)?.num_ack_pending;
        // The stream's info comes with it (no second request).
        let stream = self.js.get_stream(self.names.stream(queue)).await.map_err(unavailable)?;
        let state = stream.cached_info().state.clone();
        let oldest_age = if state.messages == 0 {
            Duration::ZERO
        } else {
            let first = stream.get_raw_message(state.first_sequence).await.map_err(unavailable)?;
            let ms = i64::try_from(first.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            super::span_ms(ms, now_ms())
        };
        Ok(QueueStats { depth: state.messages, leased: u64::try_from(leased).unwrap_or(0), oldest_age })
    }

    async fn depth(&self, queue: &str) -> Result<u64> {
        // Settled messages leave a work-queue stream, so its count is the depth: one request.
        self.consumer(queue).await?;
        let stream = self.js.get_stream(self.names.stream(queue)).await.map_err(unavailable)?;
        Ok(stream.cached_info().state.messages)
    }

    async fn release(&self, holder: &str) -> Result<u64> {
        self.reachable()?;
        let mut keys = self.leases.keys().await.map_err(unavailable)?;
        let mut released = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(unavailable)?;
            let Some(entry) = self.leases.entry(key.as_str()).await.map_err(unavailable)? else { continue };
            let Ok(held) = serde_json::from_slice::<Held>(&entry.value) else { continue };
            if held.holder == holder {
                // Redelivered at once; its next claim raises the fence.
                self.client.publish(held.reply, jetstream::AckKind::Nak(None).into()).await.map_err(unavailable)?;
                released += 1;
            }
        }
        self.client.flush().await.map_err(unavailable)?;
        Ok(released)
    }

    async fn purge(&self, _done_before_ms: i64, _dead_before_ms: i64) -> Result<u64> {
        // Settled messages leave the stream when acked; dead letters and lease entries expire
        // by their streams' age limits.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{MAX_NAMESPACE, check_namespace};

    fn all(names: &Names) -> Vec<String> {
        vec![names.stream("invocations"), names.subject("invocations"), names.dead_stream(), names.leases()]
    }

    #[test]
    fn a_namespace_gives_names_of_its_own_and_none_keeps_the_old_ones() {
        // Deployments from before namespaces keep their streams, messages and leases.
        assert_eq!(
            all(&Names::new(None)),
            ["PIXFLOW_Q_invocations", "pixflow.q.invocations", "PIXFLOW_DEAD", "pixflow_leases"]
        );
        assert_eq!(
            all(&Names::new(Some("staging"))),
            [
                "PIXFLOW-staging_Q_invocations",
                "pixflow-staging.q.invocations",
                "PIXFLOW-staging_DEAD",
                "pixflow-staging_leases"
            ]
        );
        assert_eq!(Names::new(Some("staging")).dead_subject(">"), "pixflow-staging.dead.>");
        // No name of one namespace is a name of another, or of none, whatever the queues (the
        // root ends at the first `_` or `.`, which a namespace never holds).
        let (a, b, none) = (Names::new(Some("a")), Names::new(Some("a-q")), Names::new(None));
        let queues = ["q", "q-q", "a-q", "q_q", "q_invocations"];
        for (x, y) in [(&a, &b), (&a, &none), (&b, &none)] {
            for (q1, q2) in queues.iter().flat_map(|q1| queues.iter().map(move |q2| (q1, q2))) {
                assert_ne!(x.stream(q1), y.stream(q2));
                assert_ne!(x.subject(q1), y.subject(q2));
                assert_ne!(x.dead_subject(q1), y.dead_subject(q2));
                assert_ne!(x.stream(q1), y.dead_stream());
            }
            assert_ne!(x.dead_stream(), y.dead_stream());
            assert_ne!(x.leases(), y.leases());
        }
        for bad in ["", "Staging", "a_b", "a.b", "a b", "*", ">", &"x".repeat(MAX_NAMESPACE + 1)] {
            assert!(matches!(check_namespace(bad), Err(QueueError::InvalidNamespace(_))), "{bad:?}");
        }
        check_namespace(&"x".repeat(MAX_NAMESPACE)).unwrap();
    }
}
