-- Attempt history: one row per webhook request, so an operator sees what happened to a message
-- attempt by attempt (when, how long, the answer's status code or the error, which instance and
-- leadership epoch). Written in the same statement as the batch of outcomes it belongs to, and
-- deleted with its message.
--
-- A request whose outcome is never recorded (the instance was killed mid-request) leaves no row;
-- `messages.attempts` still counts it, since attempts are counted when a message is claimed.
CREATE TABLE message_attempts (
    message_id  BIGINT      NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    -- The value of messages.attempts that the claim gave this request (1 for the first).
    attempt     INT         NOT NULL CHECK (attempt >= 1),
    started_at  TIMESTAMPTZ NOT NULL,
    duration_ms INT         NOT NULL CHECK (duration_ms >= 0),
    -- The answer's HTTP status; NULL when none came (connection error, timeout).
    status_code SMALLINT,
    error       TEXT,
    instance_id TEXT        NOT NULL,
    epoch       BIGINT,
    PRIMARY KEY (message_id, attempt)
);
