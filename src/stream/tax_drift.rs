//! `invoice tax-drift`: re-reads the compacted merchant CDC topic and compares each
//! merchant's latest record with the stored TaxInfo. Drift means the stored state is not
//! what the topic says (a missed or mis-applied event); the runbook's fix is to replay the
//! topic (`offsets reset --to-earliest`), which is safe: unchanged taxes are skipped and
//! older positions never overwrite newer ones.

use std::collections::{BTreeMap, HashMap};

use rdkafka::message::Message as _;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::tax_info::{CdcChange, CdcPosition};
use crate::events::merchant_cdc::{self, MerchantEvent};

/// A merchant's latest state according to the topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// Canonical tax of the latest upsert (`None` until one is seen).
    pub tax: Option<Value>,
    /// Deleted by the latest event.
    pub deleted: bool,
    /// Its position.
    pub position: CdcPosition,
}

/// What is stored for a merchant.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Canonical tax.
    pub tax: Value,
    /// Soft-deleted.
    pub deleted: bool,
}

/// How the stored state differs from the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drift {
    /// Same tax, same deleted state.
    InSync,
    /// Both live, different tax.
    TaxDiffers,
    /// The topic has the merchant, the store does not.
    MissingInStore,
    /// The topic says deleted, the store has it live.
    DeletedInTopic,
    /// The topic has it live, the store has it deleted.
    DeletedInStore,
    /// The store has it, the topic has no record (compacted away, or never from CDC).
    NotInTopic,
}

/// Compares one merchant (pure).
pub fn compare(latest: Option<&Latest>, stored: Option<&Stored>) -> Drift {
    match (latest, stored) {
        (None, None) => Drift::InSync,
        (None, Some(_)) => Drift::NotInTopic,
        (Some(l), None) if l.deleted => Drift::InSync,
        (Some(_), None) => Drift::MissingInStore,
        (Some(l), Some(s)) => match (l.deleted, s.deleted) {
            (true, true) => Drift::InSync,
            (true, false) => Drift::DeletedInTopic,
            (false, true) => Drift::DeletedInStore,
            (false, false) => match &l.tax {
                Some(tax) if *tax == s.tax => Drift::InSync,
                // Only placeholder updates since the topic's start: nothing to compare.
                None => Drift::InSync,
                Some(_) => Drift::TaxDiffers,
            },
        },
    }
}

/// Folds one event into the latest states (log order; older positions never win, like the
/// stream's own rule).
pub fn fold(
    latest: &mut HashMap<String, Latest>,
    merchant_id: &str,
    change: &CdcChange,
    position: CdcPosition,
) {
    let entry = latest.get(merchant_id);
    if entry.is_some_and(|e| position.is_older_than(&e.position)) {
        return;
    }
    let tax_before = entry.and_then(|e| e.tax.clone());
    let next = match change {
        CdcChange::Upsert { tax, .. } => Latest { tax: Some(tax.clone()), deleted: false, position },
        CdcChange::Unchanged { .. } => Latest { tax: tax_before, deleted: false, position },
        CdcChange::Delete => Latest { tax: tax_before, deleted: true, position },
    };
    latest.insert(merchant_id.to_owned(), next);
}

/// One report line.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Merchant.
    pub merchant_id: String,
    /// The difference.
    pub drift: Drift,
    /// The topic's tax.
    pub topic_tax: Option<Value>,
    /// The stored tax.
    pub stored_tax: Option<Value>,
}

/// Reads `topic` to its current end and compares with the store; only merchant `only` if
/// given. Returns every merchant's finding (in-sync ones included) and the records read.
pub async fn check(
    db: &PgPool,
    kafka: &crate::config::Kafka,
    topic: &str,
    only: Option<&str>,
) -> anyhow::Result<(Vec<Finding>, u64)> {
    let (kafka, topic_name) = (kafka.clone(), topic.to_owned());
    let (latest, read) = tokio::task::spawn_blocking(move || read_topic(&kafka, &topic_name)).await??;
    let rows: Vec<(String, Value, bool)> =
        sqlx::query_as("SELECT merchant_id, tax, deleted_at IS NOT NULL FROM merchant_tax_info")
            .fetch_all(db)
            .await?;
    let stored: HashMap<String, Stored> =
        rows.into_iter().map(|(id, tax, deleted)| (id, Stored { tax, deleted })).collect();
    let mut ids: BTreeMap<&str, ()> = BTreeMap::new();
    for id in latest.keys().chain(stored.keys()) {
        if only.is_none_or(|o| o == id) {
            ids.insert(id, ());
        }
    }
    let findings = ids
        .keys()
        .map(|id| {
            let (l, s) = (latest.get(*id), stored.get(*id));
            Finding {
                merchant_id: (*id).to_owned(),
                drift: compare(l, s),
                topic_tax: l.and_then(|l| l.tax.clone()),
                stored_tax: s.map(|s| s.tax.clone()),
            }
        })
        .collect();
    Ok((findings, read))
}

fn read_topic(kafka: &crate::config::Kafka, topic: &str) -> anyhow::Result<(HashMap<String, Latest>, u64)> {
    let mut latest = HashMap::new();
    let read = super::scan::to_end(
        kafka,
        topic,
        |low, _| low,
        |message| {
            if let Ok(MerchantEvent::Change(change)) = merchant_cdc::parse(message.key(), message.payload()) {
                fold(&mut latest, &change.merchant_id, &change.change, change.position);
            }
        },
    )?;
    Ok((latest, read))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pos(lsn: i64) -> CdcPosition {
        CdcPosition { lsn: Some(lsn), ts_ms: None }
    }

    #[test]
    fn the_latest_position_wins_and_placeholders_keep_the_tax() {
        let mut latest = HashMap::new();
        fold(&mut latest, "M-1", &CdcChange::Upsert { op: 'c', tax: json!({"a": 1}) }, pos(10));
        fold(&mut latest, "M-1", &CdcChange::Upsert { op: 'u', tax: json!({"a": 2}) }, pos(30));
        // An older event read later never wins.
        fold(&mut latest, "M-1", &CdcChange::Upsert { op: 'u', tax: json!({"a": 3}) }, pos(20));
        fold(&mut latest, "M-1", &CdcChange::Unchanged { op: 'u' }, pos(40));
        assert_eq!(latest["M-1"].tax, Some(json!({"a": 2})));
        fold(&mut latest, "M-1", &CdcChange::Delete, pos(50));
        assert!(latest["M-1"].deleted);
    }

    #[test]
    fn every_difference_has_its_name() {
        let live = |tax: Value| Latest { tax: Some(tax), deleted: false, position: pos(1) };
        let stored = |tax: Value, deleted| Stored { tax, deleted };
        assert_eq!(compare(Some(&live(json!(1))), Some(&stored(json!(1), false))), Drift::InSync);
        assert_eq!(compare(Some(&live(json!(1))), Some(&stored(json!(2), false))), Drift::TaxDiffers);
        assert_eq!(compare(Some(&live(json!(1))), None), Drift::MissingInStore);
        assert_eq!(compare(Some(&live(json!(1))), Some(&stored(json!(1), true))), Drift::DeletedInStore);
        let gone = Latest { tax: None, deleted: true, position: pos(2) };
        assert_eq!(compare(Some(&gone), Some(&stored(json!(1), false))), Drift::DeletedInTopic);
        assert_eq!(compare(Some(&gone), None), Drift::InSync);
        assert_eq!(compare(None, Some(&stored(json!(1), false))), Drift::NotInTopic);
    }
}
