-- no-transaction
-- The sweeper's and the oldest-due gauge's index (see 0007): `next_attempt_at` is set while
-- an invoice is QUEUED, ISSUING or SUBMITTED and cleared when it settles, so taking an
-- invoice for a call (which changes only `status`, `attempts` and the lease) leaves this
-- index alone. A build that fails leaves an INVALID index behind: drop it
-- (`DROP INDEX CONCURRENTLY invoice_due`) and run `invoice migrate` again.
CREATE INDEX CONCURRENTLY invoice_due ON invoice (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
