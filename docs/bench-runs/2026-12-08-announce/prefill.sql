TRUNCATE invocations, queue_messages;
-- History as a running node has it: settled invocations and messages from the last hour.
INSERT INTO invocations (id, function, status, attempts, max_attempts, meta, payload, result_meta, result, created_ms, updated_ms, next_ms, message)
SELECT 'old-' || i, 'flip', 'succeeded', 1, 3, '{}', '', '[]', '', (extract(epoch from now()) * 1000)::bigint - 3600000, (extract(epoch from now()) * 1000)::bigint - 3600000 + i, 0, 'old-' || i
FROM generate_series(1, 20000) i;
INSERT INTO queue_messages (queue, dedup, state, payload, due_ms, fence, enqueued_ms, settled_ms)
SELECT 'invocations', 'old-' || i, 'done', '', 0, 1, (extract(epoch from now()) * 1000)::bigint - 3600000, (extract(epoch from now()) * 1000)::bigint - 3600000 + i
FROM generate_series(1, 20000) i;
VACUUM ANALYZE invocations;
VACUUM ANALYZE queue_messages;
