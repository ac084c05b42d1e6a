//! The health of the backends the node needs while it runs: the state store (catalogue and
//! invocation log), the queue and the object store (an S3 service; the embedded store is the
//! node's own files and always answers). A probe, one of the supervised background loops, pings each
//! every second, and at once when a request has just failed on one, and keeps whether it is up,
//! since when, and the last error. `/readyz` answers `503 backend_unavailable` while one is down
//! (so a load balancer sends work elsewhere), `/metrics` shows `pixflow_backend_up{backend}`.
//!
//! Nothing here mends a backend: requests that need a lost one answer 503 themselves
//! (`state_unavailable`, `queue_unavailable`), the clients reconnect by themselves (the sqlx
//! pool, the NATS client, the PostgreSQL listeners), and the probe's next round after that turns
//! readiness green again (decision 019).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::App;

/// How often the probe pings each backend.
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

/// A ping that takes longer counts as a failure: an unreachable server often does not refuse
/// but lets the client wait (the pool up to its acquire timeout, JetStream up to its own).
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the node depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// The catalogue and the invocation log.
    State,
    /// The queues (in the state's database, or NATS JetStream).
    Queue,
    /// The object store (embedded, or an S3 service).
    Objects,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::State => "state",
            Backend::Queue => "queue",
            Backend::Objects => "objects",
        }
    }
}

/// One backend's status, as the probe last found it.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub backend: Backend,
    /// What it runs on: `sqlite`, `postgres`, `nats`, `embedded` or `s3`.
    pub kind: &'static str,
    pub up: bool,
    /// When it last went up or down (the node's start, until it changes).
    pub since: Instant,
    /// Why the last failed ping failed (kept after it is back, for the log).
    pub last_error: Option<String>,
}

/// The backends' statuses.
pub(crate) struct Health {
    statuses: Mutex<[Status; 3]>,
    /// Probe rounds completed (tests wait for one).
    rounds: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wakes every probe of the process: a request just failed on a backend. (Cheap for a node, the
/// only app in its process; a test process with several nodes pings a few more times.)
static SUSPECT: Notify = Notify::const_new();

/// A request failed because a backend was out of reach: look now rather than at the next round.
pub(crate) fn suspect() {
    SUSPECT.notify_waiters();
}

impl Health {
    /// All up since now (the node just opened them).
    pub(crate) fn new(state_kind: &'static str, queue_kind: &'static str, objects_kind: &'static str) -> Health {
        let now = Instant::now();
        let status = |backend, kind| Status { backend, kind, up: true, since: now, last_error: None };
        for backend in [Backend::State, Backend::Queue, Backend::Objects] {
            metrics::gauge!("pixflow_backend_up", "backend" => backend.name()).set(1.0);
        }
        Health {
            statuses: Mutex::new([
                status(Backend::State, state_kind),
                status(Backend::Queue, queue_kind),
                status(Backend::Objects, objects_kind),
            ]),
            rounds: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Every backend's status.
    pub(crate) fn statuses(&self) -> Vec<Status> {
        lock(&self.statuses).to_vec()
    }

    /// The backends that are down.
    pub(crate) fn down(&self) -> Vec<Status> {
        lock(&self.statuses).iter().filter(|s| !s.up).cloned().collect()
    }

    pub(crate) fn is_up(&self, backend: Backend) -> bool {
        lock(&self.statuses).iter().any(|s| s.backend == backend && s.up)
    }

    /// Records a ping's outcome, logging a change.
    fn record(&self, backend: Backend, outcome: Result<(), String>) {
        let mut statuses = lock(&self.statuses);
        let Some(status) = statuses.iter_mut().find(|s| s.backend == backend) else { return };
        let (name, kind) = (backend.name(), status.kind);
        match outcome {
            Ok(()) if !status.up => {
                tracing::info!(backend = name, kind, down_for = ?status.since.elapsed(), "backend reachable again; ready");
                status.up = true;
                status.since = Instant::now();
            }
            Ok(()) => {}
            Err(error) => {
                if status.up {
                    tracing::warn!(backend = name, kind, %error, "backend out of reach; not ready until it answers");
                    status.up = false;
                    status.since = Instant::now();
                }
                status.last_error = Some(error);
            }
        }
        metrics::gauge!("pixflow_backend_up", "backend" => name).set(if status.up { 1.0 } else { 0.0 });
    }

    /// Waits until the probe has completed `n` rounds in all.
    #[cfg(test)]
    pub(crate) async fn rounds(&self, n: u64) {
        let mut rounds = self.rounds.subscribe();
        let _ = rounds.wait_for(|done| *done >= n).await;
    }
}

/// `ping`, or why it failed (its error, or that it took too long).
async fn ping<E: std::fmt::Display>(ping: impl Future<Output = Result<(), E>>) -> Result<(), String> {
    match tokio::time::timeout(PING_TIMEOUT, ping).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", PING_TIMEOUT.as_secs())),
    }
}

/// The probe: pings the state store, the queue and the object store every [`PERIOD`] (all at
/// once, so one that hangs does not delay the others), and at once when a request suspects one, until the node stops.
pub(crate) async fn probe(app: Arc<App>) {
    loop {
        // Registered before the round, so a request failing during it brings the next one forward.
        let suspected = SUSPECT.notified();
        tokio::pin!(suspected);
        suspected.as_mut().enable();
        let state = async {
            ping(app.catalogue.ping()).await?;
            ping(app.invocations.ping()).await
        };
        let (state, queue, objects) = tokio::join!(state, ping(app.queue.ping()), ping(app.objects.ping()));
        app.health.record(Backend::State, state);
        app.health.record(Backend::Queue, queue);
        app.health.record(Backend::Objects, objects);
        app.health.rounds.send_modify(|n| *n += 1);
        // While one is down the period is the pace: a failing request tells nothing new.
        let everything_up = app.health.down().is_empty();
        tokio::select! {
            () = app.stopped() => return,
            () = tokio::time::sleep(PERIOD) => {}
            () = &mut suspected, if everything_up => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::State;
    use axum::http::StatusCode;
    use http_body_util::BodyExt;

    use super::*;
    use crate::Config;

    #[tokio::test]
    async fn the_embedded_state_and_queue_keep_readiness_green() {
        let dir = std::env::temp_dir().join(format!("pixflow-health-{}", std::process::id()));
        let mut config = Config::new(&dir);
        config.in_memory = true;
        config.async_workers = 1;
        let app = App::start(config, None).await.unwrap().app;
        // A few rounds of the probe (a request that failed would bring one forward too).
        suspect();
        app.health.rounds(3).await;
        let statuses = app.health.statuses();
        assert!(statuses.iter().all(|s| s.up && s.last_error.is_none()), "{statuses:?}");
        assert_eq!(
            statuses.iter().map(|s| (s.backend.name(), s.kind)).collect::<Vec<_>>(),
            [("state", "sqlite"), ("queue", "sqlite"), ("objects", "embedded")]
        );
        let ready = crate::readyz(State(app.clone())).await;
        assert_eq!(ready.status(), StatusCode::OK);
        let body: serde_json::Value =
            serde_json::from_slice(&ready.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["backends"]["state"]["up"], true, "{body}");
        assert_eq!(body["backends"]["queue"]["kind"], "sqlite", "{body}");
        // The probe is one of the supervised loops.
        assert!(app.loops.health().iter().any(|l| l.name == "backend-probe" && l.running));
        app.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_ping_turns_the_backend_down_until_one_succeeds() {
        let health = Health::new("postgres", "nats", "s3");
        health.record(Backend::Queue, Err("not connected to the NATS server".into()));
        let down = health.down();
        assert_eq!(down.len(), 1);
        assert_eq!((down[0].backend, down[0].kind), (Backend::Queue, "nats"));
        assert!(health.is_up(Backend::State) && !health.is_up(Backend::Queue));
        // Still down: the last error is kept, the time it went down is not moved.
        let since = down[0].since;
        health.record(Backend::Queue, Err("no answer within 2 s".into()));
        let down = health.down();
        assert_eq!((down[0].since, down[0].last_error.as_deref()), (since, Some("no answer within 2 s")));
        health.record(Backend::Queue, Ok(()));
        assert!(health.down().is_empty());
    }
}
