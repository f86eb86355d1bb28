-- no-transaction
-- Replaced by `payment_decision_skipped_order` (see the previous migration). Versions before
-- it look an order's decisions up by `order_id` alone: their `inspect` reads the whole table.
DROP INDEX CONCURRENTLY IF EXISTS payment_decision_order;
