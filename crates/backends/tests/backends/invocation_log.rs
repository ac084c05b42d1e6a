//! The invocation log contract, run against every backend: SQLite always; PostgreSQL when
//! `PIXFLOW_TEST_POSTGRES_URL` names a server (`.ci/run` sets it; a configured server that does
//! not answer fails the suite), each case in a schema of its own. Each case gets two handles,
//! "nodes": two handles on one state file for SQLite, two connection pools for PostgreSQL, and
//! a prefix for the ids it writes.

use std::future::pending;
use std::time::Duration;

use crate::support::fresh;
use pixflow_backends::invocation_log::{Outcome, Settled};
use pixflow_backends::state::now_ms;
use pixflow_backends::{InvocationLog, NewInvocation, QueueError, State, Status};

/// Runs `case` with two handles on each backend.
async fn each(case: impl AsyncFn(InvocationLog, InvocationLog, String)) {
    let dir = std::env::temp_dir().join(fresh("pixflow-invocation-log"));
    std::fs::create_dir_all(&dir).unwrap();
    let state = State::sqlite(&dir.join("state.db")).await.unwrap();
    case(state.invocations(), state.invocations(), fresh("sqlite")).await;
    state.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    if let Some(server) = crate::support::postgres_url("invocation log") {
        let schema = crate::support::Schema::create(&server).await;
        let a = State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable");
        let b = State::postgres(&schema.url).await.unwrap();
        case(a.invocations(), b.invocations(), fresh("pg")).await;
        a.close().await;
        b.close().await;
        schema.drop().await;
    }
}

/// Runs `case` with a state whose queue lives in its own database and another state whose does
/// not, and a prefix for the names it writes, on each backend: two state files for SQLite, two
/// pools on one database for PostgreSQL (each state knows only its own pool).
async fn each_pair(case: impl AsyncFn(&State, &State, &str)) {
    let dir = std::env::temp_dir().join(fresh("pixflow-log-pair"));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (State::sqlite(&dir.join("a.db")).await.unwrap(), State::sqlite(&dir.join("b.db")).await.unwrap());
    case(&a, &b, &fresh("sqlite")).await;
    a.close().await;
    b.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    if let Some(server) = crate::support::postgres_url("invocation log") {
        let schema = crate::support::Schema::create(&server).await;
        let a = State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable");
        let b = State::postgres(&schema.url).await.unwrap();
        case(&a, &b, &fresh("pg")).await;
        a.close().await;
        b.close().await;
        schema.drop().await;
    }
}

fn inv(id: &str) -> NewInvocation {
    NewInvocation {
        id: id.into(),
        function: "thumb".into(),
        max_attempts: 3,
        meta: "{\"mode\":\"raw\"}".into(),
        payload: vec![1, 2, 3],
        callback: Some("http://hooks.example/done".into()),
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

#[tokio::test]
async fn an_invocation_lives_through_its_life_cycle() {
    each(async |a, b, p| {
        let (x, y) = (format!("{p}-x"), format!("{p}-y"));
        a.insert_invocation(&inv(&x)).await.unwrap();
        a.insert_invocation(&inv(&y)).await.unwrap();
        assert_eq!(b.unsettled().await.unwrap(), pairs(&[(&x, &x), (&y, &y)]));
        let queued = b.get(&x).await.unwrap().unwrap();
        assert_eq!((queued.status, queued.attempts, queued.max_attempts), (Status::Queued, 0, 3));
        assert_eq!(
            (queued.meta.as_str(), queued.callback.as_deref()),
            ("{\"mode\":\"raw\"}", Some("http://hooks.example/done"))
        );

        // Started on one node, finished on the other, read on the first.
        let (row, payload) = b.start(&x, "1.1").await.unwrap().unwrap();
        assert_eq!((row.status, row.attempts, payload.as_slice()), (Status::Running, 1, &[1u8, 2, 3][..]));
        assert_eq!(b.result(&x).await.unwrap(), None, "no result while running");
        assert!(a.finish(&x, "1.1", "{\"ok\":true}", b"out").await.unwrap());
        assert_eq!(b.result(&x).await.unwrap().unwrap(), b"out");
        let done = b.get(&x).await.unwrap().unwrap();
        assert_eq!(
            (done.status, done.result_meta.as_deref(), done.error),
            (Status::Succeeded, Some("{\"ok\":true}"), None)
        );
        // A settled invocation is not started again (a late redelivery of its message).
        assert!(a.start(&x, "1.2").await.unwrap().is_none());

        // A retry puts it back with its error, due later; its lease ended with it.
        a.start(&y, "2.1").await.unwrap().unwrap();
        assert!(b.retry_at(&y, "2.1", "boom", Duration::from_secs(3600)).await.unwrap());
        let retried = a.get(&y).await.unwrap().unwrap();
        assert_eq!((retried.status, retried.error.as_deref()), (Status::Queued, Some("boom")));
        assert!(retried.next_ms > now_ms() + 3_500_000);
        assert!(!a.retry_at(&y, "2.1", "boom", Duration::ZERO).await.unwrap());
        assert_eq!(a.unsettled().await.unwrap(), pairs(&[(&y, &y)]));

        // Buried: a dead letter, no longer unsettled.
        let (again, _) = b.start(&y, "2.2").await.unwrap().unwrap();
        assert_eq!(again.attempts, 2);
        assert!(a.bury(&y, "2.2", "dead").await.unwrap());
        let dead = b.dead_letters(None, 10).await.unwrap();
        assert_eq!(
            dead.iter().map(|r| (r.id.as_str(), r.error.as_deref())).collect::<Vec<_>>(),
            [(y.as_str(), Some("dead"))]
        );
        assert_eq!(b.unsettled().await.unwrap(), vec![]);
        assert_eq!(a.result(&y).await.unwrap(), None);

        // Re-driven under a new message, with a fresh set of attempts and its payload.
        let message = b.redrive(&y).await.unwrap().unwrap();
        assert!(message.starts_with(&format!("{y}.")) && message != y, "{message}");
        assert!(a.redrive(&y).await.unwrap().is_none(), "no longer dead");
        assert!(a.redrive(&x).await.unwrap().is_none(), "never dead");
        assert_eq!(a.unsettled().await.unwrap(), vec![(y.clone(), message)]);
        assert!(b.dead_letters(None, 10).await.unwrap().is_empty());
        let (redriven, payload) = a.start(&y, "3.1").await.unwrap().unwrap();
        assert_eq!((redriven.attempts, payload.len()), (1, 3));
    })
    .await;
}

#[tokio::test]
async fn a_stale_lease_does_not_overwrite_the_new_owners_outcome() {
    each(async |a, b, p| {
        let x = format!("{p}-x");
        a.insert_invocation(&inv(&x)).await.unwrap();
        // The first consumer's lease ran out (it hung); the message's next claim, on the other
        // node, started it again.
        a.start(&x, "7.1").await.unwrap().unwrap();
        let (owner, _) = b.start(&x, "7.2").await.unwrap().unwrap();
        assert_eq!(owner.attempts, 2);
        assert!(!a.retry_at(&x, "7.1", "late", Duration::ZERO).await.unwrap());
        assert!(!a.bury(&x, "7.1", "late").await.unwrap());
        assert!(!a.finish(&x, "7.1", "[\"stale\"]", b"stale").await.unwrap());
        assert_eq!(b.get(&x).await.unwrap().unwrap().status, Status::Running);
        assert!(b.finish(&x, "7.2", "[\"owner\"]", b"owner").await.unwrap());
        // Nor after the owner finished.
        assert!(!a.finish(&x, "7.1", "[\"stale\"]", b"stale").await.unwrap());
        assert!(!a.bury(&x, "7.1", "late").await.unwrap());
        assert!(!a.retry_at(&x, "7.1", "late", Duration::ZERO).await.unwrap());
        let row = a.get(&x).await.unwrap().unwrap();
        assert_eq!((row.status, row.result_meta.as_deref()), (Status::Succeeded, Some("[\"owner\"]")));
        assert_eq!(a.result(&x).await.unwrap().unwrap(), b"owner");
    })
    .await;
}

#[tokio::test]
async fn of_starts_at_once_the_last_one_owns_the_invocation() {
    each(async |a, b, p| {
        let x = format!("{p}-x");
        a.insert_invocation(&inv(&x)).await.unwrap();
        let mut starts = Vec::new();
        for n in 0..8 {
            let (log, x) = (if n % 2 == 0 { a.clone() } else { b.clone() }, x.clone());
            starts.push(tokio::spawn(async move { log.start(&x, &format!("9.{n}")).await }));
        }
        for s in starts {
            assert!(s.await.unwrap().unwrap().is_some());
        }
        assert_eq!(a.get(&x).await.unwrap().unwrap().attempts, 8, "every start counted");
        let mut owners = 0;
        for n in 0..8 {
            if b.finish(&x, &format!("9.{n}"), "[]", b"").await.unwrap() {
                owners += 1;
            }
        }
        assert_eq!(owners, 1);
    })
    .await;
}

#[tokio::test]
async fn dead_letters_page_in_byte_order_of_their_ids() {
    each(async |a, b, p| {
        let ids: Vec<String> = ["0", "A", "a", "b", "c"].iter().map(|s| format!("{p}-{s}")).collect();
        // Inserted out of order, buried through both nodes.
        for (n, id) in ids.iter().rev().enumerate() {
            let log = if n % 2 == 0 { &a } else { &b };
            log.insert_invocation(&inv(id)).await.unwrap();
            log.start(id, "1.1").await.unwrap().unwrap();
            assert!(log.bury(id, "1.1", "no").await.unwrap());
        }
        let page = |rows: Vec<pixflow_backends::InvocationRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(page(a.dead_letters(None, 2).await.unwrap()), ids[..2]);
        assert_eq!(page(b.dead_letters(Some(&ids[1]), 2).await.unwrap()), ids[2..4]);
        assert_eq!(page(a.dead_letters(Some(&ids[3]), 2).await.unwrap()), ids[4..]);
        assert!(b.dead_letters(Some(&ids[4]), 2).await.unwrap().is_empty());
        assert!(a.dead_letters(None, 0).await.unwrap().is_empty());
        let all = b.dead_letters(None, 100).await.unwrap();
        assert!(all.iter().all(|r| r.status == Status::Dead && r.attempts == 1));
    })
    .await;
}

#[tokio::test]
async fn finished_invocations_are_purged_after_retention() {
    each(async |a, b, p| {
        let (done, dead, queued, running) =
            (format!("{p}-done"), format!("{p}-dead"), format!("{p}-queued"), format!("{p}-running"));
        for id in [&done, &dead, &queued, &running] {
            a.insert_invocation(&inv(id)).await.unwrap();
        }
        a.start(&done, "1.1").await.unwrap().unwrap();
        assert!(a.finish(&done, "1.1", "[]", b"x").await.unwrap());
        b.start(&dead, "2.1").await.unwrap().unwrap();
        assert!(b.bury(&dead, "2.1", "no").await.unwrap());
        b.start(&running, "3.1").await.unwrap().unwrap();
        // Nothing finished before a minute ago.
        assert_eq!(b.purge_finished(now_ms() - 60_000).await.unwrap(), 0);
        assert_eq!(a.purge_finished(now_ms() + 1).await.unwrap(), 2);
        for (id, kept) in [(&done, false), (&dead, false), (&queued, true), (&running, true)] {
            assert_eq!(b.get(id).await.unwrap().is_some(), kept, "{id}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_invocation_never_queued_is_forgotten() {
    each(async |a, b, p| {
        let (x, kept) = (format!("{p}-x"), format!("{p}-kept"));
        a.insert_invocation(&inv(&x)).await.unwrap();
        a.insert_invocation(&inv(&kept)).await.unwrap();
        b.delete_invocation(&x).await.unwrap();
        assert!(a.get(&x).await.unwrap().is_none());
        assert!(a.start(&x, "1.1").await.unwrap().is_none(), "gone");
        assert_eq!(a.unsettled().await.unwrap(), pairs(&[(&kept, &kept)]));
        // The same id twice is refused: ids name one invocation.
        assert!(b.insert_invocation(&inv(&kept)).await.is_err());
    })
    .await;
}

/// Where the queue lives in the log's own database, an invocation and its message are recorded
/// in one commit, or neither is; a queue elsewhere (another file, another pool) is left to the
/// caller.
#[tokio::test]
async fn an_invocation_and_its_message_are_recorded_together_where_they_share_a_database() {
    async fn case(same: &State, other: &State, prefix: &str) {
        let (log, queue) = (same.invocations(), same.queue("node-a").await.unwrap());
        let (work, spare) = (format!("{prefix}-work"), format!("{prefix}-spare"));
        let id = format!("{prefix}-1");
        log.insert_queued(&inv(&id), &queue, &work).await.expect("one database").unwrap();
        let d = queue.claim(&work, Duration::from_secs(60)).await.unwrap().expect("the message is queued");
        assert_eq!((d.id.as_str(), d.payload.as_slice()), (id.as_str(), id.as_bytes()));
        assert_eq!(log.get(&id).await.unwrap().unwrap().status, Status::Queued);
        // A row that cannot be inserted (its id is taken) leaves no message either.
        assert!(log.insert_queued(&inv(&id), &queue, &spare).await.expect("one database").is_err());
        assert!(queue.claim(&spare, Duration::from_secs(60)).await.unwrap().is_none());
        // A queue in another database: nothing written, the caller does it in two steps.
        let elsewhere = other.queue("node-b").await.unwrap();
        let id2 = format!("{prefix}-2");
        assert!(log.insert_queued(&inv(&id2), &elsewhere, &work).await.is_none());
        assert!(log.get(&id2).await.unwrap().is_none());
        queue.remove(&work).await.unwrap();
    }
    each_pair(case).await;
}

/// An accepted invocation wakes a worker of the same node waiting for it (the node's own
/// announcement is the only one it gets), without its backstop timer.
#[tokio::test]
async fn an_accepted_invocation_wakes_a_worker_of_its_own_node() {
    async fn case(same: &State, _other: &State, prefix: &str) {
        let (log, queue) = (same.invocations(), same.queue("node-a").await.unwrap());
        let work = format!("{prefix}-work");
        let worker = {
            let (log, queue, work) = (log.clone(), queue.clone(), work.clone());
            tokio::spawn(async move {
                log.next_started(&queue, &work, Duration::from_secs(60), pending()).await.expect("one database")
            })
        };
        // Waiting with nothing due (its backstop timer is 30 s away).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = format!("{prefix}-1");
        log.insert_queued(&inv(&id), &queue, &work).await.expect("one database").unwrap();
        let claimed = tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .expect("the worker was woken")
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(claimed.delivery.id, id);
        queue.remove(&work).await.unwrap();
    }
    each_pair(case).await;
}

/// Where the queue lives in the log's own database, a claim starts the invocation its message
/// names, and an outcome settles the message, each in one commit; the lease fences both, and a
/// queue elsewhere is left to the caller.
#[tokio::test]
async fn a_claim_starts_its_invocation_and_its_outcome_settles_its_message_where_they_share_a_database() {
    async fn case(same: &State, other: &State, prefix: &str) {
        let (log, queue) = (same.invocations(), same.queue("node-a").await.unwrap());
        let work = format!("{prefix}-work");
        let minute = Duration::from_secs(60);
        let [x, y, z] = ["x", "y", "z"].map(|n| format!("{prefix}-{n}"));
        for id in [&x, &y, &z] {
            log.insert_queued(&inv(id), &queue, &work).await.expect("one database").unwrap();
        }

        // x: started with its claim, and succeeded with its settlement.
        let c = log.next_started(&queue, &work, minute, pending()).await.expect("one database").unwrap().unwrap();
        let (row, payload) = c.started.expect("x starts");
        assert_eq!((c.delivery.id.as_str(), row.id.as_str()), (x.as_str(), x.as_str()));
        assert_eq!((row.status, row.attempts, payload.as_slice()), (Status::Running, 1, &[1, 2, 3][..]));
        // Started under the delivery's lease: the classic outcome under another token is refused.
        assert!(!log.finish(&x, "0.0", "[]", b"").await.unwrap());
        let done = Outcome::Succeeded { result_meta: "[\"ok\"]", result: b"bytes" };
        let settled = log.settle(&x, &c.delivery.lease, done, &queue).await.expect("one database").unwrap();
        assert_eq!(settled, Settled { recorded: true, settled: true });
        assert_eq!(log.get(&x).await.unwrap().unwrap().status, Status::Succeeded);
        assert_eq!(log.result(&x).await.unwrap().unwrap(), b"bytes");
        assert!(matches!(queue.finish(&c.delivery.lease).await, Err(QueueError::Stale)), "settled already");
        assert_eq!(queue.stats(&work).await.unwrap().depth, 2);

        // y: its first lease runs out and the next claim starts it again; the first lease's
        // outcome changes neither the log nor the queue.
        let first =
            log.next_started(&queue, &work, Duration::from_millis(1), pending()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.delivery.id, y);
        // z is claimed and kept, out of the way.
        let z_claimed = log.next_started(&queue, &work, minute, pending()).await.unwrap().unwrap().unwrap();
        assert_eq!(z_claimed.delivery.id, z);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = log.next_started(&queue, &work, minute, pending()).await.unwrap().unwrap().unwrap();
        assert_eq!((second.delivery.id.as_str(), second.started.as_ref().unwrap().0.attempts), (y.as_str(), 2));
        let late = Outcome::Dead { error: "late", reason: "late" };
        let settled = log.settle(&y, &first.delivery.lease, late, &queue).await.unwrap().unwrap();
        assert_eq!(settled, Settled { recorded: false, settled: false });
        assert_eq!(log.get(&y).await.unwrap().unwrap().status, Status::Running);
        // Its owner puts it back due now: the message is claimed again at once, a third start.
        let again = Outcome::Retry { error: "busy", delay: Duration::ZERO };
        let settled = log.settle(&y, &second.delivery.lease, again, &queue).await.unwrap().unwrap();
        assert_eq!(settled, Settled { recorded: true, settled: true });
        let row = log.get(&y).await.unwrap().unwrap();
        assert_eq!((row.status, row.error.as_deref()), (Status::Queued, Some("busy")));
        let third = log.next_started(&queue, &work, minute, pending()).await.unwrap().unwrap().unwrap();
        assert_eq!((third.delivery.id.as_str(), third.started.as_ref().unwrap().0.attempts), (y.as_str(), 3));
        // Dead-lettered: the message is buried with the reason, the row keeps the error.
        let dead = Outcome::Dead { error: "{\"code\":\"bad_input\"}", reason: "bad_input" };
        let settled = log.settle(&y, &third.delivery.lease, dead, &queue).await.unwrap().unwrap();
        assert_eq!(settled, Settled { recorded: true, settled: true });
        assert_eq!(log.dead_letters(None, 10).await.unwrap().iter().map(|r| r.id.clone()).collect::<Vec<_>>(), [y]);
        assert_eq!(queue.stats(&work).await.unwrap().depth, 1, "z is left");

        // A message that names no invocation is claimed, and starts nothing.
        queue.enqueue(&work, "stray", b"\xff not an id", Duration::ZERO).await.unwrap();
        queue.enqueue(&work, "gone", b"no-such-invocation", Duration::ZERO).await.unwrap();
        for expected in ["stray", "gone"] {
            let c = log.next_started(&queue, &work, minute, pending()).await.unwrap().unwrap().unwrap();
            assert_eq!((c.delivery.id.as_str(), c.started.is_none()), (expected, true));
        }
        // Nothing due: a stop ends the wait, with nothing claimed.
        let stopped = log.next_started(&queue, &work, minute, std::future::ready(())).await.unwrap().unwrap();
        assert!(stopped.is_none());

        // A queue in another database: nothing claimed or settled, the caller does it in steps.
        let (elsewhere, spare) = (other.queue("node-b").await.unwrap(), format!("{prefix}-spare"));
        elsewhere.enqueue(&spare, &z, z.as_bytes(), Duration::ZERO).await.unwrap();
        assert!(log.next_started(&elsewhere, &spare, minute, pending()).await.is_none());
        let d = elsewhere.claim(&spare, minute).await.unwrap().unwrap();
        let done = Outcome::Succeeded { result_meta: "[]", result: b"" };
        assert!(log.settle(&z, &d.lease, done, &elsewhere).await.is_none());
        assert_eq!(log.get(&z).await.unwrap().unwrap().status, Status::Running, "z is still the first claim's");
        queue.remove(&work).await.unwrap();
        elsewhere.remove(&spare).await.unwrap();
    }
    each_pair(case).await;
}

/// A node's workers claiming at once (more than one statement's worth where claims share
/// statements) each take a message of their own, started under its own lease, and nothing is
/// taken twice or left behind.
#[tokio::test]
async fn workers_claiming_at_once_each_start_a_message_of_their_own() {
    async fn case(state: &State, prefix: &str) {
        let (log, queue) = (state.invocations(), state.queue("node-a").await.unwrap());
        let work = format!("{prefix}-work");
        let mut ids: Vec<String> = (0..50).map(|n| format!("{prefix}-{n:02}")).collect();
        for id in &ids {
            log.insert_queued(&inv(id), &queue, &work).await.expect("one database").unwrap();
        }
        let workers: Vec<_> = (0..ids.len())
            .map(|_| {
                let (log, queue, work) = (log.clone(), queue.clone(), work.clone());
                tokio::spawn(async move {
                    let c = log
                        .next_started(&queue, &work, Duration::from_secs(60), pending())
                        .await
                        .unwrap()
                        .unwrap()
                        .unwrap();
                    let (row, _) = c.started.expect("each message names its invocation");
                    assert_eq!((row.id.as_str(), row.attempts), (c.delivery.id.as_str(), 1));
                    (row.id, c.delivery.lease)
                })
            })
            .collect();
        let mut taken = Vec::new();
        for w in workers {
            taken.push(w.await.unwrap());
        }
        let mut got: Vec<String> = taken.iter().map(|(id, _)| id.clone()).collect();
        got.sort();
        ids.sort();
        assert_eq!(got, ids, "each message once");
        assert!(queue.claim(&work, Duration::from_secs(60)).await.unwrap().is_none(), "none left");
        // Each was started under its own lease: its outcome settles its own message, also when
        // they all settle at once (where successes share statements), and one lease settled
        // twice at once counts once.
        let (twice_id, twice_lease) = taken[0].clone();
        taken.push((twice_id.clone(), twice_lease));
        let settlements: Vec<_> = taken
            .into_iter()
            .map(|(id, lease)| {
                let (log, queue) = (log.clone(), queue.clone());
                tokio::spawn(async move {
                    let result = id.as_bytes().to_vec();
                    let done = Outcome::Succeeded { result_meta: "[]", result: &result };
                    (id.clone(), log.settle(&id, &lease, done, &queue).await.unwrap().unwrap())
                })
            })
            .collect();
        let mut recorded = 0;
        for s in settlements {
            let (id, settled) = s.await.unwrap();
            assert_eq!(settled.recorded, settled.settled, "{id}");
            if settled.recorded {
                recorded += 1;
            } else {
                assert_eq!(id, twice_id, "only the second settlement of one lease is refused");
            }
        }
        assert_eq!(recorded, ids.len());
        for id in &ids {
            assert_eq!(log.result(id).await.unwrap().unwrap(), id.as_bytes(), "each its own result");
        }
        assert_eq!(queue.stats(&work).await.unwrap().depth, 0);
        queue.remove(&work).await.unwrap();
    }
    each_pair(async |state: &State, _: &State, prefix: &str| case(state, prefix).await).await;
}

/// Acceptances made at once are each recorded with their own message; an id taken already, or
/// twice among them, is refused for that acceptance alone.
#[tokio::test]
async fn acceptances_made_at_once_are_each_recorded_and_a_taken_id_is_refused_alone() {
    async fn case(state: &State, prefix: &str) {
        let (log, queue) = (state.invocations(), state.queue("node-a").await.unwrap());
        let work = format!("{prefix}-work");
        let taken = format!("{prefix}-taken");
        log.insert_queued(&inv(&taken), &queue, &work).await.expect("one database").unwrap();
        let mut ids: Vec<String> = (0..70).map(|n| format!("{prefix}-{n:02}")).collect();
        // The taken id again, and one id twice.
        let sent: Vec<String> = ids.iter().cloned().chain([taken.clone(), ids[7].clone()]).collect();
        let acceptances: Vec<_> = sent
            .into_iter()
            .map(|id| {
                let (log, queue, work) = (log.clone(), queue.clone(), work.clone());
                tokio::spawn(async move {
                    let mut new = inv(&id);
                    new.payload = id.as_bytes().to_vec();
                    (id, log.insert_queued(&new, &queue, &work).await.expect("one database").is_ok())
                })
            })
            .collect();
        let mut refused = Vec::new();
        for a in acceptances {
            let (id, ok) = a.await.unwrap();
            if !ok {
                refused.push(id);
            }
        }
        refused.sort();
        let mut expected = vec![taken.clone(), ids[7].clone()];
        expected.sort();
        assert_eq!(refused, expected, "the taken id, and the second of the id sent twice");
        ids.push(taken);
        let mut queued = Vec::new();
        while let Some(d) = queue.claim(&work, Duration::from_secs(60)).await.unwrap() {
            queued.push(d.id);
        }
        queued.sort();
        ids.sort();
        assert_eq!(queued, ids, "each recorded invocation has its one message");
        for id in ids.iter().filter(|id| !id.ends_with("-taken")) {
            let (_, payload) = log.start(id, "1.1").await.unwrap().expect("recorded");
            assert_eq!(payload, id.as_bytes(), "each its own payload");
        }
        queue.remove(&work).await.unwrap();
    }
    each_pair(async |state: &State, _: &State, prefix: &str| case(state, prefix).await).await;
}

/// PostgreSQL: a burst that the statistics do not know of (gathered while nothing was waiting,
/// so they say the partial indexes of waiting work are empty) is started and settled through
/// key lookups. A plan that believed the statistics would scan the whole partial index
/// for each row, reading a number of index entries that grows with the square of the burst.
#[tokio::test]
async fn a_burst_the_statistics_do_not_know_of_is_settled_through_key_lookups() {
    let Some(server) = crate::support::postgres_url("invocation log") else { return };
    let schema = crate::support::Schema::create(&server).await;
    let state = State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable");
    let (log, queue) = (state.invocations(), state.queue("node-a").await.unwrap());
    let work = fresh("work");
    // History: settled invocations and messages, and statistics gathered then.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&schema.url).await.unwrap();
    for statement in [
        "INSERT INTO invocations (id, function, status, attempts, max_attempts, meta, payload, created_ms, updated_ms, next_ms)
         SELECT 'old-' || i, 'thumb', 'succeeded', 1, 3, '{}', '', 1, 1, 1 FROM generate_series(1, 2000) i",
        "INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, fence, enqueued_ms, settled_ms)
         SELECT 'old', 'old-' || i, 'done', '', 1, 1, 1, 1 FROM generate_series(1, 2000) i",
        "ANALYZE invocations",
        "ANALYZE queue_messages",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    let n = 300;
    for i in 0..n {
        log.insert_queued(&inv(&format!("new-{i}")), &queue, &work).await.expect("one database").unwrap();
    }
    for _ in 0..n {
        let c = log.next_started(&queue, &work, Duration::from_secs(60), pending()).await.unwrap().unwrap().unwrap();
        let done = Outcome::Succeeded { result_meta: "[]", result: b"" };
        let settled = log.settle(&c.delivery.id, &c.delivery.lease, done, &queue).await.unwrap().unwrap();
        assert_eq!(settled, Settled { recorded: true, settled: true });
    }
    // A backend reports its counts when its connection closes.
    state.close().await;
    let read = |index: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(idx_tup_read), 0)::BIGINT FROM pg_stat_user_indexes
             WHERE schemaname = current_schema() AND indexrelname = $1",
        )
        .bind(index)
    };
    let mut updates = 0;
    for _ in 0..100 {
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut conn).await.unwrap();
        updates = sqlx::query_scalar::<_, i64>(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = current_schema() AND relname = 'invocations'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if updates >= 2 * n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(updates >= 2 * n, "every start and outcome counted ({updates})");
    // No statement of the burst needs the index of unsettled invocations: a lookup by id that
    // scanned it would read about n * n / 2 entries. (The index of due messages is the claim's
    // own, and how many of its entries a claim reads depends on what vacuum and other
    // transactions leave in it, so its count proves nothing either way.)
    let unsettled = read("invocations_unsettled").fetch_one(&mut conn).await.unwrap();
    assert!(unsettled < n, "invocations looked up by id, not found in the index of unsettled ones ({unsettled})");
    drop(conn);
    schema.drop().await;
}
