-- no-transaction
-- The sweeper's scan of due invoices, replacing `invoice_unfinished` (dropped by the next
-- migration). `invoice_unfinished (status, next_attempt_at) WHERE status IN (...)` served any
-- query that names an unfinished status, and the planner trusts it whenever the statistics say
-- no invoice is unfinished, as after an analyze in a quiet hour. A burst then made every lookup
-- of one invoice by id or order (the worker's read and take, the lease renewal) scan all the
-- QUEUED ones: 173 ms per read of 137 invoices at 2,000 payments/s in `make bench`, where the
-- backlog grew faster the slower the reads got. This index requires `next_attempt_at` in its
-- predicate, which only the due-time queries state, so a lookup by id or order has nothing to
-- choose but the primary key or `invoice_order`. Built concurrently; a build that fails
-- leaves an INVALID index behind: drop it (`DROP INDEX CONCURRENTLY invoice_due`) and run
-- `invoice migrate` again.
CREATE INDEX CONCURRENTLY invoice_due ON invoice (next_attempt_at)
    WHERE status IN ('QUEUED', 'ISSUING', 'SUBMITTED') AND next_attempt_at IS NOT NULL;
