-- An invoice's config snapshot (its provider configuration and rule set, copied when the
-- invoice is created and never changed: SPEC §3) is some 700 bytes of JSON, the same for
-- every invoice of one merchant, configuration and rule set: 60% of an invoice row. Postgres
-- wrote it again with each of a worker's two updates of the row (they cannot be HOT updates:
-- they change indexed columns, so the whole row is copied), and the stream wrote it with
-- every invoice. New invoices reference one shared copy by a digest (SHA-256 of the merchant
-- and the snapshot's JSON text, computed by the stream) and leave `config_snapshot` empty;
-- invoices written before keep theirs inline. `invoice_snapshot()` reads either.
--
-- Versions before this one cannot read an invoice without an inline snapshot: during a
-- rolling upgrade an old worker retries such an order until it is replaced (nothing is lost
-- or sent twice, only delayed). To run an older version again after new invoices were
-- written, first copy their snapshots inline (see the README, "Upgrading").
--
-- Only the catalog changes (no row is read or rewritten), but `ALTER TABLE invoice` needs an
-- exclusive lock, and while it waits (behind a long transaction or a VACUUM) every read and
-- write of invoices waits behind it: give up after 5 s instead (the migration fails and can
-- simply be run again). The table and the function come first, so the lock is held only
-- for the last statement.
SET LOCAL lock_timeout = '5s';

-- Never deleted, like the invoices that reference them (a merchant has one per
-- configuration, seller details and rule set it has had); key rotation reseals their
-- credentials in place (the digest is an identifier, not a checksum of the current text).
-- `merchant_id` is part of what the credentials' ciphertext is bound to (its AAD).
CREATE TABLE invoice_config_snapshot (
    digest      BYTEA PRIMARY KEY CHECK (length(digest) = 32),
    merchant_id TEXT NOT NULL,
    snapshot    JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE invoice_config_snapshot ALTER COLUMN snapshot SET STATISTICS 0;

-- An invoice's snapshot, inline or shared.
CREATE FUNCTION invoice_snapshot(inline JSONB, digest BYTEA) RETURNS JSONB
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT COALESCE(inline, (SELECT s.snapshot FROM invoice_config_snapshot s WHERE s.digest = $2)) $$;

-- No foreign key (see 0004): the stream writes the snapshot in the statement that writes its
-- invoices, and the crash tests check that every invoice has its snapshot. NOT VALID: rows
-- written before all have their snapshot inline (the column was NOT NULL); checking them
-- would read the whole table under the lock.
ALTER TABLE invoice
    ADD COLUMN config_snapshot_digest BYTEA,
    ALTER COLUMN config_snapshot DROP NOT NULL,
    ADD CONSTRAINT invoice_has_snapshot
        CHECK (config_snapshot IS NOT NULL OR config_snapshot_digest IS NOT NULL) NOT VALID;
