-- Statistics only on the columns queries select by. The tables below are written by every
-- payment or provider call and read back only by key (an event id, an invoice, an order, a
-- claim token, the outbox's id order), yet auto-analyze sampled 30,000 rows of each and sorted
-- the sample of every column (text with the collation's rules) to build statistics no plan
-- needs. A column's statistics target also sets the sample's size (300 rows per point of the
-- highest target in the table): where the few columns left keep 10, a table is sampled with
-- 3,000 rows. On the 150,000 payments of a `make bench` stream stage one auto-analyze of the
-- five tables the stream writes took 690 ms, 226 ms after this; a backlog drain has one every
-- minute (`autovacuum_naptime`). Statistics already gathered for these columns stay as they
-- are (an analyze no longer updates them), which no plan here depends on either.
--
-- What stays: an invoice's columns that any statement filters, joins or sorts on (the order
-- id keeps the default: `order_id = ANY(..)` estimated without it reads as the whole table,
-- the plan migration 0003 is about); the claim's status and deadline (the expiry's range
-- scan); the order of a decision; the invoice of an audit row or an attempt, and the order of
-- an audit row. Event ids, claim tokens and claims' invoices have unique indexes, which the
-- planner counts on without statistics.
--
-- The lock taken blocks neither reads nor writes, but would queue behind a running VACUUM,
-- ANALYZE or concurrent index build: give up after a while instead (the migration fails and
-- can simply be run again).
SET LOCAL lock_timeout = '30s';
ALTER TABLE invoice
    ALTER COLUMN currency SET STATISTICS 0, ALTER COLUMN paid_at SET STATISTICS 0,
    ALTER COLUMN payment_event_id SET STATISTICS 0, ALTER COLUMN issuance_mode SET STATISTICS 0,
    ALTER COLUMN total_net SET STATISTICS 0, ALTER COLUMN total_vat SET STATISTICS 0,
    ALTER COLUMN total_amount SET STATISTICS 0, ALTER COLUMN provider_config_id SET STATISTICS 0,
    ALTER COLUMN transaction_uuid SET STATISTICS 0, ALTER COLUMN last_error SET STATISTICS 0,
    ALTER COLUMN submitted_at SET STATISTICS 0, ALTER COLUMN provider_invoice_no SET STATISTICS 0,
    ALTER COLUMN provider_series SET STATISTICS 0, ALTER COLUMN reservation_code SET STATISTICS 0,
    ALTER COLUMN tax_authority_code SET STATISTICS 0, ALTER COLUMN issued_at SET STATISTICS 0,
    ALTER COLUMN cancel_reason SET STATISTICS 0, ALTER COLUMN replacement_reason SET STATISTICS 0;
ALTER TABLE claim
    ALTER COLUMN id SET STATISTICS 0, ALTER COLUMN invoice_id SET STATISTICS 0,
    ALTER COLUMN merchant_id SET STATISTICS 0, ALTER COLUMN order_id SET STATISTICS 0,
    ALTER COLUMN token_hash SET STATISTICS 0, ALTER COLUMN deadline SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10, ALTER COLUMN claimed_at SET STATISTICS 0,
    ALTER COLUMN created_at SET STATISTICS 0, ALTER COLUMN updated_at SET STATISTICS 0;
ALTER TABLE payment_decision
    ALTER COLUMN event_id SET STATISTICS 0, ALTER COLUMN merchant_id SET STATISTICS 0,
    ALTER COLUMN order_id SET STATISTICS 10, ALTER COLUMN outcome SET STATISTICS 0,
    ALTER COLUMN skip_reason SET STATISTICS 0, ALTER COLUMN invoice_id SET STATISTICS 0,
    ALTER COLUMN topic SET STATISTICS 0, ALTER COLUMN partition SET STATISTICS 0,
    ALTER COLUMN "offset" SET STATISTICS 0, ALTER COLUMN decided_at SET STATISTICS 0;
ALTER TABLE audit_log
    ALTER COLUMN id SET STATISTICS 0, ALTER COLUMN entity SET STATISTICS 0,
    ALTER COLUMN entity_id SET STATISTICS 0, ALTER COLUMN invoice_id SET STATISTICS 10,
    ALTER COLUMN merchant_id SET STATISTICS 0, ALTER COLUMN order_id SET STATISTICS 10,
    ALTER COLUMN event_type SET STATISTICS 0, ALTER COLUMN outcome SET STATISTICS 0,
    ALTER COLUMN actor SET STATISTICS 0, ALTER COLUMN reason SET STATISTICS 0,
    ALTER COLUMN created_at SET STATISTICS 0;
ALTER TABLE issuance_attempt
    ALTER COLUMN id SET STATISTICS 0, ALTER COLUMN invoice_id SET STATISTICS 10,
    ALTER COLUMN attempt_no SET STATISTICS 0, ALTER COLUMN operation SET STATISTICS 0,
    ALTER COLUMN transaction_uuid SET STATISTICS 0, ALTER COLUMN provider SET STATISTICS 0,
    ALTER COLUMN outcome SET STATISTICS 0, ALTER COLUMN error_code SET STATISTICS 0,
    ALTER COLUMN duration_ms SET STATISTICS 0, ALTER COLUMN worker SET STATISTICS 0,
    ALTER COLUMN started_at SET STATISTICS 0, ALTER COLUMN created_at SET STATISTICS 0;
ALTER TABLE outbox
    ALTER COLUMN id SET STATISTICS 0, ALTER COLUMN event_id SET STATISTICS 0,
    ALTER COLUMN topic SET STATISTICS 0, ALTER COLUMN message_key SET STATISTICS 0,
    ALTER COLUMN has_secret SET STATISTICS 0, ALTER COLUMN attempts SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0, ALTER COLUMN created_at SET STATISTICS 0;
