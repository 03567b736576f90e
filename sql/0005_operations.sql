-- Operations on messages (issue #12): manual retry keeping the attempt history, idempotent
-- enqueue, scheduled sends, and the indexes behind listing, bulk retry and retention.

-- A manual retry gives a fresh MAX_ATTEMPTS by making every request so far free of the limit
-- (attempts_free = attempts, see 0004): `attempts` keeps counting every request ever made.
ALTER TABLE messages
    -- The client's Idempotency-Key of POST /messages, and a SHA-256 of the request it came
    -- with: a repeat with the same request gets the same message, another request a 409.
    ADD COLUMN idempotency_key TEXT,
    ADD COLUMN request_hash BYTEA,
    -- Not sent before this instant (NULL: as soon as possible). An insert that sets it starts
    -- next_attempt_at there (trigger below), so the claim needs no change.
    ADD COLUMN send_at TIMESTAMPTZ,
    ADD CONSTRAINT messages_idempotency_key_length
        CHECK (char_length(idempotency_key) BETWEEN 1 AND 255);

CREATE UNIQUE INDEX messages_idempotency_key_idx ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Retention of sent rows: the oldest first, without reading the rest.
CREATE INDEX messages_sent_at_idx ON messages (sent_at) WHERE status = 'sent';
-- Retention and bulk retry of ended rows (by when they ended), and GET /messages?status=… of them.
CREATE INDEX messages_ended_idx ON messages (status, updated_at)
    WHERE status IN ('failed', 'expired', 'cancelled');
CREATE INDEX messages_ended_id_idx ON messages (status, id)
    WHERE status IN ('failed', 'expired', 'cancelled');

-- A row inserted with send_at is due then, not before (nor earlier than next_attempt_at says).
CREATE FUNCTION messages_send_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.next_attempt_at := GREATEST(NEW.next_attempt_at, NEW.send_at);
    RETURN NEW;
END
$$;
CREATE TRIGGER messages_scheduled BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.send_at IS NOT NULL) EXECUTE FUNCTION messages_send_at();
