-- no-transaction
-- Replaces invoice_one_active_per_order (dropped in 0010) with the same rule, one live invoice
-- of each kind per order and merchant, predicated on `cancel_reason` instead of `status`
-- (see 0007): a status change no longer touches this index. A build that fails leaves an
-- INVALID index behind: drop it (`DROP INDEX CONCURRENTLY invoice_one_live_per_order`) and
-- run `invoice migrate` again.
CREATE UNIQUE INDEX CONCURRENTLY invoice_one_live_per_order ON invoice (order_id, merchant_id, kind)
    WHERE cancel_reason IS NULL AND deleted_at IS NULL;
