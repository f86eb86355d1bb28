//! A merchant's provider configuration as operators write and read it. An edit soft-deletes
//! the live row and inserts a new one (invoices keep the version they snapshotted); the
//! credentials are sealed with the row's AAD; reads never return them.

use serde_json::{json, Value};
use sqlx::PgPool;

use super::decisions::{insert_audits, NewAudit};
use super::seed::provider_config_aad;
use super::StorageError;
use crate::crypto::Keyring;

/// A configuration to store (validated by the caller).
#[derive(Debug, Clone)]
pub struct NewConfig<'a> {
    /// Provider name.
    pub provider: &'a str,
    /// API endpoint.
    pub endpoint: &'a str,
    /// Seller tax code at the provider.
    pub supplier_tax_code: &'a str,
    /// Template.
    pub template_code: &'a str,
    /// Series.
    pub series: &'a str,
}

const MASKED: &str = "jsonb_build_object('id', id::text, 'merchantId', merchant_id, 'provider', provider,
    'endpoint', endpoint, 'supplierTaxCode', supplier_tax_code, 'templateCode', template_code,
    'series', series, 'keyId', key_id, 'createdBy', created_by, 'createdAt', created_at)";

/// The live configuration of `merchant_id`, without credentials, and the credential names.
pub async fn live(pool: &PgPool, merchant_id: &str) -> Result<Option<Value>, StorageError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT {MASKED} FROM provider_config WHERE merchant_id = $1 AND deleted_at IS NULL"
    ))
    .bind(merchant_id)
    .fetch_optional(pool)
    .await?)
}

/// Replaces `merchant_id`'s live configuration; returns the new row (masked).
/// `credentials_json` is sealed here and never stored or logged in clear.
#[allow(clippy::too_many_arguments)]
pub async fn put(
    pool: &PgPool,
    keyring: &Keyring,
    id: i64,
    merchant_id: &str,
    config: &NewConfig<'_>,
    credentials_json: &[u8],
    masked_credentials: &Value,
    actor: &str,
) -> Result<Value, StorageError> {
    let sealed = keyring.seal(credentials_json, &provider_config_aad(merchant_id, id));
    let mut tx = pool.begin().await?;
    // Serialises concurrent edits of one merchant's configuration.
    let before: Option<Value> = sqlx::query_scalar(&format!(
        "UPDATE provider_config SET deleted_at = now()
         WHERE merchant_id = $1 AND deleted_at IS NULL RETURNING {MASKED}"
    ))
    .bind(merchant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let after: Value = sqlx::query_scalar(&format!(
        "INSERT INTO provider_config (id, merchant_id, provider, endpoint, supplier_tax_code, template_code,
             series, credentials_ciphertext, credentials_nonce, key_id, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {MASKED}"
    ))
    .bind(id)
    .bind(merchant_id)
    .bind(config.provider)
    .bind(config.endpoint)
    .bind(config.supplier_tax_code)
    .bind(config.template_code)
    .bind(config.series)
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .bind(&sealed.key_id)
    .bind(actor)
    .fetch_one(&mut *tx)
    .await?;
    let mut after = after;
    if let Some(object) = after.as_object_mut() {
        object.insert("credentials".into(), masked_credentials.clone());
    }
    insert_audits(
        &mut tx,
        &[NewAudit {
            entity: "provider_config",
            entity_id: merchant_id.to_owned(),
            invoice_id: None,
            merchant_id: Some(merchant_id.to_owned()),
            order_id: None,
            event_type: if before.is_some() { "provider_config_replaced" } else { "provider_config_created" },
            outcome: "LIVE".into(),
            before,
            after: Some(json!({"config": after})),
            actor: actor.to_owned(),
            reason: None,
        }],
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// Stored TaxInfo of `merchant_id` with the CDC position it came from.
pub async fn tax_info(pool: &PgPool, merchant_id: &str) -> Result<Option<Value>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_build_object('merchantId', merchant_id, 'merchantName', merchant_name, 'tax', tax,
             'taxCode', tax_code, 'legalName', legal_name, 'address', address, 'email', email, 'phone', phone,
             'invoiceEnabled', invoice_enabled, 'issuanceMode', issuance_mode,
             'claimWindowMinutes', claim_window_minutes, 'provider', provider,
             'deleted', deleted_at IS NOT NULL, 'deletedAt', deleted_at, 'updatedAt', updated_at,
             'source', jsonb_build_object('lsn', source_lsn::text, 'tsMs', source_ts_ms, 'topic', source_topic,
                 'partition', source_partition, 'offset', source_offset))
         FROM merchant_tax_info WHERE merchant_id = $1",
    )
    .bind(merchant_id)
    .fetch_optional(pool)
    .await?)
}
