-- The attempt history's foreign key checked every row written with a lookup and a share lock of
-- its message (a row-level trigger each): about a third of the cost of the outcome statement,
-- which writes a history row per request. The outcome statement writes history only for
-- messages that exist, so the key only had deletion left to do: a statement-level trigger now
-- deletes the history of deleted messages (retention, or by hand), once per statement.
ALTER TABLE message_attempts DROP CONSTRAINT message_attempts_message_id_fkey;

CREATE FUNCTION messages_forget_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE message_attempts;
    ELSE
        DELETE FROM message_attempts AS a USING gone WHERE a.message_id = gone.id;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER messages_history_deleted AFTER DELETE ON messages
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION messages_forget_history();
CREATE TRIGGER messages_history_truncated AFTER TRUNCATE ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION messages_forget_history();
