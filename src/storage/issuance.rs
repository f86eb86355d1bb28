//! The issuance side of the invoice table: what workers read, the single-flight acquisition
//! of an invoice for a provider call, the fenced result writes, claim expiry, the sweeper's
//! scan, replays and replacements. Every state change writes its audit row (and outbox
//! event, where SPEC §2 has one) in the same transaction.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};

use std::sync::LazyLock;

use super::decisions::{bind_audits, bind_outbox, insert_audits, insert_outbox, NewAudit, NewOutbox};
use super::StorageError;

/// An invoice as a worker needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkInvoice {
    /// Id.
    pub id: i64,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// `original` or `replacement`.
    pub kind: String,
    /// The invoice a replacement replaces.
    pub replaces_invoice_id: Option<i64>,
    /// Status.
    pub status: String,
    /// Sale time.
    pub paid_at: DateTime<Utc>,
    /// Currency.
    pub currency: String,
    /// Buyer (None: consumer).
    pub buyer: Option<Value>,
    /// Lines with amounts.
    pub lines: Value,
    /// Totals.
    pub total_net: Decimal,
    /// Totals.
    pub total_vat: Decimal,
    /// Totals (the amount paid).
    pub total_amount: Decimal,
    /// Config snapshot.
    pub config_snapshot: Value,
    /// Provider config id.
    pub provider_config_id: Option<i64>,
    /// Idempotency key.
    pub transaction_uuid: String,
    /// Deliveries that could call `create`.
    pub attempts: i32,
    /// When it is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// ISSUING lease end.
    pub lease_until: Option<DateTime<Utc>>,
    /// Version read: `acquire` takes the invoice only if it is unchanged since (a buyer
    /// given through the API after the read must not be issued with the old buyer).
    pub updated_at: DateTime<Utc>,
    /// The replaced invoice's status.
    pub original_status: Option<String>,
    /// The replaced invoice's number.
    pub original_invoice_no: Option<String>,
    /// The replaced invoice's issue time.
    pub original_issued_at: Option<DateTime<Utc>>,
    /// The replaced invoice's snapshot (template and series).
    pub original_snapshot: Option<Value>,
    /// Why it is replaced.
    pub replacement_reason: Option<String>,
}

/// The worker's read: the unfinished invoices (QUEUED, ISSUING, SUBMITTED) of orders `$1`,
/// originals first, with their deadlines on the worker's clock (which read `$2` as it sent
/// this; see [`ACQUIRE`]), since the worker compares them with it. Array arguments are read
/// through scalar subqueries here, in [`ACQUIRE`] and in [`SETTLE`], so that each is planned
/// once rather than per batch (see `decisions::unnest`). Public, like the other statements
/// whose plans matter, so that tests can check those plans.
pub const UNFINISHED_FOR_ORDERS: &str =
    "SELECT i.id, i.merchant_id, i.order_id, i.kind, i.replaces_invoice_id, i.status, i.paid_at, i.currency,
            i.buyer, i.lines, i.total_net, i.total_vat, i.total_amount,
            COALESCE(i.config_snapshot, s.snapshot, 'null'::jsonb) AS config_snapshot,
            i.provider_config_id, i.transaction_uuid, i.attempts,
            $2::timestamptz + (i.next_attempt_at - statement_timestamp()) AS next_attempt_at,
            $2::timestamptz + (i.lease_until - statement_timestamp()) AS lease_until, i.updated_at,
            o.status AS original_status, o.provider_invoice_no AS original_invoice_no,
            o.issued_at AS original_issued_at, COALESCE(o.config_snapshot, os.snapshot) AS original_snapshot,
            i.replacement_reason
     FROM invoice i LEFT JOIN invoice o ON o.id = i.replaces_invoice_id
          LEFT JOIN invoice_config_snapshot s ON s.digest = i.config_snapshot_digest
          LEFT JOIN invoice_config_snapshot os ON os.digest = o.config_snapshot_digest
     WHERE i.order_id = ANY((SELECT $1::text[])::text[]) AND i.status IN ('QUEUED', 'ISSUING', 'SUBMITTED') AND i.deleted_at IS NULL
     ORDER BY i.order_id, i.kind, i.id";

/// The unfinished invoices (QUEUED, ISSUING, SUBMITTED) of the given orders, originals first;
/// their deadlines (`next_attempt_at`, `lease_until`) are on this process's clock.
pub async fn unfinished_for_orders(
    conn: &mut PgConnection,
    order_ids: &[String],
) -> Result<Vec<WorkInvoice>, StorageError> {
    // The clock is read once a connection is in hand (take `conn` from the pool first): read
    // before a wait for one, it would make every deadline look earlier by the wait.
    Ok(sqlx::query_as(UNFINISHED_FOR_ORDERS).bind(order_ids).bind(Utc::now()).fetch_all(conn).await?)
}

/// The worker's take (see [`acquire`]): invoices `$1` still at versions `$4` become ISSUING
/// for owner `$2` until `$3` (on the worker's clock, which read `$6` as it sent this), with
/// their `issuance_started` audit rows by actor `$5`; returns each taken id with its status
/// before.
///
/// Deadlines the worker computes (call leases, the safe wait, retry times) are written as
/// Postgres' clock (`statement_timestamp()`: `now()` is the start of the transaction, which
/// may be earlier) plus their distance from the worker's clock as it sent the statement,
/// never as the worker's own timestamps: takeovers test `lease_until < now()` on Postgres'
/// clock, and a worker clock behind it shortened every lease and safe wait by the
/// difference, so another worker could look up and resend while a call might still run. The
/// shift can only lengthen them (a statement reaches Postgres after it is sent). Read back
/// ([`UNFINISHED_FOR_ORDERS`]), they are shifted onto the reader's clock the same way.
pub const ACQUIRE: &str = "WITH old AS (
         SELECT i.id, i.status FROM invoice i JOIN unnest((SELECT $1::bigint[]), (SELECT $4::timestamptz[])) AS r(id, seen)
              ON r.id = i.id AND i.updated_at = r.seen
         WHERE (i.status = 'QUEUED' OR (i.status = 'ISSUING' AND i.lease_until < now()))
           -- A consumer original whose order has a pending buyer (a request that committed
           -- while its payment was being decided, unseen by it) waits for the sweeper to
           -- join that buyer: issued now, it would take a replacement to correct.
           AND NOT (i.status = 'QUEUED' AND i.kind = 'original' AND i.buyer_kind = 'consumer'
                    AND EXISTS (SELECT 1 FROM invoice_request r
                                WHERE r.merchant_id = i.merchant_id AND r.order_id = i.order_id
                                  AND r.joined_at IS NULL AND r.deleted_at IS NULL))
         FOR UPDATE OF i SKIP LOCKED),
     taken AS (
         UPDATE invoice i SET status = 'ISSUING', attempts = i.attempts + 1, lease_owner = $2,
                lease_until = statement_timestamp() + ($3 - $6::timestamptz), next_attempt_at = statement_timestamp() + ($3 - $6::timestamptz),
                updated_at = now()
         FROM old WHERE i.id = old.id
         RETURNING i.id, old.status AS before, i.merchant_id, i.order_id, i.attempts),
     audited AS (
         INSERT INTO audit_log (entity, entity_id, invoice_id, merchant_id, order_id, event_type, outcome, before,
                                after, actor, reason)
         SELECT 'invoice', id::text, id, merchant_id, order_id, 'issuance_started', 'ISSUING',
                jsonb_build_object('status', before), jsonb_build_object('status', 'ISSUING', 'attempt', attempts),
                $5::text, CASE WHEN before = 'ISSUING' THEN 'previous call''s lease expired: look up first' END
         FROM taken ORDER BY taken.id)
     SELECT id, before FROM taken";

/// Renews a call lease (see [`renew_lease`]): invoice `$1`, owner `$2`, until `$3` (on the
/// worker's clock, which read `$4` as it sent this).
pub const RENEW_LEASE: &str = "UPDATE invoice
     SET lease_until = statement_timestamp() + ($3 - $4::timestamptz), next_attempt_at = statement_timestamp() + ($3 - $4::timestamptz)
     WHERE id = $1 AND status = 'ISSUING' AND lease_owner = $2 AND lease_until > now()";

/// Takes invoices for provider calls: QUEUED ones, and ISSUING ones whose lease expired
/// (their previous call surely ended), become ISSUING for `owner` until `lease_until`, and
/// count an attempt, with their audit rows, in one statement ([`ACQUIRE`]). Returns the ids
/// taken with the status they had; an id not returned was changed by someone else meanwhile
/// and must not be called.
pub async fn acquire(
    conn: &mut PgConnection,
    ids: &[(i64, DateTime<Utc>)],
    owner: &str,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> Result<Vec<(i64, String)>, StorageError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let versions: Vec<DateTime<Utc>> = ids.iter().map(|(_, v)| *v).collect();
    let ids: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    Ok(sqlx::query_as(ACQUIRE)
        .bind(&ids)
        .bind(owner)
        .bind(lease_until)
        .bind(&versions)
        .bind(actor)
        .bind(Utc::now())
        .fetch_all(&mut *conn)
        .await?)
}

/// Extends an ISSUING invoice's call lease for `owner` before a send; `false` if the invoice
/// is no longer ISSUING for this owner (taken over: the caller must not send).
pub async fn renew_lease(
    conn: &mut PgConnection,
    id: i64,
    owner: &str,
    until: DateTime<Utc>,
) -> Result<bool, StorageError> {
    let rows = sqlx::query(RENEW_LEASE)
        .bind(id)
        .bind(owner)
        .bind(until)
        .bind(Utc::now())
        .execute(conn)
        .await?
        .rows_affected();
    Ok(rows == 1)
}

/// One provider call to record.
#[derive(Debug, Clone)]
pub struct NewAttempt {
    /// Invoice.
    pub invoice_id: i64,
    /// Attempt number (the invoice's `attempts`).
    pub attempt_no: i32,
    /// `create` or `lookup`.
    pub operation: &'static str,
    /// Key.
    pub transaction_uuid: String,
    /// Provider.
    pub provider: String,
    /// Outcome class.
    pub outcome: &'static str,
    /// Provider code.
    pub error_code: Option<String>,
    /// Redacted request.
    pub request: Option<Value>,
    /// Redacted response.
    pub response: Option<Value>,
    /// Duration.
    pub duration_ms: i32,
    /// Worker identity.
    pub worker: String,
    /// When the call started.
    pub started_at: DateTime<Utc>,
}

/// The state an invoice moves to after its calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// ISSUED with the provider's number.
    Issued {
        /// Number.
        invoice_no: String,
        /// Symbol.
        series: String,
        /// Lookup code.
        reservation_code: Option<String>,
        /// Tax authority code.
        tax_authority_code: Option<String>,
        /// Provider status text.
        provider_status: Option<String>,
    },
    /// SUBMITTED: look up again at `next`.
    Submitted {
        /// Next lookup.
        next: DateTime<Utc>,
    },
    /// Stay ISSUING, owned by nobody, until `until` (ambiguous outcome: the safe wait).
    Ambiguous {
        /// End of the safe wait.
        until: DateTime<Utc>,
        /// Why.
        error: String,
    },
    /// Back to QUEUED, due at `next`.
    Retry {
        /// When.
        next: DateTime<Utc>,
        /// Why.
        error: String,
    },
    /// FAILED (permanent or attempts exhausted).
    Failed {
        /// Why (secret-free).
        error: String,
    },
    /// Leave as is (SUBMITTED still without a number; `next` lookup).
    StillSubmitted {
        /// Next lookup.
        next: DateTime<Utc>,
    },
    /// Back to QUEUED, due now, its attempt not counted: the worker is stopping and never
    /// sent anything for it.
    HandBack,
    /// Nothing sent, due again at `next`, its attempt not counted: its series' calls were all
    /// busy for too long (a provider hanging for this merchant). `status` is where it waits:
    /// QUEUED (nothing ever sent), ISSUING (a call may exist: leased to nobody until `next`,
    /// then looked up) or SUBMITTED (its number lookup waits).
    Deferred {
        /// QUEUED, ISSUING or SUBMITTED.
        status: &'static str,
        /// When it is due again.
        next: DateTime<Utc>,
        /// Why (secret-free).
        reason: String,
    },
}

/// One invoice's result to write.
#[derive(Debug, Clone)]
pub struct Settle {
    /// The invoice.
    pub invoice: WorkInvoice,
    /// The status it must still have (ISSUING for our own deliveries, SUBMITTED for lookups).
    pub expected_status: &'static str,
    /// For ISSUING: the lease owner it must still have.
    pub owner: Option<String>,
    /// Where it goes.
    pub transition: Transition,
    /// Provider name for the event.
    pub provider: String,
    /// Give back the attempt the take counted: this delivery attempted no create (it only
    /// looked up, or sent nothing) and does not end the invoice FAILED. Attempts count creates
    /// attempted, so lookups failing while a provider is down cannot use up an invoice's
    /// attempts.
    pub uncounted: bool,
}

/// The columns one settlement writes (see [`settle`]).
struct Row<'a> {
    status: &'static str,
    invoice_no: Option<&'a str>,
    series: Option<&'a str>,
    reservation: Option<&'a str>,
    tax_code: Option<&'a str>,
    provider_status: Option<&'a str>,
    next_at: Option<DateTime<Utc>>,
    lease_until: Option<DateTime<Utc>>,
    error: Option<&'a str>,
    attempts_delta: i32,
}

fn row(t: &Transition) -> Row<'_> {
    let base = Row {
        status: "QUEUED",
        invoice_no: None,
        series: None,
        reservation: None,
        tax_code: None,
        provider_status: None,
        next_at: None,
        lease_until: None,
        error: None,
        attempts_delta: 0,
    };
    match t {
        Transition::Issued { invoice_no, series, reservation_code, tax_authority_code, provider_status } => {
            Row {
                status: "ISSUED",
                invoice_no: Some(invoice_no),
                series: Some(series),
                reservation: reservation_code.as_deref(),
                tax_code: tax_authority_code.as_deref(),
                provider_status: provider_status.as_deref(),
                ..base
            }
        }
        Transition::Submitted { next } | Transition::StillSubmitted { next } => {
            Row { status: "SUBMITTED", next_at: Some(*next), ..base }
        }
        // Stays ISSUING, owned by nobody, until the safe wait is over.
        Transition::Ambiguous { until, error } => Row {
            status: "ISSUING",
            next_at: Some(*until),
            lease_until: Some(*until),
            error: Some(error),
            ..base
        },
        Transition::Retry { next, error } => {
            Row { status: "QUEUED", next_at: Some(*next), error: Some(error), ..base }
        }
        Transition::Failed { error } => Row { status: "FAILED", error: Some(error), ..base },
        Transition::HandBack => {
            Row { status: "QUEUED", next_at: Some(Utc::now()), attempts_delta: -1, ..base }
        }
        Transition::Deferred { status, next, .. } => Row {
            status,
            next_at: Some(*next),
            lease_until: (*status == "ISSUING").then_some(*next),
            // The last provider error stays what the API shows; the audit row says why.
            error: None,
            // Taken (QUEUED or ISSUING) counted an attempt; a number lookup takes nothing.
            attempts_delta: if *status == "SUBMITTED" { 0 } else { -1 },
            ..base
        },
    }
}

/// The columns of an attempt row, in the order [`settle`] binds them.
const ATTEMPT_COLUMNS: &str =
    "invoice_id, attempt_no, operation, transaction_uuid, provider, outcome, error_code,
     request, response, duration_ms, worker, started_at";
const ATTEMPT_TYPES: [&str; 12] =
    ["bigint", "int", "text", "text", "text", "text", "text", "jsonb", "jsonb", "int", "text", "timestamptz"];

/// The batch's settlement, one statement (see [`settle`]): `$1`-`$13` the invoices' new
/// state, then the attempts, the audit rows and outbox rows of every settlement (each kept
/// only if its invoice was updated), the originals that issued replacements replace, and the
/// actor of their audit rows. Returns the ids updated.
static SETTLE: LazyLock<String> = LazyLock::new(|| {
    use super::decisions::{unnest, AUDIT_COLUMNS, AUDIT_TYPES, OUTBOX_COLUMNS, OUTBOX_TYPES};
    let attempts = 14;
    let audits = attempts + ATTEMPT_TYPES.len();
    let outbox = audits + AUDIT_TYPES.len();
    let replaced = outbox + 1 + OUTBOX_TYPES.len();
    let actor = replaced + 5;
    let clock = actor + 1;
    format!(
        "WITH updated AS (
             UPDATE invoice i SET
                 status = u.status,
                 provider_invoice_no = COALESCE(u.invoice_no, i.provider_invoice_no),
                 provider_series = COALESCE(u.series, i.provider_series),
                 reservation_code = COALESCE(u.reservation, i.reservation_code),
                 tax_authority_code = COALESCE(u.tax_code, i.tax_authority_code),
                 provider_status = CASE WHEN u.provider_status IS NULL THEN i.provider_status
                                        -- merged: what a provider.status webhook stored stays
                                        ELSE (CASE WHEN jsonb_typeof(i.provider_status) = 'object'
                                                   THEN i.provider_status ELSE '{{}}'::jsonb END)
                                             || jsonb_build_object('status', u.provider_status) END,
                 issued_at = CASE WHEN u.status = 'ISSUED' THEN now() ELSE i.issued_at END,
                 submitted_at = CASE WHEN u.status = 'SUBMITTED' THEN COALESCE(i.submitted_at, now())
                                     ELSE i.submitted_at END,
                 lease_owner = NULL,
                 lease_until = statement_timestamp() + (u.lease_until - ${clock}::timestamptz),
                 next_attempt_at = statement_timestamp() + (u.next_at - ${clock}::timestamptz),
                 last_error = CASE WHEN u.status = 'ISSUED' THEN NULL ELSE COALESCE(u.error, i.last_error) END,
                 attempts = greatest(i.attempts + u.attempts_delta, 0),
                 updated_at = now()
             FROM {updates}
                  AS u(id, expected, owner, status, invoice_no, series, reservation, tax_code, provider_status,
                       next_at, lease_until, error, attempts_delta)
             WHERE i.id = u.id AND i.status = u.expected AND (u.owner IS NULL OR i.lease_owner = u.owner)
             RETURNING i.id),
         attempted AS (
             INSERT INTO issuance_attempt ({ATTEMPT_COLUMNS}) SELECT * FROM {attempt_rows}),
         audited AS (
             INSERT INTO audit_log ({AUDIT_COLUMNS})
             SELECT * FROM {audit_rows} AS a({AUDIT_COLUMNS})
             WHERE a.invoice_id IN (SELECT id FROM updated)),
         published AS (
             INSERT INTO outbox ({OUTBOX_COLUMNS})
             SELECT {OUTBOX_COLUMNS}
             FROM {outbox_rows} WITH ORDINALITY AS t(invoice_id, {OUTBOX_COLUMNS}, n)
             WHERE t.invoice_id IN (SELECT id FROM updated)
             ORDER BY n),
         replaced AS (
             UPDATE invoice o SET status = 'REPLACED', updated_at = now()
             FROM {replaced_rows} AS r(replacement_id, original_id, merchant_id, order_id, reason)
             WHERE o.id = r.original_id AND o.status = 'ISSUED' AND r.replacement_id IN (SELECT id FROM updated)
             RETURNING o.id, r.replacement_id, r.merchant_id, r.order_id, r.reason),
         replaced_audited AS (
             INSERT INTO audit_log ({AUDIT_COLUMNS})
             SELECT 'invoice', id::text, id, merchant_id, order_id, 'invoice.replaced', 'REPLACED',
                    '{{\"status\": \"ISSUED\"}}'::jsonb,
                    jsonb_build_object('status', 'REPLACED', 'replacedBy', replacement_id::text), ${actor}::text, reason
             FROM replaced)
         SELECT id FROM updated",
        updates = unnest(
            1,
            &[
                "bigint", "text", "text", "text", "text", "text", "text", "text", "text", "timestamptz",
                "timestamptz", "text", "int"
            ]
        ),
        attempt_rows = unnest(attempts, &ATTEMPT_TYPES),
        audit_rows = unnest(audits, &AUDIT_TYPES),
        outbox_rows = unnest(outbox, &[&["bigint"][..], &OUTBOX_TYPES[..]].concat()),
        replaced_rows = unnest(replaced, &["bigint", "bigint", "text", "text", "text"]),
    )
});

/// Writes the batch's results in one statement ([`SETTLE`]): every provider call's attempt
/// row, and every settlement, fenced on status (and lease owner), with its audit row and
/// event; an issued replacement's original becomes REPLACED with it. Returns, per
/// settlement, whether it applied (false: fenced out, someone else moved the invoice).
pub async fn settle(
    conn: &mut PgConnection,
    settles: &[Settle],
    attempts: Vec<NewAttempt>,
    events_topic: &str,
    actor: &str,
) -> Result<Vec<bool>, StorageError> {
    if settles.is_empty() && attempts.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Row<'_>> = settles
        .iter()
        .map(|s| {
            let row = row(&s.transition);
            let attempts_delta = if s.uncounted { row.attempts_delta.min(-1) } else { row.attempts_delta };
            Row { attempts_delta, ..row }
        })
        .collect();
    let (audits, events, replaced) = records(settles, events_topic, actor);
    // Moved, not cloned, into the columns: requests and responses are the bulk of the bytes.
    let mut attempts = attempts;
    let requests: Vec<Option<Value>> = attempts.iter_mut().map(|a| a.request.take()).collect();
    let responses: Vec<Option<Value>> = attempts.iter_mut().map(|a| a.response.take()).collect();
    let q = sqlx::query(SETTLE.as_str())
        .bind(settles.iter().map(|s| s.invoice.id).collect::<Vec<_>>())
        .bind(settles.iter().map(|s| s.expected_status).collect::<Vec<_>>())
        .bind(settles.iter().map(|s| s.owner.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.invoice_no).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.series).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reservation).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tax_code).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.provider_status).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.next_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.lease_until).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempts_delta).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.invoice_id).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.attempt_no).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.operation).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.transaction_uuid.as_str()).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.provider.as_str()).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.outcome).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.error_code.as_deref()).collect::<Vec<_>>())
        .bind(requests)
        .bind(responses)
        .bind(attempts.iter().map(|a| a.duration_ms).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.worker.as_str()).collect::<Vec<_>>())
        .bind(attempts.iter().map(|a| a.started_at).collect::<Vec<_>>());
    let q = bind_audits(q, &audits);
    let q = q.bind(events.iter().map(|(invoice_id, _)| *invoice_id).collect::<Vec<_>>());
    let events: Vec<NewOutbox> = events.into_iter().map(|(_, event)| event).collect();
    let q = bind_outbox(q, &events)
        .bind(replaced.iter().map(|r| r.replacement_id).collect::<Vec<_>>())
        .bind(replaced.iter().map(|r| r.original_id).collect::<Vec<_>>())
        .bind(replaced.iter().map(|r| r.merchant_id).collect::<Vec<_>>())
        .bind(replaced.iter().map(|r| r.order_id).collect::<Vec<_>>())
        .bind(replaced.iter().map(|r| r.reason).collect::<Vec<_>>())
        .bind(actor)
        .bind(Utc::now());
    let updated: std::collections::HashSet<i64> = q
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| sqlx::Row::try_get::<i64, _>(row, 0))
        .collect::<Result<_, _>>()?;
    Ok(settles.iter().map(|s| updated.contains(&s.invoice.id)).collect())
}

/// An issued replacement's original, to become REPLACED with it.
struct Replaced<'a> {
    replacement_id: i64,
    original_id: i64,
    merchant_id: &'a str,
    order_id: &'a str,
    reason: Option<&'a str>,
}

/// The audit rows, the events (with their invoice) and the replaced originals that the
/// settlements write if they apply.
fn records<'a>(
    settles: &'a [Settle],
    events_topic: &str,
    actor: &str,
) -> (Vec<NewAudit>, Vec<(i64, NewOutbox)>, Vec<Replaced<'a>>) {
    use crate::events::invoice_events::{EventType, ProviderMember};
    let now = Utc::now();
    let mut audits = Vec::with_capacity(settles.len());
    let mut events = Vec::new();
    let mut replaced = Vec::new();
    for s in settles {
        let inv = &s.invoice;
        let status = row(&s.transition).status;
        // Quiet transitions (a SUBMITTED invoice still without a number) leave no audit row:
        // nothing changed but the next lookup time.
        let (event_type, event, reason) = match &s.transition {
            Transition::Issued { .. } => ("invoice.issued", Some(EventType::Issued), None),
            Transition::Submitted { .. } => {
                ("issuance_submitted", None, Some("accepted without a number".to_owned()))
            }
            Transition::StillSubmitted { .. } => continue,
            Transition::Ambiguous { error, .. } => {
                ("issuance_ambiguous", None, Some(format!("{error}; look up after the safe wait")))
            }
            Transition::Retry { error, .. } => ("issuance_retry", None, Some(error.clone())),
            Transition::Failed { error } => ("invoice.failed", Some(EventType::Failed), Some(error.clone())),
            Transition::HandBack => {
                ("issuance_handed_back", None, Some("worker stopping before the call".to_owned()))
            }
            Transition::Deferred { reason, .. } => ("issuance_deferred", None, Some(reason.clone())),
        };
        let after = match &s.transition {
            Transition::Issued { invoice_no, series, .. } => {
                json!({"status": status, "invoiceNo": invoice_no, "series": series})
            }
            _ => json!({"status": status, "attempt": inv.attempts}),
        };
        audits.push(NewAudit {
            entity: "invoice",
            entity_id: inv.id.to_string(),
            invoice_id: Some(inv.id),
            merchant_id: Some(inv.merchant_id.clone()),
            order_id: Some(inv.order_id.clone()),
            event_type,
            outcome: status.to_owned(),
            before: Some(json!({"status": s.expected_status})),
            after: Some(after),
            actor: actor.to_owned(),
            reason,
        });
        if let Some(event_type) = event {
            let provider = match &s.transition {
                Transition::Issued { invoice_no, series, reservation_code, .. } => Some(ProviderMember {
                    name: s.provider.clone(),
                    invoice_no: invoice_no.clone(),
                    series: series.clone(),
                    lookup_code: reservation_code.clone().unwrap_or_default(),
                }),
                _ => None,
            };
            let event = event_row(
                events_topic,
                (inv.id, &inv.merchant_id, &inv.order_id),
                event_type,
                status,
                provider,
                now,
            );
            events.push((inv.id, event));
        }
        if let (Transition::Issued { .. }, Some(original_id)) = (&s.transition, inv.replaces_invoice_id) {
            replaced.push(Replaced {
                replacement_id: inv.id,
                original_id,
                merchant_id: &inv.merchant_id,
                order_id: &inv.order_id,
                reason: inv.replacement_reason.as_deref(),
            });
        }
    }
    (audits, events, replaced)
}

/// The outbox row of a lifecycle event of invoice `(id, merchant, order)`.
pub(crate) fn event_row(
    topic: &str,
    (invoice_id, merchant_id, order_id): (i64, &str, &str),
    event_type: crate::events::invoice_events::EventType,
    status: &'static str,
    provider: Option<crate::events::invoice_events::ProviderMember>,
    now: DateTime<Utc>,
) -> NewOutbox {
    let event = crate::events::invoice_events::InvoiceEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type,
        occurred_at: crate::events::invoice_events::rfc3339(now),
        invoice_id: invoice_id.to_string(),
        order_id: order_id.to_owned(),
        merchant_id: merchant_id.to_owned(),
        status,
        claim: None,
        provider,
    };
    NewOutbox {
        event_id: uuid::Uuid::parse_str(&event.event_id).unwrap_or_else(|_| uuid::Uuid::new_v4()),
        topic: topic.to_owned(),
        key: Some(order_id.as_bytes().to_vec()),
        payload: Some(serde_json::to_vec(&event).unwrap_or_default()),
        headers: json!({"type": event_type.as_str()}),
        has_secret: false,
    }
}

/// A claim that expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredClaim {
    /// Invoice.
    pub invoice_id: i64,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// Whether the invoice went PENDING_CLAIM → QUEUED (a `claim_window` invoice).
    pub queued: bool,
}

/// Expires open claims past their deadline (at most `limit`): the claim becomes EXPIRED and a
/// PENDING_CLAIM invoice becomes QUEUED for a consumer; audit and `invoice.claim_expired` in
/// the same transaction. `SKIP LOCKED` and the status conditions make each expiry happen
/// exactly once with any number of workers; taking the invoice's lock with the claim's,
/// never waiting, keeps it out of a deadlock with a claim or webhook holding the invoice.
pub async fn expire_claims(
    pool: &PgPool,
    limit: i64,
    events_topic: &str,
    actor: &str,
) -> Result<Vec<ExpiredClaim>, StorageError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, i64, String, String, bool, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT c.id FROM claim c JOIN invoice i ON i.id = c.invoice_id
             WHERE c.status = 'OPEN' AND c.deadline <= now()
             ORDER BY c.deadline LIMIT $1 FOR UPDATE OF c, i SKIP LOCKED),
         expired AS (
             UPDATE claim c SET status = 'EXPIRED', updated_at = now() FROM due WHERE c.id = due.id
             RETURNING c.id, c.invoice_id),
         queued AS (
             UPDATE invoice i SET status = 'QUEUED', next_attempt_at = now(), updated_at = now()
             FROM expired e WHERE i.id = e.invoice_id AND i.status = 'PENDING_CLAIM'
             RETURNING i.id)
         SELECT e.id, e.invoice_id, i.merchant_id, i.order_id, q.id IS NOT NULL, i.status
         FROM expired e JOIN invoice i ON i.id = e.invoice_id LEFT JOIN queued q ON q.id = e.invoice_id",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let now = Utc::now();
    let mut audits = Vec::new();
    let mut outbox = Vec::new();
    let mut out = Vec::new();
    for (claim_id, invoice_id, merchant_id, order_id, queued, old_status) in rows {
        let status: &'static str = if queued { "QUEUED" } else { status_static(&old_status) };
        audits.push(NewAudit {
            entity: "invoice",
            entity_id: invoice_id.to_string(),
            invoice_id: Some(invoice_id),
            merchant_id: Some(merchant_id.clone()),
            order_id: Some(order_id.clone()),
            event_type: "claim_expired",
            outcome: status.to_owned(),
            before: Some(json!({"status": old_status, "claim": "OPEN"})),
            after: Some(json!({"status": status, "claim": "EXPIRED", "claimId": claim_id.to_string()})),
            actor: actor.to_owned(),
            reason: Some(if queued {
                "claim deadline passed: issue to a consumer".into()
            } else {
                "claim deadline passed".into()
            }),
        });
        outbox.push(event_row(
            events_topic,
            (invoice_id, &merchant_id, &order_id),
            crate::events::invoice_events::EventType::ClaimExpired,
            status,
            None,
            now,
        ));
        out.push(ExpiredClaim { invoice_id, merchant_id, order_id, queued });
    }
    insert_audits(&mut tx, &audits).await?;
    insert_outbox(&mut tx, &outbox).await?;
    tx.commit().await?;
    Ok(out)
}

fn status_static(status: &str) -> &'static str {
    match status {
        "PENDING_CLAIM" => "PENDING_CLAIM",
        "QUEUED" => "QUEUED",
        "ISSUING" => "ISSUING",
        "SUBMITTED" => "SUBMITTED",
        "ISSUED" => "ISSUED",
        "FAILED" => "FAILED",
        "CANCELLED" => "CANCELLED",
        _ => "REPLACED",
    }
}

/// One page of due, unfinished invoices for the sweeper: `(id, order id, merchant id)` with
/// id greater than `after`.
pub async fn due_page(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, String, String)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT id, order_id, merchant_id FROM invoice
         WHERE status IN ('QUEUED', 'ISSUING', 'SUBMITTED') AND next_attempt_at <= now() AND id > $1
           AND deleted_at IS NULL
         ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Seconds since the oldest due, unfinished invoice became due (0 when none): the true
/// "stuck" signal, independent of Redis.
pub async fn oldest_due_seconds(pool: &PgPool) -> Result<f64, StorageError> {
    let age: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(next_attempt_at))::float8 FROM invoice
         WHERE status IN ('QUEUED', 'ISSUING', 'SUBMITTED') AND next_attempt_at <= now()
           AND deleted_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(age.unwrap_or(0.0).max(0.0))
}

/// What a replay did to one invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Invoice.
    pub invoice_id: i64,
    /// Merchant.
    pub merchant_id: String,
    /// Its status before.
    pub before: String,
    /// Its status after.
    pub after: String,
}

/// Replays an order's FAILED invoices (of one merchant, if given) (→ QUEUED, attempts reset, audited). Issued or
/// otherwise settled invoices are left alone: a replay of an issued invoice is a no-op.
/// Returns every invoice of the order with what happened to it.
pub async fn replay(
    pool: &PgPool,
    order_id: &str,
    merchant_id: Option<&str>,
    actor: &str,
    reason: &str,
) -> Result<Vec<Replayed>, StorageError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, merchant_id, status FROM invoice
         WHERE order_id = $1 AND ($2::text IS NULL OR merchant_id = $2) AND deleted_at IS NULL
         ORDER BY id FOR UPDATE",
    )
    .bind(order_id)
    .bind(merchant_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::new();
    let mut audits = Vec::new();
    for (id, merchant_id, status) in rows {
        let after = if status == "FAILED" {
            sqlx::query(
                "UPDATE invoice SET status = 'QUEUED', attempts = 0, next_attempt_at = now(), last_error = NULL,
                     updated_at = now() WHERE id = $1 AND status = 'FAILED'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            audits.push(NewAudit {
                entity: "invoice",
                entity_id: id.to_string(),
                invoice_id: Some(id),
                merchant_id: Some(merchant_id.clone()),
                order_id: Some(order_id.to_owned()),
                event_type: "replayed",
                outcome: "QUEUED".into(),
                before: Some(json!({"status": "FAILED"})),
                after: Some(json!({"status": "QUEUED", "attempt": 0})),
                actor: actor.to_owned(),
                reason: Some(reason.to_owned()),
            });
            "QUEUED".to_owned()
        } else {
            status.clone()
        };
        out.push(Replayed { invoice_id: id, merchant_id, before: status, after });
    }
    insert_audits(&mut tx, &audits).await?;
    tx.commit().await?;
    Ok(out)
}

/// Creates a replacement invoice for an issued original, for `buyer`, QUEUED (DOMAIN §7:
/// a claim on an issued consumer invoice of an `immediate` merchant). The replacement copies
/// the original's lines, totals and config snapshot, and gets its own id and idempotency key.
/// Its id, actor, lifecycle topic and time come from `giver`; like every invoice, it is
/// announced with `invoice.created`. Returns `None` if the original is not ISSUED or already
/// has an active replacement.
pub async fn create_replacement(
    conn: &mut PgConnection,
    original_id: i64,
    buyer: &Value,
    buyer_kind: &str,
    reason: &str,
    giver: &super::buyers::Giver<'_>,
) -> Result<Option<(String, String)>, StorageError> {
    let (replacement_id, actor) = (giver.replacement_id, giver.actor.as_str());
    let transaction_uuid = crate::stream::transaction_uuid(replacement_id);
    let created: Option<(String, String)> = sqlx::query_as(
        "INSERT INTO invoice (id, merchant_id, order_id, kind, replaces_invoice_id, status, issuance_mode,
             payment_event_id, paid_at, currency, buyer, buyer_kind, lines, total_net, total_vat, total_amount,
             provider_config_id, config_snapshot, config_snapshot_digest, transaction_uuid, next_attempt_at,
             replacement_reason)
         SELECT $2, merchant_id, order_id, 'replacement', id, 'QUEUED', issuance_mode, payment_event_id, paid_at,
             currency, $3, $4, lines, total_net, total_vat, total_amount, provider_config_id, config_snapshot,
             config_snapshot_digest, $5, now(), $6
         FROM invoice WHERE id = $1 AND status = 'ISSUED' AND kind = 'original'
         ON CONFLICT DO NOTHING
         RETURNING merchant_id, order_id",
    )
    .bind(original_id)
    .bind(replacement_id)
    .bind(buyer)
    .bind(buyer_kind)
    .bind(&transaction_uuid)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((merchant_id, order_id)) = &created {
        insert_audits(
            conn,
            &[NewAudit {
                entity: "invoice",
                entity_id: replacement_id.to_string(),
                invoice_id: Some(replacement_id),
                merchant_id: Some(merchant_id.clone()),
                order_id: Some(order_id.clone()),
                event_type: "replacement_created",
                outcome: "QUEUED".into(),
                before: None,
                after: Some(
                    json!({"status": "QUEUED", "replaces": original_id.to_string(), "buyerKind": buyer_kind}),
                ),
                actor: actor.to_owned(),
                reason: Some(reason.to_owned()),
            }],
        )
        .await?;
        insert_outbox(
            conn,
            &[event_row(
                giver.events_topic,
                (replacement_id, merchant_id, order_id),
                crate::events::invoice_events::EventType::Created,
                "QUEUED",
                None,
                giver.now,
            )],
        )
        .await?;
    }
    Ok(created)
}

/// Everything about an order for `invoice inspect`: decisions, invoices, attempts, audit trail.
pub async fn inspect(pool: &PgPool, order_id: &str) -> Result<Value, StorageError> {
    let invoices: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('id', id::text, 'merchantId', merchant_id, 'orderId', order_id, 'kind', kind,
             'replaces', replaces_invoice_id::text, 'status', status, 'buyerKind', buyer_kind,
             'totalAmount', total_amount::text, 'currency', currency, 'transactionUuid', transaction_uuid,
             'attempts', attempts, 'nextAttemptAt', next_attempt_at, 'leaseUntil', lease_until,
             'lastError', last_error, 'invoiceNo', provider_invoice_no, 'series', provider_series,
             'issuedAt', issued_at,
             'provider', invoice_snapshot(config_snapshot, config_snapshot_digest)->>'provider',
             'partition', NULL, 'createdAt', created_at, 'updatedAt', updated_at)
         FROM invoice WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let attempts: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('invoiceId', a.invoice_id::text, 'attempt', a.attempt_no, 'operation', a.operation,
             'outcome', a.outcome, 'errorCode', a.error_code, 'durationMs', a.duration_ms, 'worker', a.worker,
             'startedAt', a.started_at)
         FROM issuance_attempt a JOIN invoice i ON i.id = a.invoice_id WHERE i.order_id = $1 ORDER BY a.id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let audit: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('at', created_at, 'invoiceId', invoice_id::text, 'event', event_type,
             'outcome', outcome, 'actor', actor, 'reason', reason, 'before', before, 'after', after)
         FROM (SELECT a.* FROM audit_log a JOIN invoice i ON i.id = a.invoice_id WHERE i.order_id = $1
               UNION ALL
               SELECT a.* FROM audit_log a WHERE a.invoice_id IS NULL AND a.order_id = $1) a
         ORDER BY id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let decisions: Vec<Value> = sqlx::query_scalar(ORDER_DECISIONS).bind(order_id).fetch_all(pool).await?;
    Ok(
        json!({"orderId": order_id, "decisions": decisions, "invoices": invoices, "issuances": attempts, "audit": audit}),
    )
}

/// What the stream decided for order `$1`'s payment events, for [`inspect`]: the answer to
/// "why has this order no invoice?" (a skip reason), which no other table holds. Skipped
/// decisions are rows of `payment_decision`, indexed by order
/// (`payment_decision_skipped_order`). A created decision is its original invoice: where the
/// event was read comes from the invoice's `invoice.created` audit row, or from the decision
/// row that earlier versions also wrote (found by the event's key).
pub const ORDER_DECISIONS: &str = "SELECT jsonb_build_object('eventId', event_id, 'merchantId', merchant_id,
         'outcome', outcome, 'skipReason', skip_reason, 'invoiceId', invoice_id::text, 'topic', topic,
         'partition', partition, 'offset', \"offset\", 'decidedAt', decided_at)
     FROM (SELECT event_id, merchant_id, outcome, skip_reason, invoice_id, topic, partition, \"offset\", decided_at
           FROM payment_decision WHERE order_id = $1 AND outcome <> 'created'
           UNION ALL
           SELECT i.payment_event_id, i.merchant_id, 'created', NULL, i.id,
                  COALESCE(d.topic, s.source->>'topic'), COALESCE(d.partition, (s.source->>'partition')::int),
                  COALESCE(d.\"offset\", (s.source->>'offset')::bigint), COALESCE(d.decided_at, i.created_at)
           FROM invoice i
           LEFT JOIN payment_decision d
                  ON d.event_id = i.payment_event_id AND d.outcome = 'created' AND d.invoice_id = i.id
           LEFT JOIN LATERAL (SELECT a.after->'source' AS source FROM audit_log a
                              WHERE a.invoice_id = i.id AND a.event_type = 'invoice.created'
                              ORDER BY a.id LIMIT 1) s ON true
           WHERE i.order_id = $1 AND i.kind = 'original' AND i.payment_event_id IS NOT NULL) d
     ORDER BY decided_at, event_id";

/// The newest `$1` FAILED invoices (see [`failed`]); read through `invoice_failed_recent`.
pub const FAILED_NEWEST: &str = "SELECT id, merchant_id, order_id, last_error, updated_at FROM invoice
     WHERE status = 'FAILED' AND deleted_at IS NULL ORDER BY updated_at DESC LIMIT $1";

/// FAILED invoices, newest first: the authority behind `dlq list` (Redis may have lost its DLQ).
pub async fn failed(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<(i64, String, String, Option<String>, DateTime<Utc>)>, StorageError> {
    Ok(sqlx::query_as(FAILED_NEWEST).bind(limit).fetch_all(pool).await?)
}
