-- Operations on messages (issue #12): manual retry keeping the attempt history, idempotent
-- enqueue, scheduled sends, and the indexes behind listing, bulk retry and retention.

-- Expiry belongs to 0003_expiry.sql; a manual retry of an `expired` message sets it again, so
-- this migration needs the column too. IF NOT EXISTS: whichever of the two runs first adds it.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ;

ALTER TABLE messages
    -- `attempts` when the message was last retried by hand (0 until then). `attempts` keeps
    -- counting every request ever made, so attempt-history numbers stay unique; the give-up
    -- rule and the backoff look at `attempts - attempts_base`, the requests since that retry.
    ADD COLUMN attempts_base INT NOT NULL DEFAULT 0,
    -- The client's Idempotency-Key of POST /messages, and a SHA-256 of the request it came
    -- with: a repeat with the same request gets the same message, another request a 409.
    ADD COLUMN idempotency_key TEXT,
    ADD COLUMN request_hash BYTEA,
    -- Not sent before this instant (NULL: as soon as possible). An insert that sets it starts
    -- next_attempt_at there (trigger below), so the claim needs no change.
    ADD COLUMN send_at TIMESTAMPTZ,
    -- (Named to sort after messages_attempts_not_negative: PostgreSQL checks constraints in
    -- name order, and a negative `attempts` should be reported as that.)
    ADD CONSTRAINT messages_attempts_since_retry_in_range
        CHECK (attempts_base >= 0 AND attempts_base <= attempts),
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
