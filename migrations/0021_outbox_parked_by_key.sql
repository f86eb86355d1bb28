-- no-transaction
-- A parked outbox row (10 failed attempts that were its own fault) holds its key's later
-- rows back: published past it, they would reach consumers before it once an operator hands
-- it back. The relay's read skips every row that has a parked row of its (topic, key) before
-- it, and finds those through this index. It is empty unless an operator has something to
-- do, so rows pay nothing for it until they fail. Built concurrently; a build that fails
-- leaves an INVALID index behind: drop it (`DROP INDEX CONCURRENTLY outbox_parked`) and run
-- `invoice migrate` again.
CREATE INDEX CONCURRENTLY outbox_parked ON outbox (topic, message_key, id) WHERE attempts >= 10;
