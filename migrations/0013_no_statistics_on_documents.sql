-- No query filters, joins or groups on these documents (JSON, and the outbox payload), yet ANALYZE sampled and sorted
-- every one of them to build statistics nobody reads: while a bench stage issued invoices
-- right after a bulk load, auto-analyze of these tables took a fifth of both cores, most of
-- it comparing JSON documents. A lock that blocks neither reads nor writes.
ALTER TABLE audit_log ALTER COLUMN before SET STATISTICS 0, ALTER COLUMN after SET STATISTICS 0;
ALTER TABLE claim ALTER COLUMN buyer SET STATISTICS 0;
ALTER TABLE invoice ALTER COLUMN buyer SET STATISTICS 0, ALTER COLUMN config_snapshot SET STATISTICS 0,
    ALTER COLUMN lines SET STATISTICS 0, ALTER COLUMN provider_status SET STATISTICS 0;
ALTER TABLE invoice_request ALTER COLUMN buyer SET STATISTICS 0;
ALTER TABLE issuance_attempt ALTER COLUMN request SET STATISTICS 0, ALTER COLUMN response SET STATISTICS 0;
ALTER TABLE merchant_tax_info ALTER COLUMN tax SET STATISTICS 0;
ALTER TABLE outbox ALTER COLUMN headers SET STATISTICS 0, ALTER COLUMN payload SET STATISTICS 0;
