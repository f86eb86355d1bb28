//! Giving an order's invoice a buyer (claims and `invoice.request` webhooks), cancelling an
//! invoice and recording the tax authority's answer (internal webhooks). Each function runs
//! inside the caller's transaction, locks the invoice row, and writes the change with its
//! audit row and outbox event; the caller commits, then enqueues.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};

use super::decisions::{insert_audits, insert_outbox, NewAudit};
use super::issuance::event_row;
use super::StorageError;
use crate::domain::assign::{self, Action, Refusal};
use crate::domain::buyer::ValidBuyer;
use crate::events::invoice_events::EventType;

/// Why a replacement replaces its original, printed on it as the agreement reference
/// (Viettel `additionalReferenceDesc`, `adjustedNote`): legal text in Vietnamese, not the
/// audit row's internal reason.
const REPLACEMENT_AGREEMENT: &str = "Thay thế theo yêu cầu của người mua";

/// Who gives the buyer, for audit and the invoice request's `source`.
#[derive(Debug, Clone)]
pub struct Giver<'a> {
    /// `claim`, `merchant_webhook` or `internal_webhook`.
    pub source: &'static str,
    /// The audit actor.
    pub actor: String,
    /// The lifecycle topic.
    pub events_topic: &'a str,
    /// A fresh id, used if a replacement invoice is created.
    pub replacement_id: i64,
    /// Now, on Postgres' clock: the time written (claimed at, the event's time).
    pub now: DateTime<Utc>,
    /// When the buyer asked, if earlier than `now`: a request the sweeper settles later was
    /// recorded then, and a buyer who asked in time is not refused for the time the invoice
    /// spent being issued. Deadlines are judged at this time.
    pub asked_at: Option<DateTime<Utc>>,
}

/// What giving the buyer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Given {
    /// The invoice (PENDING_CLAIM or FAILED before) is QUEUED for the buyer: enqueue it.
    Queued {
        /// The invoice.
        invoice_id: i64,
    },
    /// The QUEUED invoice now names the buyer (its job is in the queue already).
    BuyerSet {
        /// The invoice.
        invoice_id: i64,
    },
    /// A replacement invoice for the buyer was created, QUEUED: enqueue it.
    Replacement {
        /// The replacement.
        invoice_id: i64,
    },
    /// The invoice is being issued right now; nothing changed.
    Later {
        /// The invoice.
        invoice_id: i64,
    },
    /// The order has no invoice (yet); nothing changed.
    NoInvoice,
    /// Refused; nothing changed.
    Refused(Refusal),
}

impl Given {
    /// Whether the order needs a job in the queue after commit.
    pub fn needs_enqueue(&self) -> bool {
        matches!(self, Given::Queued { .. } | Given::Replacement { .. } | Given::BuyerSet { .. })
    }

    /// The invoice the buyer's invoice is (or will be).
    pub fn invoice_id(&self) -> Option<i64> {
        match self {
            Given::Queued { invoice_id }
            | Given::BuyerSet { invoice_id }
            | Given::Replacement { invoice_id }
            | Given::Later { invoice_id } => Some(*invoice_id),
            Given::NoInvoice | Given::Refused(_) => None,
        }
    }
}

/// Locks `(merchant, order)`'s active original invoice (a cancelled one only when there is
/// no live one): `(id, status, buyer kind, issuance mode)`. Every path that changes an
/// invoice and its claim locks the invoice first.
pub async fn lock_original(
    tx: &mut PgConnection,
    merchant_id: &str,
    order_id: &str,
) -> Result<Option<(i64, String, String, String)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT id, status, buyer_kind, issuance_mode FROM invoice
         WHERE merchant_id = $1 AND order_id = $2 AND kind = 'original' AND deleted_at IS NULL
         ORDER BY (status = 'CANCELLED'), id DESC LIMIT 1 FOR UPDATE",
    )
    .bind(merchant_id)
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// The newest live replacement of original `$1` (of merchant `$2`, order `$3`): `(id,
/// status)`. A replacement has its original's merchant and order, which puts the lookup on
/// the order's index; no index has `replaces_invoice_id` (one would cost every invoice write
/// for this rare lookup), and without them each buyer given read the whole invoice table.
/// Public so that tests can check its plan.
pub const REPLACEMENT_OF: &str = "SELECT id, status FROM invoice
     WHERE merchant_id = $2 AND order_id = $3 AND kind = 'replacement' AND replaces_invoice_id = $1
       AND status <> 'CANCELLED'
     ORDER BY id DESC LIMIT 1";

/// Gives `(merchant, order)`'s active original invoice the buyer, per
/// [`crate::domain::assign::action`]. Closes its open claim when the buyer is taken; the
/// flag says whether there was one (for the `claimed` count).
pub async fn give(
    tx: &mut PgConnection,
    merchant_id: &str,
    order_id: &str,
    buyer: &ValidBuyer,
    giver: &Giver<'_>,
) -> Result<(Given, bool), StorageError> {
    let Some((invoice_id, status, buyer_kind, mode)) = lock_original(tx, merchant_id, order_id).await? else {
        return Ok((Given::NoInvoice, false));
    };
    // Not locked: the worker's settle takes the replacement before the original, the
    // reverse of this path's order; the retry below changes it only if it is still FAILED.
    let replacement: Option<(i64, String)> = sqlx::query_as(REPLACEMENT_OF)
        .bind(invoice_id)
        .bind(merchant_id)
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
    let deadline: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT deadline FROM claim WHERE invoice_id = $1 ORDER BY id DESC LIMIT 1")
            .bind(invoice_id)
            .fetch_optional(&mut *tx)
            .await?;
    let target = assign::Target {
        status: &status,
        has_buyer: buyer_kind != "consumer",
        replaced: replacement.is_some(),
        replacement_failed: replacement.as_ref().is_some_and(|(_, s)| s == "FAILED"),
        deadline,
        immediate: mode == "immediate",
    };
    let buyer_json = serde_json::to_value(&buyer.buyer).unwrap_or(Value::Null);
    let kind = buyer.kind.as_str();
    let reason = format!("buyer given by {}", giver.source);
    let (given, outcome_status) = match assign::action(target, giver.asked_at.unwrap_or(giver.now)) {
        Action::Refuse(refusal) => return Ok((Given::Refused(refusal), false)),
        Action::Later => return Ok((Given::Later { invoice_id }, false)),
        Action::Queue => {
            sqlx::query(
                "UPDATE invoice SET status = 'QUEUED', buyer = $2, buyer_kind = $3, attempts = 0,
                     next_attempt_at = now(), last_error = NULL, lease_owner = NULL, lease_until = NULL,
                     updated_at = now()
                 WHERE id = $1",
            )
            .bind(invoice_id)
            .bind(&buyer_json)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
            (Given::Queued { invoice_id }, "QUEUED")
        }
        Action::SetBuyer => {
            // `updated_at` moves: a worker that read the invoice before this change cannot
            // take it (its acquire is fenced on the version it read).
            sqlx::query(
                "UPDATE invoice SET buyer = $2, buyer_kind = $3, updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(invoice_id)
            .bind(&buyer_json)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
            (Given::BuyerSet { invoice_id }, "QUEUED")
        }
        Action::Replace => {
            let created = super::issuance::create_replacement(
                tx,
                invoice_id,
                &buyer_json,
                kind,
                REPLACEMENT_AGREEMENT,
                giver,
            )
            .await?;
            if created.is_none() {
                return Ok((Given::Refused(Refusal::AlreadyReplaced), false));
            }
            (Given::Replacement { invoice_id: giver.replacement_id }, "QUEUED")
        }
        Action::RetryReplacement => {
            let Some((replacement_id, _)) = replacement else {
                return Ok((Given::Refused(Refusal::AlreadyReplaced), false));
            };
            // Its key stays: FAILED means the provider created nothing under it.
            let retried = sqlx::query(
                "UPDATE invoice SET status = 'QUEUED', buyer = $2, buyer_kind = $3, attempts = 0,
                     next_attempt_at = now(), last_error = NULL, lease_owner = NULL, lease_until = NULL,
                     updated_at = now()
                 WHERE id = $1 AND status = 'FAILED'",
            )
            .bind(replacement_id)
            .bind(&buyer_json)
            .bind(kind)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if retried == 0 {
                // Requeued by an operator meanwhile.
                return Ok((Given::Refused(Refusal::AlreadyReplaced), false));
            }
            insert_audits(
                tx,
                &[NewAudit {
                    entity: "invoice",
                    entity_id: replacement_id.to_string(),
                    invoice_id: Some(replacement_id),
                    merchant_id: Some(merchant_id.to_owned()),
                    order_id: Some(order_id.to_owned()),
                    event_type: "replacement_retried",
                    outcome: "QUEUED".into(),
                    before: Some(json!({"status": "FAILED"})),
                    after: Some(json!({"status": "QUEUED", "buyerKind": kind})),
                    actor: giver.actor.clone(),
                    reason: Some(format!("buyer given again by {}", giver.source)),
                }],
            )
            .await?;
            (Given::Replacement { invoice_id: replacement_id }, "QUEUED")
        }
    };
    let claim_closed = close_open_claim(tx, invoice_id, &buyer_json, giver.now).await?;
    let issued_for_buyer = given.invoice_id().unwrap_or(invoice_id);
    insert_audits(
        tx,
        &[NewAudit {
            entity: "invoice",
            entity_id: invoice_id.to_string(),
            invoice_id: Some(invoice_id),
            merchant_id: Some(merchant_id.to_owned()),
            order_id: Some(order_id.to_owned()),
            event_type: EventType::Claimed.as_str(),
            outcome: outcome_status.into(),
            before: Some(json!({"status": status, "buyerKind": buyer_kind})),
            after: Some(json!({"status": if matches!(given, Given::Replacement { .. }) { status.as_str() } else { outcome_status },
                               "buyerKind": kind, "invoiceForBuyer": issued_for_buyer.to_string()})),
            actor: giver.actor.clone(),
            reason: Some(reason),
        }],
    )
    .await?;
    insert_outbox(
        tx,
        &[event_row(
            giver.events_topic,
            (issued_for_buyer, merchant_id, order_id),
            EventType::Claimed,
            outcome_status,
            None,
            giver.now,
        )],
    )
    .await?;
    Ok((given, claim_closed))
}

/// Closes `invoice_id`'s open claim, if any, as claimed by `buyer` at `at`; `true` if there
/// was one.
pub async fn close_open_claim(
    tx: &mut PgConnection,
    invoice_id: i64,
    buyer: &Value,
    at: DateTime<Utc>,
) -> Result<bool, StorageError> {
    Ok(sqlx::query(
        "UPDATE claim SET status = 'CLAIMED', buyer = $2, claimed_at = $3, updated_at = now()
         WHERE invoice_id = $1 AND status = 'OPEN'",
    )
    .bind(invoice_id)
    .bind(buyer)
    .bind(at)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0)
}

/// Marks a webhook delivery as processed inside the transaction of its effect; `false` if it
/// was processed before (the caller rolls back and answers 200).
pub async fn first_delivery(
    tx: &mut PgConnection,
    endpoint: &str,
    webhook_id: &str,
) -> Result<bool, StorageError> {
    let rows =
        sqlx::query("INSERT INTO webhook_seen (endpoint, webhook_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(endpoint)
            .bind(webhook_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    Ok(rows == 1)
}

/// Forgets webhook ids older than `keep_seconds` (at most `limit` per call); returns how many.
/// A delivery that old fails the timestamp tolerance before its id is looked at, so its id
/// no longer needs remembering.
pub async fn forget_webhooks(pool: &PgPool, keep_seconds: f64, limit: i64) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM webhook_seen WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM webhook_seen WHERE received_at < now() - make_interval(secs => $1) LIMIT $2))",
    )
    .bind(keep_seconds)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Records an invoice request: joined to the invoice when the buyer was given, else kept
/// pending (the latest request for an order wins, except over a buyer's own claim kept
/// pending: `Ok(false)`, nothing recorded) for the stream or the sweeper to join.
#[allow(clippy::too_many_arguments)]
pub async fn record_request(
    tx: &mut PgConnection,
    request_id: i64,
    merchant_id: &str,
    order_id: &str,
    buyer: &ValidBuyer,
    webhook_id: Option<&str>,
    given: &Given,
    giver: &Giver<'_>,
) -> Result<bool, StorageError> {
    let buyer_json = serde_json::to_value(&buyer.buyer).unwrap_or(Value::Null);
    let joined = match given {
        Given::Queued { invoice_id } | Given::BuyerSet { invoice_id } | Given::Replacement { invoice_id } => {
            Some(*invoice_id)
        }
        _ => None,
    };
    match joined {
        Some(invoice_id) => {
            // An older request still pending (it came while the invoice was being issued) is
            // superseded: the sweeper must not apply the older buyer after this one.
            supersede_pending(tx, merchant_id, order_id).await?;
            sqlx::query(
                "INSERT INTO invoice_request (id, merchant_id, order_id, buyer, source, webhook_id, invoice_id, joined_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now())",
            )
            .bind(request_id)
            .bind(merchant_id)
            .bind(order_id)
            .bind(&buyer_json)
            .bind(giver.source)
            .bind(webhook_id)
            .bind(invoice_id)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            let recorded = sqlx::query(
                "INSERT INTO invoice_request (id, merchant_id, order_id, buyer, source, webhook_id)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (merchant_id, order_id) WHERE joined_at IS NULL AND deleted_at IS NULL
                 DO UPDATE SET buyer = EXCLUDED.buyer, source = EXCLUDED.source, webhook_id = EXCLUDED.webhook_id,
                     created_at = now()
                 -- The buyer's own claim (answered 202, its token used) is not overwritten.
                 WHERE invoice_request.source <> 'claim' OR EXCLUDED.source = 'claim'",
            )
            .bind(request_id)
            .bind(merchant_id)
            .bind(order_id)
            .bind(&buyer_json)
            .bind(giver.source)
            .bind(webhook_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            return Ok(recorded == 1);
        }
    }
    Ok(true)
}

/// Pending requests older than `min_age_seconds` whose order has an invoice: the ones a
/// payment processed concurrently with the request did not see, or whose invoice was being
/// issued. `(request id, merchant, order)`, unlocked: each is then taken with
/// [`lock_pending_request`] after its invoice.
pub async fn joinable_requests(
    pool: &PgPool,
    min_age_seconds: f64,
    limit: i64,
) -> Result<Vec<(i64, String, String)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT r.id, r.merchant_id, r.order_id FROM invoice_request r
         WHERE r.joined_at IS NULL AND r.deleted_at IS NULL
           AND r.created_at < now() - make_interval(secs => $1)
           AND EXISTS (SELECT 1 FROM invoice i WHERE i.merchant_id = r.merchant_id AND i.order_id = r.order_id
                       AND i.kind = 'original' AND i.status NOT IN ('ISSUING', 'SUBMITTED'))
         ORDER BY r.id LIMIT $2",
    )
    .bind(min_age_seconds)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Locks pending request `request_id` (its buyer), `None` if it was joined, withdrawn or is
/// locked by someone else meanwhile. Call after locking its invoice ([`lock_original`]): the
/// webhook paths lock the invoice first and the request second, so must everyone.
pub async fn lock_pending_request(
    tx: &mut PgConnection,
    request_id: i64,
) -> Result<Option<PendingRequest>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT buyer, source, created_at FROM invoice_request
         WHERE id = $1 AND joined_at IS NULL AND deleted_at IS NULL
         FOR UPDATE SKIP LOCKED",
    )
    .bind(request_id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// A pending request as [`lock_pending_request`] reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingRequest {
    /// The buyer as stored.
    pub buyer: Value,
    /// Where it came from (`merchant_webhook`, `internal_webhook`, `claim`).
    pub source: String,
    /// When it was recorded (its latest version).
    pub created_at: DateTime<Utc>,
}

impl PendingRequest {
    /// [`Giver::source`] for it.
    pub fn giver_source(&self) -> &'static str {
        match self.source.as_str() {
            "merchant_webhook" => "merchant_webhook",
            "claim" => "claim",
            _ => "internal_webhook",
        }
    }
}

/// Withdraws `(merchant, order)`'s pending request, if any: a buyer given now (by a newer
/// request or a claim) supersedes it, or the order was cancelled; the sweeper must not
/// apply it later.
pub async fn supersede_pending(
    tx: &mut PgConnection,
    merchant_id: &str,
    order_id: &str,
) -> Result<(), StorageError> {
    sqlx::query(
        "UPDATE invoice_request SET deleted_at = now()
         WHERE merchant_id = $1 AND order_id = $2 AND joined_at IS NULL AND deleted_at IS NULL",
    )
    .bind(merchant_id)
    .bind(order_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Settles a pending request: joined to `invoice_id`, or withdrawn (refused) with an audit row.
pub async fn settle_request(
    conn: &mut PgConnection,
    request_id: i64,
    invoice_id: Option<i64>,
    refusal: Option<&str>,
    actor: &str,
) -> Result<(), StorageError> {
    if let Some(invoice_id) = invoice_id {
        sqlx::query("UPDATE invoice_request SET invoice_id = $2, joined_at = now() WHERE id = $1")
            .bind(request_id)
            .bind(invoice_id)
            .execute(&mut *conn)
            .await?;
    } else if let Some(refusal) = refusal {
        let row: Option<(String, String)> = sqlx::query_as(
            "UPDATE invoice_request SET deleted_at = now() WHERE id = $1 RETURNING merchant_id, order_id",
        )
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((merchant_id, order_id)) = row {
            insert_audits(
                conn,
                &[NewAudit {
                    entity: "invoice",
                    entity_id: request_id.to_string(),
                    invoice_id: None,
                    merchant_id: Some(merchant_id),
                    order_id: Some(order_id),
                    event_type: "request_refused",
                    outcome: "REFUSED".into(),
                    before: None,
                    after: None,
                    actor: actor.to_owned(),
                    reason: Some(refusal.to_owned()),
                }],
            )
            .await?;
        }
    }
    Ok(())
}

/// What cancelling did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Now CANCELLED.
    Done {
        /// The invoice.
        invoice_id: i64,
        /// Its status before.
        before: String,
    },
    /// It was cancelled before.
    Already {
        /// The invoice.
        invoice_id: i64,
    },
    /// Too late: being issued or issued.
    TooLate {
        /// The invoice.
        invoice_id: i64,
        /// Its status.
        status: String,
    },
    /// No invoice for the order.
    NoInvoice,
}

/// Cancels `(merchant, order)`'s invoice if it is not issued and no call is in flight
/// (PENDING_CLAIM, QUEUED, FAILED), with its open claim and pending request.
pub async fn cancel(
    tx: &mut PgConnection,
    merchant_id: &str,
    order_id: &str,
    reason: &str,
    actor: &str,
    events_topic: &str,
    now: DateTime<Utc>,
) -> Result<Cancelled, StorageError> {
    let Some((invoice_id, status, ..)) = lock_original(tx, merchant_id, order_id).await? else {
        return Ok(Cancelled::NoInvoice);
    };
    match status.as_str() {
        "CANCELLED" => return Ok(Cancelled::Already { invoice_id }),
        "PENDING_CLAIM" | "QUEUED" | "FAILED" => {}
        _ => return Ok(Cancelled::TooLate { invoice_id, status }),
    }
    sqlx::query(
        "UPDATE invoice SET status = 'CANCELLED', cancel_reason = $2, next_attempt_at = NULL, updated_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(invoice_id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE claim SET status = 'CANCELLED', updated_at = now() WHERE invoice_id = $1 AND status = 'OPEN'",
    )
    .bind(invoice_id)
    .execute(&mut *tx)
    .await?;
    supersede_pending(tx, merchant_id, order_id).await?;
    insert_audits(
        tx,
        &[NewAudit {
            entity: "invoice",
            entity_id: invoice_id.to_string(),
            invoice_id: Some(invoice_id),
            merchant_id: Some(merchant_id.to_owned()),
            order_id: Some(order_id.to_owned()),
            event_type: EventType::Cancelled.as_str(),
            outcome: "CANCELLED".into(),
            before: Some(json!({"status": status})),
            after: Some(json!({"status": "CANCELLED"})),
            actor: actor.to_owned(),
            reason: Some(reason.to_owned()),
        }],
    )
    .await?;
    insert_outbox(
        tx,
        &[event_row(
            events_topic,
            (invoice_id, merchant_id, order_id),
            EventType::Cancelled,
            "CANCELLED",
            None,
            now,
        )],
    )
    .await?;
    Ok(Cancelled::Done { invoice_id, before: status })
}

/// Records the provider's or tax authority's status on the order's issued invoice: the
/// replacement once one was sent (issued or awaiting its number: the status is most likely
/// about the newest invoice), else the original. `Err(status)` names the state that does not allow it;
/// `Ok(None)` means the order has no invoice.
pub async fn provider_status(
    tx: &mut PgConnection,
    merchant_id: &str,
    order_id: &str,
    status: &Value,
    tax_authority_code: Option<&str>,
    actor: &str,
) -> Result<Option<Result<i64, String>>, StorageError> {
    let row: Option<(i64, String, Option<Value>, Option<String>)> = sqlx::query_as(
        "SELECT id, status, provider_status, tax_authority_code FROM invoice
         WHERE merchant_id = $1 AND order_id = $2 AND deleted_at IS NULL AND status <> 'CANCELLED'
         ORDER BY status IN ('ISSUED', 'SUBMITTED') DESC, kind = 'replacement' DESC,
             CASE status WHEN 'ISSUED' THEN 0 WHEN 'SUBMITTED' THEN 1 ELSE 2 END, id DESC
         LIMIT 1 FOR UPDATE",
    )
    .bind(merchant_id)
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((invoice_id, current, before, before_code)) = row else { return Ok(None) };
    // SUBMITTED too: the tax authority may answer before our next lookup does.
    if !matches!(current.as_str(), "ISSUED" | "REPLACED" | "SUBMITTED") {
        return Ok(Some(Err(current)));
    }
    sqlx::query(
        "UPDATE invoice SET provider_status = $2, tax_authority_code = COALESCE($3, tax_authority_code),
             updated_at = clock_timestamp() WHERE id = $1",
    )
    .bind(invoice_id)
    .bind(status)
    .bind(tax_authority_code)
    .execute(&mut *tx)
    .await?;
    insert_audits(
        tx,
        &[NewAudit {
            entity: "invoice",
            entity_id: invoice_id.to_string(),
            invoice_id: Some(invoice_id),
            merchant_id: Some(merchant_id.to_owned()),
            order_id: Some(order_id.to_owned()),
            event_type: "provider_status",
            outcome: current.clone(),
            before: Some(json!({"providerStatus": before, "taxAuthorityCode": before_code})),
            after: Some(json!({"providerStatus": status, "taxAuthorityCode": tax_authority_code})),
            actor: actor.to_owned(),
            reason: None,
        }],
    )
    .await?;
    Ok(Some(Ok(invoice_id)))
}
