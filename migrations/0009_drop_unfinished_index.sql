-- no-transaction
-- Replaced by `invoice_due` (see the previous migration). Its `PENDING_CLAIM` entries served
-- no query: claims expire through `claim_open_deadline`.
DROP INDEX CONCURRENTLY IF EXISTS invoice_unfinished;
