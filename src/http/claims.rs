//! `GET`/`POST /v1/api/claims/{token}`: a buyer sees the claim and gives their details.
//! The token is looked up by its SHA-256; the GET has no side effect (link scanners
//! prefetch it); a client whose lookups keep failing gets 429.

use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::problem::Problem;
use super::server::bytes_body::Body;
use super::{client_ip, parse_json, read_body, Api, MAX_BODY};
use crate::domain::buyer::Buyer;
use crate::domain::claim::token_hash;
use crate::events::invoice_events::rfc3339;
use crate::storage::buyers::{Given, Giver};
use crate::storage::claims::{self, Submitted};

/// The claim body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    /// The buyer object (SPEC §5).
    pub buyer: Buyer,
}

/// Whether `token` has the shape of ours (43 base64url characters); anything else is
/// unknown without a database read.
pub fn well_formed(token: &str) -> bool {
    token.len() == 43 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses a claim body. Never panics, whatever the bytes.
pub fn parse(body: &[u8]) -> Result<Buyer, Problem> {
    let parsed: ClaimBody = parse_json(body)?;
    Ok(parsed.buyer)
}

fn throttled(api: &Api, request: &Request<Incoming>, method: &'static str) -> Option<Response<Body>> {
    let client = client_ip(api, request)?;
    let wait = api.claim_limiter.blocked(client, Instant::now())?;
    api.metrics.api.claim_request(method, "rate_limited");
    api.metrics.api.rate_limited("/v1/api/claims/{token}");
    tracing::warn!(client = %client, "Claim lookups rate limited");
    let mut response = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "too many failed claim lookups from this client; retry later",
    )
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    Some(response)
}

fn unknown(api: &Api, request_client: Option<std::net::IpAddr>, method: &'static str) -> Response<Body> {
    if let Some(client) = request_client {
        api.claim_limiter.failed(client, Instant::now());
    }
    api.metrics.api.claim_request(method, "unknown");
    Problem::new(StatusCode::NOT_FOUND, "unknown-claim", "no claim has this token").into_response()
}

fn gone(api: &Api, method: &'static str, detail: &str) -> Response<Body> {
    api.metrics.api.claim_request(method, "gone");
    Problem::new(StatusCode::GONE, "claim-gone", detail.to_owned()).into_response()
}

/// `GET /v1/api/claims/{token}`.
pub async fn get(api: &Api, token: &str, request: &Request<Incoming>) -> Response<Body> {
    if let Some(refused) = throttled(api, request, "GET") {
        return refused;
    }
    let client = client_ip(api, request);
    if !well_formed(token) {
        return unknown(api, client, "GET");
    }
    let view = match claims::view(&api.db, &token_hash(token)).await {
        Ok(Some(view)) => view,
        Ok(None) => return unknown(api, client, "GET"),
        Err(error) => return super::internal(&error).into_response(),
    };
    let expired = view.status == "EXPIRED" || (view.status == "OPEN" && view.past_deadline);
    if expired {
        return gone(api, "GET", "the claim deadline has passed");
    }
    if view.status == "CANCELLED" {
        return gone(api, "GET", "the invoice was cancelled");
    }
    api.metrics.api.claim_request("GET", "ok");
    super::json(
        StatusCode::OK,
        &json!({
            "status": view.status,
            "merchantName": view.merchant_name,
            "orderId": view.order_id,
            "totalAmount": view.total_amount.normalize().to_string(),
            "currency": view.currency,
            "deadline": rfc3339(view.deadline),
            "buyer": view.buyer,
            "invoiceStatus": view.invoice_status,
        }),
    )
}

/// `POST /v1/api/claims/{token}`.
pub async fn post(api: &Api, token: &str, request: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = throttled(api, &request, "POST") {
        return refused;
    }
    let client = client_ip(api, &request);
    if !well_formed(token) {
        return unknown(api, client, "POST");
    }
    let body = match read_body(request, MAX_BODY).await {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let buyer = match parse(&body).and_then(|b| {
        b.validate()
            .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-buyer", e.to_string()))
    }) {
        Ok(buyer) => buyer,
        Err(problem) => {
            api.metrics.api.claim_request("POST", "invalid");
            return problem.into_response();
        }
    };
    match submit(api, token, &buyer, client).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn submit(
    api: &Api,
    token: &str,
    buyer: &crate::domain::buyer::ValidBuyer,
    client: Option<std::net::IpAddr>,
) -> Result<Response<Body>, Problem> {
    let mut tx = api.db.begin().await?;
    let giver = Giver {
        source: "claim",
        actor: "buyer:claim".into(),
        events_topic: &api.events_topic,
        replacement_id: api.ids.next_id()?,
        now: crate::storage::transaction_time(&mut tx).await?,
        asked_at: None,
    };
    let submitted =
        claims::submit(&mut tx, &token_hash(token), buyer, &giver).await.map_err(super::values_refused)?;
    let (merchant_id, order_id, given) = match submitted {
        // A guess counts against the client like a GET's: POST is no way around the limit.
        Submitted::Unknown => return Ok(unknown(api, client, "POST")),
        Submitted::Expired => return Ok(gone(api, "POST", "the claim deadline has passed")),
        Submitted::Cancelled => return Ok(gone(api, "POST", "the invoice was cancelled")),
        Submitted::AlreadyClaimed => {
            api.metrics.api.claim_request("POST", "conflict");
            return Ok(Problem::new(StatusCode::CONFLICT, "already-claimed", "this claim was already used")
                .into_response());
        }
        Submitted::Given { merchant_id, order_id, given } => (merchant_id, order_id, given),
    };
    let invoice_id = match given {
        Given::Refused(crate::domain::assign::Refusal::DeadlinePassed) => {
            return Ok(gone(api, "POST", "the claim deadline has passed"));
        }
        Given::Refused(refusal) => {
            api.metrics.api.claim_request("POST", "conflict");
            return Ok(
                Problem::new(StatusCode::CONFLICT, "claim-refused", refusal.to_string()).into_response()
            );
        }
        Given::Later { invoice_id } => {
            // Recorded: applied to the order once its issuance settles (the claim is used).
            tx.commit().await?;
            api.metrics.claim("claimed", 1);
            api.metrics.api.claim_request("POST", "accepted");
            tracing::info!(orderId = %order_id, merchantId = %merchant_id, invoiceId = invoice_id,
                "Claim accepted while the invoice is being issued; applied once it settles");
            return Ok(super::json(
                StatusCode::ACCEPTED,
                &json!({"status": "PENDING", "invoiceId": invoice_id.to_string()}),
            ));
        }
        Given::NoInvoice => return Err(super::internal(&"a claim without its invoice")),
        ref g => g.invoice_id().unwrap_or_default(),
    };
    tx.commit().await?;
    api.metrics.claim("claimed", 1);
    api.metrics.api.claim_request("POST", "accepted");
    tracing::info!(orderId = %order_id, merchantId = %merchant_id, invoiceId = invoice_id, "Claim accepted");
    if given.needs_enqueue() {
        if let Err(error) =
            crate::issuance::enqueue(&api.queue, &api.metrics, &[(order_id, merchant_id)], "claim").await
        {
            tracing::warn!(%error, "Enqueue after a claim failed; the sweeper will enqueue it");
        }
    }
    Ok(super::json(StatusCode::ACCEPTED, &json!({"status": "QUEUED", "invoiceId": invoice_id.to_string()})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_tokens_of_our_shape_reach_the_database() {
        assert!(well_formed(&crate::crypto::random_token()));
        assert!(!well_formed("short"));
        assert!(!well_formed(&"a".repeat(44)));
        assert!(!well_formed(&format!("{}=", "a".repeat(42))));
    }

    proptest! {
        #[test]
        fn no_claim_body_makes_the_parser_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&body);
        }

        #[test]
        fn no_buyer_makes_validation_panic(fields in proptest::collection::hash_map(
            prop_oneof![Just("name"), Just("legalName"), Just("taxCode"), Just("address"), Just("email"), Just("phone")],
            "\\PC{0,60}", 0..6)) {
            let body = serde_json::json!({"buyer": fields});
            if let Ok(buyer) = parse(body.to_string().as_bytes()) {
                let _ = buyer.validate();
            }
        }
    }
}
