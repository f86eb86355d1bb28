-- No query filters, joins, sorts or groups on these documents (JSON, and the outbox payload;
-- key rotation's scan by `config_snapshot->'credentials'->>'keyId'` is an expression, which
-- column statistics do not serve), yet ANALYZE sampled them and sorted the samples to build
-- statistics nobody reads. Right after a bulk load (a backlog drained after an outage),
-- auto-analyze of these tables took a fifth of both cores in a 6-second profile of the
-- bench's issuing stage, most of it comparing JSON documents; a twentieth without them.
-- The lock taken blocks neither reads nor writes, but would queue behind a running VACUUM,
-- ANALYZE or concurrent index build: give up after a while instead (the migration fails and
-- can simply be run again).
SET LOCAL lock_timeout = '30s';
ALTER TABLE audit_log ALTER COLUMN before SET STATISTICS 0, ALTER COLUMN after SET STATISTICS 0;
ALTER TABLE claim ALTER COLUMN buyer SET STATISTICS 0;
ALTER TABLE invoice ALTER COLUMN buyer SET STATISTICS 0, ALTER COLUMN config_snapshot SET STATISTICS 0,
    ALTER COLUMN lines SET STATISTICS 0, ALTER COLUMN provider_status SET STATISTICS 0;
ALTER TABLE invoice_request ALTER COLUMN buyer SET STATISTICS 0;
ALTER TABLE issuance_attempt ALTER COLUMN request SET STATISTICS 0, ALTER COLUMN response SET STATISTICS 0;
ALTER TABLE merchant_tax_info ALTER COLUMN tax SET STATISTICS 0;
ALTER TABLE outbox ALTER COLUMN headers SET STATISTICS 0, ALTER COLUMN payload SET STATISTICS 0;
