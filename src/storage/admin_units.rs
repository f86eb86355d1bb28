//! Vietnam's administrative units (read side).

use serde::Serialize;
use sqlx::PgPool;

use super::StorageError;

/// A province or centrally-run municipality.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Province {
    /// Two-digit code.
    pub code: String,
    /// Official name.
    pub name: String,
    /// `province` or `municipality`.
    pub kind: String,
}

/// A commune-level unit.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Ward {
    /// Five-digit code.
    pub code: String,
    /// Official name.
    pub name: String,
    /// `ward`, `commune` or `special_zone`.
    pub kind: String,
}

/// Every province, by code.
pub async fn provinces(pool: &PgPool) -> Result<Vec<Province>, StorageError> {
    Ok(sqlx::query_as("SELECT code, name, kind FROM admin_province ORDER BY code").fetch_all(pool).await?)
}

/// The wards of a province, by code; `None` if the province does not exist.
pub async fn wards(pool: &PgPool, province_code: &str) -> Result<Option<Vec<Ward>>, StorageError> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM admin_province WHERE code = $1)")
        .bind(province_code)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    Ok(Some(
        sqlx::query_as("SELECT code, name, kind FROM admin_ward WHERE province_code = $1 ORDER BY code")
            .bind(province_code)
            .fetch_all(pool)
            .await?,
    ))
}
