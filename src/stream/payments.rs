//! One batch of `payment.succeeded.v1` messages of one partition: parse, gather the facts in
//! one query, decide every payment in offset order, and write everything with the offset in
//! one statement.

use std::collections::hash_map::Entry;
use std::collections::HashSet;

use base64::Engine as _;
use chrono::Utc;
use rdkafka::message::{Message, OwnedMessage};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{json, Value};
use sqlx::PgConnection;

use super::deadletter::dead_letter;
use super::{BatchError, Deps};
use crate::domain::buyer::{Buyer, BuyerKind, ValidBuyer};
use crate::domain::claim::{token_hash, vietnam};
use crate::domain::decision::{self, BuyerSource, Decision, Facts, Merchant, Payment};
use crate::domain::rules;
use crate::events::invoice_events::{rfc3339, ClaimMember, EventType, InvoiceEvent};
use crate::events::{payment, Invalid};
use crate::storage::decisions::{
    self, BatchFacts, NewAudit, NewClaim, NewDecision, NewInvoice, NewOutbox, OffsetMove, Writes,
};
use crate::storage::merchants::ProviderConfigRow;

/// What a committed batch did, for metrics and logs after the commit.
#[derive(Debug, Default)]
pub struct Summary {
    /// `(outcome, reason)` per decision.
    pub decisions: Vec<(&'static str, &'static str)>,
    /// Dead letters.
    pub dead_lettered: u64,
    /// Claims opened.
    pub claims_opened: u64,
    /// Log lines to emit once committed: `(order id, merchant id, outcome, reason, invoice id)`.
    pub log: Vec<(String, String, &'static str, &'static str, Option<i64>)>,
}

/// The idempotency key at the provider, derived from the invoice id (DOMAIN §7): a UUID-shaped
/// (version 8) string, deterministic so it never changes for an invoice.
pub fn transaction_uuid(invoice_id: i64) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("invoice-transaction:{invoice_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

fn config_snapshot(
    config: &ProviderConfigRow,
    merchant_name: Option<&str>,
    tax: &crate::domain::tax_info::TaxInfo,
    payment: &Payment,
    wording: rules::ConsumerWording,
) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let legal_day = payment.paid_at.with_timezone(&vietnam()).date_naive();
    let rule = rules::rules_for(legal_day).ok();
    json!({
        "configId": config.id.to_string(),
        "provider": config.provider,
        "endpoint": config.endpoint,
        "supplierTaxCode": config.supplier_tax_code,
        "templateCode": config.template_code,
        "series": config.series,
        "credentials": {"keyId": config.key_id, "nonce": b64.encode(&config.nonce), "ciphertext": b64.encode(&config.ciphertext)},
        "seller": {
            "name": merchant_name,
            // A TaxInfo without a tax code: the seller is who the provider account issues for.
            "taxCode": tax.tax_code.as_deref().unwrap_or(&config.supplier_tax_code),
            "legalName": tax.legal_name, "address": tax.address,
            "email": tax.email, "phone": tax.phone,
        },
        "ruleSet": rule.map(|r| json!({"from": r.from.to_string(), "basis": r.basis, "consumerBuyerName": wording.name_on(legal_day)})),
    })
}

/// Decides one batch and writes it with its offset move, in two round trips: the facts, then
/// one statement that moves the offset and writes every row. `None`: the offset had moved
/// (another owner of the partition); nothing was written.
pub async fn process(
    deps: &Deps,
    conn: &mut PgConnection,
    partition: i32,
    messages: &[OwnedMessage],
    offset: OffsetMove<'_>,
) -> Result<Option<Summary>, BatchError> {
    let topic = deps.topics.payment.as_str();
    let parsed: Vec<(&OwnedMessage, Result<Payment, Invalid>)> = messages
        .iter()
        .map(|m| {
            let result = match m.payload() {
                Some(value) => payment::parse(value),
                None => Err(Invalid("a payment message needs a value (found a tombstone)".into())),
            };
            (m, result)
        })
        .collect();
    let valid: Vec<&Payment> = parsed.iter().filter_map(|(_, p)| p.as_ref().ok()).collect();

    // The facts of the whole batch, in one query.
    let event_ids: Vec<String> = valid.iter().map(|p| p.event_id.clone()).collect();
    let merchant_ids: Vec<String> = {
        let set: HashSet<&str> = valid.iter().map(|p| p.merchant_id.as_str()).collect();
        set.into_iter().map(str::to_owned).collect()
    };
    let pair_merchants: Vec<String> = valid.iter().map(|p| p.merchant_id.clone()).collect();
    let pair_orders: Vec<String> = valid.iter().map(|p| p.order_id.clone()).collect();
    // Read without the offset row's lock: a second owner reading the same facts is fenced
    // out of every write by the offset move of the write statement.
    let BatchFacts {
        mut decided,
        mut created,
        mut active,
        mut requests,
        merchants: merchants_stored,
        configs,
    } = decisions::facts(conn, &event_ids, &pair_merchants, &pair_orders, &merchant_ids).await?;

    let mut writes = Writes::default();
    let mut summary = Summary::default();
    let now = Utc::now();
    // The snapshot depends on the merchant and the rule set only: built once per batch.
    let mut snapshots: std::collections::HashMap<(String, chrono::NaiveDate), std::sync::Arc<RawValue>> =
        std::collections::HashMap::new();
    for (message, result) in &parsed {
        let payment = match result {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(
                    topic, partition, offset = message.offset(), error = %reason.sanitized(),
                    "[handlePaymentSuccess] invalid message, dead-lettered"
                );
                writes.outbox.push(dead_letter(&deps.topics.deadletter, message, reason));
                summary.dead_lettered += 1;
                continue;
            }
        };
        let record = merchants_stored.get(&payment.merchant_id);
        let merchant = match record {
            None => Merchant::Unknown,
            Some(r) if r.stored.deleted => Merchant::Deleted,
            Some(r) => match &r.info {
                Some(info) => Merchant::Known(info),
                None => Merchant::Unknown,
            },
        };
        let key = (payment.merchant_id.clone(), payment.order_id.clone());
        let request = requests.get(&key).and_then(|(id, stored)| {
            let buyer: Buyer = serde_json::from_value(stored.clone()).ok()?;
            buyer.validate().ok().map(|b| (*id, b, stored.clone()))
        });
        let config = configs.get(&payment.merchant_id);
        let facts = Facts {
            payment,
            merchant,
            provider_configured: config.is_some(),
            pending_request: request.as_ref().map(|(_, b, _)| b),
            // An event is decided if its skip was recorded, or if it created this pair's
            // invoice. An event id that upstream reused for another order is decided anew
            // for it: the answer must not depend on which batch each one falls in.
            event_already_decided: decided.contains(&payment.event_id)
                || created.get(&key).is_some_and(|events| events.contains(&payment.event_id)),
            active_invoice_exists: active.contains(&key),
        };
        let decision = decision::decide(&facts);
        let offset = message.offset();
        match decision {
            Decision::Skip(reason) => {
                if reason != decision::SkipReason::DuplicateEvent {
                    writes.decisions.push(NewDecision {
                        event_id: payment.event_id.clone(),
                        merchant_id: payment.merchant_id.clone(),
                        order_id: payment.order_id.clone(),
                        outcome: "skipped",
                        skip_reason: Some(reason.as_str()),
                        invoice_id: None,
                        partition,
                        offset,
                    });
                    decided.insert(payment.event_id.clone());
                }
                summary.decisions.push(("skipped", reason.as_str()));
                summary.log.push((
                    payment.order_id.clone(),
                    payment.merchant_id.clone(),
                    "skipped",
                    reason.as_str(),
                    None,
                ));
            }
            Decision::Create(plan) => {
                let (Merchant::Known(tax), Some(config)) = (merchant, config) else {
                    // decide() creates only for a known merchant with a configuration.
                    return Err(BatchError::Bug(
                        "decision created an invoice without merchant or configuration",
                    ));
                };
                let invoice_id = deps.ids.next_id().map_err(BatchError::Ids)?;
                let legal_day = payment.paid_at.with_timezone(&vietnam()).date_naive();
                let snapshot = match snapshots.entry((payment.merchant_id.clone(), legal_day)) {
                    Entry::Occupied(e) => e.get().clone(),
                    Entry::Vacant(e) => {
                        let value = config_snapshot(
                            config,
                            record.and_then(|r| r.name.as_deref()),
                            tax,
                            payment,
                            deps.settings.consumer_wording,
                        );
                        e.insert(std::sync::Arc::from(
                            to_raw_value(&value).map_err(|_| BatchError::Bug("unserialisable snapshot"))?,
                        ))
                        .clone()
                    }
                };
                let buyer_json = plan
                    .buyer
                    .as_ref()
                    .map(|b: &ValidBuyer| serde_json::to_value(&b.buyer).unwrap_or(Value::Null));
                writes.invoices.push(NewInvoice {
                    id: invoice_id,
                    merchant_id: payment.merchant_id.clone(),
                    order_id: payment.order_id.clone(),
                    status: plan.status.as_str(),
                    issuance_mode: plan.mode.as_str(),
                    payment_event_id: payment.event_id.clone(),
                    paid_at: payment.paid_at,
                    currency: payment.currency.clone(),
                    buyer: buyer_json,
                    buyer_kind: plan.buyer_kind.as_str(),
                    lines: to_raw_value(&payment.lines)
                        .map_err(|_| BatchError::Bug("unserialisable lines"))?,
                    total_net: payment.totals.net,
                    total_vat: payment.totals.vat,
                    total_amount: payment.totals.gross,
                    provider_config_id: config.id,
                    config_snapshot: snapshot,
                    transaction_uuid: transaction_uuid(invoice_id),
                    next_attempt_at: (plan.status == decision::InvoiceStatus::Queued).then_some(now),
                });
                let event = |event_type: EventType, claim: Option<ClaimMember>| InvoiceEvent {
                    event_id: uuid::Uuid::new_v4().to_string(),
                    event_type,
                    occurred_at: rfc3339(now),
                    invoice_id: invoice_id.to_string(),
                    order_id: payment.order_id.clone(),
                    merchant_id: payment.merchant_id.clone(),
                    status: plan.status.as_str(),
                    claim,
                    provider: None,
                };
                let mut outbox = vec![event(EventType::Created, None)];
                if let Some(deadline) = plan.claim_deadline {
                    let token = crate::crypto::random_token();
                    writes.claims.push(NewClaim {
                        id: deps.ids.next_id().map_err(BatchError::Ids)?,
                        invoice_id,
                        merchant_id: payment.merchant_id.clone(),
                        order_id: payment.order_id.clone(),
                        token_hash: token_hash(&token).to_vec(),
                        deadline,
                    });
                    outbox.push(event(
                        EventType::ClaimOpened,
                        Some(ClaimMember { token, deadline: rfc3339(deadline) }),
                    ));
                    summary.claims_opened += 1;
                }
                for e in outbox {
                    let has_secret = e.claim.is_some();
                    writes.outbox.push(NewOutbox {
                        event_id: uuid::Uuid::parse_str(&e.event_id).unwrap_or_else(|_| uuid::Uuid::new_v4()),
                        topic: deps.topics.events.clone(),
                        key: Some(payment.order_id.as_bytes().to_vec()),
                        payload: Some(serde_json::to_vec(&e).unwrap_or_default()),
                        headers: json!({"type": e.event_type.as_str()}),
                        has_secret,
                    });
                }
                writes.audits.push(NewAudit {
                    entity: "invoice",
                    entity_id: invoice_id.to_string(),
                    invoice_id: Some(invoice_id),
                    merchant_id: Some(payment.merchant_id.clone()),
                    order_id: Some(payment.order_id.clone()),
                    event_type: EventType::Created.as_str(),
                    outcome: plan.status.as_str().to_owned(),
                    before: None,
                    after: Some(json!({
                        "status": plan.status.as_str(),
                        "buyerKind": plan.buyer_kind.as_str(),
                        "totalAmount": payment.totals.gross.to_string(),
                        "claimDeadline": plan.claim_deadline.map(rfc3339),
                        "paymentEventId": payment.event_id,
                        "source": {"topic": topic, "partition": partition, "offset": offset},
                    })),
                    actor: "stream".into(),
                    reason: Some(match plan.buyer_source {
                        BuyerSource::None if plan.buyer_kind == BuyerKind::Consumer => {
                            "consumer buyer".into()
                        }
                        BuyerSource::None => "buyer without tax identity".into(),
                        BuyerSource::Payment => "buyer tax code on the payment".into(),
                        BuyerSource::Request => "invoice request received before the payment".into(),
                    }),
                });
                if let (BuyerSource::Request, Some((request_id, _, stored))) = (plan.buyer_source, &request) {
                    writes.request_joins.push((*request_id, invoice_id, stored.clone()));
                    requests.remove(&key);
                }
                // No decision row: the invoice is the decision's record (it names the event),
                // and its audit row says where the event was read. One row and one index entry
                // less per payment.
                created.entry(key.clone()).or_default().push(payment.event_id.clone());
                active.insert(key);
                let outcome =
                    if plan.status == decision::InvoiceStatus::Queued { "queued" } else { "pending_claim" };
                summary.decisions.push((outcome, ""));
                summary.log.push((
                    payment.order_id.clone(),
                    payment.merchant_id.clone(),
                    outcome,
                    "",
                    Some(invoice_id),
                ));
            }
        }
    }
    debug_assert_eq!(offset.topic, topic);
    Ok(writes.write(conn, offset).await?.then_some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_uuids_are_stable_uuid_shaped_and_distinct() {
        let a = transaction_uuid(7_302_145_867_481_088_001);
        assert_eq!(a, transaction_uuid(7_302_145_867_481_088_001));
        assert_ne!(a, transaction_uuid(7_302_145_867_481_088_002));
        let parsed = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
        assert_eq!(a.len(), 36);
    }
}
