-- Messages waiting to be delivered, and the record of what happened to them.
-- Any program enqueues a message with: INSERT INTO messages (recipient, content) VALUES (…, …);
CREATE TABLE messages (
    id                BIGSERIAL PRIMARY KEY,
    recipient         TEXT        NOT NULL,
    content           TEXT        NOT NULL,
    status            TEXT        NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts          INT         NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at           TIMESTAMPTZ,
    last_error        TEXT,
    remote_message_id TEXT,
    -- When a pending message may be sent (retries are pushed into the future).
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Who holds a `sending` row: the leadership epoch and instance that claimed it, and when.
    claimed_epoch     BIGINT,
    claimed_by        TEXT,
    claimed_at        TIMESTAMPTZ
);

-- The claim query: due pending messages, oldest due first.
CREATE INDEX messages_due_idx ON messages (next_attempt_at, id) WHERE status = 'pending';
-- Crash recovery: rows left `sending`.
CREATE INDEX messages_sending_idx ON messages (claimed_at) WHERE status = 'sending';
-- GET /messages/sent: newest sent first, keyset pagination on id.
CREATE INDEX messages_sent_idx ON messages (id) WHERE status = 'sent';

-- One row of cluster-wide state: the processing switch and the leadership epoch used to fence
-- the writes of a lease holder that was replaced.
CREATE TABLE dispatcher_state (
    singleton          BOOLEAN     PRIMARY KEY DEFAULT true CHECK (singleton),
    processing_enabled BOOLEAN     NOT NULL DEFAULT true,
    epoch              BIGINT      NOT NULL DEFAULT 0,
    holder             TEXT,
    epoch_started_at   TIMESTAMPTZ
);
INSERT INTO dispatcher_state DEFAULT VALUES;

-- Wake sleeping schedulers (continuous mode) when messages are enqueued.
CREATE FUNCTION messages_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('message_dispatcher', 'enqueued');
    RETURN NULL;
END
$$;
CREATE TRIGGER messages_enqueued AFTER INSERT ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION messages_notify();
