-- no-transaction
-- `invoice inspect` reads an order's decisions, and only the skipped ones are found by the
-- order alone: a created one is the decision of its invoice's payment event (written in
-- the same transaction), found through the invoice (`invoice_by_order`) and this table's
-- primary key. Every created decision, a payment's usual outcome, wrote a B-tree entry in
-- `payment_decision_order` (dropped by the next migration) that no query needed. Built
-- concurrently; a build that fails leaves an INVALID index behind: drop it
-- (`DROP INDEX CONCURRENTLY payment_decision_skipped_order`) and run `invoice migrate` again.
CREATE INDEX CONCURRENTLY payment_decision_skipped_order ON payment_decision (order_id)
    WHERE outcome <> 'created';
