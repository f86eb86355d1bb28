//! Merchant TaxInfo (from CDC) and provider configurations.

use std::collections::HashMap;

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
        .map(|(id, tax, lsn, ts_ms, deleted, name)| {
            let info = tax_info::parse(&tax).ok();
            let stored = StoredTax { tax, position: CdcPosition { lsn, ts_ms }, deleted };
            (id, MerchantRecord { stored, info, name })
        })
        .collect())
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
    sqlx::query(
        "INSERT INTO merchant_tax_info (merchant_id, merchant_name, tax, tax_code, legal_name, address, email,
             phone, invoice_enabled, issuance_mode, claim_window_minutes, provider, source_lsn, source_ts_ms,
             source_topic, source_partition, source_offset)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (merchant_id) DO UPDATE SET
             merchant_name = COALESCE(EXCLUDED.merchant_name, merchant_tax_info.merchant_name),
             tax = EXCLUDED.tax, tax_code = EXCLUDED.tax_code, legal_name = EXCLUDED.legal_name,
             address = EXCLUDED.address, email = EXCLUDED.email, phone = EXCLUDED.phone,
             invoice_enabled = EXCLUDED.invoice_enabled, issuance_mode = EXCLUDED.issuance_mode,
             claim_window_minutes = EXCLUDED.claim_window_minutes, provider = EXCLUDED.provider,
             source_lsn = EXCLUDED.source_lsn, source_ts_ms = EXCLUDED.source_ts_ms,
             source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
             source_offset = EXCLUDED.source_offset, updated_at = now(), deleted_at = NULL
         -- Second line of defence behind the task's own check: never overwrite newer state.
         WHERE NOT (CASE
             WHEN merchant_tax_info.source_lsn IS NOT NULL AND EXCLUDED.source_lsn IS NOT NULL
                 THEN EXCLUDED.source_lsn < merchant_tax_info.source_lsn
             WHEN merchant_tax_info.source_ts_ms IS NOT NULL AND EXCLUDED.source_ts_ms IS NOT NULL
                 THEN EXCLUDED.source_ts_ms < merchant_tax_info.source_ts_ms
             ELSE FALSE END)",
    )
    .bind(merchant_id)
    .bind(name)
    .bind(tax)
    .bind(&info.tax_code)
    .bind(&info.legal_name)
    .bind(&info.address)
    .bind(&info.email)
    .bind(&info.phone)
    .bind(info.invoice_enabled)
    .bind(info.issuance_mode.as_str())
    .bind(info.claim_window_minutes as i32)
    .bind(&info.provider)
    .bind(position.lsn)
    .bind(position.ts_ms)
    .bind(source.topic)
    .bind(source.partition)
    .bind(source.offset)
    .execute(tx)
    .await?;
    Ok(())
}

/// Soft-deletes a merchant's TaxInfo (CDC `d`), keeping the delete's position so older
/// events stay stale. A merchant never seen gets a deleted row carrying that position, so an
/// older create replayed later does not bring it back.
pub async fn soft_delete(
    tx: &mut PgConnection,
    merchant_id: &str,
    position: &CdcPosition,
    source: Source<'_>,
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO merchant_tax_info (merchant_id, tax, source_lsn, source_ts_ms, source_topic, source_partition,
             source_offset, deleted_at)
         VALUES ($1, '{}'::jsonb, $2, $3, $4, $5, $6, now())
         ON CONFLICT (merchant_id) DO UPDATE SET
             deleted_at = now(), updated_at = now(), source_lsn = EXCLUDED.source_lsn,
             source_ts_ms = EXCLUDED.source_ts_ms, source_topic = EXCLUDED.source_topic,
             source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset
         WHERE NOT (CASE
             WHEN merchant_tax_info.source_lsn IS NOT NULL AND EXCLUDED.source_lsn IS NOT NULL
                 THEN EXCLUDED.source_lsn < merchant_tax_info.source_lsn
             WHEN merchant_tax_info.source_ts_ms IS NOT NULL AND EXCLUDED.source_ts_ms IS NOT NULL
                 THEN EXCLUDED.source_ts_ms < merchant_tax_info.source_ts_ms
             ELSE FALSE END)",
    )
    .bind(merchant_id)
    .bind(position.lsn)
    .bind(position.ts_ms)
    .bind(source.topic)
    .bind(source.partition)
    .bind(source.offset)
    .execute(tx)
    .await?;
    Ok(())
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
