//! Reference data (permissions, Vietnam's administrative units) and the development demo
//! merchant. Every statement is an idempotent upsert that writes only what differs, so a
//! second run changes nothing.

use serde::Deserialize;
use sqlx::PgPool;

use super::StorageError;
use crate::crypto::Keyring;

/// The permissions a JWT may carry (SPEC §5).
pub const PERMISSIONS: &[(&str, &str)] = &[
    ("invoice:read", "Read invoices, their audit trail and merchant tax info (own merchants)"),
    ("invoice:replay", "Re-enqueue an invoice's issuance (own merchants)"),
    ("invoice:admin", "Operate the dead-letter queue; sees every merchant"),
    ("invoice:config:read", "Read a merchant's provider configuration, credentials masked"),
    ("invoice:config:write", "Write a merchant's provider configuration"),
];

const PROVINCES_CSV: &str = include_str!("../../data/vn-admin-units/provinces.csv");
const WARDS_CSV: &str = include_str!("../../data/vn-admin-units/wards.csv");

/// The demo merchant created by `migrate --seed` (development only).
pub const DEMO_MERCHANT_ID: &str = "M-1001";
/// The demo provider configuration's fixed id, so reseeding finds it.
pub const DEMO_PROVIDER_CONFIG_ID: i64 = 1;
/// Where `invoice provider-sim` listens by default; the demo configuration points there.
pub const DEMO_PROVIDER_ENDPOINT: &str = "http://127.0.0.1:31150/services/einvoiceapplication/api";

#[derive(Debug, Deserialize)]
struct Province {
    code: String,
    name: String,
    kind: String,
}

#[derive(Debug, Deserialize)]
struct Ward {
    code: String,
    name: String,
    kind: String,
    province_code: String,
}

/// Rows written by one seeding run (0 everywhere on a second run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// Permission rows inserted or changed.
    pub permissions: u64,
    /// Province rows inserted or changed.
    pub provinces: u64,
    /// Ward rows inserted or changed.
    pub wards: u64,
    /// Demo merchant rows (tax info, provider configuration) inserted.
    pub demo: u64,
}

fn parse<T: serde::de::DeserializeOwned>(csv_text: &str) -> Result<Vec<T>, StorageError> {
    csv::Reader::from_reader(csv_text.as_bytes())
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| StorageError::Other(format!("embedded admin-unit CSV: {e}")))
}

/// Loads permissions and administrative units. Part of every `migrate`: production needs
/// them as much as development.
pub async fn reference_data(pool: &PgPool) -> Result<SeedReport, StorageError> {
    let mut tx = pool.begin().await?;
    let (codes, descriptions): (Vec<&str>, Vec<&str>) = PERMISSIONS.iter().copied().unzip();
    let permissions = sqlx::query(
        "INSERT INTO permission (code, description)
         SELECT * FROM UNNEST($1::text[], $2::text[])
         ON CONFLICT (code) DO UPDATE SET description = EXCLUDED.description
         WHERE permission.description IS DISTINCT FROM EXCLUDED.description",
    )
    .bind(&codes)
    .bind(&descriptions)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let provinces: Vec<Province> = parse(PROVINCES_CSV)?;
    let provinces_written = sqlx::query(
        "INSERT INTO admin_province (code, name, kind)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])
         ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind
         WHERE (admin_province.name, admin_province.kind) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.kind)",
    )
    .bind(provinces.iter().map(|p| p.code.as_str()).collect::<Vec<_>>())
    .bind(provinces.iter().map(|p| p.name.as_str()).collect::<Vec<_>>())
    .bind(provinces.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let wards: Vec<Ward> = parse(WARDS_CSV)?;
    let wards_written = sqlx::query(
        "INSERT INTO admin_ward (code, name, kind, province_code)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (code) DO UPDATE
           SET name = EXCLUDED.name, kind = EXCLUDED.kind, province_code = EXCLUDED.province_code
         WHERE (admin_ward.name, admin_ward.kind, admin_ward.province_code)
               IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.kind, EXCLUDED.province_code)",
    )
    .bind(wards.iter().map(|w| w.code.as_str()).collect::<Vec<_>>())
    .bind(wards.iter().map(|w| w.name.as_str()).collect::<Vec<_>>())
    .bind(wards.iter().map(|w| w.kind.as_str()).collect::<Vec<_>>())
    .bind(wards.iter().map(|w| w.province_code.as_str()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(SeedReport { permissions, provinces: provinces_written, wards: wards_written, demo: 0 })
}

/// The associated data that binds a provider configuration's credentials to its row.
pub fn provider_config_aad(merchant_id: &str, config_id: i64) -> Vec<u8> {
    format!("provider_config:{merchant_id}:{config_id}").into_bytes()
}

/// Creates the demo merchant `M-1001` (TaxInfo as if from CDC, `immediate` mode) and a
/// provider configuration pointing at the local simulator, unless they exist. Development
/// only: `migrate --seed`.
pub async fn demo_merchant(pool: &PgPool, keyring: &Keyring) -> Result<u64, StorageError> {
    let mut tx = pool.begin().await?;
    let tax = serde_json::json!({
        "address": "1 Tràng Tiền, Phường Hoàn Kiếm, Thành phố Hà Nội",
        "claimWindowMinutes": 1440,
        "email": "ketoan@demo.vn",
        "invoiceEnabled": true,
        "issuanceMode": "immediate",
        "legalName": "Công ty TNHH Demo",
        "phone": "02812345678",
        "provider": "viettel",
        "taxCode": "0100109106",
    });
    let tax_rows = sqlx::query(
        "INSERT INTO merchant_tax_info (merchant_id, merchant_name, tax, tax_code, legal_name, address,
             email, phone, invoice_enabled, issuance_mode, claim_window_minutes, provider)
         VALUES ($1, 'Demo Coffee', $2, '0100109106', 'Công ty TNHH Demo',
             '1 Tràng Tiền, Phường Hoàn Kiếm, Thành phố Hà Nội', 'ketoan@demo.vn', '02812345678',
             TRUE, 'immediate', 1440, 'viettel')
         ON CONFLICT (merchant_id) DO NOTHING",
    )
    .bind(DEMO_MERCHANT_ID)
    .bind(&tax)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM provider_config WHERE id = $1)")
        .bind(DEMO_PROVIDER_CONFIG_ID)
        .fetch_one(&mut *tx)
        .await?;
    let mut config_rows = 0;
    if !exists {
        let credentials = serde_json::json!({"username": "0100109106-509", "password": "demo-password"});
        let sealed = keyring.seal(
            credentials.to_string().as_bytes(),
            &provider_config_aad(DEMO_MERCHANT_ID, DEMO_PROVIDER_CONFIG_ID),
        );
        config_rows = sqlx::query(
            "INSERT INTO provider_config (id, merchant_id, provider, endpoint, supplier_tax_code,
                 template_code, series, credentials_ciphertext, credentials_nonce, key_id, created_by)
             VALUES ($1, $2, 'viettel', $3, '0100109106', '1/001', 'C26TAA', $4, $5, $6, 'seed')
             ON CONFLICT DO NOTHING",
        )
        .bind(DEMO_PROVIDER_CONFIG_ID)
        .bind(DEMO_MERCHANT_ID)
        .bind(DEMO_PROVIDER_ENDPOINT)
        .bind(&sealed.ciphertext)
        .bind(&sealed.nonce)
        .bind(&sealed.key_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(tax_rows + config_rows)
}
