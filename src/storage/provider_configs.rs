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

/// First key of the two-key advisory lock serialising one merchant's configuration edits
/// (the second is a hash of the merchant id); the two-key space keeps it apart from the
/// single-key locks (outbox leader) and the worker-id namespace.
const CONFIG_LOCK_NAMESPACE: i32 = 0x1_1406;

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
    // Serialises concurrent edits of one merchant's configuration, the first one included
    // (there is no live row to lock yet: two first PUTs would both insert).
    sqlx::query("SELECT pg_advisory_xact_lock($2, hashtext($1))")
        .bind(merchant_id)
        .bind(CONFIG_LOCK_NAMESPACE)
        .execute(&mut *tx)
        .await?;
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

/// `(id, merchant, ciphertext, nonce, key id)` of a provider configuration.
type SealedRow = (i64, String, Vec<u8>, Vec<u8>, String);

/// What a rewrap re-sealed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    /// Provider configuration rows (live and replaced).
    pub configs: u64,
    /// Invoice config snapshots (an invoice's own, or one shared by newer invoices).
    pub invoices: u64,
    /// Rows whose credentials could not be opened with any configured key (left as they are).
    pub unopenable: u64,
}

/// Re-seals, under the keyring's current key, every stored credential sealed with another
/// key: provider configurations and the snapshots copied for invoices, inline or shared (same
/// plaintext, same AAD, a fresh nonce), in batches of `batch`, so the old key can then be
/// dropped (R13).
pub async fn rewrap(pool: &PgPool, keyring: &Keyring, batch: i64) -> Result<Rewrapped, StorageError> {
    let current = keyring.current_key_id().to_owned();
    let mut done = Rewrapped::default();
    let mut after = 0i64;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<SealedRow> = sqlx::query_as(
            "SELECT id, merchant_id, credentials_ciphertext, credentials_nonce, key_id FROM provider_config
             WHERE key_id <> $1 AND id > $2 ORDER BY id LIMIT $3 FOR UPDATE",
        )
        .bind(&current)
        .bind(after)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        for (id, merchant_id, ciphertext, nonce, key_id) in &rows {
            let aad = provider_config_aad(merchant_id, *id);
            let sealed = crate::crypto::Sealed {
                key_id: key_id.clone(),
                nonce: nonce.clone(),
                ciphertext: ciphertext.clone(),
            };
            let Ok(plain) = keyring.open(&sealed, &aad) else {
                done.unopenable += 1;
                continue;
            };
            let fresh = keyring.seal(plain.expose(), &aad);
            sqlx::query(
                "UPDATE provider_config SET credentials_ciphertext = $2, credentials_nonce = $3, key_id = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(&fresh.ciphertext)
            .bind(&fresh.nonce)
            .bind(&fresh.key_id)
            .execute(&mut *tx)
            .await?;
            done.configs += 1;
        }
        tx.commit().await?;
        match rows.last() {
            Some(last) if rows.len() as i64 == batch => after = last.0,
            _ => break,
        }
    }
    // Only the sealing changes; the snapshot's content (what is sent to the provider) stays
    // what it was when the invoice was created. The shared snapshots of newer invoices are
    // resealed in place: their digest is their identifier, not a checksum of the current text.
    let inline = reseal_snapshots::<i64>(
        pool,
        keyring,
        batch,
        "SELECT id, merchant_id, config_snapshot FROM invoice
         WHERE config_snapshot->'credentials'->>'keyId' <> $1 AND id > $2 ORDER BY id LIMIT $3 FOR UPDATE",
        "UPDATE invoice SET config_snapshot = jsonb_set(config_snapshot, '{credentials}', $2) WHERE id = $1",
    )
    .await?;
    let shared = reseal_snapshots::<Vec<u8>>(
        pool,
        keyring,
        batch,
        "SELECT digest, merchant_id, snapshot FROM invoice_config_snapshot
         WHERE snapshot->'credentials'->>'keyId' <> $1 AND digest > $2 ORDER BY digest LIMIT $3 FOR UPDATE",
        "UPDATE invoice_config_snapshot SET snapshot = jsonb_set(snapshot, '{credentials}', $2) WHERE digest = $1",
    )
    .await?;
    done.invoices += inline.0 + shared.0;
    done.unopenable += inline.1 + shared.1;
    Ok(done)
}

/// Reseals, a batch per transaction, the snapshots `select` finds: `(key, merchant,
/// snapshot)` rows sealed under another key than `$1`, keyed above `$2` (in key order), at
/// most `$3`; `update` writes each back (`$1` its key, `$2` its new `credentials`). Returns
/// `(resealed, unopenable)`.
async fn reseal_snapshots<K>(
    pool: &PgPool,
    keyring: &Keyring,
    batch: i64,
    select: &str,
    update: &str,
) -> Result<(u64, u64), StorageError>
where
    K: for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + for<'q> sqlx::Encode<'q, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + Default
        + Clone
        + Send
        + Sync
        + Unpin,
{
    let current = keyring.current_key_id();
    let (mut resealed, mut unopenable) = (0, 0);
    let mut after = K::default();
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(K, String, Value)> =
            sqlx::query_as(select).bind(current).bind(after.clone()).bind(batch).fetch_all(&mut *tx).await?;
        for (key, merchant_id, snapshot) in &rows {
            let Some(credentials) = reseal_snapshot(keyring, merchant_id, snapshot) else {
                unopenable += 1;
                continue;
            };
            sqlx::query(update).bind(key.clone()).bind(&credentials).execute(&mut *tx).await?;
            resealed += 1;
        }
        tx.commit().await?;
        match rows.last() {
            Some(last) if rows.len() as i64 == batch => after = last.0.clone(),
            _ => break,
        }
    }
    Ok((resealed, unopenable))
}

/// The `credentials` member of `snapshot` (of an invoice of `merchant_id`) sealed again under
/// the keyring's current key: same plaintext, same AAD, a fresh nonce. `None`: no configured
/// key opens it (or it is not a sealed credential).
fn reseal_snapshot(keyring: &Keyring, merchant_id: &str, snapshot: &Value) -> Option<Value> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let credentials = &snapshot["credentials"];
    let key_id = credentials["keyId"].as_str()?;
    let nonce = credentials["nonce"].as_str().and_then(|n| b64.decode(n).ok())?;
    let ciphertext = credentials["ciphertext"].as_str().and_then(|c| b64.decode(c).ok())?;
    let config_id = snapshot["configId"].as_str().and_then(|s| s.parse::<i64>().ok())?;
    let aad = provider_config_aad(merchant_id, config_id);
    let sealed = crate::crypto::Sealed { key_id: key_id.to_owned(), nonce, ciphertext };
    let plain = keyring.open(&sealed, &aad).ok()?;
    let fresh = keyring.seal(plain.expose(), &aad);
    Some(
        json!({"keyId": fresh.key_id, "nonce": b64.encode(&fresh.nonce), "ciphertext": b64.encode(&fresh.ciphertext)}),
    )
}
