-- no-transaction
-- Replaced by `claim_one_per_invoice` (migration 0013). Dropped concurrently: a plain `DROP INDEX`
-- needs an exclusive lock on the table, and while it waits for one (behind a long
-- transaction, a VACUUM, or a claim request holding the other table) every read and write of
-- the table waits behind it.
DROP INDEX CONCURRENTLY IF EXISTS claim_invoice;
