-- Every payment the stream decides writes an invoice, a claim, a decision, an audit row and
-- outbox rows; every issuance adds attempts and audit rows. A profile of `make bench` on two
-- cores put 16% of Postgres' CPU in foreign-key triggers (one `SELECT ... FOR KEY SHARE` per
-- row, run one by one after each multi-row insert) and 24% in index inserts. This migration
-- and the next two remove the checks and indexes that bought nothing. Everything here takes
-- its locks for milliseconds (no data is read); the index work that reads a table is done
-- concurrently, in migrations of its own.

-- Invoices are never deleted (`deleted_at` marks them; no code deletes a row), so a row
-- pointing at an invoice cannot lose it. Such rows are written with their invoice or while a
-- worker works on it: claims, decisions and the creation's audit row in the transaction that
-- inserts the invoice, attempts and later audit rows after it committed. The crash tests
-- assert that no row points at a missing invoice.
ALTER TABLE claim DROP CONSTRAINT claim_invoice_id_fkey;
ALTER TABLE payment_decision DROP CONSTRAINT payment_decision_invoice_id_fkey;
ALTER TABLE issuance_attempt DROP CONSTRAINT issuance_attempt_invoice_id_fkey;
ALTER TABLE audit_log DROP CONSTRAINT audit_log_invoice_id_fkey;
-- An invoice carries a copy of its provider configuration (`config_snapshot`), so it does not
-- depend on the row it was copied from (configurations are never deleted either); the check
-- also took a key-share lock on that row for every invoice, shared by every partition task
-- writing for the same merchant.
ALTER TABLE invoice DROP CONSTRAINT invoice_provider_config_id_fkey;

-- The transaction UUID is derived from the invoice id (SHA-256, DOMAIN §7), so it is unique
-- because the id is; nothing looks an invoice up by it. Its random-keyed B-tree cost a page
-- read and write per invoice.
ALTER TABLE invoice DROP CONSTRAINT invoice_transaction_uuid_key;
