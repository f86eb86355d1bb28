-- no-transaction
-- Superseded by invoice_due (0011).
DROP INDEX CONCURRENTLY IF EXISTS invoice_unfinished;
