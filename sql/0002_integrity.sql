-- Impossible states made impossible (issue #10, defect 9): a `sending` row with no claim time,
-- for instance, was never returned by crash recovery (which selects on claimed_at) and so was
-- stuck for ever. The constraints below reject such rows; every statement of the daemon
-- (claim, record, recover) and an enqueue by INSERT of recipient and content satisfy them.
--
-- A database may already hold rows in such a state (left by that defect, an older version or a
-- hand-written statement), so they are repaired first and this migration applies to any
-- database. Repairs that change a status also move updated_at.

-- 1. Repairs.

-- Waiting or in flight with an empty recipient or content: there is nothing to deliver.
UPDATE messages
SET status = 'failed',
    last_error = 'empty recipient or content (set failed by migration 0002_integrity)',
    claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL, updated_at = now()
WHERE status IN ('pending', 'sending') AND (recipient = '' OR content = '');

-- `sending` without a holder that crash recovery can see (no claim time or no claimant, or an
-- epoch no lease ever had: the first is 1): back to `pending`, as crash recovery would have done.
UPDATE messages
SET status = 'pending', claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL,
    updated_at = now()
WHERE status = 'sending'
  AND (claimed_at IS NULL OR claimed_by IS NULL OR claimed_epoch < 1);

-- Claim fields left on a row that is not `sending`: nobody holds it.
UPDATE messages
SET claimed_epoch = NULL, claimed_by = NULL, claimed_at = NULL
WHERE status <> 'sending'
  AND (claimed_epoch IS NOT NULL OR claimed_by IS NOT NULL OR claimed_at IS NOT NULL);

-- `sent` without sent_at: the daemon writes both in one statement, with updated_at, so
-- updated_at is the best record of when it was sent.
UPDATE messages SET sent_at = updated_at WHERE status = 'sent' AND sent_at IS NULL;

UPDATE messages SET attempts = 0 WHERE attempts < 0;

-- The epoch only ever grows from 0; raising a negative one to 0 never moves it back.
UPDATE dispatcher_state SET epoch = 0 WHERE epoch < 0;

-- 2. Constraints (one ALTER TABLE: the table is scanned once to check them all).
ALTER TABLE messages
    -- The six statuses of the contract; `expired` and `cancelled` are used by upcoming features.
    -- (`messages_status_check` is the name PostgreSQL gave 0001's column constraint.)
    DROP CONSTRAINT messages_status_check,
    ADD CONSTRAINT messages_status_check
        CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'expired', 'cancelled')),
    -- A `sending` row says who claimed it and when, or crash recovery can never return it. The
    -- epoch stays NULL for a claim made without the lease (DISTRIBUTED_LOCK_ENABLED=false).
    ADD CONSTRAINT messages_sending_is_claimed
        CHECK (status <> 'sending' OR (claimed_at IS NOT NULL AND claimed_by IS NOT NULL)),
    -- Only a `sending` row is held by anyone; every statement that ends a claim clears all three.
    ADD CONSTRAINT messages_claimed_only_while_sending
        CHECK (status = 'sending'
               OR (claimed_epoch IS NULL AND claimed_by IS NULL AND claimed_at IS NULL)),
    -- Epochs start at 1 (dispatcher_state.epoch is 0 until the first acquisition raises it).
    ADD CONSTRAINT messages_claimed_epoch_positive CHECK (claimed_epoch >= 1),
    ADD CONSTRAINT messages_sent_has_sent_at CHECK (status <> 'sent' OR sent_at IS NOT NULL),
    ADD CONSTRAINT messages_attempts_not_negative CHECK (attempts >= 0),
    -- What is waiting or in flight has a recipient and a content (POST /messages requires more:
    -- no surrounding spaces, no control characters, not only white space, a length limit; those
    -- are the API's rules, not the table's). Finished rows keep what they were sent with.
    ADD CONSTRAINT messages_queued_not_empty
        CHECK (status NOT IN ('pending', 'sending') OR (recipient <> '' AND content <> ''));

ALTER TABLE dispatcher_state
    ADD CONSTRAINT dispatcher_state_epoch_not_negative CHECK (epoch >= 0);
