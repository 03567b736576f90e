-- The claim's search for due messages, in the order they fell due, read from the first entries
-- of messages_due_idx whatever the planner believes.
--
-- Inline in the claim, the search's filter on expires_at (NULL or later than now) looks very
-- selective to a planner without statistics (a fresh table, a first backlog: autovacuum has
-- not analyzed it yet), so it reads every pending row through a bitmap scan and sorts them to
-- take the first BATCH_SIZE: with 20,000 messages pending, 355 pages and 20,000 rows sorted
-- for each claim of 10. Planned with sorting disabled, the one way to that order is the index.
CREATE FUNCTION messages_due(how_many bigint) RETURNS SETOF bigint
LANGUAGE sql VOLATILE
SET enable_sort = off
AS $$
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY next_attempt_at, id
    LIMIT how_many
    FOR UPDATE SKIP LOCKED
$$;
