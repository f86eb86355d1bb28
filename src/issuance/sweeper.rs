//! Postgres is the truth, Redis only delivers (SPEC §1.2): every worker periodically (and at
//! start-up) expires claims past their deadline and re-enqueues every due, unfinished invoice
//! (QUEUED, ISSUING whose lease ended, SUBMITTED due for a lookup). Enqueue is a no-op for an
//! order whose job is live, so this is idempotent and safe to run in every process; a Redis
//! that lost everything loses no invoice.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Deps;

/// Claims expired per transaction.
const CLAIM_PAGE: i64 = 500;
/// Invoices read per page.
const DUE_PAGE: i64 = 2_000;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Claims expired.
    pub claims_expired: u64,
    /// Due invoices seen.
    pub due: u64,
    /// Jobs created for them (the rest were live already).
    pub enqueued: u64,
    /// Pending invoice requests joined (or refused) late.
    pub requests_joined: u64,
    /// Webhook ids forgotten (older than [`WEBHOOK_IDS_KEPT_SECONDS`]).
    pub webhook_ids_forgotten: u64,
}

/// How long a webhook id is remembered for dedupe: a week. A replay of a captured request
/// is refused on its 5-minute timestamp tolerance, but a sender's own retry of a delivery
/// we processed (its answer lost) is signed afresh with the same id, and Standard Webhooks
/// senders retry for up to 75 h; forgotten after a day, such a retry took effect twice.
pub const WEBHOOK_IDS_KEPT_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
/// Webhook ids forgotten per sweep (a short delete; the next sweep continues).
const WEBHOOK_FORGET_PAGE: i64 = 10_000;

/// Requests pending longer than this are joined by the sweeper (younger ones may still be
/// joined by the stream transaction that is deciding their payment right now).
const JOIN_AFTER_SECONDS: f64 = 5.0;
/// Requests joined per sweep.
const JOIN_PAGE: i64 = 200;

/// Joins invoice requests that are pending although their order has an invoice: the request
/// arrived while the payment's batch was being decided, or while the invoice was being
/// issued. Each gets what the webhook would have given it now.
async fn join_requests(deps: &Deps) -> anyhow::Result<u64> {
    let pending = crate::storage::buyers::joinable_requests(&deps.db, JOIN_AFTER_SECONDS, JOIN_PAGE).await?;
    let mut enqueue = Vec::new();
    let mut joined = 0u64;
    for (request_id, merchant_id, order_id) in &pending {
        // One transaction per request, invoice locked before the request (the webhooks'
        // order): a sweeper holding many requests while waiting on an invoice deadlocked with
        // a webhook holding the invoice.
        match join_one(deps, *request_id, merchant_id, order_id).await {
            Ok(Some(enqueued)) => {
                joined += 1;
                if enqueued {
                    enqueue.push((order_id.clone(), merchant_id.clone()));
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(orderId = %order_id, merchantId = %merchant_id, error = format!("{error:#}"), "Cannot join a pending invoice request; next sweep retries")
            }
        }
    }
    if let Err(error) = super::enqueue(&deps.queue, &deps.metrics, &enqueue, "request_join").await {
        tracing::warn!(%error, "Cannot enqueue joined requests; the due scan will");
    }
    Ok(joined)
}

/// Joins (or refuses) one pending request; `Some(needs a job)` if it was settled, `None` if
/// someone else settled it first or it must wait (the invoice is being issued).
async fn join_one(
    deps: &Deps,
    request_id: i64,
    merchant_id: &str,
    order_id: &str,
) -> anyhow::Result<Option<bool>> {
    use crate::storage::buyers::{self, Given, Giver};
    let mut tx = deps.db.begin().await?;
    buyers::lock_original(&mut tx, merchant_id, order_id).await?;
    let Some(request) = buyers::lock_pending_request(&mut tx, request_id).await? else { return Ok(None) };
    let valid = serde_json::from_value::<crate::domain::buyer::Buyer>(request.buyer.clone())
        .ok()
        .and_then(|b| b.validate().ok());
    let Some(valid) = valid else {
        buyers::settle_request(
            &mut tx,
            request_id,
            None,
            Some("the stored buyer is no longer valid"),
            &deps.identity,
        )
        .await?;
        tx.commit().await?;
        return Ok(Some(false));
    };
    let giver = Giver {
        source: request.giver_source(),
        actor: format!("sweeper:{}", deps.identity),
        events_topic: &deps.events_topic,
        replacement_id: deps.ids.next_id()?,
        now: crate::storage::transaction_time(&mut tx).await?,
        // Judged as of when the buyer asked: it waited here only while the invoice was
        // being issued (or its payment was on its way).
        asked_at: Some(request.created_at),
    };
    let (given, claim_closed) = buyers::give(&mut tx, merchant_id, order_id, &valid, &giver).await?;
    let settled = match given {
        Given::Refused(refusal) => {
            tracing::info!(orderId = %order_id, merchantId = %merchant_id, %refusal, "Pending invoice request refused");
            buyers::settle_request(&mut tx, request_id, None, Some(&refusal.to_string()), &deps.identity)
                .await?;
            Some(false)
        }
        Given::Later { .. } | Given::NoInvoice => None,
        given => {
            buyers::settle_request(&mut tx, request_id, given.invoice_id(), None, &deps.identity).await?;
            tracing::info!(orderId = %order_id, merchantId = %merchant_id, "Pending invoice request joined");
            Some(true)
        }
    };
    tx.commit().await?;
    if claim_closed {
        deps.metrics.claim("claimed", 1);
    }
    Ok(settled)
}

/// One sweep: claim expiry, then re-enqueue of due invoices.
pub async fn sweep_once(deps: &Deps) -> anyhow::Result<Swept> {
    let mut swept = Swept::default();
    loop {
        let expired =
            crate::storage::issuance::expire_claims(&deps.db, CLAIM_PAGE, &deps.events_topic, &deps.identity)
                .await?;
        swept.claims_expired += expired.len() as u64;
        deps.metrics.claim("expired", expired.len() as u64);
        for claim in &expired {
            tracing::info!(
                orderId = %claim.order_id, merchantId = %claim.merchant_id, invoiceId = claim.invoice_id,
                queued = claim.queued, "Claim deadline passed"
            );
        }
        let queued: Vec<(String, String)> = expired
            .iter()
            .filter(|c| c.queued)
            .map(|c| (c.order_id.clone(), c.merchant_id.clone()))
            .collect();
        if let Err(error) = super::enqueue(&deps.queue, &deps.metrics, &queued, "claim_expiry").await {
            // They are QUEUED in Postgres: the due scan below or the next sweep enqueues them.
            tracing::warn!(%error, "Cannot enqueue invoices whose claim expired");
        }
        if (expired.len() as i64) < CLAIM_PAGE {
            break;
        }
    }
    swept.webhook_ids_forgotten =
        crate::storage::buyers::forget_webhooks(&deps.db, WEBHOOK_IDS_KEPT_SECONDS, WEBHOOK_FORGET_PAGE)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "Cannot forget old webhook ids; next sweep retries");
                0
            });
    // A failure here must not keep the due scan below (the safety net) from running.
    swept.requests_joined = join_requests(deps).await.unwrap_or_else(|error| {
        tracing::warn!(
            error = format!("{error:#}"),
            "Cannot join pending invoice requests; next sweep retries"
        );
        0
    });
    let mut after = 0i64;
    loop {
        let page = crate::storage::issuance::due_page(&deps.db, after, DUE_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.0;
        swept.due += page.len() as u64;
        let orders: Vec<(String, String)> = page.iter().map(|(_, o, m)| (o.clone(), m.clone())).collect();
        let new = super::enqueue(&deps.queue, &deps.metrics, &orders, super::SWEEPER).await?;
        swept.enqueued += new;
        deps.metrics.issuance.swept(new);
        if (page.len() as i64) < DUE_PAGE {
            break;
        }
    }
    if swept.enqueued > 0 {
        tracing::info!(
            due = swept.due,
            enqueued = swept.enqueued,
            "Sweeper re-enqueued due invoices Redis did not hold"
        );
    }
    Ok(swept)
}

/// Sweeps at start-up and then every interval until `stop`.
pub async fn run(deps: Arc<Deps>, stop: CancellationToken) {
    // A sweep is pages of short statements; one that waits this long is on a connection to
    // a server that is gone (no client keepalive), and would stop sweeping for good.
    let deadline = deps.settings.db_work_timeout * 5;
    loop {
        match tokio::time::timeout(deadline, sweep_once(&deps)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "Sweep failed; next one in the usual interval")
            }
            Err(_) => tracing::warn!(
                deadline_s = deadline.as_secs(),
                "Sweep got no answer in time; abandoned, next one in the usual interval"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(deps.settings.sweep_interval) => {},
            _ = stop.cancelled() => return,
        }
    }
}

/// Keeps the queue gauges (depth, DLQ depth, oldest waiting age, oldest due invoice) current.
pub async fn gauges(deps: Arc<Deps>, stop: CancellationToken) {
    let every = Duration::from_secs(5).min(deps.settings.sweep_interval);
    loop {
        match deps.queue.depths().await {
            Ok(depths) => {
                for (partition, depth) in depths.iter().enumerate() {
                    deps.metrics.issuance.depth(partition as u32, depth);
                }
            }
            Err(error) => {
                deps.metrics.issuance.queue_error("depth");
                tracing::debug!(%error, "Cannot read queue depth");
            }
        }
        if let Ok(oldest) = deps.queue.oldest_waiting().await {
            let now = crate::queue::now_ms();
            for (partition, at) in oldest.iter().enumerate() {
                let age = at.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
                deps.metrics.issuance.oldest_age(partition as u32, age);
            }
        }
        let oldest_due = crate::storage::issuance::oldest_due_seconds(&deps.db);
        if let Ok(Ok(seconds)) = tokio::time::timeout(deps.settings.db_work_timeout, oldest_due).await {
            deps.metrics.issuance.oldest_due(seconds);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.cancelled() => return,
        }
    }
}
