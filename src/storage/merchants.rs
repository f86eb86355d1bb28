//! Merchant TaxInfo (from CDC) and provider configurations.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::PgConnection;

use super::StorageError;
use crate::domain::tax_info::{self, CdcPosition, StoredTax, TaxInfo};

/// A merchant's stored TaxInfo with its typed form.
#[derive(Debug, Clone, PartialEq)]
pub struct MerchantRecord {
    /// Canonical tax, position, deleted flag.
    pub stored: StoredTax,
    /// Typed form of `stored.tax` (`None` if it no longer parses, which a migration of the
    /// rules could cause; treated as unknown).
    pub info: Option<TaxInfo>,
    /// Display name.
    pub name: Option<String>,
}

/// Stored TaxInfo of `merchant_ids` (those never seen are absent).
pub async fn load(
    conn: &mut PgConnection,
    merchant_ids: &[String],
) -> Result<HashMap<String, MerchantRecord>, StorageError> {
    type Row = (String, Value, Option<i64>, Option<i64>, bool, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT merchant_id, tax, source_lsn, source_ts_ms, deleted_at IS NOT NULL, merchant_name
         FROM merchant_tax_info WHERE merchant_id = ANY($1)",
    )
    .bind(merchant_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, tax, lsn, ts_ms, deleted, name)| (id, record(tax, lsn, ts_ms, deleted, name)))
        .collect())
}

/// A stored TaxInfo row's record, with its typed form.
pub(crate) fn record(
    tax: Value,
    lsn: Option<i64>,
    ts_ms: Option<i64>,
    deleted: bool,
    name: Option<String>,
) -> MerchantRecord {
    let info = tax_info::parse(&tax).ok();
    let stored = StoredTax { tax, position: CdcPosition { lsn, ts_ms }, deleted };
    MerchantRecord { stored, info, name }
}

/// Where a CDC write came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// The conflict clause of every TaxInfo write: the second line of defence behind the task's
/// own check, so an event older than the stored state (LSN, else `ts_ms`) never overwrites it.
macro_rules! never_older_than_stored {
    () => {
        " WHERE NOT (CASE
             WHEN merchant_tax_info.source_lsn IS NOT NULL AND EXCLUDED.source_lsn IS NOT NULL
                 THEN EXCLUDED.source_lsn < merchant_tax_info.source_lsn
             WHEN merchant_tax_info.source_ts_ms IS NOT NULL AND EXCLUDED.source_ts_ms IS NOT NULL
                 THEN EXCLUDED.source_ts_ms < merchant_tax_info.source_ts_ms
             ELSE FALSE END)"
    };
}

/// Inserts or replaces a merchant's TaxInfo (and revives a deleted one).
pub async fn upsert(
    tx: &mut PgConnection,
    merchant_id: &str,
    name: Option<&str>,
    tax: &Value,
    info: &TaxInfo,
    position: &CdcPosition,
    source: Source<'_>,
) -> Result<(), StorageError> {
    let mut write = TaxWrite::new(merchant_id);
    write.apply(name.map(str::to_owned), tax.clone(), info.clone(), *position, source.offset);
    write_batch(tx, source.topic, source.partition, &[write]).await.map(drop)
}

/// The values of an applied upsert.
#[derive(Debug, Clone)]
pub struct Upserted {
    /// Canonical `tax`.
    pub tax: Value,
    /// Its typed form.
    pub info: TaxInfo,
}

/// The state one batch leaves a merchant's TaxInfo in: the net effect of the changes it
/// applied, in offset order, so the batch writes each merchant once.
#[derive(Debug, Clone)]
pub struct TaxWrite {
    /// Merchant.
    pub merchant_id: String,
    /// The last upsert applied (`None`: the batch only deleted; the stored values stay).
    pub upserted: Option<Upserted>,
    /// The last display name given (a change without one keeps the stored name).
    pub name: Option<String>,
    /// Whether the last change applied was a delete.
    pub deleted: bool,
    /// Position of the last change applied.
    pub position: CdcPosition,
    /// Offset of the last change applied.
    pub offset: i64,
}

impl TaxWrite {
    /// Nothing applied yet.
    pub fn new(merchant_id: &str) -> TaxWrite {
        TaxWrite {
            merchant_id: merchant_id.to_owned(),
            upserted: None,
            name: None,
            deleted: false,
            position: CdcPosition { lsn: None, ts_ms: None },
            offset: -1,
        }
    }

    /// An upsert (`c`, `r`, `u`) applied: it also revives a deleted merchant.
    pub fn apply(
        &mut self,
        name: Option<String>,
        tax: Value,
        info: TaxInfo,
        position: CdcPosition,
        offset: i64,
    ) {
        self.upserted = Some(Upserted { tax, info });
        if name.is_some() {
            self.name = name;
        }
        self.deleted = false;
        self.position = position;
        self.offset = offset;
    }

    /// A delete applied: the values stay, marked deleted, with the delete's position (so
    /// older events stay stale).
    pub fn delete(&mut self, position: CdcPosition, offset: i64) {
        self.deleted = true;
        self.position = position;
        self.offset = offset;
    }
}

/// Writes each merchant's net change of a batch: one statement for those with new values,
/// one for those only deleted. A merchant never seen that is deleted gets a deleted row
/// carrying the delete's position, so an older create replayed later does not bring it back.
/// Returns the merchants whose write the stored row refused as older than itself: written
/// meanwhile by someone this task does not know of (another consumer group on the same
/// database, or the same merchant under another key format, hence another partition).
pub async fn write_batch(
    tx: &mut PgConnection,
    topic: &str,
    partition: i32,
    writes: &[TaxWrite],
) -> Result<HashSet<String>, StorageError> {
    // The merchants written; the others were refused by the stored row's newer position.
    let mut written: HashSet<String> = HashSet::new();
    let (upserts, deletes): (Vec<&TaxWrite>, Vec<&TaxWrite>) =
        writes.iter().partition(|w| w.upserted.is_some());
    let upserted: Vec<&Upserted> = upserts.iter().filter_map(|w| w.upserted.as_ref()).collect();
    if !upserts.is_empty() {
        let text = |f: fn(&TaxInfo) -> &Option<String>| -> Vec<Option<&str>> {
            upserted.iter().map(|u| f(&u.info).as_deref()).collect()
        };
        let rows: Vec<(String,)> = sqlx::query_as(concat!(
            "INSERT INTO merchant_tax_info (merchant_id, merchant_name, tax, tax_code, legal_name, address, email,
                 phone, invoice_enabled, issuance_mode, claim_window_minutes, provider, source_lsn, source_ts_ms,
                 source_topic, source_partition, source_offset, deleted_at)
             SELECT m, n, t, tc, ln, a, e, ph, ie, im, cw, p, lsn, ts, $17, $18, o, CASE WHEN d THEN now() END
             FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::text[], $6::text[], $7::text[],
                 $8::text[], $9::bool[], $10::text[], $11::int[], $12::text[], $13::bigint[], $14::bigint[],
                 $15::bigint[], $16::bool[]) AS u(m, n, t, tc, ln, a, e, ph, ie, im, cw, p, lsn, ts, o, d)
             ON CONFLICT (merchant_id) DO UPDATE SET
                 merchant_name = COALESCE(EXCLUDED.merchant_name, merchant_tax_info.merchant_name),
                 tax = EXCLUDED.tax, tax_code = EXCLUDED.tax_code, legal_name = EXCLUDED.legal_name,
                 address = EXCLUDED.address, email = EXCLUDED.email, phone = EXCLUDED.phone,
                 invoice_enabled = EXCLUDED.invoice_enabled, issuance_mode = EXCLUDED.issuance_mode,
                 claim_window_minutes = EXCLUDED.claim_window_minutes, provider = EXCLUDED.provider,
                 source_lsn = EXCLUDED.source_lsn, source_ts_ms = EXCLUDED.source_ts_ms,
                 source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
                 source_offset = EXCLUDED.source_offset, updated_at = now(), deleted_at = EXCLUDED.deleted_at
             ", never_older_than_stored!(), " RETURNING merchant_id"),
        )
        .bind(upserts.iter().map(|w| w.merchant_id.as_str()).collect::<Vec<_>>())
        .bind(upserts.iter().map(|w| w.name.as_deref()).collect::<Vec<_>>())
        .bind(upserted.iter().map(|u| &u.tax).collect::<Vec<_>>())
        .bind(text(|i| &i.tax_code))
        .bind(text(|i| &i.legal_name))
        .bind(text(|i| &i.address))
        .bind(text(|i| &i.email))
        .bind(text(|i| &i.phone))
        .bind(upserted.iter().map(|u| u.info.invoice_enabled).collect::<Vec<_>>())
        .bind(upserted.iter().map(|u| u.info.issuance_mode.as_str()).collect::<Vec<_>>())
        .bind(upserted.iter().map(|u| u.info.claim_window_minutes as i32).collect::<Vec<_>>())
        .bind(text(|i| &i.provider))
        .bind(upserts.iter().map(|w| w.position.lsn).collect::<Vec<_>>())
        .bind(upserts.iter().map(|w| w.position.ts_ms).collect::<Vec<_>>())
        .bind(upserts.iter().map(|w| w.offset).collect::<Vec<_>>())
        .bind(upserts.iter().map(|w| w.deleted).collect::<Vec<_>>())
        .bind(topic)
        .bind(partition)
        .fetch_all(&mut *tx)
        .await?;
        written.extend(rows.into_iter().map(|(id,)| id));
    }
    let deletes: Vec<&TaxWrite> = deletes.into_iter().filter(|w| w.deleted).collect();
    if !deletes.is_empty() {
        let rows: Vec<(String,)> = sqlx::query_as(concat!(
            "INSERT INTO merchant_tax_info (merchant_id, tax, source_lsn, source_ts_ms, source_topic, source_partition,
                 source_offset, deleted_at)
             SELECT m, '{}'::jsonb, lsn, ts, $4, $5, o, now()
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $6::bigint[]) AS d(m, lsn, ts, o)
             ON CONFLICT (merchant_id) DO UPDATE SET
                 deleted_at = now(), updated_at = now(), source_lsn = EXCLUDED.source_lsn,
                 source_ts_ms = EXCLUDED.source_ts_ms, source_topic = EXCLUDED.source_topic,
                 source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset
             ", never_older_than_stored!(), " RETURNING merchant_id"),
        )
        .bind(deletes.iter().map(|w| w.merchant_id.as_str()).collect::<Vec<_>>())
        .bind(deletes.iter().map(|w| w.position.lsn).collect::<Vec<_>>())
        .bind(deletes.iter().map(|w| w.position.ts_ms).collect::<Vec<_>>())
        .bind(topic)
        .bind(partition)
        .bind(deletes.iter().map(|w| w.offset).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        written.extend(rows.into_iter().map(|(id,)| id));
    }
    Ok(writes
        .iter()
        .filter(|w| (w.upserted.is_some() || w.deleted) && !written.contains(&w.merchant_id))
        .map(|w| w.merchant_id.clone())
        .collect())
}

/// A live provider configuration, as snapshotted onto invoices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfigRow {
    /// Id (part of the credentials' AAD).
    pub id: i64,
    /// Provider name.
    pub provider: String,
    /// API endpoint.
    pub endpoint: String,
    /// Seller tax code at the provider.
    pub supplier_tax_code: String,
    /// Template code.
    pub template_code: String,
    /// Series.
    pub series: String,
    /// Sealed credentials.
    pub ciphertext: Vec<u8>,
    /// Their nonce.
    pub nonce: Vec<u8>,
    /// Key id.
    pub key_id: String,
}

/// Live provider configurations of `merchant_ids`.
pub async fn live_provider_configs(
    conn: &mut PgConnection,
    merchant_ids: &[String],
) -> Result<HashMap<String, ProviderConfigRow>, StorageError> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, i64, String, String, String, String, String, Vec<u8>, Vec<u8>, String)> =
        sqlx::query_as(
            "SELECT merchant_id, id, provider, endpoint, supplier_tax_code, template_code, series,
                credentials_ciphertext, credentials_nonce, key_id
         FROM provider_config WHERE merchant_id = ANY($1) AND deleted_at IS NULL",
        )
        .bind(merchant_ids)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.0,
                ProviderConfigRow {
                    id: r.1,
                    provider: r.2,
                    endpoint: r.3,
                    supplier_tax_code: r.4,
                    template_code: r.5,
                    series: r.6,
                    ciphertext: r.7,
                    nonce: r.8,
                    key_id: r.9,
                },
            )
        })
        .collect())
}
