-- See 0007. Validation reads the whole table under a lock that blocks neither reads nor writes.
ALTER TABLE invoice VALIDATE CONSTRAINT invoice_cancelled_has_reason;
