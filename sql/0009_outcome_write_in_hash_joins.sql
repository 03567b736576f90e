-- The outcome write as a function that joins in hashes, so that its cost follows the batch
-- whatever the planner believes.
--
-- The write joins the batch's outcomes to their messages on id and keeps the messages still
-- `sending` for this instance. The planner believes almost no row is `sending` (statistics are
-- taken between claims, when none are), so it read those rows first, from their partial index
-- or the whole table, and then went through every outcome again for each of them: a batch of
-- 500 compared 250,000 pairs, 150 ms of PostgreSQL's CPU where 9 do. The plan a session keeps
-- after five executions (the generic plan) did it on any table; a first execution on tables of
-- up to some tens of thousands of rows. Planned with nested loops off, each side is read once
-- and hashed; the `= ANY` conditions read the batch's own rows by primary key rather than the
-- whole table. PL/pgSQL keeps the plan for the session, made with the function's settings.
--
-- The daemon calls it with $16 = true when writing outcomes again after a write whose answer
-- was lost (it may have committed): history rows already there are then skipped, and only then
-- looked for.
-- `expires_at` as `last_error` gives it (UTC, RFC 3339, microseconds), for the claim's expiry
-- sweep and for the outcome write: one wording for both. Plain SQL, so it is inlined.
CREATE FUNCTION messages_expiry_text(expires_at timestamptz) RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT COALESCE(to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                    expires_at::text, 'an unknown time')
$$;

CREATE FUNCTION messages_record(
    bigint[], text[], int[], text[], text[], bigint[], bigint, text,
    bigint[], int[], timestamptz[], int[], smallint[], text[], int[], boolean)
RETURNS TABLE (rows_written bigint, expired_ids bigint[])
LANGUAGE plpgsql VOLATILE
SET enable_nestloop = off
AS $$
BEGIN
    RETURN QUERY
    WITH fence AS (
        SELECT 1 FROM dispatcher_state WHERE $7::bigint IS NULL OR epoch = $7 FOR SHARE
    ), history AS (
        -- What was requested is history whoever leads now: not fenced.
        INSERT INTO message_attempts
            (message_id, attempt, started_at, duration_ms, status_code, error, instance_id, epoch)
        SELECT h.id, h.attempt, h.started_at, h.duration_ms, h.status_code, h.error, $8, $7
        FROM unnest($9::bigint[], $10::int[], $11::timestamptz[], $12::int[], $13::smallint[],
                    $14::text[])
             AS h(id, attempt, started_at, duration_ms, status_code, error)
        -- (= ANY: found by primary key, in a hash join like the rest.)
        WHERE EXISTS (SELECT 1 FROM messages WHERE id = h.id AND id = ANY ($9))
          -- Written again after a write whose answer was lost: rows already there are skipped.
          AND (NOT $16 OR NOT EXISTS (SELECT 1 FROM message_attempts AS a
                                      WHERE a.message_id = h.id AND a.started_at = h.started_at))
    ), written AS (
    UPDATE messages AS m SET
        status = CASE
            WHEN o.status = 'pending'
                 AND m.expires_at <= now() + o.delay_ms * interval '1 millisecond' THEN 'expired'
            ELSE o.status END,
        attempts = m.attempts - o.unsent,
        attempts_free = m.attempts_free + o.free,
        sent_at = CASE WHEN o.status = 'sent' THEN now() ELSE m.sent_at END,
        last_error = CASE
            WHEN o.status = 'expired'
                 OR (o.status = 'pending' AND o.error IS NULL
                     AND m.expires_at <= now() + o.delay_ms * interval '1 millisecond')
            THEN 'expired at ' || messages_expiry_text(m.expires_at) || ' before it could be sent'
                 || COALESCE(' (last error: ' || m.last_error || ')', '')
            WHEN o.status = 'pending'
                 AND m.expires_at <= now() + o.delay_ms * interval '1 millisecond'
            THEN 'expired at ' || messages_expiry_text(m.expires_at) || ': the next attempt would have come after it (last error: ' || o.error || ')'
            ELSE COALESCE(o.error, m.last_error) END,
        remote_message_id = COALESCE(o.remote_id, m.remote_message_id),
        next_attempt_at = CASE WHEN o.status = 'pending'
                               THEN now() + o.delay_ms * interval '1 millisecond'
                               ELSE m.next_attempt_at END,
        claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL,
        updated_at = now()
    FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[],
                $15::int[])
             AS o(id, status, unsent, error, remote_id, delay_ms, free)
    WHERE m.id = o.id AND m.id = ANY ($1) AND m.status = 'sending'
      AND m.claimed_epoch IS NOT DISTINCT FROM $7 AND m.claimed_by = $8
      AND EXISTS (SELECT 1 FROM fence)
    RETURNING m.id, m.status
    )
    SELECT count(*), COALESCE(array_agg(id) FILTER (WHERE status = 'expired'), '{}') FROM written;
END
$$;
