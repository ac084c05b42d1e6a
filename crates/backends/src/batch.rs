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

struct Line<Q, A> {
    waiting: Vec<(Q, oneshot::Sender<Answer<A>>)>,
    /// A task runs the line's batches.
    running: bool,
}

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

/// Removes a line when its task ends, however it ends (a panic included): its waiting requests
/// are answered with an error (their senders dropped), and the next request starts anew.
struct Ended<K: Hash + Eq, Q, A>(Lines<K, Q, A>, K);

impl<K: Hash + Eq, Q, A> Drop for Ended<K, Q, A> {
    fn drop(&mut self) {
        self.0.lines.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.1);
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
            let line = lines.entry(key.clone()).or_insert_with(|| Line { waiting: Vec::new(), running: false });
            line.waiting.push((request, answer));
            !std::mem::replace(&mut line.running, true)
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
        let ended = Ended(self, key);
        loop {
            let (requests, answers): (Vec<Q>, Vec<oneshot::Sender<Answer<A>>>) = {
                let mut lines = ended.0.lock();
                let Some(line) = lines.get_mut(&ended.1) else { return };
                line.waiting.retain(|(_, answer)| !answer.is_closed());
                if line.waiting.is_empty() {
                    // Removed under the same lock that saw it empty: a request that comes next
                    // finds no line and starts one.
                    lines.remove(&ended.1);
                    return;
                }
                let n = line.waiting.len().min(max);
                line.waiting.drain(..n).unzip()
            };
            match batch(ended.1.clone(), requests).await {
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
