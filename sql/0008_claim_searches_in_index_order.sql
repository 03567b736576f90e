-- The claim's two searches among pending messages, both read from the first entries of their
-- index whatever the planner believes, and both in PL/pgSQL.
--
-- The search for due messages, in the order they fell due. Inline in the claim, its filter on
-- expires_at (NULL or later than now) looks very selective to a planner without statistics (a
-- fresh table, a first backlog: autovacuum has not analyzed it yet), so it read every pending
-- row through a bitmap scan and sorted them to take the first BATCH_SIZE: with 20,000 messages
-- pending, 355 pages and 20,000 rows sorted for each claim of 10. Planned with sorting
-- disabled, the one way to that order is messages_due_idx.
--
-- PL/pgSQL rather than SQL (0007 wrote messages_past_expiry in SQL; it is rewritten here, same
-- query): a SQL function with a SET clause is never inlined and its query is planned again on
-- every call, two plannings in every claim. PL/pgSQL keeps the plan for the session, made with
-- the function's settings. Measured by the benchmark's statements phase at BATCH_SIZE 100:
-- 28.5 -> 26.0 us of PostgreSQL's CPU a message.
CREATE FUNCTION messages_due(how_many bigint) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE
SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY next_attempt_at, id
    LIMIT how_many
    FOR UPDATE SKIP LOCKED;
END
$$;

CREATE OR REPLACE FUNCTION messages_past_expiry(how_many bigint) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE
SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
    SELECT id FROM messages
    WHERE status = 'pending' AND expires_at <= now()
    ORDER BY expires_at
    LIMIT how_many
    FOR UPDATE SKIP LOCKED;
END
$$;
