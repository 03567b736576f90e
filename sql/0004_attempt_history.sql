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
    -- A request is known by when it started: probes and "slow down" answers do not advance the
    -- count (see attempts_free), and a repeated write of the same outcome adds nothing.
    PRIMARY KEY (message_id, started_at)
);

-- Requests that do not count toward MAX_ATTEMPTS: the probes of an open circuit breaker and
-- requests the receiver answered with "slow down" (429, 503 with Retry-After) say nothing about
-- the message. The daemon gives up after MAX_ATTEMPTS of attempts - attempts_free.
ALTER TABLE messages
    ADD COLUMN attempts_free INT NOT NULL DEFAULT 0,
    -- (A negative count is messages_attempts_not_negative's to refuse.)
    ADD CONSTRAINT messages_attempts_free_within
        CHECK (attempts_free >= 0 AND (attempts < 0 OR attempts_free <= attempts));
