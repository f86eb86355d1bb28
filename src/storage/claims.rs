//! Buyer claims, found by the SHA-256 of their token (the clear token is never stored).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use super::buyers::{self, Given, Giver};
use super::StorageError;
use crate::domain::buyer::ValidBuyer;

/// What `GET /claims/{token}` shows.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimView {
    /// Claim status (`OPEN`, `CLAIMED`, `EXPIRED`, `CANCELLED`).
    pub status: String,
    /// The seller's display name.
    pub merchant_name: Option<String>,
    /// Merchant.
    pub merchant_id: String,
    /// Order.
    pub order_id: String,
    /// Amount paid.
    pub total_amount: Decimal,
    /// Currency.
    pub currency: String,
    /// Deadline.
    pub deadline: DateTime<Utc>,
    /// Whether the deadline has passed, on Postgres' clock (the one claim expiry runs on).
    pub past_deadline: bool,
    /// The buyer given, once claimed.
    pub buyer: Option<Value>,
    /// The invoice's status.
    pub invoice_status: String,
}

/// The claim with token hash `hash`.
pub async fn view(pool: &PgPool, hash: &[u8; 32]) -> Result<Option<ClaimView>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT c.status, m.merchant_name, c.merchant_id, c.order_id, i.total_amount, i.currency, c.deadline,
                c.deadline < now() AS past_deadline, c.buyer, i.status AS invoice_status
         FROM claim c JOIN invoice i ON i.id = c.invoice_id
         LEFT JOIN merchant_tax_info m ON m.merchant_id = c.merchant_id
         WHERE c.token_hash = $1",
    )
    .bind(&hash[..])
    .fetch_optional(pool)
    .await?)
}

/// What submitting a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The buyer was given: see [`Given`].
    Given {
        /// Merchant.
        merchant_id: String,
        /// Order.
        order_id: String,
        /// What happened.
        given: Given,
    },
    /// No claim has this token.
    Unknown,
    /// Past the deadline, or expired by the worker.
    Expired,
    /// The invoice was cancelled.
    Cancelled,
    /// Claimed before (by this or another request).
    AlreadyClaimed,
}

/// Claims with token hash `hash` for `buyer`, inside `tx`. The claim row is locked first, so
/// of two concurrent claims exactly one finds it OPEN.
pub async fn submit(
    tx: &mut PgConnection,
    hash: &[u8; 32],
    buyer: &ValidBuyer,
    giver: &Giver<'_>,
) -> Result<Submitted, StorageError> {
    let order: Option<(String, String)> =
        sqlx::query_as("SELECT merchant_id, order_id FROM claim WHERE token_hash = $1")
            .bind(&hash[..])
            .fetch_optional(&mut *tx)
            .await?;
    let Some((merchant_id, order_id)) = order else { return Ok(Submitted::Unknown) };
    // The invoice is locked before the claim, as in `give`, `cancel` and the expiry: one lock
    // order everywhere, so a claim racing a webhook or the expiry cannot deadlock.
    buyers::lock_original(tx, &merchant_id, &order_id).await?;
    let row: Option<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT status, deadline FROM claim WHERE token_hash = $1 FOR UPDATE")
            .bind(&hash[..])
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, deadline)) = row else { return Ok(Submitted::Unknown) };
    match status.as_str() {
        "CLAIMED" => return Ok(Submitted::AlreadyClaimed),
        "CANCELLED" => return Ok(Submitted::Cancelled),
        "EXPIRED" => return Ok(Submitted::Expired),
        _ if giver.now > deadline => return Ok(Submitted::Expired),
        _ => {}
    }
    let (given, _) = buyers::give(tx, &merchant_id, &order_id, buyer, giver).await?;
    if given.needs_enqueue() {
        // The buyer's own claim wins over a request still pending for the order.
        buyers::supersede_pending(tx, &merchant_id, &order_id).await?;
    }
    if let Given::Later { invoice_id } = given {
        // The invoice is being issued right now: the buyer is kept as the order's pending
        // request, applied once the issuance settles, as of now (the sweeper judges the
        // deadline at the time recorded here). Refused instead, the buyer would have to
        // come back, and might find the claim expired meanwhile.
        buyers::record_request(tx, giver.replacement_id, &merchant_id, &order_id, buyer, None, &given, giver)
            .await?;
        let buyer_json = serde_json::to_value(&buyer.buyer).unwrap_or(Value::Null);
        buyers::close_open_claim(tx, invoice_id, &buyer_json, giver.now).await?;
        super::decisions::insert_audits(
            tx,
            &[super::decisions::NewAudit {
                entity: "invoice",
                entity_id: invoice_id.to_string(),
                invoice_id: Some(invoice_id),
                merchant_id: Some(merchant_id.clone()),
                order_id: Some(order_id.clone()),
                event_type: "claim_recorded",
                outcome: "PENDING".into(),
                before: None,
                after: Some(serde_json::json!({"buyerKind": buyer.kind.as_str()})),
                actor: giver.actor.clone(),
                reason: Some("claimed while the invoice was being issued: applied once it settles".into()),
            }],
        )
        .await?;
    }
    Ok(Submitted::Given { merchant_id, order_id, given })
}
