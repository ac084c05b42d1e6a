//! A function's ready instances and its admission queue. Capacity is `ready instances x
//! per-instance concurrency`; a request either takes a free slot, waits in a bounded FIFO queue
//! (Knative's queue-proxy and activator in one), or is refused at once when the queue is full.
//! A request is never accepted and then dropped: a waiter that gives up (timeout, client gone)
//! leaves the queue, and a slot handed to a waiter that is already gone comes straight back.
//!
//! Background work (the node's asynchronous workers) waits apart, in a second line with neither
//! a bound nor a deadline ([`Pool::acquire_background`]): it gets a slot only when no request
//! waits in the first one, so queued work never delays or refuses a caller that is waiting for
//! an answer, and it is never failed for waiting (its number is bounded by the workers).
//!
//! The pool also meters time-weighted concurrency (running + waiting, in both lines) for the
//! autoscaler and wakes it when a request waits at zero instances, so a cold start begins
//! immediately.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Every slot is busy and the queue is full.
    #[error("{queued} requests are already waiting (the queue holds {max_queue}); retry later")]
    QueueFull { queued: usize, max_queue: u32 },
    /// The request waited its whole budget without getting a slot.
    #[error("no instance became free within {0:?}")]
    WaitTimeout(Duration),
    /// The function is being removed or the node is shutting down.
    #[error("the function is shutting down")]
    Closed,
    /// No instance could be started for the waiting requests (a process function whose
    /// program fails to start); the function's last start error says why.
    #[error("no instance of the function could be started")]
    NoInstance,
}

/// Live counts, for listings and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub ready: u32,
    pub in_flight: u32,
    pub queued: u32,
}

/// Instances and admission of one function version.
pub struct Pool {
    concurrency: u32,
    max_queue: u32,
    state: Mutex<State>,
    /// Wakes the autoscaler when demand appears at zero instances.
    demand: Notify,
}

struct State {
    ready: u32,
    in_flight: u32,
    waiters: VecDeque<oneshot::Sender<Permit>>,
    /// Background work waiting for a slot; served when `waiters` is empty.
    background: VecDeque<oneshot::Sender<Permit>>,
    closed: bool,
    meter: Meter,
}

/// Time-weighted concurrency since the last sample.
struct Meter {
    since: Instant,
    last: Instant,
    area: f64,
    level: u32,
    /// Last time anything ran or waited.
    last_active: Instant,
}

impl Meter {
    fn advance(&mut self, now: Instant, level: u32) {
        self.area += f64::from(self.level) * now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.level = level;
        if level > 0 {
            self.last_active = now;
        }
    }
}

/// A slot held by one request; dropping it frees the slot (or hands it to the next waiter).
pub struct Permit {
    pool: Option<Arc<Pool>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.release();
        }
    }
}

impl Pool {
    pub fn new(concurrency: u32, max_queue: u32, ready: u32) -> Arc<Pool> {
        let now = Instant::now();
        Arc::new(Pool {
            concurrency: concurrency.max(1),
            max_queue,
            demand: Notify::new(),
            state: Mutex::new(State {
                ready,
                in_flight: 0,
                waiters: VecDeque::new(),
                background: VecDeque::new(),
                closed: false,
                meter: Meter { since: now, last: now, area: 0.0, level: 0, last_active: now },
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counts half-updated (every critical
        // section is a few integer updates), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn capacity(&self, s: &State) -> u32 {
        s.ready.saturating_mul(self.concurrency)
    }

    fn level(s: &State) -> u32 {
        let waiting = s.waiters.len().saturating_add(s.background.len());
        s.in_flight.saturating_add(u32::try_from(waiting).unwrap_or(u32::MAX))
    }

    /// Takes a slot, waiting at most `wait` in the queue.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Result<Permit, Rejected> {
        let rx = {
            let mut s = self.lock();
            if s.closed {
                return Err(Rejected::Closed);
            }
            if s.in_flight < self.capacity(&s) && s.waiters.is_empty() {
                return Ok(self.take(&mut s));
            }
            s.waiters.retain(|w| !w.is_closed());
            if s.waiters.len() >= self.max_queue as usize {
                if s.ready == 0 {
                    // Refused, but the demand still starts an instance for the next request.
                    self.demand.notify_one();
                }
                return Err(Rejected::QueueFull { queued: s.waiters.len(), max_queue: self.max_queue });
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            self.joined(&mut s);
            rx
        };
        // A permit sent after the timeout fired is dropped with the channel and so released.
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(self.unserved()),
            Err(_) => {
                self.forget_closed_waiters();
                Err(Rejected::WaitTimeout(wait))
            }
        }
    }

    /// Takes a slot for background work: at once if one is free and nothing waits, else in the
    /// background line, behind every request of the first line (those that come later too),
    /// for as long as it takes. Fails only when the pool closes ([`Rejected::Closed`]) or no
    /// instance can be started ([`Rejected::NoInstance`]).
    pub async fn acquire_background(self: &Arc<Self>) -> Result<Permit, Rejected> {
        let rx = {
            let mut s = self.lock();
            if s.closed {
                return Err(Rejected::Closed);
            }
            if s.in_flight < self.capacity(&s) && s.waiters.is_empty() && s.background.is_empty() {
                return Ok(self.take(&mut s));
            }
            s.background.retain(|w| !w.is_closed());
            let (tx, rx) = oneshot::channel();
            s.background.push_back(tx);
            self.joined(&mut s);
            rx
        };
        rx.await.map_err(|_| self.unserved())
    }

    /// Takes a free slot now (the caller checked there is one).
    fn take(self: &Arc<Self>, s: &mut State) -> Permit {
        s.in_flight += 1;
        let level = Self::level(s);
        s.meter.advance(Instant::now(), level);
        Permit { pool: Some(self.clone()) }
    }

    /// After a waiter joined a line: the level metered, and the autoscaler woken at zero
    /// instances.
    fn joined(&self, s: &mut State) {
        let level = Self::level(s);
        s.meter.advance(Instant::now(), level);
        if s.ready == 0 {
            self.demand.notify_one();
        }
    }

    /// Why a waiter's line dropped it without a slot: the pool closed, or no instance could be
    /// started ([`Pool::fail_waiters`]).
    fn unserved(&self) -> Rejected {
        if self.lock().closed { Rejected::Closed } else { Rejected::NoInstance }
    }

    /// The refusal a request would get right now if every slot is busy and the queue is full
    /// (a hint for front ends, to refuse before reading a body; `acquire` decides for real).
    pub fn refusal(&self) -> Option<Rejected> {
        let s = self.lock();
        let queued = s.waiters.iter().filter(|w| !w.is_closed()).count();
        let full = s.in_flight >= self.capacity(&s) && queued >= self.max_queue as usize && s.ready > 0;
        full.then_some(Rejected::QueueFull { queued, max_queue: self.max_queue })
    }

    fn forget_closed_waiters(&self) {
        let mut s = self.lock();
        s.waiters.retain(|w| !w.is_closed());
        s.background.retain(|w| !w.is_closed());
        let level = Self::level(&s);
        s.meter.advance(Instant::now(), level);
    }

    fn release(self: Arc<Self>) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        self.hand_out(&mut s);
        let level = Self::level(&s);
        s.meter.advance(Instant::now(), level);
    }

    /// Gives free slots to waiters, oldest first, the first line before the background one.
    fn hand_out(self: &Arc<Self>, s: &mut State) {
        while s.in_flight < self.capacity(s) {
            let Some(tx) = s.waiters.pop_front().or_else(|| s.background.pop_front()) else { break };
            s.in_flight += 1;
            if let Err(mut unsent) = tx.send(Permit { pool: Some(self.clone()) }) {
                // The waiter is gone; take the slot back without re-entering the lock.
                unsent.pool = None;
                s.in_flight -= 1;
            }
        }
    }

    /// Sets the number of ready instances (the autoscaler's decision, once instances are up).
    /// Shrinking never interrupts running requests: they finish, and slots above the new
    /// capacity are simply not handed out again.
    pub fn set_ready(self: &Arc<Self>, ready: u32) {
        let mut s = self.lock();
        s.ready = ready;
        self.hand_out(&mut s);
        let level = Self::level(&s);
        s.meter.advance(Instant::now(), level);
    }

    /// Fails the requests waiting for a slot with [`Rejected::NoInstance`] (no instance could
    /// be started for them); later requests wait as usual.
    pub fn fail_waiters(&self) {
        let mut s = self.lock();
        s.waiters.clear();
        s.background.clear();
        let level = Self::level(&s);
        s.meter.advance(Instant::now(), level);
    }

    /// Asks the autoscaler for an instance (a request found none and was answered at once).
    pub fn want_instance(&self) {
        self.demand.notify_one();
    }

    /// Refuses new requests and fails the waiting ones with [`Rejected::Closed`]; running
    /// requests finish.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.waiters.clear();
        s.background.clear();
        let level = Self::level(&s);
        s.meter.advance(Instant::now(), level);
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats {
            ready: s.ready,
            in_flight: s.in_flight,
            queued: u32::try_from(s.waiters.iter().chain(&s.background).filter(|w| !w.is_closed()).count())
                .unwrap_or(u32::MAX),
        }
    }

    /// Average concurrency (running + waiting) since the previous sample, and when the
    /// function last had any request.
    pub fn sample(&self) -> (f64, Instant) {
        let now = Instant::now();
        let mut s = self.lock();
        let level = Self::level(&s);
        s.meter.advance(now, level);
        let elapsed = now.saturating_duration_since(s.meter.since).as_secs_f64();
        let avg = if elapsed > 0.0 { s.meter.area / elapsed } else { f64::from(level) };
        s.meter.since = now;
        s.meter.area = 0.0;
        (avg, s.meter.last_active)
    }

    /// Resolves when a request waits at zero instances.
    pub async fn demand(&self) {
        self.demand.notified().await;
    }

    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn slots_then_queue_then_refusal() {
        let pool = Pool::new(2, 1, 1);
        let a = pool.acquire(LONG).await.unwrap();
        let _b = pool.acquire(LONG).await.unwrap();
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(LONG).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(pool.stats(), PoolStats { ready: 1, in_flight: 2, queued: 1 });
        assert_eq!(pool.acquire(LONG).await.err(), Some(Rejected::QueueFull { queued: 1, max_queue: 1 }));
        assert_eq!(pool.refusal(), Some(Rejected::QueueFull { queued: 1, max_queue: 1 }));
        drop(a);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(pool.stats(), PoolStats { ready: 1, in_flight: 1, queued: 0 });
        assert_eq!(pool.refusal(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn background_work_waits_behind_callers_without_bound_or_deadline() {
        let pool = Pool::new(1, 1, 1);
        let held = pool.acquire(LONG).await.unwrap();
        let background: Vec<_> = (0..3)
            .map(|n| {
                let pool = pool.clone();
                tokio::spawn(async move { (n, pool.acquire_background().await) })
            })
            .collect();
        tokio::task::yield_now().await;
        // Three waiting in the background line: a caller is neither refused nor put behind them.
        assert_eq!(pool.stats().queued, 3);
        assert_eq!(pool.refusal(), None);
        let caller = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(LONG * 3).await.map(|_| Instant::now()) })
        };
        tokio::task::yield_now().await;
        // Hours go by: the background waiters are not failed for waiting.
        tokio::time::sleep(Duration::from_secs(7200)).await;
        let freed = Instant::now();
        drop(held);
        assert_eq!(caller.await.unwrap(), Ok(freed));
        // Then the background line, oldest first: each gets the slot the one before gives back.
        for (n, task) in background.into_iter().enumerate() {
            let (m, permit) = task.await.unwrap();
            assert_eq!(m, n);
            assert_eq!(pool.stats().in_flight, 1);
            drop(permit.unwrap());
        }
        assert_eq!(pool.stats(), PoolStats { ready: 1, in_flight: 0, queued: 0 });
        // Closing fails whoever still waits there.
        let held = pool.acquire(LONG).await.unwrap();
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire_background().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        pool.close();
        assert_eq!(waiting.await.unwrap(), Err(Rejected::Closed));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_no_slot_behind() {
        let pool = Pool::new(1, 10, 1);
        let held = pool.acquire(LONG).await.unwrap();
        let err = pool.acquire(Duration::from_secs(1)).await.err();
        assert_eq!(err, Some(Rejected::WaitTimeout(Duration::from_secs(1))));
        // A cancelled waiter (client gone) is skipped too.
        let cancelled = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(LONG).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        drop(held);
        assert_eq!(pool.stats().in_flight, 0);
        let _again = pool.acquire(Duration::ZERO).await.unwrap();
        assert_eq!(pool.stats(), PoolStats { ready: 1, in_flight: 1, queued: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn requests_at_zero_wait_for_an_instance_and_wake_the_scaler() {
        let pool = Pool::new(4, 10, 0);
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(LONG).await.map(|_| ()) })
        };
        pool.demand().await;
        assert_eq!(pool.stats().queued, 1);
        pool.set_ready(1);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_lets_running_requests_finish() {
        let pool = Pool::new(1, 10, 2);
        let a = pool.acquire(LONG).await.unwrap();
        let b = pool.acquire(LONG).await.unwrap();
        pool.set_ready(1);
        assert_eq!(pool.stats().in_flight, 2);
        drop(a);
        // Capacity is 1 and one request still runs: the next must wait.
        assert!(pool.acquire(Duration::from_millis(10)).await.is_err());
        drop(b);
        assert!(pool.acquire(Duration::ZERO).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn close_fails_waiters_and_refuses_new_requests() {
        let pool = Pool::new(1, 10, 1);
        let _held = pool.acquire(LONG).await.unwrap();
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(LONG).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        pool.close();
        assert_eq!(waiting.await.unwrap(), Err(Rejected::Closed));
        assert_eq!(pool.acquire(LONG).await.err(), Some(Rejected::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn sample_is_time_weighted() {
        let pool = Pool::new(4, 10, 1);
        pool.sample();
        let a = pool.acquire(LONG).await.unwrap();
        let b = pool.acquire(LONG).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(a);
        tokio::time::advance(Duration::from_secs(2)).await;
        let (avg, _) = pool.sample();
        // 2 for 1 s, 1 for 1 s, 0 for 2 s: 3 request-seconds over 4 s.
        assert!((avg - 0.75).abs() < 1e-9, "{avg}");
    }
}
