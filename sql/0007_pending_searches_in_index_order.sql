-- Two searches among pending messages that must read only the first entries of an index.
--
-- The claim's search for pending messages past their expires_at, oldest expiry first.
--
-- Planned with sorting disabled, so that the one way to that order is messages_expiry_idx.
-- Without that, statistics taken while nothing was pending (a large table of sent rows,
-- ANALYZEd, then a backlog arrives; autovacuum will not look again for a long while) lead the
-- planner to read every pending row through messages_due_idx and sort them, on every claim:
-- 15 ms a claim with 20,000 messages pending, growing with the backlog.
CREATE FUNCTION messages_past_expiry(how_many bigint) RETURNS SETOF bigint
LANGUAGE sql VOLATILE
SET enable_sort = off
AS $$
    SELECT id FROM messages
    WHERE status = 'pending' AND expires_at <= now()
    ORDER BY expires_at
    LIMIT how_many
    FOR UPDATE SKIP LOCKED
$$;

-- The earliest next_attempt_at and expires_at among pending messages, for an idle scheduler's
-- next wake-up. Under the same statistics min() read every pending row as well (an aggregate
-- over a whole index looks as cheap as its first entry when the index is believed empty);
-- the first entry of each index in order is all it takes.
CREATE FUNCTION messages_next_pending(OUT next_attempt_at timestamptz, OUT expires_at timestamptz)
LANGUAGE sql STABLE
SET enable_sort = off
AS $$
    SELECT (SELECT m.next_attempt_at FROM messages AS m
            WHERE m.status = 'pending'
            ORDER BY m.next_attempt_at LIMIT 1),
           (SELECT m.expires_at FROM messages AS m
            WHERE m.status = 'pending' AND m.expires_at IS NOT NULL AND isfinite(m.expires_at)
            ORDER BY m.expires_at LIMIT 1)
$$;
