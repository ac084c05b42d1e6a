//! The one way the node runs its background loops (queue workers, feed followers, retention):
//! each runs in a task of its own, watched by a supervisor task that starts it again after a
//! panic (or an unexpected return) with exponential backoff, counts the restarts, and reports
//! the loop's health to `/readyz`. At shutdown the loops, told to stop by the node's stop
//! signal, are awaited in the order they were started, under one deadline; what is still
//! running then is aborted.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// The first pause before a restart; it doubles with each failure in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A run this long counts as healthy: the next failure starts again from the first pause.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What `/readyz` says about one loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoopHealth {
    pub name: &'static str,
    /// `false` while it waits to be started again after a failure.
    pub running: bool,
    pub restarts: u64,
    /// What ended its last run, if it failed.
    pub last_failure: Option<String>,
}

struct Watched {
    name: &'static str,
    running: AtomicBool,
    restarts: AtomicU64,
    last_failure: Mutex<Option<String>>,
    /// The current run's task, so a shutdown past its deadline can abort it.
    run: Mutex<Option<AbortHandle>>,
}

struct Entry {
    watched: Arc<Watched>,
    supervisor: JoinHandle<()>,
}

/// The node's background loops.
pub(crate) struct Supervisor {
    stop: CancellationToken,
    first_backoff: Duration,
    loops: Mutex<Vec<Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(e) => e.to_string(),
    }
}

impl Supervisor {
    /// Loops stop when `stop` is cancelled (they watch it themselves, through the node).
    pub(crate) fn new(stop: CancellationToken) -> Supervisor {
        Supervisor { stop, first_backoff: FIRST_BACKOFF, loops: Mutex::new(Vec::new()) }
    }

    #[cfg(test)]
    fn with_backoff(mut self, first: Duration) -> Supervisor {
        self.first_backoff = first;
        self
    }

    /// Runs the loop `make` builds, and builds and runs it again whenever it panics or returns
    /// before the stop signal.
    pub(crate) fn spawn<F, Fut>(&self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let watched = Arc::new(Watched {
            name,
            running: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            run: Mutex::new(None),
        });
        let (w, stop, first_backoff) = (watched.clone(), self.stop.clone(), self.first_backoff);
        let supervisor = tokio::spawn(async move {
            let mut backoff = first_backoff;
            loop {
                let started = tokio::time::Instant::now();
                let run = tokio::spawn(make());
                *lock(&w.run) = Some(run.abort_handle());
                w.running.store(true, Ordering::Release);
                let failure = match run.await {
                    Ok(()) if stop.is_cancelled() => return,
                    Ok(()) => "it returned before the node stopped".to_owned(),
                    Err(e) if e.is_cancelled() => return,
                    Err(e) => panic_text(e),
                };
                if stop.is_cancelled() {
                    return;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = first_backoff;
                }
                w.running.store(false, Ordering::Release);
                w.restarts.fetch_add(1, Ordering::AcqRel);
                metrics::counter!("pixflow_background_restarts_total", "loop" => name).increment(1);
                tracing::error!(background = name, failure = %failure, retry_in = ?backoff, "a background loop failed; restarting it");
                *lock(&w.last_failure) = Some(failure);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        lock(&self.loops).push(Entry { watched, supervisor });
    }

    /// Every loop's health, in start order.
    pub(crate) fn health(&self) -> Vec<LoopHealth> {
        lock(&self.loops)
            .iter()
            .map(|e| LoopHealth {
                name: e.watched.name,
                running: e.watched.running.load(Ordering::Acquire),
                restarts: e.watched.restarts.load(Ordering::Acquire),
                last_failure: lock(&e.watched.last_failure).clone(),
            })
            .collect()
    }

    /// Waits for the loops, in start order, until `deadline`; aborts what is left then. Call
    /// after the stop signal. Returns how many were aborted.
    pub(crate) async fn join(&self, deadline: tokio::time::Instant) -> usize {
        let entries = std::mem::take(&mut *lock(&self.loops));
        let mut aborted = 0;
        for Entry { watched, supervisor } in entries {
            let abort = supervisor.abort_handle();
            if tokio::time::timeout_at(deadline, supervisor).await.is_err() {
                abort.abort();
                if let Some(run) = lock(&watched.run).take() {
                    run.abort();
                }
                tracing::warn!(background = watched.name, "still running at the shutdown deadline; aborted");
                aborted += 1;
            }
        }
        aborted
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[tokio::test]
    async fn a_loop_that_panics_is_started_again_and_reported_meanwhile() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone()).with_backoff(Duration::from_millis(300));
        let runs = Arc::new(AtomicU32::new(0));
        let (r, s) = (runs.clone(), stop.clone());
        sup.spawn("flaky", move || {
            let (r, s) = (r.clone(), s.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run fails");
                }
                s.cancelled().await;
            }
        });
        // During the backoff the loop is reported down, with what ended it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let h = sup.health();
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].name, h[0].running, h[0].restarts), ("flaky", false, 1));
        assert_eq!(h[0].last_failure.as_deref(), Some("first run fails"));
        // Then it runs again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(sup.health()[0].running);
        stop.cancel();
        assert_eq!(sup.join(tokio::time::Instant::now() + Duration::from_secs(5)).await, 0);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "not started again after the stop");
    }

    #[tokio::test]
    async fn loops_are_joined_and_stragglers_aborted_at_the_deadline() {
        let stop = CancellationToken::new();
        let sup = Supervisor::new(stop.clone());
        let order = Arc::new(Mutex::new(Vec::new()));
        for (name, linger) in [("first", 50u64), ("second", 0)] {
            let (o, s) = (order.clone(), stop.clone());
            sup.spawn(name, move || {
                let (o, s) = (o.clone(), s.clone());
                async move {
                    s.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(linger)).await;
                    lock(&o).push(name);
                }
            });
        }
        // One that ignores the stop signal.
        sup.spawn("stubborn", std::future::pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        let aborted = sup.join(tokio::time::Instant::now() + Duration::from_millis(500)).await;
        assert_eq!(aborted, 1);
        // Both well-behaved loops ended by themselves within the deadline (not aborted).
        let mut ended = lock(&order).clone();
        ended.sort_unstable();
        assert_eq!(ended, ["first", "second"]);
        assert!(sup.health().is_empty());
    }
}
