-- The operator list endpoint (`GET /v1/api/invoices`): a merchant's invoices, newest first.
CREATE INDEX invoice_merchant_recent ON invoice (merchant_id, id DESC);
-- `invoice_request` rows the sweeper may join: pending ones, by age.
CREATE INDEX invoice_request_pending_age ON invoice_request (created_at)
    WHERE joined_at IS NULL AND deleted_at IS NULL;
