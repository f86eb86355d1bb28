-- The indexes the two previous migrations replaced. Dropping an index reads nothing, but it
-- needs an exclusive lock on its table, and while that waits (behind a long transaction or a
-- VACUUM) every read and write of the table waits behind it: give up after 5 s instead (the
-- migration fails and can simply be run again).
SET LOCAL lock_timeout = '5s';

DROP INDEX invoice_one_active_per_order;
DROP INDEX invoice_order;
DROP INDEX claim_invoice;
DROP INDEX claim_one_open_per_invoice;
