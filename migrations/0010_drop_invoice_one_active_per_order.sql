-- no-transaction
-- Superseded by invoice_one_live_per_order (0009).
DROP INDEX CONCURRENTLY IF EXISTS invoice_one_active_per_order;
