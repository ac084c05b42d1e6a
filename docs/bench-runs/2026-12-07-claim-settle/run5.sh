#!/bin/bash
B=/work/target-main/debug/deps/queue-612cbd2c973b2afd
PG="postgres://postgres@127.0.0.1:5432/pixflow_bench"
for r in 1 2 3; do
  for build in base final; do
    # This machine's PostgreSQL runs with autovacuum off: each run starts on emptied, vacuumed tables.
    psql -h 127.0.0.1 -U postgres -d pixflow_bench -qc "TRUNCATE invocations, queue_messages" -c "VACUUM ANALYZE invocations" -c "VACUUM ANALYZE queue_messages"
    echo "round $r $build $(cat /proc/loadavg)"
    $B --parts async --backends sqlite --rounds 1 --pixflow /tmp/b/pixflow-$build --producers 1,4,16 --invocations 3000 --sequential 20 \
      --node "postgres=--state postgres --state-url $PG" \
      --json /tmp/b/clean-$build-$r.jsonl > /tmp/b/clean-$build-$r.txt 2>&1 || echo FAILED
  done
done
