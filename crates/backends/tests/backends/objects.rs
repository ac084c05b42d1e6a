//! The object store's behaviour, run against each backend: the embedded store, and (feature
//! `s3`) the S3 backend against an S3 server in this process (`s3s-fs`, SigV4 on).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use pixflow_backends::{
    Actor, BucketConfig, ChangeKind, ChangeRecord, Condition, FeedError, Listing, ObjectError, ObjectMeta, Objects,
    Resume, Retention,
};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("pixflow-objects-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store of one backend with a bucket `media`; the folder holds everything it keeps.
struct Fixture {
    objects: Objects,
    /// Where its uploads spool.
    spool: PathBuf,
    _dir: Dir,
}

async fn embedded(name: &str) -> Fixture {
    let dir = Dir::new(&format!("embedded-{name}"));
    let objects = Objects::open(&dir.0.join("store")).await.unwrap();
    objects.put_bucket("media", &BucketConfig::default()).await.unwrap();
    Fixture { objects, spool: dir.0.join("store/tmp"), _dir: dir }
}

#[cfg(feature = "s3")]
mod service {
    use super::*;

    pub use pixflow_backends::objects::test_server::{config, start};

    pub async fn fixture(name: &str) -> Fixture {
        let dir = Dir::new(&format!("s3-{name}"));
        let root = dir.0.join("service");
        // The service's buckets: `media`, and `spare` that pixflow has not registered.
        std::fs::create_dir_all(root.join("media")).unwrap();
        std::fs::create_dir_all(root.join("spare")).unwrap();
        let endpoint = start(&root).await.unwrap();
        let settings = pixflow_backends::State::memory().await.unwrap().catalogue();
        let objects = Objects::open_s3(&config(endpoint), settings, &dir.0.join("spool")).await.unwrap();
        objects.put_bucket("media", &BucketConfig::default()).await.unwrap();
        Fixture { objects, spool: dir.0.join("spool"), _dir: dir }
    }
}

/// Each behaviour, once per backend.
macro_rules! behaviour {
    ($($name:ident),* $(,)?) => {
        mod embedded_store {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let f = super::embedded(stringify!($name)).await;
                super::$name(&f.objects).await;
                super::spool_is_empty(&f);
            })*
        }
        #[cfg(feature = "s3")]
        mod s3_service {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let f = super::service::fixture(stringify!($name)).await;
                super::$name(&f.objects).await;
                super::spool_is_empty(&f);
            })*
        }
    };
}

behaviour!(
    objects_round_trip_with_their_facts,
    readers_take_ranges_of_one_version,
    changes_are_recorded_in_order_with_their_cause,
    a_waiter_wakes_on_a_commit,
    conditions_hold,
    uploads_stream_with_a_limit,
    large_uploads_arrive_whole,
    buckets_are_registered_updated_and_deleted_only_when_empty,
    listing_pages_through_prefixes_and_delimiters,
);

/// Whatever a behaviour did, committed or refused, its uploads left no spooled file.
fn spool_is_empty(f: &Fixture) {
    let left: Vec<_> = std::fs::read_dir(&f.spool).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "{left:?}");
}

async fn put(o: &Objects, key: &str, bytes: &[u8]) -> ObjectMeta {
    o.put("media", key, "image/png", &BTreeMap::new(), &Condition::None, bytes).await.unwrap()
}

/// Equal but for the modification time, which services keep in whole seconds.
fn same_object(a: &ObjectMeta, b: &ObjectMeta) {
    assert_eq!((&a.bucket, &a.key, a.size, &a.etag), (&b.bucket, &b.key, b.size, &b.etag));
    assert_eq!((&a.content_type, &a.metadata), (&b.content_type, &b.metadata));
    assert!((a.modified_ms - b.modified_ms).abs() < 2_000, "{} vs {}", a.modified_ms, b.modified_ms);
}

async fn objects_round_trip_with_their_facts(o: &Objects) {
    let meta = BTreeMap::from([("origin".to_owned(), "cms".to_owned())]);
    let m = o.put("media", "a/b ü.png", "image/png", &meta, &Condition::None, b"hello").await.unwrap();
    assert_eq!((m.size, m.etag.as_str()), (5, "5d41402abc4b2a76b9719d911017c592"));
    let head = o.head("media", "a/b ü.png").await.unwrap();
    same_object(&head, &m);
    assert_eq!(head.metadata["origin"], "cms");
    let (read, bytes) = o.read("media", "a/b ü.png", 100).await.unwrap();
    assert_eq!(bytes, b"hello");
    same_object(&read, &m);
    assert!(matches!(o.read("media", "a/b ü.png", 4).await, Err(ObjectError::TooLarge { limit: 4, actual: 5 })));
    assert!(matches!(o.head("media", "nope").await, Err(ObjectError::NoSuchKey { .. })));
    assert!(matches!(o.read("media", "nope", 10).await, Err(ObjectError::NoSuchKey { .. })));
    assert!(matches!(o.head("other", "a/b ü.png").await, Err(ObjectError::NoSuchBucket(_))));
    assert!(matches!(
        o.put("other", "k", "image/png", &BTreeMap::new(), &Condition::None, b"x").await,
        Err(ObjectError::NoSuchBucket(_))
    ));
    // Keys and attributes are checked before any backend sees them.
    for bad in ["../etc/passwd", "a//b", "nul\0"] {
        assert!(matches!(o.head("media", bad).await, Err(ObjectError::InvalidKey(_))), "{bad:?}");
    }
    let bad_meta = BTreeMap::from([("Bad Name".to_owned(), "x".to_owned())]);
    assert!(matches!(
        o.put("media", "k", "image/png", &bad_meta, &Condition::None, b"x").await,
        Err(ObjectError::InvalidMetadata(_))
    ));
    put(o, "a/b ü.png", b"world!").await;
    assert_eq!(o.read("media", "a/b ü.png", 100).await.unwrap().1, b"world!");
    assert!(o.delete("media", "a/b ü.png", &Condition::None).await.unwrap());
    assert!(!o.delete("media", "a/b ü.png", &Condition::None).await.unwrap());
    assert!(matches!(o.head("media", "a/b ü.png").await, Err(ObjectError::NoSuchKey { .. })));
}

async fn readers_take_ranges_of_one_version(o: &Objects) {
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    put(o, "big.bin", &bytes).await;
    let (m, reader) = o.get("media", "big.bin").await.unwrap();
    assert_eq!(m.size, 200_000);
    let part: Vec<Bytes> = reader.range(70_000, 100_001).await.unwrap().try_collect().await.unwrap();
    assert_eq!(part.concat(), &bytes[70_000..170_001]);
    let (_, reader) = o.get("media", "big.bin").await.unwrap();
    let none: Vec<Bytes> = reader.range(0, 0).await.unwrap().try_collect().await.unwrap();
    assert!(none.concat().is_empty());
    // A reader taken before an overwrite (of the same size) reads the old version or fails;
    // it never mixes them.
    let (_, before) = o.get("media", "big.bin").await.unwrap();
    put(o, "big.bin", &vec![7u8; bytes.len()]).await;
    match before.range(0, 200_000).await {
        Ok(stream) => match stream.try_collect::<Vec<Bytes>>().await {
            Ok(chunks) => assert_eq!(chunks.concat(), bytes),
            Err(e) => panic!("a started read failed: {e}"),
        },
        Err(e) => assert!(matches!(e, ObjectError::PreconditionFailed(_)), "{e}"),
    }
}

/// The parts of a record a test can know in advance (not its number or time).
fn fields(r: &ChangeRecord) -> (ChangeKind, Option<bool>, &str, Option<&str>, u64, &Actor) {
    (r.kind, r.replaced, r.key.as_str(), r.etag.as_deref(), r.size, &r.actor)
}

async fn changes_are_recorded_in_order_with_their_cause(o: &Objects) {
    let feed = o.feed();
    let start = feed.last().await.unwrap();
    let none = BTreeMap::new();
    let cms = Actor::token("cms", "0a1b2c3d");
    let thumb = Actor::function("thumb", 1);
    let key = Actor::access_key("AKIDEXAMPLE");
    let created = o.by(cms.clone()).put("media", "a", "text/plain", &none, &Condition::Absent, b"one").await.unwrap();
    let fresh = Condition::Matches(vec![created.etag.clone()]);
    let overwritten = o.by(thumb.clone()).put("media", "a", "text/plain", &none, &fresh, b"three").await.unwrap();
    let plain = put(o, "b", b"22").await;
    // Refused writes, a refused delete and a delete of nothing record nothing.
    let stale = Condition::Matches(vec!["0000".into()]);
    assert!(o.put("media", "a", "text/plain", &none, &Condition::Absent, b"x").await.is_err());
    assert!(o.put("media", "a", "text/plain", &none, &stale, b"x").await.is_err());
    assert!(o.put("media", "c", "text/plain", &none, &Condition::Matches(vec!["*".into()]), b"x").await.is_err());
    assert!(o.delete("media", "a", &stale).await.is_err());
    assert!(!o.delete("media", "nothing", &Condition::None).await.unwrap());
    assert!(o.by(key.clone()).delete("media", "a", &Condition::None).await.unwrap());

    let records = feed.read(start, 100).await.unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (start + 1..=start + 4).collect::<Vec<_>>());
    assert_eq!(feed.last().await.unwrap(), start + 4);
    // An unconditional write to an S3 service cannot tell whether it replaced an object.
    let unknown = if o.kind() == "embedded" { Some(false) } else { None };
    let system = Actor::system();
    assert_eq!(
        records.iter().map(fields).collect::<Vec<_>>(),
        [
            (ChangeKind::Put, Some(false), "a", Some(created.etag.as_str()), 3, &cms),
            (ChangeKind::Put, Some(true), "a", Some(overwritten.etag.as_str()), 5, &thumb),
            (ChangeKind::Put, unknown, "b", Some(plain.etag.as_str()), 2, &system),
            (ChangeKind::Delete, Some(true), "a", None, 0, &key),
        ]
    );
    assert!(records.iter().all(|r| r.bucket == "media"));
    let now = pixflow_backends::state::now_ms();
    assert!(records.iter().all(|r| (now - r.time_ms).abs() < 60_000), "{records:?}");
    assert_eq!((key.depth, thumb.depth, o.actor()), (0, 1, &system));
    // Reading resumes anywhere, a page at a time.
    assert_eq!(feed.read(records[1].seq, 1).await.unwrap(), [records[2].clone()]);
    assert!(feed.read(feed.last().await.unwrap(), 10).await.unwrap().is_empty());
}

/// A reader that saw everything waits for the next commit, and a commit between its empty read
/// and its wait is not missed. (The bound only ends a broken run.)
async fn a_waiter_wakes_on_a_commit(o: &Objects) {
    let feed = o.feed();
    let seen = feed.last().await.unwrap();
    assert!(feed.read(seen, 10).await.unwrap().is_empty());
    let waiter = tokio::spawn({
        let feed = feed.clone();
        async move { feed.wait(seen).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "nothing was committed yet");
    put(o, "woken", b"x").await;
    tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("a commit wakes the waiter").unwrap().unwrap();
    let seen = feed.last().await.unwrap();
    assert!(feed.read(seen, 10).await.unwrap().is_empty());
    put(o, "between", b"y").await;
    tokio::time::timeout(Duration::from_secs(5), feed.wait(seen))
        .await
        .expect("a commit before the wait counts")
        .unwrap();
    assert_eq!(feed.read(seen, 10).await.unwrap().len(), 1);
}

async fn conditions_hold(o: &Objects) {
    let none = BTreeMap::new();
    let first = o.put("media", "k", "text/plain", &none, &Condition::Absent, b"one").await.unwrap();
    let again = o.put("media", "k", "text/plain", &none, &Condition::Absent, b"two").await;
    assert!(matches!(again, Err(ObjectError::PreconditionFailed(_))), "{again:?}");
    let stale = Condition::Matches(vec!["0000".into()]);
    assert!(matches!(
        o.put("media", "k", "text/plain", &none, &stale, b"two").await,
        Err(ObjectError::PreconditionFailed(_))
    ));
    assert!(matches!(
        o.put("media", "absent", "text/plain", &none, &Condition::Matches(vec!["*".into()]), b"x").await,
        Err(ObjectError::PreconditionFailed(_))
    ));
    let fresh = Condition::Matches(vec!["0000".into(), first.etag.clone()]);
    let second = o.put("media", "k", "text/plain", &none, &fresh, b"two").await.unwrap();
    assert!(matches!(o.delete("media", "k", &fresh).await, Err(ObjectError::PreconditionFailed(_))));
    assert_eq!(o.read("media", "k", 10).await.unwrap().1, b"two");
    assert!(o.delete("media", "k", &Condition::Matches(vec![second.etag])).await.unwrap());
}

async fn uploads_stream_with_a_limit(o: &Objects) {
    let mut u = o.upload(10).await.unwrap();
    u.write(b"12345").await.unwrap();
    assert!(matches!(u.write(b"678901").await, Err(ObjectError::TooLarge { limit: 10, actual: 11 })));
    drop(u);
    let mut u = o.upload(10).await.unwrap();
    u.write(b"12").await.unwrap();
    u.write(b"34").await.unwrap();
    assert_eq!(u.prefix(), b"1234");
    let m = o.commit(u, "media", "k", "text/plain", &BTreeMap::new(), &Condition::None).await.unwrap();
    assert_eq!(m.size, 4);
    assert_eq!(o.read("media", "k", 10).await.unwrap().1, b"1234");
    let listed = o.list("media", "", None, None, 10).await.unwrap();
    assert_eq!(listed.objects.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(), ["k"]);
}

/// Past the single-PUT size an S3 service gets the upload in parts; it still arrives whole.
async fn large_uploads_arrive_whole(o: &Objects) {
    let size = 20 << 20;
    let mut u = o.upload(size as u64).await.unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut all = Vec::with_capacity(size);
    for i in 0..20u8 {
        let c: Vec<u8> = chunk.iter().map(|b| b ^ i).collect();
        u.write(&c).await.unwrap();
        all.extend_from_slice(&c);
    }
    let meta = BTreeMap::from([("source".to_owned(), "camera".to_owned())]);
    let before = o.feed().last().await.unwrap();
    let m = o.commit(u, "media", "video.bin", "video/mp4", &meta, &Condition::Absent).await.unwrap();
    assert_eq!(m.size, size as u64);
    let head = o.head("media", "video.bin").await.unwrap();
    assert_eq!((head.size, &head.etag, head.content_type.as_str()), (m.size, &m.etag, "video/mp4"));
    assert_eq!(head.metadata["source"], "camera");
    let (_, bytes) = o.read("media", "video.bin", size as u64).await.unwrap();
    assert!(bytes == all, "the stored bytes differ");
    // Conditions hold for large uploads too, and a refused one changes nothing.
    for condition in [Condition::Absent, Condition::Matches(vec!["0000".into()])] {
        let mut u = o.upload(size as u64).await.unwrap();
        for _ in 0..20 {
            u.write(&chunk).await.unwrap();
        }
        let refused = o.commit(u, "media", "video.bin", "video/mp4", &meta, &condition).await;
        assert!(matches!(refused, Err(ObjectError::PreconditionFailed(_))), "{condition:?}: {refused:?}");
    }
    assert_eq!(o.head("media", "video.bin").await.unwrap().etag, m.etag);
    // One record, for the write that happened.
    let records = o.feed().read(before, 10).await.unwrap();
    let system = Actor::system();
    assert_eq!(
        records.iter().map(fields).collect::<Vec<_>>(),
        [(ChangeKind::Put, Some(false), "video.bin", Some(m.etag.as_str()), m.size, &system)]
    );
}

async fn buckets_are_registered_updated_and_deleted_only_when_empty(o: &Objects) {
    let public = BucketConfig { public: true, cache_control: Some("public, max-age=60".into()) };
    assert!(!o.put_bucket("media", &public).await.unwrap());
    assert_eq!(o.bucket("media").await.unwrap().unwrap().config, public);
    assert!(o.bucket("missing").await.unwrap().is_none());
    assert!(matches!(o.put_bucket("Bad_Name", &public).await, Err(ObjectError::InvalidBucket { .. })));
    let bad_cc = BucketConfig { public: false, cache_control: Some("x\ny".into()) };
    assert!(matches!(o.put_bucket("media", &bad_cc).await, Err(ObjectError::InvalidMetadata(_))));
    put(o, "k", b"x").await;
    assert!(matches!(o.delete_bucket("media").await, Err(ObjectError::BucketNotEmpty(_))));
    o.delete("media", "k", &Condition::None).await.unwrap();
    o.delete_bucket("media").await.unwrap();
    assert!(matches!(o.delete_bucket("media").await, Err(ObjectError::NoSuchBucket(_))));
    assert!(matches!(o.head("media", "k").await, Err(ObjectError::NoSuchBucket(_))));
    assert!(o.buckets().await.unwrap().is_empty());
    // Registering again brings the bucket back.
    assert!(o.put_bucket("media", &BucketConfig::default()).await.unwrap());
    assert_eq!(o.buckets().await.unwrap().iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["media"]);
}

async fn listing_pages_through_prefixes_and_delimiters(o: &Objects) {
    for k in ["a/1", "a/2", "a/x/1", "a/x/2", "a/y/1", "a-b", "b", "ab/1"] {
        put(o, k, b"x").await;
    }
    let keys = |l: &Listing| l.objects.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
    let all = o.list("media", "", None, None, 1000).await.unwrap();
    // Byte order, as S3 lists.
    assert_eq!(keys(&all), ["a-b", "a/1", "a/2", "a/x/1", "a/x/2", "a/y/1", "ab/1", "b"]);
    assert!(
        all.objects.iter().all(|l| l.size == 1 && l.etag == "9dd4e461268c8034f5c8564e155c67a6"),
        "{:?}",
        all.objects
    );
    assert!(all.next.is_none());
    let under_a = o.list("media", "a/", Some("/"), None, 1000).await.unwrap();
    assert_eq!(keys(&under_a), ["a/1", "a/2"]);
    assert_eq!(under_a.prefixes, ["a/x/", "a/y/"]);
    let top = o.list("media", "", Some("/"), None, 1000).await.unwrap();
    assert_eq!(keys(&top), ["a-b", "b"]);
    assert_eq!(top.prefixes, ["a/", "ab/"]);
    // A prefix is a plain string prefix, not a folder.
    let a_ish = o.list("media", "a", Some("/"), None, 1000).await.unwrap();
    assert_eq!((keys(&a_ish), a_ish.prefixes), (vec!["a-b".to_owned()], vec!["a/".to_owned(), "ab/".to_owned()]));
    // Pages of two, following `next`, give the same entries in the same order.
    let mut seen = Vec::new();
    let mut resume = None;
    loop {
        let page = o.list("media", "a/", Some("/"), resume.as_ref(), 2).await.unwrap();
        assert!(page.objects.len() + page.prefixes.len() <= 2);
        seen.extend(keys(&page));
        seen.extend(page.prefixes.clone());
        match page.next {
            Some(n) => resume = Some(Resume::from_token(&n.token()).unwrap()),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["a/1", "a/2", "a/x/", "a/y/"]);
    let mut flat = Vec::new();
    let mut resume = None;
    loop {
        let page = o.list("media", "", None, resume.as_ref(), 3).await.unwrap();
        flat.extend(keys(&page));
        match page.next {
            Some(n) => resume = Some(n),
            None => break,
        }
    }
    assert_eq!(flat, keys(&all));
    // Resuming after a key (S3's StartAfter), even one below the prefix.
    let after = o.list("media", "", None, Some(&Resume::After("a/x/2".into())), 10).await.unwrap();
    assert_eq!(keys(&after), ["a/y/1", "ab/1", "b"]);
    let from_below = o.list("media", "b", None, Some(&Resume::After("a".into())), 10).await.unwrap();
    assert_eq!(keys(&from_below), ["b"]);
    assert!(matches!(o.list("missing", "", None, None, 10).await, Err(ObjectError::NoSuchBucket(_))));
}

/// The change feed of the embedded store across reopening its files, multipart uploads and
/// retention.
mod embedded_feed {
    use super::*;

    /// Closes `o`, a handle of the store of `f`, and opens the store again.
    async fn reopen(o: &Objects, f: &Fixture) -> Objects {
        o.close().await;
        Objects::open(&f._dir.0.join("store")).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_resumes_after_its_saved_cursor_once_the_store_is_reopened() {
        let f = embedded("feed-resume").await;
        for k in ["a", "b", "c"] {
            put(&f.objects, k, k.as_bytes()).await;
        }
        let feed = f.objects.feed();
        let first = feed.read(feed.cursor("reader").await.unwrap(), 2).await.unwrap();
        assert_eq!(first.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        feed.save_cursor("reader", first[1].seq).await.unwrap();
        // Another reader's cursor is its own.
        feed.save_cursor("other", 0).await.unwrap();

        let o = reopen(&f.objects, &f).await;
        let feed = o.feed();
        assert_eq!(feed.last().await.unwrap(), first[1].seq + 1, "the newest number survives the reopening");
        let cursor = feed.cursor("reader").await.unwrap();
        assert_eq!(cursor, first[1].seq);
        let rest = feed.read(cursor, 100).await.unwrap();
        assert_eq!(rest.iter().map(|r| (r.seq, r.key.as_str())).collect::<Vec<_>>(), [(cursor + 1, "c")]);
        feed.save_cursor("reader", rest[0].seq).await.unwrap();
        put(&o, "d", b"d").await;
        let o = reopen(&o, &f).await;
        let feed = o.feed();
        let cursor = feed.cursor("reader").await.unwrap();
        let rest = feed.read(cursor, 100).await.unwrap();
        assert_eq!(rest.iter().map(|r| (r.seq, r.key.as_str())).collect::<Vec<_>>(), [(cursor + 1, "d")]);
        feed.save_cursor("reader", rest[0].seq).await.unwrap();
        assert!(feed.read(feed.cursor("reader").await.unwrap(), 100).await.unwrap().is_empty());
        assert_eq!(feed.read(feed.cursor("other").await.unwrap(), 100).await.unwrap().len(), 4);
        o.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_changes_are_in_the_feed_after_reopening_and_numbers_are_never_reused() {
        let f = embedded("feed-durable").await;
        let m = put(&f.objects, "kept", b"kept").await;
        f.objects.delete("media", "kept", &Condition::None).await.unwrap();
        // No reader ran before the store closed.
        let o = reopen(&f.objects, &f).await;
        let records = o.feed().read(0, 100).await.unwrap();
        let system = Actor::system();
        assert_eq!(
            records.iter().map(fields).collect::<Vec<_>>(),
            [
                (ChangeKind::Put, Some(false), "kept", Some(m.etag.as_str()), 4, &system),
                (ChangeKind::Delete, Some(true), "kept", None, 0, &system),
            ]
        );
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        // Retention that keeps nothing empties the feed; the next change still gets a new number.
        let o = o.with_feed_retention(Retention { max_records: 0, max_age: Duration::from_secs(3600) });
        assert_eq!(o.feed().trim().await.unwrap(), 2);
        let o = reopen(&o, &f).await;
        put(&o, "next", b"n").await;
        assert_eq!(o.feed().read(2, 10).await.unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        o.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multipart_completion_is_one_multipart_change() {
        let f = embedded("feed-multipart").await;
        let o = f.objects.by(Actor::access_key("AKIDEXAMPLE"));
        let start = o.feed().last().await.unwrap();
        let id = o.create_multipart("media", "big.bin", "application/octet-stream", &BTreeMap::new()).await.unwrap();
        let mut u = o.upload(1 << 20).await.unwrap();
        u.write(b"only part").await.unwrap();
        let part = o.put_part(&id, "media", "big.bin", 1, u).await.unwrap();
        let listed = [(1, part.etag.clone())];
        assert!(o.feed().read(start, 10).await.unwrap().is_empty(), "parts are not changes");
        let m = o.complete_multipart(&id, "media", "big.bin", &listed, &Condition::None, u64::MAX).await.unwrap();
        // A completion whose condition fails changes nothing and records nothing.
        let again = o.create_multipart("media", "big.bin", "text/plain", &BTreeMap::new()).await.unwrap();
        let mut u = o.upload(1 << 20).await.unwrap();
        u.write(b"second").await.unwrap();
        let part = o.put_part(&again, "media", "big.bin", 1, u).await.unwrap();
        let listed = [(1, part.etag.clone())];
        let refused = o.complete_multipart(&again, "media", "big.bin", &listed, &Condition::Absent, u64::MAX).await;
        assert!(matches!(refused, Err(ObjectError::PreconditionFailed(_))), "{refused:?}");
        let records = o.feed().read(start, 10).await.unwrap();
        let key = Actor::access_key("AKIDEXAMPLE");
        assert_eq!(
            records.iter().map(fields).collect::<Vec<_>>(),
            [(ChangeKind::Multipart, Some(false), "big.bin", Some(m.etag.as_str()), 9, &key)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cursor_older_than_retention_is_told_it_is_behind() {
        let f = embedded("feed-behind").await;
        let o = f.objects.clone().with_feed_retention(Retention { max_records: 2, max_age: Duration::from_secs(3600) });
        for k in ["1", "2", "3", "4", "5"] {
            put(&o, k, b"x").await;
        }
        // Garbage collection trims what retention no longer keeps.
        o.collect_garbage(std::time::SystemTime::UNIX_EPOCH).await.unwrap();
        assert_eq!(o.feed().oldest().await.unwrap(), 4);
        for cursor in [0, 1, 2] {
            match o.feed().read(cursor, 10).await {
                Err(FeedError::Behind { cursor: c, oldest: 4 }) if c == cursor => {}
                other => panic!("cursor {cursor}: {other:?}"),
            }
        }
        // A cursor just before the oldest record kept missed nothing.
        let rest = o.feed().read(3, 10).await.unwrap();
        assert_eq!(rest.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        // By age: everything goes; a reader that saw the last record is not behind, others are.
        let o = o.with_feed_retention(Retention { max_records: 100, max_age: Duration::ZERO });
        assert_eq!(o.feed().trim().await.unwrap(), 2);
        assert!(o.feed().read(5, 10).await.unwrap().is_empty());
        assert!(matches!(o.feed().read(4, 10).await, Err(FeedError::Behind { cursor: 4, oldest: 6 })));
    }
}

#[cfg(feature = "s3")]
mod s3_only {
    use super::*;

    #[tokio::test]
    async fn buckets_must_exist_in_the_service_and_a_dead_service_is_a_clear_error() {
        let f = service::fixture("registration").await;
        // `spare` exists in the service; `ghost` does not.
        assert!(f.objects.put_bucket("spare", &BucketConfig::default()).await.unwrap());
        let ghost = f.objects.put_bucket("ghost", &BucketConfig::default()).await;
        assert!(matches!(&ghost, Err(ObjectError::NotInService(b)) if b == "ghost"), "{ghost:?}");
        assert!(f.objects.bucket("ghost").await.unwrap().is_none());
        // A registered bucket the service lost can still be forgotten.
        std::fs::remove_dir_all(f._dir.0.join("service/spare")).unwrap();
        f.objects.delete_bucket("spare").await.unwrap();
        assert!(f.objects.bucket("spare").await.unwrap().is_none());
        // Listings roll up at `/` only.
        assert!(matches!(f.objects.list("media", "", Some("-"), None, 10).await, Err(ObjectError::Unsupported(_))));
        assert!(f.objects.list("media", "", Some("/"), None, 10).await.is_ok());
        // Multipart uploads belong to the service's own endpoint.
        assert!(matches!(
            f.objects.create_multipart("media", "k", "text/plain", &BTreeMap::new()).await,
            Err(ObjectError::Unsupported(_))
        ));
        // A service nobody answers: the error says so, nothing hangs for long.
        let dir = Dir::new("s3-dead");
        // Bound but not listening for the whole test: refused, and nobody else's meanwhile.
        let reserved = tokio::net::TcpSocket::new_v4().unwrap();
        reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = reserved.local_addr().unwrap().port();
        let settings = pixflow_backends::State::memory().await.unwrap().catalogue();
        let cfg = service::config(format!("http://127.0.0.1:{port}"));
        let dead = Objects::open_s3(&cfg, settings, &dir.0.join("spool")).await.unwrap();
        let started = std::time::Instant::now();
        let e = dead.put_bucket("media", &BucketConfig::default()).await.unwrap_err();
        assert!(matches!(e, ObjectError::Service(_)), "{e:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }
}

/// With an S3 service the feed of the node's writes lives in a file of its own beside the spool:
/// it keeps the records and cursors of the handle's writes across a restart.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_backends_feed_survives_a_restart() {
    let dir = Dir::new("s3-feed-restart");
    let root = dir.0.join("service");
    std::fs::create_dir_all(root.join("media")).unwrap();
    let endpoint = service::start(&root).await.unwrap();
    let open = || async {
        let settings = pixflow_backends::State::sqlite(&dir.0.join("state.db")).await.unwrap();
        let config = service::config(endpoint.clone());
        let objects = Objects::open_s3(&config, settings.catalogue(), &dir.0.join("spool")).await.unwrap();
        (objects, settings)
    };
    let (o, settings) = open().await;
    o.put_bucket("media", &BucketConfig::default()).await.unwrap();
    let m = put(&o, "a", b"one").await;
    o.delete("media", "a", &Condition::None).await.unwrap();
    o.feed().save_cursor("reader", 1).await.unwrap();
    o.close().await;
    settings.close().await;
    let (o, settings) = open().await;
    let feed = o.feed();
    assert_eq!((feed.last().await.unwrap(), feed.cursor("reader").await.unwrap()), (2, 1));
    let all = feed.read(0, 10).await.unwrap();
    assert_eq!(all[0].etag.as_deref(), Some(m.etag.as_str()));
    let rest = feed.read(1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|r| (r.seq, r.kind)).collect::<Vec<_>>(), [(2, ChangeKind::Delete)]);
    settings.close().await;
}

/// Only the node's user reads what the stores keep: folders `0700`, files `0600`.
#[cfg(unix)]
mod private_files {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// Every folder and file under `root` with its permission bits.
    fn modes(root: &Path) -> Vec<(PathBuf, u32)> {
        let mut found = Vec::new();
        let mut todo = vec![root.to_owned()];
        while let Some(p) = todo.pop() {
            let meta = std::fs::metadata(&p).unwrap();
            found.push((p.clone(), meta.permissions().mode() & 0o7777));
            if meta.is_dir() {
                todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        found
    }

    fn assert_private(root: &Path) {
        let found = modes(root);
        for (path, mode) in &found {
            let want = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(*mode, want, "{} is {mode:o}", path.display());
        }
    }

    /// An upload in progress: its spooled file, then the stored object.
    async fn spool_and_store(f: &Fixture) {
        let mut upload = f.objects.upload(1 << 20).await.unwrap();
        upload.write(b"private bytes").await.unwrap();
        let spooled: Vec<_> = std::fs::read_dir(&f.spool).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(spooled.len(), 1);
        assert_private(&f.spool);
        f.objects
            .commit(upload, "media", "secret.txt", "text/plain", &BTreeMap::new(), &Condition::None)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_store() {
        let f = embedded("private").await;
        spool_and_store(&f).await;
        // A multipart part is a blob of its own.
        let id = f.objects.create_multipart("media", "big", "text/plain", &BTreeMap::new()).await.unwrap();
        let mut part = f.objects.upload(1 << 20).await.unwrap();
        part.write(b"part").await.unwrap();
        f.objects.put_part(&id, "media", "big", 1, part).await.unwrap();
        let root = f._dir.0.join("store");
        let files = modes(&root);
        let blobs = files.iter().filter(|(p, _)| p.starts_with(root.join("blobs")) && p.is_file()).count();
        assert_eq!(blobs, 2, "{files:?}");
        assert!(root.join("catalogue.db-wal").exists());
        assert_private(&root);
    }

    /// A node's data folder as `App::start` lays it out (state, objects, edge cache), made on a
    /// fresh path and on an existing folder every user could read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_data_folder_fresh_or_open_to_others_ends_private() {
        let dir = Dir::new("data-folder");
        let open = dir.0.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (data, was) in [(dir.0.join("fresh/data"), None), (open, Some(0o755))] {
            assert_eq!(pixflow_backends::files::private_dir(&data).unwrap(), was);
            let state = pixflow_backends::State::sqlite(&data.join("state.db")).await.unwrap();
            let objects = Objects::open(&data.join("objects")).await.unwrap();
            objects.put_bucket("media", &BucketConfig::default()).await.unwrap();
            put(&objects, "private/cat.png", b"not for others").await;
            let cache = pixflow_backends::EdgeCache::open(&data.join("cdn-cache"), 1 << 20, 1 << 20).unwrap();
            let entry = pixflow_backends::CachedEntry {
                bytes: Bytes::from_static(b"derived"),
                content_type: "image/webp".into(),
                etag: "ab".into(),
                created_ms: 1,
            };
            cache.put(&"ab".repeat(16), "media", "private/cat.png", &entry).await.unwrap();
            let found = modes(&data);
            for name in ["state.db", "state.db-wal", "catalogue.db", "cdn-cache"] {
                assert!(found.iter().any(|(p, _)| p.ends_with(name)), "no {name} in {found:?}");
            }
            assert!(found.iter().any(|(p, _)| p.starts_with(data.join("objects/blobs")) && p.is_file()));
            assert!(found.iter().any(|(p, _)| p.starts_with(data.join("cdn-cache")) && p.is_file()));
            assert_private(&data);
            state.close().await;
            objects.close().await;
        }
    }

    #[cfg(feature = "s3")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_service_spool() {
        let f = service::fixture("private").await;
        spool_and_store(&f).await;
        assert_private(&f.spool);
    }
}

/// The reserved bucket is the internal handle's alone: other handles are refused it on every
/// path (objects, listings, settings, multipart) and do not see it among the buckets.
#[tokio::test]
async fn the_reserved_bucket_is_for_the_internal_handle_only() {
    let dir = Dir::new("reserved");
    let objects = Objects::open(&dir.0.join("store")).await.unwrap().with_reserved_bucket("node-spool");
    let internal = objects.internal();
    assert_eq!(objects.reserved_bucket(), Some("node-spool"));
    assert!(internal.put_bucket("node-spool", &BucketConfig::default()).await.unwrap());
    objects.put_bucket("media", &BucketConfig::default()).await.unwrap();
    let meta = internal.put("node-spool", "a/b", "image/png", &BTreeMap::new(), &Condition::None, b"x").await.unwrap();
    assert_eq!(internal.read("node-spool", "a/b", 10).await.unwrap().1, b"x");

    // Every other handle, whoever it records changes as.
    for o in [objects.clone(), objects.by(Actor::access_key("ak1"))] {
        let refused =
            |r: Result<(), ObjectError>| assert!(matches!(r, Err(ObjectError::Reserved(b)) if b == "node-spool"));
        refused(o.head("node-spool", "a/b").await.map(drop));
        refused(o.read("node-spool", "a/b", 10).await.map(drop));
        refused(o.get("node-spool", "a/b").await.map(drop));
        refused(o.put("node-spool", "a/c", "image/png", &BTreeMap::new(), &Condition::None, b"y").await.map(drop));
        refused(o.delete("node-spool", "a/b", &Condition::None).await.map(drop));
        refused(o.list("node-spool", "", None, None, 10).await.map(drop));
        refused(o.bucket("node-spool").await.map(drop));
        refused(o.put_bucket("node-spool", &BucketConfig { public: true, cache_control: None }).await.map(drop));
        refused(o.delete_bucket("node-spool").await);
        refused(o.create_multipart("node-spool", "a/d", "image/png", &BTreeMap::new()).await.map(drop));
        let names: Vec<String> = o.buckets().await.unwrap().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["media"]);
    }
    // Nothing changed: the object is whole and the bucket private.
    assert_eq!(internal.head("node-spool", "a/b").await.unwrap().etag, meta.etag);
    assert!(!internal.bucket("node-spool").await.unwrap().unwrap().config.public);
    let names: Vec<String> = internal.buckets().await.unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["media", "node-spool"]);
    assert_eq!(ObjectError::Reserved("node-spool".into()).code(), "reserved_bucket");
    objects.close().await;
}
