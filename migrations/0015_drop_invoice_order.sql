-- no-transaction
-- Replaced by `invoice_by_order` (migration 0012). Dropped concurrently: a plain `DROP INDEX`
-- needs an exclusive lock on the table, and while it waits for one (behind a long
-- transaction, a VACUUM, or a claim request holding the other table) every read and write of
-- the table waits behind it.
DROP INDEX CONCURRENTLY IF EXISTS invoice_order;
