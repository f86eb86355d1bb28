-- no-transaction
-- No query reads audit rows by entity (the API and `inspect` read them by invoice or order),
-- and each audit row paid for an entry here.
DROP INDEX CONCURRENTLY IF EXISTS audit_log_entity;
