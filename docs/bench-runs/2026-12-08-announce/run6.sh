#!/bin/bash
# usage: run6.sh TAG ROUNDS BUILD...
B=/work/target-main/debug/deps/queue-612cbd2c973b2afd
PG="postgres://postgres@127.0.0.1:5432/pixflow_bench"
tag=$1; rounds=$2; shift 2
for r in $(seq 1 $rounds); do
  for build in "$@"; do
    # This machine's PostgreSQL runs with autovacuum off: each run starts on the same history (prefill.sql), vacuumed and analysed.
    psql -h 127.0.0.1 -U postgres -d pixflow_bench -q -f /tmp/b/prefill.sql
    echo "round $r $build $(cat /proc/loadavg)"
    $B --parts async --backends sqlite --rounds 1 --pixflow /tmp/b/pixflow-$build --producers 1,4,16 --invocations 3000 --sequential 20 \
      --node "postgres=--state postgres --state-url $PG" \
      --json /tmp/b/$tag-$build-$r.jsonl > /tmp/b/$tag-$build-$r.txt 2>&1 || echo FAILED
  done
done
