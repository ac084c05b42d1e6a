//! Rough rate of small writes to the embedded object store: rounds of 1 KiB puts (new keys,
//! then overwrites), by one writer and by eight at once, each round in a fresh store. Prints
//! every round and the median writes per second and process CPU time per write (from
//! `/proc/self/stat`, so Linux only). Each write commits its catalogue row (and its change
//! record) with `synchronous=FULL`, so the disk's fsync rate bounds the numbers.
//!
//! `cargo bench -p pixflow-backends --bench put_rate -- [puts per round] [rounds]` (a `harness = false`
//! bench, so `cargo test` does not build it)

use std::collections::BTreeMap;
use std::time::Instant;

use pixflow_backends::{BucketConfig, Condition, Objects};

/// User plus system CPU time of this process, in seconds (clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round: `puts` writes split among `writers` tasks; returns (writes/s, CPU µs/write).
async fn round(puts: usize, writers: usize, n: usize) -> (f64, f64) {
    let dir = std::env::temp_dir().join(format!("pixflow-put-rate-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let objects = Objects::open(&dir).await.expect("opening the store");
    objects.put_bucket("bench", &BucketConfig::default()).await.expect("bucket");
    let body = vec![7u8; 1024];
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (objects, body) = (objects.clone(), body.clone());
            tokio::spawn(async move {
                let none = BTreeMap::new();
                for i in 0..puts / writers {
                    // Half new keys, half overwrites of them.
                    let key = format!("w{w}/k{}", i % (puts / writers / 2).max(1));
                    objects.put("bench", &key, "image/png", &none, &Condition::None, &body).await.expect("put");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
    let (secs, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let done = (puts / writers * writers) as f64;
    objects.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    (done / secs, cpu / done * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let puts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut n = 0;
    for writers in [1, 8] {
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            n += 1;
            let (rate, cpu) = round(puts, writers, n).await;
            println!("writers {writers} round {r}: {rate:8.0} writes/s, {cpu:6.0} µs CPU/write");
            rates.push(rate);
            cpus.push(cpu);
        }
        println!("writers {writers} median: {:8.0} writes/s, {:6.0} µs CPU/write", median(rates), median(cpus));
    }
}
