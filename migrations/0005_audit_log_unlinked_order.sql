-- no-transaction
-- `invoice inspect` finds an order's audit rows through its invoices (`audit_log_invoice`) and,
-- for rows about no invoice (a request refused before any payment), through this index; it
-- used to read the whole table. Built concurrently, so writers are not blocked while it reads
-- the table. A build that fails leaves an INVALID index behind: drop it
-- (`DROP INDEX CONCURRENTLY audit_log_unlinked_order`) and run `invoice migrate` again.
CREATE INDEX CONCURRENTLY audit_log_unlinked_order ON audit_log (order_id, id)
    WHERE invoice_id IS NULL AND order_id IS NOT NULL;
