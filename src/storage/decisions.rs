//! What the stream writes per batch: invoices, claims, decisions, audit rows, outbox rows and
//! request joins, all in one statement (a multi-row `UNNEST` per table), and the lookups that
//! feed the decisions, each one query per batch. The audit and outbox row binders are shared
//! with the other writers of those tables.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::StorageError;

/// Event ids of `event_ids` that were decided before.
pub async fn decided_events(
    conn: &mut PgConnection,
    event_ids: &[String],
) -> Result<HashSet<String>, StorageError> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM payment_decision WHERE event_id = ANY($1)")
            .bind(event_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// `(merchant, order)` pairs among the given ones that have an active original invoice.
///
/// Looked up by `order_id = ANY(..)` (index `invoice_order`) and filtered to the exact pairs
/// here: a join against `UNNEST` of the pairs lets the planner, with the statistics of a
/// table that grew since its last analyze, scan every active invoice once per pair.
pub async fn active_orders(
    conn: &mut PgConnection,
    merchants: &[String],
    orders: &[String],
) -> Result<HashSet<(String, String)>, StorageError> {
    let wanted: HashSet<(&str, &str)> =
        merchants.iter().map(String::as_str).zip(orders.iter().map(String::as_str)).collect();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT merchant_id, order_id FROM invoice
         WHERE order_id = ANY($1) AND kind = 'original' AND status <> 'CANCELLED' AND deleted_at IS NULL",
    )
    .bind(orders)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().filter(|(m, o)| wanted.contains(&(m.as_str(), o.as_str()))).collect())
}

/// Pending (not yet joined) invoice requests for the given pairs: `(merchant, order) → (id, buyer)`.
pub async fn pending_requests(
    conn: &mut PgConnection,
    merchants: &[String],
    orders: &[String],
) -> Result<HashMap<(String, String), (i64, Value)>, StorageError> {
    let wanted: HashSet<(&str, &str)> =
        merchants.iter().map(String::as_str).zip(orders.iter().map(String::as_str)).collect();
    let rows: Vec<(String, String, i64, Value)> = sqlx::query_as(
        "SELECT merchant_id, order_id, id, buyer FROM invoice_request
         WHERE order_id = ANY($1) AND joined_at IS NULL AND deleted_at IS NULL",
    )
    .bind(orders)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(m, o, _, _)| wanted.contains(&(m.as_str(), o.as_str())))
        .map(|(m, o, id, buyer)| ((m, o), (id, buyer)))
        .collect())
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
    /// Snapshot, serialised once per merchant and batch (a clone is a copy of its text).
    pub config_snapshot: Box<RawValue>,
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
    /// Value bytes.
    pub payload: Vec<u8>,
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
    /// `(request id, invoice id)` joins.
    pub request_joins: Vec<(i64, i64)>,
}

/// Everything a batch writes, one statement (see [`Writes::write`]): `$1`-`$18` the invoices,
/// then the claims, the decisions, the request joins, the audit rows, the outbox rows and,
/// last (`$52`), the decisions' topic. A statement of empty arrays writes nothing.
static WRITE_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH invoices AS (
             INSERT INTO invoice (id, merchant_id, order_id, status, issuance_mode, payment_event_id, paid_at,
                 currency, buyer, buyer_kind, lines, total_net, total_vat, total_amount, provider_config_id,
                 config_snapshot, transaction_uuid, next_attempt_at)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::timestamptz[], $8::text[], $9::jsonb[], $10::text[], $11::jsonb[], $12::numeric[],
                 $13::numeric[], $14::numeric[], $15::bigint[], $16::jsonb[], $17::text[], $18::timestamptz[])),
         claims AS (
             INSERT INTO claim (id, invoice_id, merchant_id, order_id, token_hash, deadline, status)
             SELECT id, invoice_id, merchant_id, order_id, token_hash, deadline, 'OPEN'
             FROM UNNEST($19::bigint[], $20::bigint[], $21::text[], $22::text[], $23::bytea[], $24::timestamptz[])
               AS t(id, invoice_id, merchant_id, order_id, token_hash, deadline)),
         -- ON CONFLICT: a replay of an event decided before records nothing new.
         decisions AS (
             INSERT INTO payment_decision (event_id, merchant_id, order_id, outcome, skip_reason, invoice_id,
                 topic, partition, \"offset\")
             SELECT event_id, merchant_id, order_id, outcome, skip_reason, invoice_id, $52, partition, off
             FROM UNNEST($25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::bigint[], $31::int[],
                 $32::bigint[]) AS t(event_id, merchant_id, order_id, outcome, skip_reason, invoice_id, partition, off)
             ON CONFLICT (event_id) DO NOTHING),
         joins AS (
             UPDATE invoice_request r SET invoice_id = j.invoice_id, joined_at = now()
             FROM UNNEST($33::bigint[], $34::bigint[]) AS j(id, invoice_id) WHERE r.id = j.id),
         audits AS (
             INSERT INTO audit_log ({AUDIT_COLUMNS}) SELECT * FROM {audit_rows})
         INSERT INTO outbox ({OUTBOX_COLUMNS}) SELECT {OUTBOX_COLUMNS}
         FROM {outbox_rows} WITH ORDINALITY AS t({OUTBOX_COLUMNS}, n) ORDER BY n",
        audit_rows = unnest(35, &AUDIT_TYPES),
        outbox_rows = unnest(35 + AUDIT_TYPES.len(), &OUTBOX_TYPES),
    )
});

impl Writes {
    /// Writes everything in one statement ([`WRITE_BATCH`]): one round trip per batch,
    /// however few payments it carries.
    pub async fn write(&self, tx: &mut PgConnection, decision_topic: &str) -> Result<(), StorageError> {
        let invoices = &self.invoices;
        let claims = &self.claims;
        let decisions = &self.decisions;
        let q = sqlx::query(WRITE_BATCH.as_str())
            .bind(invoices.iter().map(|i| i.id).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.merchant_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.order_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.status).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.issuance_mode).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.payment_event_id.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.paid_at).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.currency.as_str()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.buyer.clone()).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.buyer_kind).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| Json(i.lines.clone())).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_net).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_vat).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.total_amount).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| i.provider_config_id).collect::<Vec<_>>())
            .bind(invoices.iter().map(|i| Json(i.config_snapshot.clone())).collect::<Vec<_>>())
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
        bind_outbox(bind_audits(q, &self.audits), &self.outbox).bind(decision_topic).execute(tx).await?;
        Ok(())
    }
}

/// A query whose arguments are still being bound.
pub(crate) type Bound<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `UNNEST` over arrays of the given element types, bound from parameter `$first` on.
pub(crate) fn unnest(first: usize, types: &[&str]) -> String {
    let arrays: Vec<String> =
        types.iter().enumerate().map(|(i, t)| format!("${}::{t}[]", first + i)).collect();
    format!("UNNEST({})", arrays.join(", "))
}

/// The columns of an audit row, in the order [`bind_audits`] binds them.
pub(crate) const AUDIT_COLUMNS: &str =
    "entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, before, after, actor, reason";
/// The element types of [`AUDIT_COLUMNS`].
pub(crate) const AUDIT_TYPES: [&str; 11] =
    ["text", "text", "bigint", "text", "text", "text", "text", "jsonb", "jsonb", "text", "text"];

/// Binds audit rows as one array per column of [`AUDIT_COLUMNS`].
pub(crate) fn bind_audits<'q>(q: Bound<'q>, v: &[NewAudit]) -> Bound<'q> {
    q.bind(v.iter().map(|a| a.entity).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.entity_id.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.invoice_id).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.merchant_id.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.order_id.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.event_type).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.outcome.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.before.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.after.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.actor.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|a| a.reason.clone()).collect::<Vec<_>>())
}

/// The columns of an outbox row, in the order [`bind_outbox`] binds them.
pub(crate) const OUTBOX_COLUMNS: &str = "event_id, topic, message_key, payload, headers, has_secret";
/// The element types of [`OUTBOX_COLUMNS`].
pub(crate) const OUTBOX_TYPES: [&str; 6] = ["uuid", "text", "bytea", "bytea", "jsonb", "bool"];

/// Binds outbox rows as one array per column of [`OUTBOX_COLUMNS`].
pub(crate) fn bind_outbox<'q>(q: Bound<'q>, v: &[NewOutbox]) -> Bound<'q> {
    q.bind(v.iter().map(|o| o.event_id).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.topic.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.key.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.payload.clone()).collect::<Vec<_>>())
        .bind(v.iter().map(|o| o.headers.clone()).collect::<Vec<_>>())
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
