//! `POST /v1/api/webhooks/{merchant,internal}`: Standard Webhooks signed deliveries.
//! The order of checks is the security: size, then signature over the raw bytes, then
//! parsing; the dedupe row is written in the transaction of the effect, so a delivery is
//! processed exactly once even when retried concurrently or after a crash.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::problem::Problem;
use super::server::bytes_body::Body;
use super::{parse_json, read_body, Api};
use crate::auth::webhook::{Headers, Rejection, Verifier};
use crate::domain::buyer::Buyer;
use crate::storage::buyers::{self, Cancelled, Given, Giver};

/// Which endpoint (and so which secrets and payload types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Merchants: `invoice.request`.
    Merchant,
    /// Commerce and the provider gateway: `invoice.request`, `invoice.cancel`, `provider.status`.
    Internal,
}

impl Endpoint {
    /// Label and `webhook_seen.endpoint` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Merchant => "merchant",
            Endpoint::Internal => "internal",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Endpoint::Merchant => "merchant_webhook",
            Endpoint::Internal => "internal_webhook",
        }
    }

    fn types(self) -> &'static [&'static str] {
        match self {
            Endpoint::Merchant => &["invoice.request"],
            Endpoint::Internal => &["invoice.request", "invoice.cancel", "provider.status"],
        }
    }
}

/// The envelope `{"type": ..., "data": {...}}`.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// Payload type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Payload.
    pub data: Value,
}

/// `invoice.request` data.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestData {
    /// Order.
    pub order_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// The buyer object.
    pub buyer: Buyer,
}

/// `invoice.cancel` data.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelData {
    /// Order.
    pub order_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Why (kept on the invoice and in the audit trail).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `provider.status` data.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusData {
    /// Order.
    pub order_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// The provider's or tax authority's status (a code or an object).
    pub status: Value,
    /// The tax authority's code for the invoice, once it has one.
    #[serde(default)]
    pub tax_authority_code: Option<String>,
}

/// A parsed payload.
#[derive(Debug)]
pub enum Payload {
    /// `invoice.request`
    Request(RequestData),
    /// `invoice.cancel`
    Cancel(CancelData),
    /// `provider.status`
    Status(StatusData),
}

fn check_ref(field: &str, value: &str) -> Result<(), Problem> {
    if value.trim().is_empty() || value.chars().count() > 128 || value.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            format!("data.{field} must be 1-128 characters without control characters"),
        ));
    }
    Ok(())
}

/// Parses a body (already verified) for `endpoint`. Never panics, whatever the bytes.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Payload, Problem> {
    let envelope: Envelope = parse_json(body)?;
    if !endpoint.types().contains(&envelope.kind.as_str()) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown-type",
            format!(
                "type `{}` is not accepted on the {} endpoint; accepted: {}",
                envelope.kind.chars().take(64).collect::<String>(),
                endpoint.as_str(),
                endpoint.types().join(", ")
            ),
        ));
    }
    // Postgres can store no U+0000 (in `text` or `jsonb`): refused here with a 422, not by
    // the database with a 500 that the sender would retry for days.
    if crate::events::contains_nul(&envelope.data) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            "data holds a string with the NUL character (U+0000)",
        ));
    }
    let data = |e: serde_json::Error| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            format!("data is not acceptable: {}", super::describe_json_error(&e)),
        )
    };
    let payload = match envelope.kind.as_str() {
        "invoice.request" => {
            let d: RequestData = serde_json::from_value(envelope.data).map_err(data)?;
            check_ref("orderId", &d.order_id)?;
            check_ref("merchantId", &d.merchant_id)?;
            Payload::Request(d)
        }
        "invoice.cancel" => {
            let d: CancelData = serde_json::from_value(envelope.data).map_err(data)?;
            check_ref("orderId", &d.order_id)?;
            check_ref("merchantId", &d.merchant_id)?;
            if d.reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-body",
                    "data.reason is longer than 500 characters",
                ));
            }
            Payload::Cancel(d)
        }
        _ => {
            let d: StatusData = serde_json::from_value(envelope.data).map_err(data)?;
            check_ref("orderId", &d.order_id)?;
            check_ref("merchantId", &d.merchant_id)?;
            if d.status.is_null() || d.status.to_string().len() > 8192 {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-body",
                    "data.status is required (a code or an object under 8 KiB)",
                ));
            }
            if let Some(code) = &d.tax_authority_code {
                check_ref("taxAuthorityCode", code)?;
            }
            Payload::Status(d)
        }
    };
    Ok(payload)
}

/// Largest webhook body (security R5): deliveries are small JSON documents, and a body is
/// buffered whole before its MAC can be checked.
pub const WEBHOOK_MAX_BODY: usize = 256 * 1024;

/// Handles one delivery.
pub async fn handle(api: &Api, endpoint: Endpoint, request: Request<Incoming>) -> Response<Body> {
    let label = endpoint.as_str();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (id, timestamp, signature) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let headers =
        Headers { id: id.as_deref(), timestamp: timestamp.as_deref(), signature: signature.as_deref() };
    // Every header check before any body is buffered: an unsigned or stale request costs
    // neither memory nor HMAC work. A signed one over the limit gets its 413 unread too.
    let checked = match Verifier::check_headers(headers, chrono::Utc::now().timestamp()) {
        Ok(checked) => checked,
        Err(rejection) => {
            super::discard_body(request).await;
            return rejected(api, label, rejection);
        }
    };
    let body = match read_body(request, WEBHOOK_MAX_BODY).await {
        Ok(body) => body,
        Err(problem) => {
            api.metrics.api.webhook(label, "rejected", "too_large");
            return problem.into_response();
        }
    };
    let verifier = match endpoint {
        Endpoint::Merchant => &api.merchant_webhooks,
        Endpoint::Internal => &api.internal_webhooks,
    };
    let webhook_id = match verifier.check_body(checked, &body) {
        Ok(id) => id.to_owned(),
        Err(rejection) => return rejected(api, label, rejection),
    };
    let payload = match parse(endpoint, &body) {
        Ok(payload) => payload,
        Err(problem) => {
            api.metrics.api.webhook(label, "invalid", "body");
            // The detail is the sender's to see; it is not logged (bodies carry personal data).
            tracing::warn!(endpoint = label, webhookId = %webhook_id, problem = %problem.type_uri, "Webhook body refused");
            return problem.into_response();
        }
    };
    match process(api, endpoint, &webhook_id, payload).await {
        Ok(Processed::Duplicate) => {
            api.metrics.api.webhook(label, "duplicate", "");
            super::json(StatusCode::OK, &json!({"status": "duplicate", "webhookId": webhook_id}))
        }
        Ok(Processed::Done(answer)) => {
            api.metrics.api.webhook(label, "accepted", "");
            super::json(StatusCode::OK, &answer)
        }
        Err(problem) => {
            let result = if problem.status >= 500 { "error" } else { "refused" };
            api.metrics.api.webhook(label, result, "");
            problem.into_response()
        }
    }
}

/// The 401 of a delivery that failed verification, counted by reason.
fn rejected(api: &Api, label: &'static str, rejection: Rejection) -> Response<Body> {
    api.metrics.api.webhook(label, "rejected", rejection.reason());
    tracing::warn!(endpoint = label, reason = rejection.reason(), "Webhook rejected");
    Problem::new(StatusCode::UNAUTHORIZED, "invalid-signature", rejection.to_string())
        .with("reason", json!(rejection.reason()))
        .into_response()
}

enum Processed {
    Duplicate,
    Done(Value),
}

async fn process(
    api: &Api,
    endpoint: Endpoint,
    webhook_id: &str,
    payload: Payload,
) -> Result<Processed, Problem> {
    let actor = format!("webhook:{}:{webhook_id}", endpoint.as_str());
    let mut tx = api.db.begin().await?;
    let now = crate::storage::transaction_time(&mut tx).await?;
    if !buyers::first_delivery(&mut tx, endpoint.as_str(), webhook_id).await? {
        tx.rollback().await?;
        return Ok(Processed::Duplicate);
    }
    let mut claimed = false;
    let (answer, enqueue) = match payload {
        Payload::Request(d) => {
            let buyer = d.buyer.validate().map_err(|e| {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-buyer", e.to_string())
            })?;
            let giver = Giver {
                source: endpoint.source(),
                actor: actor.clone(),
                events_topic: &api.events_topic,
                replacement_id: api.ids.next_id()?,
                now,
                asked_at: None,
            };
            let (given, claim_closed) = buyers::give(&mut tx, &d.merchant_id, &d.order_id, &buyer, &giver)
                .await
                .map_err(super::values_refused)?;
            claimed = claim_closed;
            if let Given::Refused(refusal) = given {
                return Err(Problem::new(StatusCode::CONFLICT, "request-refused", refusal.to_string()));
            }
            let recorded = buyers::record_request(
                &mut tx,
                api.ids.next_id()?,
                &d.merchant_id,
                &d.order_id,
                &buyer,
                Some(webhook_id),
                &given,
                &giver,
            )
            .await
            .map_err(super::values_refused)?;
            if !recorded {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "request-refused",
                    "the buyer's own claim is waiting for the invoice being issued; it is not replaced",
                ));
            }
            let result = match given {
                Given::Queued { .. } => "queued",
                Given::BuyerSet { .. } => "buyer_set",
                Given::Replacement { .. } => "replacement",
                _ => "pending",
            };
            tracing::info!(orderId = %d.order_id, merchantId = %d.merchant_id, result, "Invoice request recorded");
            let mut answer = json!({"status": "processed", "type": "invoice.request", "result": result});
            if let Some(id) = given.invoice_id() {
                answer["invoiceId"] = json!(id.to_string());
            }
            (answer, given.needs_enqueue().then_some((d.order_id, d.merchant_id)))
        }
        Payload::Cancel(d) => {
            let reason = d.reason.unwrap_or_else(|| "cancelled by the internal webhook".into());
            match buyers::cancel(
                &mut tx,
                &d.merchant_id,
                &d.order_id,
                &reason,
                &actor,
                &api.events_topic,
                now,
            )
            .await
            .map_err(super::values_refused)?
            {
                Cancelled::Done { invoice_id, .. } | Cancelled::Already { invoice_id } => {
                    tracing::info!(orderId = %d.order_id, merchantId = %d.merchant_id, invoiceId = invoice_id, "Invoice cancelled");
                    (
                        json!({"status": "processed", "type": "invoice.cancel", "invoiceId": invoice_id.to_string(), "result": "CANCELLED"}),
                        None,
                    )
                }
                Cancelled::TooLate { status, .. } => {
                    return Err(Problem::new(
                        StatusCode::CONFLICT,
                        "too-late",
                        format!(
                            "the invoice is {status}; only an invoice not yet being issued can be cancelled"
                        ),
                    ))
                }
                Cancelled::NoInvoice => return Err(no_invoice(&d.merchant_id, &d.order_id)),
            }
        }
        Payload::Status(d) => {
            match buyers::provider_status(
                &mut tx,
                &d.merchant_id,
                &d.order_id,
                &d.status,
                d.tax_authority_code.as_deref(),
                &actor,
            )
            .await
            .map_err(super::values_refused)?
            {
                Some(Ok(invoice_id)) => (
                    json!({"status": "processed", "type": "provider.status", "invoiceId": invoice_id.to_string()}),
                    None,
                ),
                Some(Err(status)) => {
                    return Err(Problem::new(
                        StatusCode::CONFLICT,
                        "not-issued",
                        format!("the invoice is {status}; a provider status applies to an issued or submitted invoice"),
                    ))
                }
                None => return Err(no_invoice(&d.merchant_id, &d.order_id)),
            }
        }
    };
    tx.commit().await?;
    if claimed {
        api.metrics.claim("claimed", 1);
    }
    if let Some(order) = enqueue {
        // Committed: if Redis fails now, the sweeper enqueues it from Postgres.
        if let Err(error) = crate::issuance::enqueue(&api.queue, &api.metrics, &[order], "webhook").await {
            tracing::warn!(%error, "Enqueue after a webhook failed; the sweeper will enqueue it");
        }
    }
    Ok(Processed::Done(answer))
}

fn no_invoice(merchant_id: &str, order_id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-invoice",
        format!("merchant {merchant_id} has no invoice for order {order_id}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_endpoint_accepts_only_its_types() {
        let cancel = br#"{"type": "invoice.cancel", "data": {"orderId": "O-1", "merchantId": "M-1"}}"#;
        assert!(matches!(parse(Endpoint::Internal, cancel), Ok(Payload::Cancel(_))));
        assert_eq!(parse(Endpoint::Merchant, cancel).unwrap_err().status, 422);
        let request =
            br#"{"type": "invoice.request", "data": {"orderId": "O-1", "merchantId": "M-1", "buyer": {}}}"#;
        assert!(matches!(parse(Endpoint::Merchant, request), Ok(Payload::Request(_))));
        assert_eq!(parse(Endpoint::Merchant, b"{").unwrap_err().status, 400);
        let float = br#"{"type": "provider.status", "data": {"orderId": "O-1", "merchantId": "M-1"}}"#;
        assert_eq!(parse(Endpoint::Internal, float).unwrap_err().status, 422);
        let empty_order = br#"{"type": "invoice.cancel", "data": {"orderId": " ", "merchantId": "M-1"}}"#;
        assert!(parse(Endpoint::Internal, empty_order).unwrap_err().detail.contains("orderId"));
    }

    proptest! {
        #[test]
        fn no_body_makes_the_parser_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(Endpoint::Internal, &body);
            let _ = parse(Endpoint::Merchant, &body);
        }

        #[test]
        fn no_json_shaped_body_makes_the_parser_panic(
            kind in prop_oneof![Just("invoice.request".to_owned()), Just("invoice.cancel".to_owned()), Just("provider.status".to_owned()), "\\PC{0,20}"],
            order in "\\PC{0,200}", buyer in proptest::collection::hash_map("\\PC{0,12}", "\\PC{0,40}", 0..6),
        ) {
            let body = serde_json::json!({"type": kind, "data": {"orderId": order, "merchantId": "M-1", "buyer": buyer,
                "status": "00", "reason": order}});
            let _ = parse(Endpoint::Internal, body.to_string().as_bytes());
        }
    }
}
