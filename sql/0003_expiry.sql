-- Message expiry (issue #11, item 5): a message is never sent after its `expires_at`.
--
-- A pending row whose `expires_at` has passed becomes `expired` at the next claim (fenced like
-- the claim), a worker checks again just before the request, and a retry that would fall due
-- at or after `expires_at` ends `expired` at once. NULL means never. Rows in any other status
-- keep what happened to them: a request that started in time and ends after `expires_at` is
-- recorded as what it was.
ALTER TABLE messages ADD COLUMN expires_at TIMESTAMPTZ;

-- The expiry sweep of the claim: pending rows that have an expiry, soonest first. Rows without
-- one (the usual case without MESSAGE_TTL) are not in the index at all.
CREATE INDEX messages_expiry_idx ON messages (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;

-- MESSAGE_TTL is the daemon's configuration, but it must apply to rows inserted by any program
-- with plain SQL, so the daemon stores it here at start (`serve`; the last instance to start
-- wins: give every instance the same value) and the trigger below reads it. NULL = no TTL.
ALTER TABLE dispatcher_state
    ADD COLUMN message_ttl INTERVAL,
    ADD CONSTRAINT dispatcher_state_message_ttl_positive CHECK (message_ttl > interval '0');

-- A row inserted without `expires_at` (or with NULL) expires MESSAGE_TTL after its created_at.
-- To exempt one message from the TTL, insert it with expires_at = 'infinity'. The trigger only
-- runs for rows without an expiry (WHEN clause) and reads the one-row state table once per row.
CREATE FUNCTION messages_default_expiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.expires_at := NEW.created_at + (SELECT message_ttl FROM dispatcher_state);
    RETURN NEW;
END
$$;
CREATE TRIGGER messages_default_expiry BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.expires_at IS NULL) EXECUTE FUNCTION messages_default_expiry();
