-- The worker moves every invoice QUEUED → ISSUING → ISSUED. Postgres writes such an update
-- as HOT (the new row version on the same page, no new index entry) only if no column that
-- an index keys on or is predicated on changes value, and the page has room for it. `status`
-- was in two indexes, so each transition wrote five index entries and left five dead ones.
-- From here on:
-- * a cancelled invoice is exactly one with a cancel reason (the check below), so the index
--   allowing one live invoice per order can be predicated on `cancel_reason` (0009, 0010);
-- * the sweeper's due index keys on `next_attempt_at` alone, which is set exactly while a
--   worker may still have to pick the invoice up (0011, 0012); taking an invoice for a call
--   no longer moves it (its call lease is `lease_until`);
-- * new pages keep 40 % free for the versions those updates write.
-- The check is added NOT VALID (a short exclusive lock) and validated in 0008, a transaction
-- of its own that lets reads and writes go on while it reads the table.
UPDATE invoice
SET cancel_reason = CASE WHEN status = 'CANCELLED' THEN coalesce(cancel_reason, 'cancelled') END
WHERE (status = 'CANCELLED') <> (cancel_reason IS NOT NULL);

ALTER TABLE invoice ADD CONSTRAINT invoice_cancelled_has_reason
    CHECK ((status = 'CANCELLED') = (cancel_reason IS NOT NULL)) NOT VALID;

ALTER TABLE invoice SET (fillfactor = 60);
