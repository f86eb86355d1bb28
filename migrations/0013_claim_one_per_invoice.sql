-- no-transaction
-- One index on a claim's invoice, replacing two (`claim_invoice` and the partial unique
-- `claim_one_open_per_invoice`, dropped by migrations 0016 and 0017): a claim is opened only
-- with its invoice, in the stream's transaction that creates the invoice, so an invoice has at
-- most one claim at all, and unique over all claims is the stronger form of the same rule.
-- Each claim paid for a second B-tree insert. Built concurrently; a build that fails leaves
-- an INVALID index behind: drop it (`DROP INDEX CONCURRENTLY claim_one_per_invoice`) and run
-- `invoice migrate` again.
CREATE UNIQUE INDEX CONCURRENTLY claim_one_per_invoice ON claim (invoice_id);
