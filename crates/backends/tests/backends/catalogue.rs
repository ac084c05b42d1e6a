//! The catalogue contract, run against every backend: SQLite always; PostgreSQL when
//! `PIXFLOW_TEST_POSTGRES_URL` names a server (`.ci/run` sets it; a configured server that does
//! not answer fails the suite), each case in a schema of its own. Each case gets two handles,
//! "nodes": two handles on one state file for SQLite, two connection pools for PostgreSQL, and
//! a prefix for the names it writes.

use std::time::Duration;

use crate::support::fresh;
use pixflow_backends::{Bucket, BucketConfig, Catalogue, CatalogueChange, QueueError, State, StateError};

/// Runs `case` with two handles on each backend.
async fn each(case: impl AsyncFn(Catalogue, Catalogue, String)) {
    let dir = std::env::temp_dir().join(fresh("pixflow-catalogue"));
    std::fs::create_dir_all(&dir).unwrap();
    let state = State::sqlite(&dir.join("state.db")).await.unwrap();
    case(state.catalogue(), state.catalogue(), fresh("sqlite")).await;
    state.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    if let Some(server) = crate::support::postgres_url("catalogue") {
        let schema = crate::support::Schema::create(&server).await;
        let a = State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable");
        let b = State::postgres(&schema.url).await.unwrap();
        case(a.catalogue(), b.catalogue(), fresh("pg")).await;
        a.close().await;
        b.close().await;
        schema.drop().await;
    }
}

/// The functions whose names start with `prefix`, as listed.
async fn functions(c: &Catalogue, prefix: &str) -> Vec<(String, String)> {
    c.functions().await.unwrap().into_iter().filter(|(name, _)| name.starts_with(prefix)).collect()
}

#[tokio::test]
async fn deploys_and_tokens_written_through_one_node_are_seen_through_the_other() {
    each(async |a, b, p| {
        let thumb = format!("{p}-thumb");
        a.save_function(&thumb, "1", "version: '1'").await.unwrap();
        assert_eq!(functions(&b, &p).await, vec![(thumb.clone(), "version: '1'".to_owned())]);
        // A new version replaces the manifest under the same name.
        b.save_function(&thumb, "2", "version: '2'").await.unwrap();
        assert_eq!(functions(&a, &p).await, vec![(thumb.clone(), "version: '2'".to_owned())]);

        let (hash, role) = (format!("{p}-hash").into_bytes(), format!("{p}-role"));
        assert!(!b.has_role(&role).await.unwrap());
        a.add_token(&hash, &role, "cms").await.unwrap();
        assert_eq!(b.token_role(&hash).await.unwrap(), Some(role.clone()));
        assert!(b.has_role(&role).await.unwrap());
        assert_eq!(b.token_role(format!("{p}-other").as_bytes()).await.unwrap(), None);
        // The same hash again replaces the token's role.
        b.add_token(&hash, "invoke", "cms").await.unwrap();
        assert_eq!(a.token_role(&hash).await.unwrap().as_deref(), Some("invoke"));
        assert!(!a.has_role(&role).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn a_deleted_function_is_gone_for_every_node() {
    each(async |a, b, p| {
        let (kept, gone) = (format!("{p}-kept"), format!("{p}-gone"));
        a.save_function(&kept, "1", "kept").await.unwrap();
        a.save_function(&gone, "1", "gone").await.unwrap();
        assert_eq!(functions(&b, &p).await.len(), 2);
        assert_eq!(b.function(&gone).await.unwrap().as_deref(), Some("gone"));
        b.delete_function(&gone).await.unwrap();
        assert_eq!(functions(&a, &p).await, vec![(kept.clone(), "kept".to_owned())]);
        assert_eq!(a.function(&gone).await.unwrap(), None);
        assert_eq!(a.function(&kept).await.unwrap().as_deref(), Some("kept"));
        // Deleting what is not there is no error.
        a.delete_function(&gone).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn functions_are_listed_in_byte_order_of_their_names() {
    each(async |a, _b, p| {
        for name in ["b", "B", "a", "a-2"] {
            a.save_function(&format!("{p}-{name}"), "1", name).await.unwrap();
        }
        let manifests: Vec<String> = functions(&a, &p).await.into_iter().map(|(_, m)| m).collect();
        assert_eq!(manifests, ["B", "a", "a-2", "b"]);
    })
    .await;
}

#[tokio::test]
async fn bucket_settings_are_saved_updated_and_deleted() {
    each(async |a, b, p| {
        let media = format!("{p}-media");
        let public = BucketConfig { public: true, cache_control: Some("public, max-age=60".into()) };
        assert!(a.save_bucket(&media, &public).await.unwrap(), "a new bucket");
        let saved = b.buckets(Some(&media)).await.unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!((saved[0].name.as_str(), &saved[0].config), (media.as_str(), &public));
        // Saving again updates the settings and keeps the creation time.
        let private = BucketConfig { public: false, cache_control: None };
        assert!(!b.save_bucket(&media, &private).await.unwrap(), "an existing bucket");
        let expected = Bucket { name: media.clone(), config: private, created_ms: saved[0].created_ms };
        assert_eq!(a.buckets(Some(&media)).await.unwrap(), vec![expected]);
        // All of them, by name.
        let uploads = format!("{p}-uploads");
        b.save_bucket(&uploads, &public).await.unwrap();
        let names: Vec<String> =
            a.buckets(None).await.unwrap().into_iter().map(|b| b.name).filter(|n| n.starts_with(&p)).collect();
        assert_eq!(names, [media.clone(), uploads.clone()]);
        assert!(a.buckets(Some(&format!("{p}-none"))).await.unwrap().is_empty());
        // Deleted for every node; a second delete finds nothing.
        assert!(b.delete_bucket(&media).await.unwrap());
        assert!(!a.delete_bucket(&media).await.unwrap());
        assert!(a.buckets(Some(&media)).await.unwrap().is_empty());
        assert_eq!(b.buckets(Some(&uploads)).await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_labelled_token_is_replaced_in_one_step() {
    each(async |a, b, p| {
        let label = format!("{p}-configured");
        let (old, new, other) =
            (format!("{p}-old").into_bytes(), format!("{p}-new").into_bytes(), format!("{p}-other").into_bytes());
        a.add_token(&old, "admin", &label).await.unwrap();
        a.add_token(&other, "admin", "generated").await.unwrap();
        b.replace_labelled_token(&label, &new, "admin").await.unwrap();
        assert_eq!(a.token_role(&old).await.unwrap(), None);
        assert_eq!(a.token_role(&new).await.unwrap().as_deref(), Some("admin"));
        assert_eq!(a.token_role(&other).await.unwrap().as_deref(), Some("admin"), "another label is kept");
        // Nodes starting with the same setting replace it with itself.
        a.replace_labelled_token(&label, &new, "admin").await.unwrap();
        b.replace_labelled_token(&label, &new, "admin").await.unwrap();
        assert_eq!(b.token_role(&new).await.unwrap().as_deref(), Some("admin"));
    })
    .await;
}

#[tokio::test]
async fn nodes_replacing_the_same_labelled_token_at_once_all_succeed() {
    each(async |a, b, p| {
        let label = format!("{p}-configured");
        let hash = format!("{p}-token").into_bytes();
        let mut tasks = Vec::new();
        for n in 0..8 {
            let (c, label, hash) = (if n % 2 == 0 { a.clone() } else { b.clone() }, label.clone(), hash.clone());
            tasks.push(tokio::spawn(async move { c.replace_labelled_token(&label, &hash, "admin").await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(a.token_role(&hash).await.unwrap().as_deref(), Some("admin"));
    })
    .await;
}

/// The next change `changes` announces, or a failure after 10 s.
async fn next(changes: &mut tokio::sync::broadcast::Receiver<CatalogueChange>) -> CatalogueChange {
    tokio::time::timeout(Duration::from_secs(10), changes.recv())
        .await
        .expect("no change announced within 10 s")
        .unwrap()
}

#[tokio::test]
async fn changes_to_functions_are_announced_to_the_other_nodes() {
    each(async |a, b, p| {
        // One node owns a SQLite file: it makes every change itself, and nothing is announced.
        let (Some(mut seen_by_a), Some(mut seen_by_b)) = (a.changes(), b.changes()) else {
            assert!(a.changes().is_none() && b.changes().is_none());
            return;
        };
        let (thumb, other) = (format!("{p}-thumb"), format!("{p}-other"));
        a.save_function(&thumb, "1", "one").await.unwrap();
        assert_eq!(next(&mut seen_by_b).await, CatalogueChange::Function(thumb.clone()));
        a.save_function(&thumb, "2", "two").await.unwrap();
        a.delete_function(&thumb).await.unwrap();
        // Deleting what is not there announces nothing.
        a.delete_function(&thumb).await.unwrap();
        a.save_function(&other, "1", "other").await.unwrap();
        for expected in [&thumb, &thumb, &other] {
            assert_eq!(next(&mut seen_by_b).await, CatalogueChange::Function(expected.clone()));
        }
        // A node hears only the others: the first change A hears is B's.
        b.save_function(&other, "2", "other 2").await.unwrap();
        assert_eq!(next(&mut seen_by_a).await, CatalogueChange::Function(other.clone()));
        assert!(seen_by_b.try_recv().is_err(), "B heard its own change");
    })
    .await;
}

/// Every handle of an open state answers a ping (a health probe's question); once the state is
/// closed, each says the store is out of reach (`Unavailable`, which the server answers with
/// 503), not that it failed.
#[tokio::test]
async fn every_handle_answers_a_ping_until_the_state_is_closed() {
    let check = async |state: State| {
        let (catalogue, log) = (state.catalogue(), state.invocations());
        let queue = state.queue(&fresh("node")).await.unwrap();
        catalogue.ping().await.unwrap();
        log.ping().await.unwrap();
        queue.ping().await.unwrap();
        state.close().await;
        let unreachable = |e: StateError| matches!(e, StateError::Unavailable(_));
        assert!(catalogue.ping().await.is_err_and(unreachable), "{}", state.backend());
        assert!(log.ping().await.is_err_and(unreachable), "{}", state.backend());
        assert!(matches!(queue.ping().await, Err(QueueError::Unavailable(_))), "{}", state.backend());
    };
    check(State::memory().await.unwrap()).await;
    if let Some(server) = crate::support::postgres_url("catalogue") {
        let schema = crate::support::Schema::create(&server).await;
        check(State::postgres(&schema.url).await.expect("PIXFLOW_TEST_POSTGRES_URL is set but unreachable")).await;
        schema.drop().await;
    }
}
