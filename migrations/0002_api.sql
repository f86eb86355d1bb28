-- What the HTTP API (issue 5) needs beyond the first schema.
-- The operator list endpoint (`GET /v1/api/invoices`): a merchant's invoices, newest first.
CREATE INDEX invoice_merchant_recent ON invoice (merchant_id, id DESC);
-- `invoice_request` rows the sweeper may join: pending ones, by age.
CREATE INDEX invoice_request_pending_age ON invoice_request (created_at)
    WHERE joined_at IS NULL AND deleted_at IS NULL;
-- At most one open claim per invoice (a second open claim would be a second live token).
CREATE UNIQUE INDEX claim_one_open_per_invoice ON claim (invoice_id) WHERE status = 'OPEN';
