-- The stream looks invoices and pending requests up by a batch's orders (`order_id = ANY(..)`).
-- With `merchant_id` leading, the partial unique indexes below matched those queries' predicates
-- best, so a planner working from the statistics of a table that grew since its last analyze
-- (a new deployment, a backlog after an outage) chose them and scanned the whole index, comparing
-- each entry with every order of the batch: 0.5-2 s per batch of 1,000 in `make bench`. With
-- `order_id` leading, every index such a query can use is probed per order. The uniqueness they
-- enforce is unchanged (ON CONFLICT infers them by their column set, not its order).
DROP INDEX invoice_one_active_per_order;
CREATE UNIQUE INDEX invoice_one_active_per_order
    ON invoice (order_id, merchant_id, kind)
    WHERE status <> 'CANCELLED' AND deleted_at IS NULL;

-- The plain `order_id` index of pending requests is now the unique index's prefix.
DROP INDEX invoice_request_pending_order;
DROP INDEX invoice_request_one_pending_per_order;
CREATE UNIQUE INDEX invoice_request_one_pending_per_order
    ON invoice_request (order_id, merchant_id)
    WHERE joined_at IS NULL AND deleted_at IS NULL;

-- Implied by `claim_token_hash` (unique over all claims, open or not); each claim paid for a
-- second random-key B-tree insert.
DROP INDEX claim_one_live_per_token;
