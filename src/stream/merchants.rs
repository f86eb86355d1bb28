//! One batch of `merchant.cdc.v1` messages of one partition. The task keeps every merchant it
//! has seen in a cache, so an update that changes nothing is decided without any I/O (the
//! batch still advances its offset).

use std::collections::HashMap;

use rdkafka::message::{Message, OwnedMessage};
use sqlx::PgConnection;

use super::deadletter::dead_letter;
use super::{BatchError, Deps};
use crate::domain::tax_info::{decide_cdc, CdcChange, CdcOutcome, StoredTax};
use crate::events::merchant_cdc::{self, MerchantEvent};
use crate::storage::decisions::{insert_audits, insert_outbox, NewAudit};
use crate::storage::merchants::{self, TaxWrite};

/// The batch's pending write of `merchant_id`, created on its first change.
fn write_of_merchant<'a>(
    writes: &'a mut Vec<TaxWrite>,
    index: &mut HashMap<String, usize>,
    merchant_id: &str,
) -> &'a mut TaxWrite {
    let at = *index.entry(merchant_id.to_owned()).or_insert_with(|| {
        writes.push(TaxWrite::new(merchant_id));
        writes.len() - 1
    });
    &mut writes[at]
}

/// Stored TaxInfo per merchant as this task knows it (`None`: known to be absent). Valid only
/// while the task owns the partition: merchants are keyed by id, so no one else writes them.
pub type Cache = HashMap<String, Option<StoredTax>>;

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct Summary {
    /// CDC outcomes.
    pub outcomes: Vec<CdcOutcome>,
    /// Tombstones ignored.
    pub tombstones: u64,
    /// Dead letters.
    pub dead_lettered: u64,
    /// Cache entries to install once the transaction committed (never before: a rolled-back
    /// batch must leave the cache as the database is).
    pub cache_updates: Vec<(String, Option<StoredTax>)>,
    /// Merchants to drop from the cache once the transaction committed: their stored row
    /// was newer than the cache said.
    pub cache_evictions: Vec<String>,
}

/// The audit row of a TaxInfo change (the outcome is the event type's verb).
fn tax_audit(
    merchant_id: &str,
    event_type: &'static str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
    op: char,
    position: &crate::domain::tax_info::CdcPosition,
) -> NewAudit {
    NewAudit {
        entity: "tax_info",
        entity_id: merchant_id.to_owned(),
        invoice_id: None,
        merchant_id: Some(merchant_id.to_owned()),
        order_id: None,
        event_type,
        outcome: event_type.trim_start_matches("tax_info.").to_owned(),
        before,
        after,
        actor: "cdc".into(),
        reason: Some(format!("op={op} lsn={:?} ts_ms={:?}", position.lsn, position.ts_ms)),
    }
}

/// The stored TaxInfo of `merchant_id` as of this point of the batch: its changes so far
/// (`view`), else the task's cache.
fn known<'a>(
    view: &'a HashMap<String, Option<StoredTax>>,
    cache: &'a Cache,
    merchant_id: &str,
) -> Option<&'a StoredTax> {
    match view.get(merchant_id) {
        Some(stored) => stored.as_ref(),
        None => cache.get(merchant_id).and_then(Option::as_ref),
    }
}

/// Decides and writes one batch inside `tx`.
pub async fn process(
    deps: &Deps,
    tx: &mut PgConnection,
    partition: i32,
    messages: &[OwnedMessage],
    cache: &Cache,
) -> Result<Summary, BatchError> {
    let topic = deps.topics.merchant_cdc.as_str();
    let parsed: Vec<(&OwnedMessage, Result<MerchantEvent, crate::events::Invalid>)> =
        messages.iter().map(|m| (m, merchant_cdc::parse(m.key(), m.payload()))).collect();
    // Load the merchants this task has not seen yet, in one query.
    let misses: Vec<String> = {
        let mut ids: Vec<String> = parsed
            .iter()
            .filter_map(|(_, e)| match e {
                Ok(MerchantEvent::Change(c)) if !cache.contains_key(&c.merchant_id) => {
                    Some(c.merchant_id.clone())
                }
                _ => None,
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let mut view: HashMap<String, Option<StoredTax>> = HashMap::new();
    if !misses.is_empty() {
        let loaded = merchants::load(tx, &misses).await?;
        for id in misses {
            let stored = loaded.get(&id).map(|r| r.stored.clone());
            view.insert(id, stored);
        }
    }
    let mut summary = Summary::default();
    // Each merchant's net change, written once per batch, in first-seen order.
    let mut writes: Vec<TaxWrite> = Vec::new();
    let mut write_of: HashMap<String, usize> = HashMap::new();
    let mut audits = Vec::new();
    let mut dead = Vec::new();
    for (message, event) in &parsed {
        let change = match event {
            Ok(MerchantEvent::Tombstone) => {
                summary.tombstones += 1;
                continue;
            }
            Ok(MerchantEvent::Change(change)) => change,
            Err(reason) => {
                tracing::warn!(topic, partition, offset = message.offset(), error = %reason.sanitized(),
                    "[handleMerchantCDC] invalid message, dead-lettered");
                dead.push(dead_letter(&deps.topics.deadletter, message, reason));
                summary.dead_lettered += 1;
                continue;
            }
        };
        let merchant_id = change.merchant_id.as_str();
        let outcome = decide_cdc(&change.change, &change.position, known(&view, cache, merchant_id));
        // A copy only for the outcomes that change something (a skip, the common case, reads
        // the cache in place).
        let stored = match outcome {
            CdcOutcome::SkipUnchanged | CdcOutcome::Stale => None,
            _ => known(&view, cache, merchant_id).cloned(),
        };
        let op = match &change.change {
            CdcChange::Upsert { op, .. } | CdcChange::Unchanged { op } => *op,
            CdcChange::Delete => 'd',
        };
        match outcome {
            CdcOutcome::Apply => {
                let (CdcChange::Upsert { tax, .. }, Some(info)) = (&change.change, &change.tax_info) else {
                    return Err(BatchError::Bug("an applied CDC change without tax"));
                };
                write_of_merchant(&mut writes, &mut write_of, merchant_id).apply(
                    change.merchant_name.clone(),
                    tax.clone(),
                    info.clone(),
                    change.position,
                    message.offset(),
                );
                audits.push(tax_audit(
                    merchant_id,
                    "tax_info.applied",
                    stored.as_ref().filter(|s| !s.deleted).map(|s| s.tax.clone()),
                    Some(tax.clone()),
                    op,
                    &change.position,
                ));
                let new = StoredTax { tax: tax.clone(), position: change.position, deleted: false };
                view.insert(merchant_id.to_owned(), Some(new));
                tracing::info!(merchantId = %merchant_id, partition, op = %op, "[handleMerchantCDC] TaxInfo applied");
            }
            CdcOutcome::Delete => {
                write_of_merchant(&mut writes, &mut write_of, merchant_id)
                    .delete(change.position, message.offset());
                audits.push(tax_audit(
                    merchant_id,
                    "tax_info.deleted",
                    stored.as_ref().map(|s| s.tax.clone()),
                    None,
                    op,
                    &change.position,
                ));
                let new = stored.map(|s| StoredTax { position: change.position, deleted: true, ..s });
                view.insert(merchant_id.to_owned(), new);
                tracing::info!(
                    merchantId = %merchant_id,
                    partition,
                    "[handleMerchantCDC] op=d TaxInfo soft-deleted"
                );
            }
            CdcOutcome::SkipUnchanged => {
                tracing::info!(
                    merchantId = %merchant_id,
                    partition,
                    "[handleMerchantCDC] op={op} tax unchanged, SKIP"
                );
            }
            CdcOutcome::Stale => {
                tracing::info!(merchantId = %merchant_id, partition, op = %op, lsn = ?change.position.lsn,
                    ts_ms = ?change.position.ts_ms, "[handleMerchantCDC] event older than the stored TaxInfo, SKIP");
            }
            CdcOutcome::AlreadyDeleted => {
                if stored.is_none() {
                    // Never seen: keep the delete's position so an older create replayed
                    // later stays stale.
                    write_of_merchant(&mut writes, &mut write_of, merchant_id)
                        .delete(change.position, message.offset());
                    let marker = StoredTax {
                        tax: serde_json::Value::Object(serde_json::Map::new()),
                        position: change.position,
                        deleted: true,
                    };
                    view.insert(merchant_id.to_owned(), Some(marker));
                }
                tracing::info!(
                    merchantId = %merchant_id,
                    partition,
                    "[handleMerchantCDC] op=d for an absent TaxInfo, SKIP"
                );
            }
        }
        summary.outcomes.push(outcome);
    }
    let refused = merchants::write_batch(tx, topic, partition, &writes).await?;
    if !refused.is_empty() {
        // What this task believed of them was out of date: no audit of a change that did
        // not happen, and they are read again next time rather than skipped against a
        // cache that no longer matches the database.
        for merchant_id in &refused {
            tracing::warn!(merchantId = %merchant_id, partition,
                "[handleMerchantCDC] stored TaxInfo is newer than this task knew (written by another consumer); change not applied");
            view.remove(merchant_id);
        }
        audits.retain(|a| a.merchant_id.as_ref().is_none_or(|m| !refused.contains(m)));
        summary.cache_evictions = refused.into_iter().collect();
    }
    insert_audits(tx, &audits).await?;
    insert_outbox(tx, &dead).await?;
    // Everything loaded or changed here (misses included, so the next skip needs no query).
    summary.cache_updates = view.into_iter().collect();
    Ok(summary)
}
