//! The queue contract, run against every backend: SQLite always; PostgreSQL when
//! `PIXFLOW_TEST_POSTGRES_URL` names a server (each case in a schema of its own), NATS JetStream
//! when `PIXFLOW_TEST_NATS_URL` does (`.ci/run` sets both; a configured server that does not
//! answer fails the suite). Each case gets two handles, "nodes": two handles on one state for
//! SQLite, two connection pools for PostgreSQL, two connections for JetStream (whose leases
//! last its `AckWait`, 5 s here: longer than any case holds a lease it means to keep, even on a
//! loaded machine).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::fresh;
use pixflow_backends::state::now_ms;
use pixflow_backends::{Queue, QueueError, State};

/// Runs `case` with two handles on each backend.
async fn each(case: impl AsyncFn(Queue, Queue, String)) {
    let state = State::memory().await.unwrap();
    case(state.queue("local").await.unwrap(), state.queue("local").await.unwrap(), fresh("sqlite")).await;
    if let Some(server) = crate::support::postgres_url("queue") {
        let schema = crate::support::Schema::create(&server).await;
        let a = State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable");
        let b = State::postgres(&schema.url).await.unwrap();
        let (qa, qb) = (a.queue(&fresh("node-a")).await.unwrap(), b.queue(&fresh("node-b")).await.unwrap());
        let q = fresh("pg");
        case(qa.clone(), qb, q.clone()).await;
        qa.remove(&q).await.unwrap();
        a.close().await;
        b.close().await;
        schema.drop().await;
    }
    if let Some(url) = crate::support::service("PIXFLOW_TEST_NATS_URL", "nats://127.0.0.1:4222") {
        let options = pixflow_backends::queue::NatsOptions { ack_wait: Duration::from_secs(5), ..Default::default() };
        let qa = Queue::nats(&url, options.clone(), &fresh("node-a"))
            .await
            .expect("PIXFLOW_TEST_NATS_URL is set but unreachable");
        let qb = Queue::nats(&url, options, &fresh("node-b")).await.unwrap();
        let q = fresh("nats");
        case(qa.clone(), qb, q.clone()).await;
        qa.remove(&q).await.unwrap();
    }
}

const MINUTE: Duration = Duration::from_secs(60);

/// `fut`, or a failure after `secs` (a bound on a wait that should end, never a measurement).
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after {secs} s"))
}

#[tokio::test]
async fn a_live_backend_answers_a_ping() {
    each(async |a, b, _| {
        a.ping().await.unwrap();
        b.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn two_consumers_never_hold_the_same_message() {
    each(async |a, b, q| {
        for i in 0..40 {
            assert!(a.enqueue(&q, &format!("m{i}"), format!("{i}").as_bytes(), Duration::ZERO).await.unwrap());
        }
        let mut tasks = Vec::new();
        for n in 0..8 {
            let (h, q) = (if n % 2 == 0 { a.clone() } else { b.clone() }, q.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(d) = h.claim(&q, MINUTE).await.unwrap() {
                    got.push((d.id, d.attempt));
                }
                got
            }));
        }
        // A message is handed out again only under a new lease: after the one before ran out
        // (JetStream's 5 s here, which a loaded machine may exceed while the 40 are claimed).
        let mut seen = HashSet::new();
        for t in tasks {
            for (id, attempt) in t.await.unwrap() {
                assert!(seen.insert((id.clone(), attempt)), "{id} handed out twice in attempt {attempt}");
            }
        }
        let ids: HashSet<_> = seen.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ids.len(), 40);
        let stats = a.stats(&q).await.unwrap();
        assert_eq!(stats.depth, 40);
        if seen.len() == 40 {
            // No lease ran out: all 40 are held.
            assert_eq!(stats.leased, 40);
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_writes_each_get_their_own_answer() {
    each(async |a, b, q| {
        // A lease that ran out and was taken over, and a message that is there already.
        a.enqueue(&q, "moved", b"m", Duration::ZERO).await.unwrap();
        let stale = a.claim(&q, Duration::ZERO).await.unwrap().unwrap();
        let owner = within(10, "the takeover", b.next(&q, MINUTE)).await.unwrap();
        a.enqueue(&q, "there", b"t", Duration::ZERO).await.unwrap();
        // All at once, from both handles (on SQLite: committed together).
        let enqueue = |h: &Queue, id: String| {
            let (h, q) = (h.clone(), q.clone());
            tokio::spawn(async move { h.enqueue(&q, &id, id.as_bytes(), Duration::ZERO).await.unwrap() })
        };
        let fresh: Vec<_> = (0..30).map(|i| enqueue(if i % 2 == 0 { &a } else { &b }, format!("new-{i}"))).collect();
        let again: Vec<_> = (0..4).map(|i| enqueue(if i % 2 == 0 { &a } else { &b }, "there".into())).collect();
        let racing: Vec<_> = (0..4).map(|i| enqueue(if i % 2 == 0 { &a } else { &b }, "racing".into())).collect();
        let late = {
            let (a, lease) = (a.clone(), stale.lease.clone());
            tokio::spawn(async move { a.finish(&lease).await })
        };
        let done = {
            let (b, lease) = (b.clone(), owner.lease.clone());
            tokio::spawn(async move { b.finish(&lease).await })
        };
        for t in fresh {
            assert!(t.await.unwrap(), "a new id is added");
        }
        for t in again {
            assert!(!t.await.unwrap(), "an id there already is not added again");
        }
        let mut added = 0;
        for t in racing {
            added += usize::from(t.await.unwrap());
        }
        assert_eq!(added, 1, "one of four enqueues of the same new id adds it");
        assert!(matches!(late.await.unwrap(), Err(QueueError::Stale)));
        done.await.unwrap().unwrap();
        // Each message is there once, with the payload of the enqueue that added it.
        let mut seen = HashSet::new();
        while let Some(d) = a.claim(&q, MINUTE).await.unwrap() {
            if d.id == "there" {
                assert_eq!(d.payload, b"t");
            } else {
                assert_eq!(d.payload, d.id.as_bytes());
            }
            assert!(seen.insert(d.id.clone()), "{} delivered twice", d.id);
        }
        let mut want: HashSet<String> = (0..30).map(|i| format!("new-{i}")).collect();
        want.extend(["there".to_owned(), "racing".to_owned()]);
        assert_eq!(seen, want);
    })
    .await;
}

#[tokio::test]
async fn a_late_settlement_after_the_lease_moved_on_is_refused() {
    each(async |a, b, q| {
        a.enqueue(&q, "job", b"x", Duration::ZERO).await.unwrap();
        // The first consumer's lease runs out at once (it hung); the other node takes over.
        let stale = a.claim(&q, Duration::ZERO).await.unwrap().unwrap();
        let owner = within(10, "the takeover", b.next(&q, MINUTE)).await.unwrap();
        assert_eq!((owner.id.as_str(), owner.attempt), ("job", 2));
        assert!(owner.lease.fence() > stale.lease.fence());
        assert_ne!(owner.lease.token(), stale.lease.token());
        assert!(matches!(a.extend(&stale.lease, MINUTE).await, Err(QueueError::Stale)));
        assert!(matches!(a.finish(&stale.lease).await, Err(QueueError::Stale)));
        assert!(matches!(a.retry(&stale.lease, Duration::ZERO).await, Err(QueueError::Stale)));
        assert!(matches!(a.bury(&stale.lease, "late").await, Err(QueueError::Stale)));
        // None of that freed the message for a third claim.
        assert!(a.claim(&q, MINUTE).await.unwrap().is_none());
        b.extend(&owner.lease, MINUTE).await.unwrap();
        b.finish(&owner.lease).await.unwrap();
        // Settled: the owner's lease ends too.
        assert!(matches!(b.finish(&owner.lease).await, Err(QueueError::Stale)));
        assert!(matches!(a.finish(&stale.lease).await, Err(QueueError::Stale)));
        assert_eq!(a.stats(&q).await.unwrap().depth, 0);
        // Each limit itself is allowed.
        let longest = format!("{q}-{}", "x".repeat(pixflow_backends::queue::MAX_QUEUE_NAME - q.len() - 1));
        assert!(a.enqueue(&longest, &"i".repeat(200), b"", Duration::ZERO).await.unwrap());
        let full = vec![7u8; pixflow_backends::queue::MAX_MESSAGE];
        assert!(a.enqueue(&q, "full", &full, Duration::ZERO).await.unwrap());
        assert_eq!(a.claim(&q, MINUTE).await.unwrap().unwrap().payload, full);
        a.remove(&longest).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_same_deduplication_id_twice_is_one_message() {
    each(async |a, b, q| {
        assert!(a.enqueue(&q, "once", b"first", Duration::ZERO).await.unwrap());
        assert!(!b.enqueue(&q, "once", b"second", Duration::ZERO).await.unwrap());
        let d = a.claim(&q, MINUTE).await.unwrap().unwrap();
        assert_eq!(d.payload, b"first");
        assert!(b.claim(&q, MINUTE).await.unwrap().is_none());
        // Still one while leased, and after it finished (within the deduplication window).
        assert!(!b.enqueue(&q, "once", b"third", Duration::ZERO).await.unwrap());
        a.finish(&d.lease).await.unwrap();
        assert!(!b.enqueue(&q, "once", b"fourth", Duration::ZERO).await.unwrap());
        assert!(a.claim(&q, MINUTE).await.unwrap().is_none());
        // Past the window the id is free again (JetStream's window is a time from the first
        // publish, which a purge does not shorten).
        if a.kind() != "nats" {
            tokio::time::sleep(Duration::from_millis(5)).await;
            a.purge(Duration::ZERO, MINUTE).await.unwrap();
            assert!(b.enqueue(&q, "once", b"fifth", Duration::ZERO).await.unwrap());
            assert_eq!(a.claim(&q, MINUTE).await.unwrap().unwrap().payload, b"fifth");
        }
    })
    .await;
}

#[tokio::test]
async fn a_consumer_killed_mid_message_leads_to_redelivery() {
    each(async |a, b, q| {
        a.enqueue(&q, "work", b"w", Duration::ZERO).await.unwrap();
        let lost = a.claim(&q, Duration::from_millis(300)).await.unwrap().unwrap();
        drop(lost); // its consumer died without settling or renewing
        assert!(b.claim(&q, MINUTE).await.unwrap().is_none(), "the lease still runs");
        // The waiting consumer wakes by its timer when the lease runs out.
        let again = within(10, "redelivery", b.next(&q, MINUTE)).await.unwrap();
        assert_eq!((again.id.as_str(), again.attempt), ("work", 2));
    })
    .await;
}

#[tokio::test]
async fn delayed_messages_are_not_claimed_early() {
    each(async |a, b, q| {
        let delay = Duration::from_millis(400);
        a.enqueue(&q, "later", b"l", delay).await.unwrap();
        assert!(b.claim(&q, MINUTE).await.unwrap().is_none());
        let d = within(10, "the delayed message", b.next(&q, MINUTE)).await.unwrap();
        assert!(now_ms() >= d.enqueued_ms + 400, "claimed {} ms after enqueue", now_ms() - d.enqueued_ms);
        // A retry with a delay is delayed alike, and counts an attempt.
        b.retry(&d.lease, delay).await.unwrap();
        assert!(a.claim(&q, MINUTE).await.unwrap().is_none());
        let started = Instant::now();
        let again = within(10, "the retried message", a.next(&q, MINUTE)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(again.attempt, 2);
    })
    .await;
}

#[tokio::test]
async fn an_enqueue_wakes_a_waiting_consumer_of_another_handle() {
    each(async |a, b, q| {
        let waiter = {
            let (b, q) = (b.clone(), q.clone());
            tokio::spawn(async move { b.next(&q, MINUTE).await })
        };
        // The consumer is waiting with nothing due (its backstop timer is 30 s away).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        a.enqueue(&q, "ping", b"p", Duration::ZERO).await.unwrap();
        let d = within(5, "the woken consumer", waiter).await.unwrap().unwrap();
        assert_eq!(d.id, "ping");
        assert!(sent.elapsed() < Duration::from_secs(5));
    })
    .await;
}

/// Every waiting consumer, on the enqueuing node and on another, is woken for a message of its
/// own: none waits for its backstop timer.
#[tokio::test]
async fn enqueues_wake_waiting_consumers_of_the_same_handle_and_of_another() {
    each(async |a, b, q| {
        let waiters: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|node| {
                let q = q.clone();
                tokio::spawn(async move { node.next(&q, MINUTE).await })
            })
            .collect();
        // Both are waiting with nothing due (their backstop timers are 30 s away).
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.enqueue(&q, "one", b"1", Duration::ZERO).await.unwrap();
        a.enqueue(&q, "two", b"2", Duration::ZERO).await.unwrap();
        let mut got = HashSet::new();
        for w in waiters {
            got.insert(within(5, "a woken consumer", w).await.unwrap().unwrap().id);
        }
        assert_eq!(got, HashSet::from(["one".to_owned(), "two".to_owned()]));
    })
    .await;
}

/// A consumer that began waiting while a message was leased (its timer set for the lease's
/// end) is woken when the message is put back for later, and takes it once it is due.
#[tokio::test]
async fn a_message_put_back_for_later_reaches_a_consumer_that_waited_during_its_lease() {
    each(async |a, b, q| {
        a.enqueue(&q, "again", b"a", Duration::ZERO).await.unwrap();
        let d = a.claim(&q, MINUTE).await.unwrap().unwrap();
        let waiter = {
            let (b, q) = (b.clone(), q.clone());
            tokio::spawn(async move { b.next(&q, MINUTE).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.retry(&d.lease, Duration::from_millis(200)).await.unwrap();
        let again = within(10, "the message put back", waiter).await.unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempt), ("again", 2));
    })
    .await;
}

#[tokio::test]
async fn buried_messages_are_never_delivered_again_and_stats_follow() {
    each(async |a, b, q| {
        assert_eq!(a.stats(&q).await.unwrap(), Default::default());
        a.enqueue(&q, "bad", b"b", Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.enqueue(&q, "good", b"g", Duration::from_secs(3600)).await.unwrap();
        let s = b.stats(&q).await.unwrap();
        assert_eq!(a.depth(&q).await.unwrap(), 2);
        assert_eq!((s.depth, s.leased), (2, 0));
        assert!(s.oldest_age >= Duration::from_millis(20), "{s:?}");
        let d = b.claim(&q, MINUTE).await.unwrap().unwrap();
        assert_eq!(d.id, "bad");
        assert_eq!(a.stats(&q).await.unwrap().leased, 1);
        b.bury(&d.lease, "cannot be processed").await.unwrap();
        assert!(a.claim(&q, MINUTE).await.unwrap().is_none());
        assert_eq!(a.stats(&q).await.unwrap().depth, 1);
        assert_eq!(b.depth(&q).await.unwrap(), 1);
        // A buried id stays taken until purged.
        assert!(!a.enqueue(&q, "bad", b"b", Duration::ZERO).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn a_restarted_node_takes_its_own_leases_back_at_once() {
    each(async |a, b, q| {
        a.enqueue(&q, "held", b"h", Duration::ZERO).await.unwrap();
        let before = a.claim(&q, Duration::from_secs(3600)).await.unwrap().unwrap();
        if a.holder() != b.holder() {
            // Another node's release leaves it alone (one SQLite file is one node).
            assert_eq!(b.release_held().await.unwrap(), 0);
            assert!(b.claim(&q, MINUTE).await.unwrap().is_none());
        }
        // The holder's next start releases it: claimable long before its hour is over (JetStream
        // redelivers a released message a moment later, so the claim waits for it).
        assert!(a.release_held().await.unwrap() >= 1);
        let after = within(20, "the released message", b.next(&q, MINUTE)).await.unwrap();
        assert_eq!((after.id.as_str(), after.attempt), ("held", 2));
        assert!(matches!(a.finish(&before.lease).await, Err(QueueError::Stale)));
    })
    .await;
}

#[tokio::test]
async fn bad_names_ids_and_oversized_messages_are_refused() {
    each(async |a, _b, q| {
        for name in ["", "Upper", "has space", "dots.are.out", &"x".repeat(65)] {
            assert!(
                matches!(a.enqueue(name, "id", b"", Duration::ZERO).await, Err(QueueError::InvalidName(_))),
                "{name}"
            );
        }
        for id in ["", "with space", &"x".repeat(201), "tab\t"] {
            assert!(matches!(a.enqueue(&q, id, b"", Duration::ZERO).await, Err(QueueError::InvalidId)), "{id:?}");
        }
        let big = vec![0u8; pixflow_backends::queue::MAX_MESSAGE + 1];
        assert!(matches!(a.enqueue(&q, "big", &big, Duration::ZERO).await, Err(QueueError::TooLarge { .. })));
        assert_eq!(a.stats(&q).await.unwrap().depth, 0);
    })
    .await;
}

#[tokio::test]
async fn a_state_file_keeps_the_queue_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("pixflow-queue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.db");
    {
        let s = State::sqlite(&path).await.unwrap();
        let q = s.queue("local").await.unwrap();
        q.enqueue("invocations", "a", b"1", Duration::ZERO).await.unwrap();
        q.enqueue("invocations", "b", b"2", Duration::ZERO).await.unwrap();
        // Stopped while running `a`, its lease far from over.
        q.claim("invocations", Duration::from_secs(3600)).await.unwrap().unwrap();
        s.close().await;
    }
    let s = State::sqlite(&path).await.unwrap();
    let q = s.queue("local").await.unwrap();
    assert_eq!(q.release_held().await.unwrap(), 1);
    let a = q.claim("invocations", MINUTE).await.unwrap().unwrap();
    assert_eq!((a.id.as_str(), a.attempt, a.payload.as_slice()), ("a", 2, &b"1"[..]));
    assert_eq!(q.claim("invocations", MINUTE).await.unwrap().unwrap().id, "b");
    s.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn closing_the_state_does_not_wait_for_an_open_queue() {
    let state = State::memory().await.unwrap();
    let queue = state.queue("local").await.unwrap();
    within(10, "closing SQLite", state.close()).await;
    drop(queue);
    if let Some(server) = crate::support::postgres_url("queue") {
        let schema = crate::support::Schema::create(&server).await;
        let state = State::postgres(&schema.url).await.unwrap();
        // Its listener holds a connection while it waits for notifications.
        let queue = state.queue(&fresh("node")).await.unwrap();
        within(10, "closing PostgreSQL", state.close()).await;
        drop(queue);
        schema.drop().await;
    }
}

/// Deployments sharing one JetStream server in namespaces of their own see neither each other's
/// messages and leases nor those of a deployment without one.
#[tokio::test]
async fn jetstream_namespaces_keep_deployments_apart() {
    let Some(url) = crate::support::service("PIXFLOW_TEST_NATS_URL", "nats://127.0.0.1:4222") else { return };
    let open = async |namespace: Option<&str>| {
        let options = pixflow_backends::queue::NatsOptions {
            ack_wait: Duration::from_secs(5),
            namespace: namespace.map(str::to_owned),
            ..Default::default()
        };
        Queue::nats(&url, options, &fresh("node")).await.expect("PIXFLOW_TEST_NATS_URL is set but unreachable")
    };
    // Namespaces of the suite's own (later runs reuse their dead-letter streams and lease
    // buckets), a queue name of this run's.
    let (a, b, none) = (open(Some("suite-a")).await, open(Some("suite-b")).await, open(None).await);
    let q = fresh("ns");
    assert!(a.enqueue(&q, "same-id", b"a", Duration::ZERO).await.unwrap());
    // The same id in another namespace is another message.
    assert!(b.enqueue(&q, "same-id", b"b", Duration::ZERO).await.unwrap());
    assert!(none.claim(&q, MINUTE).await.unwrap().is_none());
    let in_b = b.claim(&q, MINUTE).await.unwrap().unwrap();
    assert_eq!(in_b.payload, b"b");
    assert!(b.claim(&q, MINUTE).await.unwrap().is_none());
    let in_a = a.claim(&q, MINUTE).await.unwrap().unwrap();
    assert_eq!(in_a.payload, b"a");
    // Both are the first message of their stream; each lease is its own namespace's.
    assert_eq!(in_a.lease.token(), in_b.lease.token());
    a.finish(&in_a.lease).await.unwrap();
    assert_eq!((a.stats(&q).await.unwrap().depth, b.stats(&q).await.unwrap().depth), (0, 1));
    b.extend(&in_b.lease, MINUTE).await.unwrap();
    b.finish(&in_b.lease).await.unwrap();
    for queue in [&a, &b, &none] {
        queue.remove(&q).await.unwrap();
    }
    // A namespace that would not give names of its own is refused before connecting.
    let odd = pixflow_backends::queue::NatsOptions { namespace: Some("a.b".into()), ..Default::default() };
    assert!(matches!(Queue::nats(&url, odd, "node").await, Err(QueueError::InvalidNamespace(_))));
}
