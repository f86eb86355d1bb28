//! What the stream reads and writes per batch of payments: the facts its decisions need, in
//! one query; then the offset move with the invoices, claims, decisions, audit rows, outbox
//! rows and request joins, all in one statement (a multi-row `UNNEST` per table), each write
//! gated on the move. The audit and outbox row binders are shared with the other writers of
//! those tables.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::merchants::{self, MerchantRecord, ProviderConfigRow};
use super::StorageError;

/// What the stream must know to decide a batch, read in one statement ([`FACTS`]).
#[derive(Debug, Default)]
pub struct BatchFacts {
    /// Event ids of the batch whose skip was recorded (`payment_decision`; older versions
    /// also recorded creations there).
    pub decided: HashSet<String>,
    /// The payment events that created the original invoices (in any state, cancelled and
    /// deleted ones too) of the batch's `(merchant, order)` pairs: such an event is decided,
    /// and that invoice is its decision's only record.
    pub created: HashMap<(String, String), Vec<String>>,
    /// `(merchant, order)` pairs of the batch that have an active original invoice.
    pub active: HashSet<(String, String)>,
    /// Pending (not yet joined) invoice requests of the batch's pairs:
    /// `(merchant, order) → (id, buyer)`.
    pub requests: HashMap<(String, String), (i64, Value)>,
    /// Stored TaxInfo of the batch's merchants (those never seen are absent).
    pub merchants: HashMap<String, MerchantRecord>,
    /// Live provider configurations of the batch's merchants.
    pub configs: HashMap<String, ProviderConfigRow>,
}

/// Five lookups, one round trip: each subquery aggregates its rows into one row of arrays
/// (the aggregates of one subquery see its rows in the same order).
///
/// Invoices and requests are looked up by `order_id = ANY(..)` (indexes `invoice_by_order` and
/// `invoice_request_one_pending_per_order`) and filtered to the exact pairs here: a join against
/// `UNNEST` of the pairs lets the planner, with the statistics of a table that grew since its
/// last analyze, scan every active invoice once per pair. The arrays are read through scalar
/// subqueries so that the statement is planned once, not at every batch (see [`unnest`]).
/// Public so that tests can check its plan.
pub const FACTS: &str = "
    SELECT d.event_ids,
           a.merchant_ids AS invoice_merchants, a.order_ids AS invoice_orders, a.event_ids AS invoice_events,
           a.active AS invoice_active,
           r.merchant_ids AS request_merchants, r.order_ids AS request_orders, r.ids AS request_ids,
           r.buyers AS request_buyers,
           m.merchant_ids AS tax_merchants, m.taxes, m.lsns, m.ts_ms, m.deleted, m.names,
           c.merchant_ids AS config_merchants, c.ids AS config_ids, c.providers, c.endpoints,
           c.supplier_tax_codes, c.template_codes, c.series, c.ciphertexts, c.nonces, c.key_ids
    FROM (SELECT array_agg(event_id) AS event_ids FROM payment_decision WHERE event_id = ANY((SELECT $1::text[])::text[])) d,
         (SELECT array_agg(merchant_id) AS merchant_ids, array_agg(order_id) AS order_ids,
                 array_agg(payment_event_id) AS event_ids, array_agg(status <> 'CANCELLED' AND deleted_at IS NULL) AS active
          FROM invoice WHERE order_id = ANY((SELECT $2::text[])::text[]) AND kind = 'original') a,
         (SELECT array_agg(merchant_id) AS merchant_ids, array_agg(order_id) AS order_ids, array_agg(id) AS ids,
                 array_agg(buyer) AS buyers
          FROM invoice_request WHERE order_id = ANY((SELECT $2::text[])::text[]) AND joined_at IS NULL AND deleted_at IS NULL) r,
         (SELECT array_agg(merchant_id) AS merchant_ids, array_agg(tax) AS taxes, array_agg(source_lsn) AS lsns,
                 array_agg(source_ts_ms) AS ts_ms, array_agg(deleted_at IS NOT NULL) AS deleted,
                 array_agg(merchant_name) AS names
          FROM merchant_tax_info WHERE merchant_id = ANY((SELECT $3::text[])::text[])) m,
         (SELECT array_agg(merchant_id) AS merchant_ids, array_agg(id) AS ids, array_agg(provider) AS providers,
                 array_agg(endpoint) AS endpoints, array_agg(supplier_tax_code) AS supplier_tax_codes,
                 array_agg(template_code) AS template_codes, array_agg(series) AS series,
                 array_agg(credentials_ciphertext) AS ciphertexts, array_agg(credentials_nonce) AS nonces,
                 array_agg(key_id) AS key_ids
          FROM provider_config WHERE merchant_id = ANY((SELECT $3::text[])::text[]) AND deleted_at IS NULL) c";

/// The row of [`FACTS`]: `NULL` (no row matched) reads as empty.
#[derive(sqlx::FromRow)]
struct FactsRow {
    event_ids: Option<Vec<String>>,
    invoice_merchants: Option<Vec<String>>,
    invoice_orders: Option<Vec<String>>,
    invoice_events: Option<Vec<Option<String>>>,
    invoice_active: Option<Vec<bool>>,
    request_merchants: Option<Vec<String>>,
    request_orders: Option<Vec<String>>,
    request_ids: Option<Vec<i64>>,
    request_buyers: Option<Vec<Value>>,
    tax_merchants: Option<Vec<String>>,
    taxes: Option<Vec<Value>>,
    lsns: Option<Vec<Option<i64>>>,
    ts_ms: Option<Vec<Option<i64>>>,
    deleted: Option<Vec<bool>>,
    names: Option<Vec<Option<String>>>,
    config_merchants: Option<Vec<String>>,
    config_ids: Option<Vec<i64>>,
    providers: Option<Vec<String>>,
    endpoints: Option<Vec<String>>,
    supplier_tax_codes: Option<Vec<String>>,
    template_codes: Option<Vec<String>>,
    series: Option<Vec<String>>,
    ciphertexts: Option<Vec<Vec<u8>>>,
    nonces: Option<Vec<Vec<u8>>>,
    key_ids: Option<Vec<String>>,
}

/// Reads the [`BatchFacts`] of a batch: its event ids, its `(merchant, order)` pairs (as two
/// parallel slices) and its distinct merchants.
pub async fn facts(
    conn: &mut PgConnection,
    event_ids: &[String],
    pair_merchants: &[String],
    pair_orders: &[String],
    merchant_ids: &[String],
) -> Result<BatchFacts, StorageError> {
    let row: FactsRow =
        sqlx::query_as(FACTS).bind(event_ids).bind(pair_orders).bind(merchant_ids).fetch_one(conn).await?;
    let wanted: HashSet<(&str, &str)> =
        pair_merchants.iter().map(String::as_str).zip(pair_orders.iter().map(String::as_str)).collect();
    let is_wanted = |pair: &(String, String)| wanted.contains(&(pair.0.as_str(), pair.1.as_str()));
    let list = |v: Option<Vec<String>>| v.unwrap_or_default().into_iter();

    let mut created: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut active = HashSet::new();
    let mut invoice_events = row.invoice_events.unwrap_or_default().into_iter();
    let mut invoice_active = row.invoice_active.unwrap_or_default().into_iter();
    for pair in list(row.invoice_merchants).zip(list(row.invoice_orders)) {
        let (Some(event), Some(is_active)) = (invoice_events.next(), invoice_active.next()) else {
            return Err(StorageError::Other("invoice facts arrays of unequal lengths".into()));
        };
        if !is_wanted(&pair) {
            continue;
        }
        if is_active {
            active.insert(pair.clone());
        }
        if let Some(event) = event {
            created.entry(pair).or_default().push(event);
        }
    }
    let mut request_orders = list(row.request_orders);
    let mut request_ids = row.request_ids.unwrap_or_default().into_iter();
    let mut request_buyers = row.request_buyers.unwrap_or_default().into_iter();
    let mut requests = HashMap::new();
    for merchant in list(row.request_merchants) {
        let (Some(order), Some(id), Some(buyer)) =
            (request_orders.next(), request_ids.next(), request_buyers.next())
        else {
            return Err(StorageError::Other("request facts arrays of unequal lengths".into()));
        };
        let pair = (merchant, order);
        if is_wanted(&pair) {
            requests.insert(pair, (id, buyer));
        }
    }
    let mut taxes = row.taxes.unwrap_or_default().into_iter();
    let mut lsns = row.lsns.unwrap_or_default().into_iter();
    let mut ts_ms = row.ts_ms.unwrap_or_default().into_iter();
    let mut deleted = row.deleted.unwrap_or_default().into_iter();
    let mut names = row.names.unwrap_or_default().into_iter();
    let mut merchants = HashMap::new();
    for merchant in list(row.tax_merchants) {
        let (Some(tax), Some(lsn), Some(ts), Some(gone), Some(name)) =
            (taxes.next(), lsns.next(), ts_ms.next(), deleted.next(), names.next())
        else {
            return Err(StorageError::Other("merchant facts arrays of unequal lengths".into()));
        };
        merchants.insert(merchant, merchants::record(tax, lsn, ts, gone, name));
    }
    let mut ids = row.config_ids.unwrap_or_default().into_iter();
    let mut providers = list(row.providers);
    let mut endpoints = list(row.endpoints);
    let mut supplier_tax_codes = list(row.supplier_tax_codes);
    let mut template_codes = list(row.template_codes);
    let mut series = list(row.series);
    let mut ciphertexts = row.ciphertexts.unwrap_or_default().into_iter();
    let mut nonces = row.nonces.unwrap_or_default().into_iter();
    let mut key_ids = list(row.key_ids);
    let mut configs = HashMap::new();
    for merchant in list(row.config_merchants) {
        let config = (|| {
            Some(ProviderConfigRow {
                id: ids.next()?,
                provider: providers.next()?,
                endpoint: endpoints.next()?,
                supplier_tax_code: supplier_tax_codes.next()?,
                template_code: template_codes.next()?,
                series: series.next()?,
                ciphertext: ciphertexts.next()?,
                nonce: nonces.next()?,
                key_id: key_ids.next()?,
            })
        })()
        .ok_or_else(|| StorageError::Other("configuration facts arrays of unequal lengths".into()))?;
        configs.insert(merchant, config);
    }
    Ok(BatchFacts { decided: list(row.event_ids).collect(), created, active, requests, merchants, configs })
}

/// A new invoice row.
#[derive(Debug, Clone)]
pub struct NewInvoice {
    /// Snowflake id.
    pub id: i64,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// Status.
    pub status: &'static str,
    /// Mode.
    pub issuance_mode: &'static str,
    /// Payment event id.
    pub payment_event_id: String,
    /// Paid at.
    pub paid_at: DateTime<Utc>,
    /// Currency.
    pub currency: String,
    /// Buyer object (None: consumer).
    pub buyer: Option<Value>,
    /// Buyer kind.
    pub buyer_kind: &'static str,
    /// Lines JSON, serialised once.
    pub lines: Box<RawValue>,
    /// Totals.
    pub total_net: Decimal,
    /// Totals.
    pub total_vat: Decimal,
    /// Totals.
    pub total_amount: Decimal,
    /// Provider config id.
    pub provider_config_id: i64,
    /// Snapshot, serialised once per merchant, rule set and batch, and shared by the batch's
    /// invoices that have the same.
    pub config_snapshot: Arc<RawValue>,
    /// Idempotency key.
    pub transaction_uuid: String,
    /// When a worker may take it (QUEUED) — `None` for PENDING_CLAIM.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// A new claim row.
#[derive(Debug, Clone)]
pub struct NewClaim {
    /// Snowflake id.
    pub id: i64,
    /// Its invoice.
    pub invoice_id: i64,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// SHA-256 of the token.
    pub token_hash: Vec<u8>,
    /// Deadline.
    pub deadline: DateTime<Utc>,
}

/// A payment decision row.
#[derive(Debug, Clone)]
pub struct NewDecision {
    /// Event id.
    pub event_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// `created` or `skipped`.
    pub outcome: &'static str,
    /// Skip reason.
    pub skip_reason: Option<&'static str>,
    /// The invoice created.
    pub invoice_id: Option<i64>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

/// An audit row.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// `invoice`, `claim`, `tax_info`, …
    pub entity: &'static str,
    /// Entity id as text.
    pub entity_id: String,
    /// Invoice, if about one.
    pub invoice_id: Option<i64>,
    /// Merchant.
    pub merchant_id: Option<String>,
    /// Order.
    pub order_id: Option<String>,
    /// Event type.
    pub event_type: &'static str,
    /// Outcome (usually the status after).
    pub outcome: String,
    /// State before.
    pub before: Option<Value>,
    /// State after.
    pub after: Option<Value>,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
}

/// An outbox row.
#[derive(Debug, Clone)]
pub struct NewOutbox {
    /// Event id.
    pub event_id: Uuid,
    /// Topic.
    pub topic: String,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes (`None`: a null value, as a dead-lettered tombstone had).
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Value,
    /// Carries a clear claim token.
    pub has_secret: bool,
}

/// Everything one batch writes.
#[derive(Debug, Default)]
pub struct Writes {
    /// Invoices.
    pub invoices: Vec<NewInvoice>,
    /// Claims.
    pub claims: Vec<NewClaim>,
    /// Decisions.
    pub decisions: Vec<NewDecision>,
    /// Audit rows.
    pub audits: Vec<NewAudit>,
    /// Outbox rows.
    pub outbox: Vec<NewOutbox>,
    /// `(request id, invoice id, the request's buyer as read)` joins.
    pub request_joins: Vec<(i64, i64, Value)>,
}

/// Everything a batch writes, one statement (see [`Writes::write`]): first the partition's
/// offset moved by compare-and-set (`$52`-`$56`: topic, group, partition, expected next offset
/// or `NULL` for a partition never stored, new next offset), then, only if it moved, the
/// batch's distinct config snapshots (`$58` their JSON, `$59` their digests, `$60` their
/// merchants; written once, shared by every invoice that has the same: see
/// [`snapshot_digest`]), the invoices (`$1`-`$18`; `$16` indexes those snapshots), the
/// claims, the decisions, the request joins, the audit rows and the outbox rows. A statement
/// of empty arrays moves the offset only.
///
/// One statement is atomic by itself: no BEGIN and COMMIT round trips. The offset row is
/// locked before any row is written (every write reads `fence`), so a second owner of the
/// partition waits on it and then finds it moved: its writes insert nothing.
static WRITE_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH offset_inserted AS (
             INSERT INTO consumer_offset (group_id, topic, partition, next_offset)
             SELECT $53::text, $52::text, $54::int, $56::bigint WHERE $55::bigint IS NULL
             ON CONFLICT (group_id, topic, partition) DO NOTHING
             RETURNING 1),
         offset_moved AS (
             UPDATE consumer_offset SET next_offset = $56::bigint, updated_at = now()
             WHERE group_id = $53::text AND topic = $52::text AND partition = $54::int
               AND next_offset = $55::bigint
             RETURNING 1),
         fence AS (SELECT 1 FROM offset_inserted UNION ALL SELECT 1 FROM offset_moved),
         -- In digest order, so that two partitions writing the same new snapshots wait for
         -- each other in the same order instead of deadlocking.
         snapshots AS (
             INSERT INTO invoice_config_snapshot (digest, merchant_id, snapshot)
             SELECT digest, merchant_id, snapshot
             FROM UNNEST($59::bytea[], $60::text[], $58::jsonb[]) AS s(digest, merchant_id, snapshot)
             WHERE EXISTS (SELECT 1 FROM fence)
             ORDER BY digest
             ON CONFLICT (digest) DO NOTHING),
         invoices AS (
             INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at,
                 currency, buyer, buyer_kind, lines, total_net, total_vat, total_amount, provider_config_id,
                 config_snapshot_digest, transaction_uuid, next_attempt_at)
             SELECT id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at, currency, buyer,
                 buyer_kind, lines, total_net, total_vat, total_amount, provider_config_id,
                 ($59::bytea[])[snapshot], transaction_uuid, next_attempt_at
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::timestamptz[], $8::text[], $9::jsonb[], $10::text[], $11::jsonb[], $12::numeric[],
                 $13::numeric[], $14::numeric[], $15::bigint[], $16::int[], $17::text[], $18::timestamptz[])
               AS t(id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at, currency, buyer,
                    buyer_kind, lines, total_net, total_vat, total_amount, provider_config_id, snapshot,
                    transaction_uuid, next_attempt_at)
             WHERE EXISTS (SELECT 1 FROM fence)),
         claims AS (
             INSERT INTO claim (id, invoice_id, merchant_id, order_id, token_hash, deadline, status)
             SELECT id, invoice_id, merchant_id, order_id, token_hash, deadline, 'OPEN'
             FROM UNNEST($19::bigint[], $20::bigint[], $21::text[], $22::text[], $23::bytea[], $24::timestamptz[])
               AS t(id, invoice_id, merchant_id, order_id, token_hash, deadline)
             WHERE EXISTS (SELECT 1 FROM fence)),
         -- ON CONFLICT: a replay of an event decided before records nothing new.
         decisions AS (
             INSERT INTO payment_decision (event_id, merchant_id, order_id, outcome, skip_reason, invoice_id,
                 topic, partition, \"offset\")
             SELECT event_id, merchant_id, order_id, outcome, skip_reason, invoice_id, $52, partition, off
             FROM UNNEST($25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::bigint[], $31::int[],
                 $32::bigint[]) AS t(event_id, merchant_id, order_id, outcome, skip_reason, invoice_id, partition, off)
             WHERE EXISTS (SELECT 1 FROM fence)
             ON CONFLICT (event_id) DO NOTHING),
         joins AS (
             UPDATE invoice_request r SET invoice_id = j.invoice_id, joined_at = now()
             FROM UNNEST($33::bigint[], $34::bigint[], $57::jsonb[]) AS j(id, invoice_id, buyer)
             -- Still pending and still the buyer that was read: one the API superseded,
             -- another batch joined, or a newer request rewrote since the facts were read
             -- stays pending (the sweeper settles it).
             WHERE r.id = j.id AND r.joined_at IS NULL AND r.deleted_at IS NULL AND r.buyer = j.buyer
               AND EXISTS (SELECT 1 FROM fence)),
         audits AS (
             INSERT INTO audit_log ({AUDIT_COLUMNS}) SELECT * FROM {audit_rows} WHERE EXISTS (SELECT 1 FROM fence)),
         published AS (
             INSERT INTO outbox ({OUTBOX_COLUMNS}) SELECT {OUTBOX_COLUMNS}
             FROM {outbox_rows} WITH ORDINALITY AS t({OUTBOX_COLUMNS}, n)
             WHERE EXISTS (SELECT 1 FROM fence) ORDER BY n)
         SELECT EXISTS (SELECT 1 FROM fence)",
        audit_rows = unnest(35, &AUDIT_TYPES),
        outbox_rows = unnest(35 + AUDIT_TYPES.len(), &OUTBOX_TYPES),
    )
});

/// A partition's offset move, from `expected` (`None`: never stored) to `next`.
#[derive(Debug, Clone, Copy)]
pub struct OffsetMove<'a> {
    /// Consumer group.
    pub group: &'a str,
    /// Topic (also the decisions' topic).
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The stored next offset this owner believes in.
    pub expected: Option<i64>,
    /// The next offset after the batch.
    pub next: i64,
}

impl Writes {
    /// Moves the offset and writes everything, in one statement ([`WRITE_BATCH`]): one round
    /// trip per batch, however few payments it carries. `false`: the offset had moved (another
    /// owner), nothing was written.
    pub async fn write(&self, conn: &mut PgConnection, offset: OffsetMove<'_>) -> Result<bool, StorageError> {
        let invoices = &self.invoices;
        let claims = &self.claims;
        let decisions = &self.decisions;
        // A batch's invoices share a few snapshots (one per merchant and rule set), each some
        // 700 bytes of JSON: sent, parsed and stored once each, not once per invoice.
        let mut snapshots: Vec<(&str, &RawValue)> = Vec::new();
        // Keyed by the shared text's address, not the text (some 700 bytes to hash per
        // invoice): invoices sharing a snapshot share its `Arc`. Equal texts in two `Arc`s
        // only send the row twice; the insert keeps one.
        let mut snapshot_of: HashMap<(&str, usize), i32> = HashMap::new();
        let snapshot_index: Vec<i32> = invoices
            .iter()
            .map(|i| {
                let key = (i.merchant_id.as_str(), Arc::as_ptr(&i.config_snapshot).cast::<u8>() as usize);
                *snapshot_of.entry(key).or_insert_with(|| {
                    snapshots.push((&i.merchant_id, &i.config_snapshot));
                    snapshots.len() as i32
                })
            })
            .collect();
        let digests: Vec<[u8; 32]> =
            snapshots.iter().map(|(merchant, snapshot)| snapshot_digest(merchant, snapshot)).collect();
        let q = sqlx::query(WRITE_BATCH.as_str())
            .bind(invoices.iter().map(|i| i.id).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.merchant_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.order_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.status).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.issuance_mode).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.payment_event_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.paid_at).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.currency.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.buyer.as_ref().map(Json)).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.buyer_kind).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| Json(i.lines.as_ref())).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_net).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_vat).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_amount).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.provider_config_id).collect::<Vec<_>>())
            .bind(snapshot_index)
            .bind(invoices.iter().map(|i| i.transaction_uuid.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.next_attempt_at).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.id).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.invoice_id).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.merchant_id.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.order_id.as_str()).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.token_hash.as_slice()).collect::<Vec<_>>())
            .bind(claims.iter().map(|c| c.deadline).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.merchant_id.as_str()).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.order_id.as_str()).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.outcome).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.skip_reason).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.invoice_id).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.partition).collect::<Vec<_>>())
            .bind(decisions.iter().map(|d| d.offset).collect::<Vec<_>>())
            .bind(self.request_joins.iter().map(|j| j.0).collect::<Vec<_>>())
            .bind(self.request_joins.iter().map(|j| j.1).collect::<Vec<_>>());
        let q = bind_outbox(bind_audits(q, &self.audits), &self.outbox);
        let moved: bool = q
            .bind(offset.topic)
            .bind(offset.group)
            .bind(offset.partition)
            .bind(offset.expected)
            .bind(offset.next)
            .bind(self.request_joins.iter().map(|j| &j.2).collect::<Vec<_>>())
            .bind(snapshots.iter().map(|(_, snapshot)| Json(*snapshot)).collect::<Vec<_>>())
            .bind(digests.iter().map(|d| d.as_slice()).collect::<Vec<_>>())
            .bind(snapshots.iter().map(|(merchant, _)| *merchant).collect::<Vec<_>>())
            .try_map(|row: sqlx::postgres::PgRow| sqlx::Row::try_get(&row, 0))
            .fetch_one(conn)
            .await?;
        Ok(moved)
    }
}

/// The key of a shared config snapshot (`invoice_config_snapshot`): SHA-256 of the merchant
/// and the snapshot's JSON text, so each merchant's invoices reference their own rows (the
/// sealed credentials in a snapshot are bound to its merchant).
pub fn snapshot_digest(merchant_id: &str, snapshot: &RawValue) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(merchant_id.as_bytes());
    hash.update([0u8]);
    hash.update(snapshot.get().as_bytes());
    hash.finalize().into()
}

/// A query whose arguments are still being bound.
pub(crate) type Bound<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `UNNEST` over arrays of the given element types, bound from parameter `$first` on, each
/// array behind a scalar subquery: `UNNEST((SELECT $1::bigint[]))`. The batch statements read
/// their array arguments that way (`= ANY((SELECT $1::text[])::text[])` too: the cast keeps it
/// an array, not the subquery's rows), rather than directly.
///
/// Postgres plans a prepared statement's first five executions for their arguments (custom
/// plans), then keeps a plan made for no arguments in particular (generic) unless that one
/// looks dearer than the custom ones did. An array argument it can see is counted exactly
/// (one element at a quiet hour), while the generic plan counts 10 or 100, so it always looked
/// dearer: a service that started while batches were small planned its settlement, its take,
/// its read and the stream's lookups at every execution, for ever. At ~140 payments/s (one
/// per batch) planning took more of Postgres' time than executing (11.0 s against 8.2 s in
/// 20 s, `pg_stat_statements`). Behind a subquery the array is unknown to both kinds of plan,
/// so they cost the same and the generic one is kept after five executions; it is the plan
/// the statements had anyway once their connection had seen a large batch (key lookups per
/// element, as `tests/it/plans.rs` checks).
pub(crate) fn unnest(first: usize, types: &[&str]) -> String {
    let arrays: Vec<String> =
        types.iter().enumerate().map(|(i, t)| format!("(SELECT ${}::{t}[])", first + i)).collect();
    format!("UNNEST({})", arrays.join(", "))
}

/// The columns of an audit row, in the order [`bind_audits`] binds them.
pub(crate) const AUDIT_COLUMNS: &str =
    "entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, before, after, actor, reason";
/// The element types of [`AUDIT_COLUMNS`].
pub(crate) const AUDIT_TYPES: [&str; 11] =
    ["text", "text", "bigint", "text", "text", "text", "text", "jsonb", "jsonb", "text", "text"];

/// Binds audit rows as one array per column of [`AUDIT_COLUMNS`]. Borrowed, not cloned: the
/// arguments are encoded as they are bound, and copies were a tenth of the stream's own CPU.
pub(crate) fn bind_audits<'q>(q: Bound<'q>, v: &'q [NewAudit]) -> Bound<'q> {
    q.bind(v.iter().map(|a| a.entity).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.entity_id.as_str()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.invoice_id).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.merchant_id.as_deref()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.order_id.as_deref()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.event_type).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.before.as_ref().map(Json)).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.after.as_ref().map(Json)).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.actor.as_str()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.reason.as_deref()).collect::<Vec<_>>())
}

/// The columns of an outbox row, in the order [`bind_outbox`] binds them.
pub(crate) const OUTBOX_COLUMNS: &str = "event_id, topic, message_key, payload, headers, has_secret";
/// The element types of [`OUTBOX_COLUMNS`].
pub(crate) const OUTBOX_TYPES: [&str; 6] = ["uuid", "text", "bytea", "bytea", "jsonb", "bool"];

/// Binds outbox rows as one array per column of [`OUTBOX_COLUMNS`] (borrowed, as in
/// [`bind_audits`]).
pub(crate) fn bind_outbox<'q>(q: Bound<'q>, v: &'q [NewOutbox]) -> Bound<'q> {
    q.bind(v.iter().map(|o| o.event_id).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.topic.as_str()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.key.as_deref()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.payload.as_deref()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| Json(&o.headers)).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.has_secret).collect::<Vec<_>>())
}

static INSERT_AUDITS: LazyLock<String> = LazyLock::new(|| {
    format!("INSERT INTO audit_log ({AUDIT_COLUMNS}) SELECT * FROM {}", unnest(1, &AUDIT_TYPES))
});

/// Inserts audit rows.
pub async fn insert_audits(tx: &mut PgConnection, v: &[NewAudit]) -> Result<(), StorageError> {
    if v.is_empty() {
        return Ok(());
    }
    bind_audits(sqlx::query(INSERT_AUDITS.as_str()), v).execute(tx).await?;
    Ok(())
}

static INSERT_OUTBOX: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO outbox ({OUTBOX_COLUMNS}) SELECT {OUTBOX_COLUMNS}
         FROM {} WITH ORDINALITY AS t({OUTBOX_COLUMNS}, n) ORDER BY n",
        unnest(1, &OUTBOX_TYPES)
    )
});

/// Inserts outbox rows (in the order given: ids follow it, and so does publication).
pub async fn insert_outbox(tx: &mut PgConnection, v: &[NewOutbox]) -> Result<(), StorageError> {
    if v.is_empty() {
        return Ok(());
    }
    bind_outbox(sqlx::query(INSERT_OUTBOX.as_str()), v).execute(tx).await?;
    Ok(())
}
