//! Lag of the embedded store's change feed (issue 13): how long after a put a follower sees its
//! record. A measuring program, not a test (`harness = false`; `cargo test` does not build it).
//!
//! Each round opens a fresh embedded store (SQLite catalogue and feed on disk, `synchronous=FULL`,
//! in the temp folder or `--scratch`). One writer puts 1 KiB objects under new keys through
//! [`Objects::put`] at a steady pace (`--interval-ms`; 0: back to back); one follower reads the
//! feed the way the CDN's purge follower does (`cdn::follow_changes`): [`Feed::read`] after its
//! cursor, [`Feed::wait`] when nothing is new, [`Feed::save_cursor`] after each batch. Per change,
//! the lag is the moment the follower's `read` returned the record minus the moment just after
//! the put returned (negative when the follower saw it first: the store wakes followers before
//! `put` returns), and minus the moment just before the put began. The first `--warm-up` changes
//! of a round are not counted. CPU is this process's (writer and follower, utime + stime from
//! `/proc/self/stat`, 10 ms ticks).
//!
//! ```text
//! cargo bench --profile dev -p pixflow-backends --bench feed_lag -- --rounds 5 --changes 3000 \
//!     --interval-ms 5,0 --json rows.jsonl
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pixflow_backends::{BucketConfig, Condition, FeedError, Objects};
use serde_json::{Value, json};

/// The follower's cursor name, like the CDN's `cdn-purge`.
const CURSOR: &str = "bench-follower";
/// Records per read, as the CDN's follower asks for.
const BATCH: u32 = 512;

struct Args {
    rounds: usize,
    changes: usize,
    warm_up: usize,
    intervals: Vec<u64>,
    json: Option<PathBuf>,
    scratch: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        rounds: 5,
        changes: 3000,
        warm_up: 50,
        intervals: vec![5, 0],
        json: None,
        scratch: std::env::temp_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench program.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = |v: &str| v.trim().parse::<usize>().unwrap_or_else(|_| panic!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--rounds" => a.rounds = number(&value),
            "--changes" => a.changes = number(&value),
            "--warm-up" => a.warm_up = number(&value),
            "--interval-ms" => a.intervals = value.split(',').map(|v| number(v) as u64).collect(),
            "--json" => a.json = Some(value.into()),
            "--scratch" => a.scratch = value.into(),
            _ => panic!("unknown option {flag}"),
        }
    }
    a
}

/// User plus system CPU time of this process, in milliseconds (clock ticks of 1/100 s).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) * 10.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `later - earlier` in milliseconds, negative when `later` came first.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => ms(d),
        None => -ms(earlier - later),
    }
}

/// The `p`th percentile (nearest rank) of `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the follower saw: for each change (by the index in its key), when its read returned;
/// and how many reads returned records.
async fn follow(objects: Objects, total: usize) -> Result<(Vec<Option<Instant>>, usize), FeedError> {
    let feed = objects.feed();
    let mut seen = vec![None; total];
    let (mut count, mut reads) = (0, 0);
    let mut after = feed.cursor(CURSOR).await?;
    while count < total {
        let batch = feed.read(after, BATCH).await?;
        let at = Instant::now();
        if batch.is_empty() {
            feed.wait(after).await?;
            continue;
        }
        reads += 1;
        for change in &batch {
            let i: usize = change.key.strip_prefix('k').and_then(|i| i.parse().ok()).expect("a key of the writer's");
            if seen[i].replace(at).is_none() {
                count += 1;
            }
        }
        after = batch.last().map_or(after, |c| c.seq);
        feed.save_cursor(CURSOR, after).await?;
    }
    Ok((seen, reads))
}

/// One round: `warm_up + changes` puts, one every `interval` (back to back when zero).
async fn round(args: &Args, interval: Duration, n: usize) -> Value {
    let dir = args.scratch.join(format!("pixflow-feed-lag-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let objects = Objects::open(&dir).await.expect("opening the store");
    objects.put_bucket("bench", &BucketConfig::default()).await.expect("bucket");
    let total = args.warm_up + args.changes;
    let follower = tokio::spawn(follow(objects.clone(), total));
    let body = vec![7u8; 1024];
    let none = BTreeMap::new();
    let mut puts = Vec::with_capacity(total);
    let (mut cpu, mut begun) = (cpu_ms(), Instant::now());
    let start = tokio::time::Instant::now();
    for i in 0..total {
        if i == args.warm_up {
            (cpu, begun) = (cpu_ms(), Instant::now());
        }
        if !interval.is_zero() {
            // A steady schedule: a put that ran late is followed at once, not a full interval later.
            tokio::time::sleep_until(start + interval * u32::try_from(i).unwrap_or(u32::MAX)).await;
        }
        let before = Instant::now();
        objects.put("bench", &format!("k{i}"), "image/png", &none, &Condition::None, &body).await.expect("put");
        puts.push((before, Instant::now()));
    }
    let written = begun.elapsed();
    let (seen, reads) = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("the follower did not see every change within 60 s")
        .expect("the follower")
        .expect("following the feed");
    let (cpu, wall) = (cpu_ms() - cpu, begun.elapsed());
    objects.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (mut after_put, mut before_put, mut put_ms, mut early) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (i, (before, after)) in puts.iter().enumerate().skip(args.warm_up) {
        let at = seen[i].expect("seen");
        let lag = signed_ms(at, *after);
        if lag < 0.0 {
            early += 1;
        }
        after_put.push(lag);
        before_put.push(signed_ms(at, *before));
        put_ms.push(ms(*after - *before));
    }
    json!({
        "kind": "feed_lag", "interval_ms": ms(interval), "changes": args.changes,
        "writes_per_s": args.changes as f64 / written.as_secs_f64(),
        "lag_p50_ms": pct(&after_put, 50.0), "lag_p90_ms": pct(&after_put, 90.0),
        "lag_p99_ms": pct(&after_put, 99.0), "lag_max_ms": pct(&after_put, 100.0),
        "seen_before_put_returned": early,
        "from_start_p50_ms": pct(&before_put, 50.0), "from_start_p90_ms": pct(&before_put, 90.0),
        "from_start_p99_ms": pct(&before_put, 99.0), "from_start_max_ms": pct(&before_put, 100.0),
        "put_p50_ms": pct(&put_ms, 50.0), "put_p99_ms": pct(&put_ms, 99.0),
        "reads": reads, "cpu_ms_per_change": cpu / args.changes as f64, "wall_s": wall.as_secs_f64(),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    let mut json = args.json.as_ref().map(|p| std::fs::File::create(p).expect("creating the JSON file"));
    let mut emit = |row: Value| {
        println!("{row}");
        if let Some(f) = &mut json {
            writeln!(f, "{row}").expect("writing the JSON file");
        }
    };
    emit(json!({"kind": "machine", "load": load_average()}));
    let mut rows = Vec::new();
    let mut n = 0;
    // Rounds interleave the paces, so slow spells of the machine hit each alike.
    for r in 1..=args.rounds {
        for &interval in &args.intervals {
            n += 1;
            let mut row = round(&args, Duration::from_millis(interval), n).await;
            row["round"] = json!(r);
            emit(row.clone());
            rows.push(row);
        }
    }
    emit(json!({"kind": "machine", "load": load_average()}));
    println!("\nMedians over {} rounds (range over rounds in brackets).", args.rounds);
    println!(
        "\n| interval ms | writes/s | lag p50 ms | p90 | p99 | max | seen before put returned | from put start p50 ms | p99 | put p50 ms | put p99 ms | reads | CPU ms/change |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &interval in &args.intervals {
        let mine: Vec<&Value> =
            rows.iter().filter(|r| r["interval_ms"] == json!(ms(Duration::from_millis(interval)))).collect();
        let cell = |f: &str, ranged: bool| {
            let v: Vec<f64> = mine.iter().filter_map(|r| r[f].as_f64()).collect();
            let m = median(v.clone());
            if ranged {
                let (lo, hi) = (pct(&v, 0.0), pct(&v, 100.0));
                format!("{m:.2} ({lo:.2}-{hi:.2})")
            } else {
                format!("{m:.2}")
            }
        };
        println!(
            "| {interval} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell("writes_per_s", true),
            cell("lag_p50_ms", true),
            cell("lag_p90_ms", false),
            cell("lag_p99_ms", true),
            cell("lag_max_ms", false),
            cell("seen_before_put_returned", false),
            cell("from_start_p50_ms", false),
            cell("from_start_p99_ms", true),
            cell("put_p50_ms", false),
            cell("put_p99_ms", false),
            cell("reads", false),
            cell("cpu_ms_per_change", false),
        );
    }
}
