#!/bin/bash
# usage: run7.sh TAG ROUNDS BACKEND LABEL=BUILD[:EXTRA ARGS]...
# Each run starts on the same history (prefill.sql), vacuumed and analysed: this machine's
# PostgreSQL runs without autovacuum.
B=/work/target-main/debug/deps/queue-612cbd2c973b2afd
PG="postgres://postgres@127.0.0.1:5432/pixflow_bench"
tag=$1; rounds=$2; backend=$3; shift 3
for r in $(seq 1 $rounds); do
  for spec in "$@"; do
    label=${spec%%=*}; rest=${spec#*=}; build=${rest%%:*}; extra=""; [[ $rest == *:* ]] && extra=${rest#*:}
    psql -h 127.0.0.1 -U postgres -d pixflow_bench -q -f /tmp/b/prefill.sql
    case $backend in
      postgres) node="postgres=--state postgres --state-url $PG $extra";;
      sqlite) node="sqlite=$extra";;
      pgjs) node="pgjs=--state postgres --state-url $PG --queue nats --queue-url nats://127.0.0.1:4222 $extra";;
    esac
    echo "round $r $label $(cat /proc/loadavg)"
    $B --parts async --backends sqlite --rounds 1 --pixflow /tmp/b/pixflow-$build --producers 1,4,16 --invocations 3000 --sequential 20 \
      --node "$node" --json /tmp/b/$tag-$label-$r.jsonl > /tmp/b/$tag-$label-$r.txt 2>&1 || echo FAILED
  done
done
