-- no-transaction
-- `invoice dlq list` and `GET /v1/api/dlq`: the newest FAILED invoices. Without it each call
-- read the whole invoice table and sorted its FAILED rows. Partial, so it holds only FAILED
-- invoices and no statement about other statuses can use it. Built concurrently; a build
-- that fails leaves an INVALID index behind: drop it
-- (`DROP INDEX CONCURRENTLY invoice_failed_recent`) and run `invoice migrate` again.
CREATE INDEX CONCURRENTLY invoice_failed_recent ON invoice (updated_at DESC)
    WHERE status = 'FAILED' AND deleted_at IS NULL;
