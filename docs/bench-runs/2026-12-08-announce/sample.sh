#!/bin/bash
# Samples pg_stat_activity of pixflow_bench every 20 ms for $1 seconds.
end=$((SECONDS+$1))
while [ $SECONDS -lt $end ]; do
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "select coalesce(wait_event_type,'-')||':'||coalesce(wait_event,'-')||':'||state||':'||left(regexp_replace(query,'\s+',' ','g'),40) from pg_stat_activity where datname='pixflow_bench' and pid<>pg_backend_pid()"
  sleep 0.02
done
