-- The whole data model of `invoice`. Postgres is the system of record (SPEC §1): every
-- state change of an invoice, the Kafka offset that caused it, its audit row and its outbox
-- event are written in one transaction.
--
-- Conventions: snowflake ids are BIGINT (JSON strings on the wire); money is NUMERIC, never
-- float; times are TIMESTAMPTZ in UTC; user data is soft-deleted with `deleted_at`.

-- Merchant tax information, kept current from the merchant CDC topic.
CREATE TABLE merchant_tax_info (
    merchant_id          TEXT PRIMARY KEY,
    merchant_name        TEXT,
    -- The `tax` member of the merchant's metadata, canonicalised (sorted keys, numbers
    -- normalised): equality of this column is the CDC tax-diff skip test.
    tax                  JSONB NOT NULL,
    tax_code             TEXT,
    legal_name           TEXT,
    address              TEXT,
    email                TEXT,
    phone                TEXT,
    invoice_enabled      BOOLEAN NOT NULL DEFAULT FALSE,
    issuance_mode        TEXT NOT NULL DEFAULT 'immediate'
                         CHECK (issuance_mode IN ('immediate', 'claim_window')),
    claim_window_minutes INTEGER NOT NULL DEFAULT 1440 CHECK (claim_window_minutes >= 0),
    provider             TEXT,
    -- CDC position this state came from: an older event never overwrites newer state.
    source_lsn           BIGINT,
    source_ts_ms         BIGINT,
    source_topic         TEXT,
    source_partition     INTEGER,
    source_offset        BIGINT,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at           TIMESTAMPTZ
);

-- A merchant's e-invoice provider configuration. Credentials are AES-256-GCM ciphertext
-- whose AAD binds them to (merchant_id, id); `key_id` names the key for rotation.
CREATE TABLE provider_config (
    id                     BIGINT PRIMARY KEY,
    merchant_id            TEXT NOT NULL,
    provider               TEXT NOT NULL,
    endpoint               TEXT NOT NULL,
    supplier_tax_code      TEXT NOT NULL,
    template_code          TEXT NOT NULL,
    series                 TEXT NOT NULL,
    credentials_ciphertext BYTEA NOT NULL,
    credentials_nonce      BYTEA NOT NULL,
    key_id                 TEXT NOT NULL,
    created_by             TEXT NOT NULL,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at             TIMESTAMPTZ
);
-- Editing a configuration soft-deletes the old row and inserts a new one, so invoices keep
-- pointing at the version they snapshotted.
CREATE UNIQUE INDEX provider_config_one_live_per_merchant
    ON provider_config (merchant_id) WHERE deleted_at IS NULL;

-- One row per paid order's invoice, and one per replacement invoice.
CREATE TABLE invoice (
    id                  BIGINT PRIMARY KEY,
    merchant_id         TEXT NOT NULL,
    order_id            TEXT NOT NULL,
    kind                TEXT NOT NULL DEFAULT 'original' CHECK (kind IN ('original', 'replacement')),
    replaces_invoice_id BIGINT REFERENCES invoice (id),
    status              TEXT NOT NULL CHECK (status IN ('PENDING_CLAIM', 'QUEUED', 'ISSUING',
                            'SUBMITTED', 'ISSUED', 'FAILED', 'CANCELLED', 'REPLACED')),
    issuance_mode       TEXT NOT NULL CHECK (issuance_mode IN ('immediate', 'claim_window')),
    payment_event_id    TEXT,
    paid_at             TIMESTAMPTZ NOT NULL,
    currency            TEXT NOT NULL,
    -- Buyer object of SPEC §5; NULL means a consumer (retail) buyer.
    buyer               JSONB,
    buyer_kind          TEXT NOT NULL DEFAULT 'consumer'
                        CHECK (buyer_kind IN ('consumer', 'individual', 'company')),
    -- Lines with their computed net, VAT and gross (DOMAIN §7 money rules).
    lines               JSONB NOT NULL,
    total_net           NUMERIC(27, 6) NOT NULL,
    total_vat           NUMERIC(27, 6) NOT NULL,
    total_amount        NUMERIC(27, 6) NOT NULL,
    -- Provider configuration copied at creation; never changed afterwards (SPEC §3).
    provider_config_id  BIGINT REFERENCES provider_config (id),
    config_snapshot     JSONB NOT NULL,
    -- Idempotency key at the provider, derived from the id and stored before the first call.
    transaction_uuid    TEXT NOT NULL UNIQUE CHECK (length(transaction_uuid) BETWEEN 10 AND 36),
    -- Issuance bookkeeping. `attempts` counts deliveries that may call `create`;
    -- `next_attempt_at` is when the sweeper considers the invoice due (for ISSUING it equals
    -- `lease_until`: the time after which the previous call surely ended).
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ,
    -- Single flight per idempotency key: an ISSUING invoice belongs to `lease_owner` (one
    -- delivery of one worker) until `lease_until`; every later write of that delivery is
    -- fenced on both.
    lease_until         TIMESTAMPTZ,
    lease_owner         TEXT,
    last_error          TEXT,
    submitted_at        TIMESTAMPTZ,
    -- Provider result.
    provider_invoice_no TEXT,
    provider_series     TEXT,
    reservation_code    TEXT,
    tax_authority_code  TEXT,
    provider_status     JSONB,
    issued_at           TIMESTAMPTZ,
    cancel_reason       TEXT,
    -- Why a replacement replaces its original (printed on it as the agreement reference).
    replacement_reason  TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at          TIMESTAMPTZ,
    CHECK ((kind = 'replacement') = (replaces_invoice_id IS NOT NULL))
);
-- At most one active original and one active replacement per order (SPEC §1, §3).
CREATE UNIQUE INDEX invoice_one_active_per_order
    ON invoice (merchant_id, order_id, kind)
    WHERE status <> 'CANCELLED' AND deleted_at IS NULL;
CREATE INDEX invoice_order ON invoice (order_id);
-- No index for listing a merchant's invoices yet: the operator list endpoint (issue 5) adds
-- the one its query needs. Every index here costs each of the invoice's state changes.
-- The sweeper's scan: only invoices whose issuance is not finished.
CREATE INDEX invoice_unfinished ON invoice (status, next_attempt_at)
    WHERE status IN ('QUEUED', 'ISSUING', 'SUBMITTED', 'PENDING_CLAIM');

-- Buyer claims. Only the SHA-256 of the token is stored; the clear token appears once, in
-- the `invoice.claim_opened` event.
CREATE TABLE claim (
    id          BIGINT PRIMARY KEY,
    invoice_id  BIGINT NOT NULL REFERENCES invoice (id),
    merchant_id TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    token_hash  BYTEA NOT NULL CHECK (length(token_hash) = 32),
    deadline    TIMESTAMPTZ NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('OPEN', 'CLAIMED', 'EXPIRED', 'CANCELLED')),
    buyer       JSONB,
    claimed_at  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX claim_one_live_per_token ON claim (token_hash) WHERE status = 'OPEN';
CREATE UNIQUE INDEX claim_token_hash ON claim (token_hash);
CREATE INDEX claim_open_deadline ON claim (deadline) WHERE status = 'OPEN';
CREATE INDEX claim_invoice ON claim (invoice_id);

-- A buyer's request for a company invoice; may arrive before its payment and is joined
-- when the payment arrives.
CREATE TABLE invoice_request (
    id          BIGINT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    buyer       JSONB NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('merchant_webhook', 'internal_webhook', 'claim')),
    webhook_id  TEXT,
    invoice_id  BIGINT REFERENCES invoice (id),
    joined_at   TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at  TIMESTAMPTZ
);
CREATE UNIQUE INDEX invoice_request_one_pending_per_order
    ON invoice_request (merchant_id, order_id) WHERE joined_at IS NULL AND deleted_at IS NULL;
CREATE INDEX invoice_request_pending_order
    ON invoice_request (order_id) WHERE joined_at IS NULL AND deleted_at IS NULL;

-- What the stream decided for each payment event: the duplicate-event check, and the answer
-- to "why has this order no invoice?".
CREATE TABLE payment_decision (
    event_id    TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    skip_reason TEXT,
    invoice_id  BIGINT REFERENCES invoice (id),
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    "offset"    BIGINT NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX payment_decision_order ON payment_decision (order_id);

-- One row per provider call (create or lookup); payloads redacted before they are stored.
CREATE TABLE issuance_attempt (
    id               BIGSERIAL PRIMARY KEY,
    invoice_id       BIGINT NOT NULL REFERENCES invoice (id),
    attempt_no       INTEGER NOT NULL,
    operation        TEXT NOT NULL CHECK (operation IN ('create', 'lookup')),
    transaction_uuid TEXT NOT NULL,
    provider         TEXT NOT NULL,
    outcome          TEXT NOT NULL
                     CHECK (outcome IN ('issued', 'accepted', 'not_found', 'retryable', 'ambiguous', 'permanent')),
    error_code       TEXT,
    request          JSONB,
    response         JSONB,
    duration_ms      INTEGER NOT NULL,
    worker           TEXT NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX issuance_attempt_invoice ON issuance_attempt (invoice_id, id);

-- Audit trail, written in the same transaction as the change it describes (SPEC §1.5).
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    entity      TEXT NOT NULL CHECK (entity IN ('invoice', 'claim', 'provider_config', 'tax_info', 'offsets')),
    entity_id   TEXT NOT NULL,
    invoice_id  BIGINT REFERENCES invoice (id),
    merchant_id TEXT,
    order_id    TEXT,
    event_type  TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    before      JSONB,
    after       JSONB,
    actor       TEXT NOT NULL,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_invoice ON audit_log (invoice_id, id) WHERE invoice_id IS NOT NULL;
CREATE INDEX audit_log_entity ON audit_log (entity, entity_id, id);

-- The consumer's position, the truth for where each partition resumes (SPEC §1.1).
-- Advanced with compare-and-set on `next_offset`, which fences a zombie owner.
CREATE TABLE consumer_offset (
    group_id    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL CHECK (partition >= 0),
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Transactional outbox: every message this service produces to Kafka (lifecycle events and
-- dead letters) is written here in the transaction that caused it, and published by one
-- relay in id order, so an event exists if and only if its change committed. A row is
-- deleted once Kafka acknowledged it (the event lives on in the topic), which also removes
-- any clear claim token it carried.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    -- Random v4 UUIDs: no unique index (it would cost a random B-tree insert per event and
    -- guard nothing the generator does not).
    event_id     UUID NOT NULL,
    topic        TEXT NOT NULL,
    message_key  BYTEA,
    payload      BYTEA,
    headers      JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- Carries a clear claim token (so it must not outlive its publication).
    has_secret   BOOLEAN NOT NULL DEFAULT FALSE,
    -- Failed publication attempts; a row that keeps failing (e.g. larger than the broker
    -- accepts) is parked after a few so it cannot block the rest: see `invoice_outbox_parked`.
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- `webhook-id`s already processed, per endpoint: a redelivery is answered 200 and not redone.
CREATE TABLE webhook_seen (
    endpoint    TEXT NOT NULL CHECK (endpoint IN ('merchant', 'internal')),
    webhook_id  TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, webhook_id)
);
CREATE INDEX webhook_seen_received ON webhook_seen (received_at);

-- The permissions a JWT may carry (SPEC §5).
CREATE TABLE permission (
    code        TEXT PRIMARY KEY,
    description TEXT NOT NULL
);

-- Vietnam's administrative units after the 2025 reform (two levels).
CREATE TABLE admin_province (
    code TEXT PRIMARY KEY CHECK (code ~ '^[0-9]{2}$'),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('province', 'municipality'))
);
CREATE TABLE admin_ward (
    code          TEXT PRIMARY KEY CHECK (code ~ '^[0-9]{5}$'),
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('ward', 'commune', 'special_zone')),
    province_code TEXT NOT NULL REFERENCES admin_province (code)
);
CREATE INDEX admin_ward_province ON admin_ward (province_code, code);

-- Snowflake worker ids in use. The process also holds a Postgres advisory lock on its id for
-- its lifetime; `last_ms` is the newest millisecond it has issued ids in, so a restart with a
-- clock behind it waits instead of reusing ids.
CREATE TABLE snowflake_worker (
    worker_id   INTEGER PRIMARY KEY CHECK (worker_id BETWEEN 0 AND 1023),
    last_ms     BIGINT NOT NULL,
    holder      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
