//! Requests that wait while a statement of their kind is in flight, run together in the next one:
//! group commit for a backend whose statements go one per round trip (PostgreSQL). A line per
//! key (a queue, a holder, a lease); the first request of an idle line starts a task that runs
//! every request waiting, up to a bound, in one call of the batch function, answers each with its
//! own result, and goes on until none waits. A request whose caller went away before its batch
//! began is left out; one that goes away later is answered into the void.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// What a batch answers each of its requests: its result, or the batch's error.
pub(crate) type Answer<A> = Result<A, String>;

/// Where a request's answer goes.
type Reply<A> = oneshot::Sender<Answer<A>>;

/// The requests waiting in one line. A line exists exactly while a task runs its batches: the
/// request that makes it starts the task, and the task removes it once it finds it empty.
type Line<Q, A> = Vec<(Q, Reply<A>)>;

/// The lines of one kind of request, by key. Cheap to clone.
pub(crate) struct Lines<K, Q, A> {
    lines: Arc<Mutex<HashMap<K, Line<Q, A>>>>,
}

impl<K, Q, A> Clone for Lines<K, Q, A> {
    fn clone(&self) -> Self {
        Lines { lines: self.lines.clone() }
    }
}

impl<K, Q, A> Default for Lines<K, Q, A> {
    fn default() -> Self {
        Lines { lines: Arc::default() }
    }
}

/// Removes a line if its task ends otherwise than by finding it empty (a panic): its waiting
/// requests are answered with an error (their senders dropped), and the next request starts
/// anew. A task that found its line empty removed it under the same lock and disarmed this, so
/// a line started after that one is never touched.
struct Ended<K: Hash + Eq, Q, A> {
    lines: Lines<K, Q, A>,
    key: K,
    armed: bool,
}

impl<K: Hash + Eq, Q, A> Drop for Ended<K, Q, A> {
    fn drop(&mut self) {
        if self.armed {
            self.lines.lines.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
        }
    }
}

impl<K, Q, A> Lines<K, Q, A>
where
    K: Hash + Eq + Clone + Send + 'static,
    Q: Send + 'static,
    A: Send + 'static,
{
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Line<Q, A>>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `request` in the next batch of `key`'s line: `batch` gets the key and up to `max`
    /// requests, in the order they came, and answers each, in that order (an answer missing at
    /// the end is an error). All requests of a key must pass the same `batch`.
    pub(crate) async fn run<F, R>(&self, key: K, request: Q, max: usize, batch: F) -> Answer<A>
    where
        F: Fn(K, Vec<Q>) -> R + Send + 'static,
        R: Future<Output = Answer<Vec<A>>> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let lead = {
            let mut lines = self.lock();
            let lead = !lines.contains_key(&key);
            lines.entry(key.clone()).or_default().push((request, answer));
            lead
        };
        if lead {
            tokio::spawn(self.clone().drain(key, max.max(1), batch));
        }
        answered.await.unwrap_or_else(|_| Err("the batch that held this request stopped".into()))
    }

    async fn drain<F, R>(self, key: K, max: usize, batch: F)
    where
        F: Fn(K, Vec<Q>) -> R + Send + 'static,
        R: Future<Output = Answer<Vec<A>>> + Send + 'static,
    {
        let mut ended = Ended { lines: self, key, armed: true };
        loop {
            let taken: Option<(Vec<Q>, Vec<Reply<A>>)> = {
                let mut lines = ended.lines.lock();
                match lines.get_mut(&ended.key) {
                    Some(line) => {
                        line.retain(|(_, answer)| !answer.is_closed());
                        if line.is_empty() {
                            // Removed under the same lock that saw it empty: a request that
                            // comes next finds no line and starts one.
                            lines.remove(&ended.key);
                            None
                        } else {
                            let n = line.len().min(max);
                            Some(line.drain(..n).unzip())
                        }
                    }
                    None => None,
                }
            };
            let Some((requests, answers)) = taken else {
                ended.armed = false;
                return;
            };
            match batch(ended.key.clone(), requests).await {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for answer in answers {
                        let result = results.next().ok_or_else(|| "the batch gave no answer to this request".into());
                        let _ = answer.send(result);
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Doubles each request, after a yield (so that others arrive meanwhile); counts batches and
    /// keeps the largest.
    async fn doubled(counts: Arc<(AtomicUsize, AtomicUsize)>, requests: Vec<u32>) -> Answer<Vec<u32>> {
        counts.0.fetch_add(1, Ordering::Relaxed);
        counts.1.fetch_max(requests.len(), Ordering::Relaxed);
        tokio::task::yield_now().await;
        Ok(requests.iter().map(|r| r * 2).collect())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_gets_its_own_answer_and_requests_that_wait_together_share_a_batch() {
        let lines: Lines<u8, u32, u32> = Lines::default();
        let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        // Clients that each send one request after another: lines start, drain, end and start
        // again while requests keep arriving.
        let (clients, each) = (8u32, 400u32);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (lines, counts) = (lines.clone(), counts.clone());
                tokio::spawn(async move {
                    for i in 0..each {
                        let n = c * each + i;
                        let key = u8::try_from(c % 2).unwrap();
                        let counts = counts.clone();
                        let answer = lines.run(key, n, 4, move |_, all| doubled(counts.clone(), all)).await;
                        assert_eq!(answer, Ok(n * 2), "request {n}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let total = usize::try_from(clients * each).unwrap();
        let (batches, largest) = (counts.0.load(Ordering::Relaxed), counts.1.load(Ordering::Relaxed));
        assert!(batches < total, "requests that waited together shared batches ({batches} for {total})");
        assert!(largest <= 4, "no batch beyond the bound ({largest})");
        assert!(lines.lock().is_empty(), "every line ended once drained");
    }

    #[tokio::test]
    async fn a_failed_short_or_panicking_batch_answers_its_requests_with_errors_and_the_line_goes_on() {
        let lines: Lines<u8, u32, u32> = Lines::default();
        let failed = lines.run(0, 1, 8, |_, _| async { Err::<Vec<u32>, _>("down".to_owned()) }).await;
        assert_eq!(failed, Err("down".to_owned()));
        let short = lines.run(0, 1, 8, |_, _| async { Ok(Vec::new()) }).await;
        assert!(short.unwrap_err().contains("no answer"));
        let panicked = lines
            .run(0, 1, 8, |_, all: Vec<u32>| async move {
                assert!(all.is_empty(), "a batch that panics");
                Ok(all)
            })
            .await;
        assert!(panicked.unwrap_err().contains("stopped"));
        assert_eq!(lines.run(0, 3, 8, |_, all: Vec<u32>| async move { Ok(all) }).await, Ok(3), "a new line after it");
    }
}
