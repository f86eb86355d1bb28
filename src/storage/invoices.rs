//! Operator reads of invoices: the merchant-scoped list, one invoice with its config
//! snapshot (credentials masked), its audit trail.

use serde_json::{json, Value};
use sqlx::PgPool;

use super::StorageError;

/// Filters of the list. `merchants = None` means every merchant (an admin).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Merchants the caller may see; `None` for all.
    pub merchants: Option<Vec<String>>,
    /// One order.
    pub order_id: Option<String>,
    /// One status.
    pub status: Option<String>,
    /// Ids below this one (the cursor: newest first).
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: i64,
}

const SUMMARY: &str = "jsonb_build_object('id', id::text, 'merchantId', merchant_id, 'orderId', order_id,
    'kind', kind, 'replaces', replaces_invoice_id::text, 'status', status, 'issuanceMode', issuance_mode,
    'buyerKind', buyer_kind, 'totalAmount', total_amount::text, 'currency', currency, 'paidAt', paid_at,
    'provider', invoice_snapshot(config_snapshot, config_snapshot_digest)->>'provider', 'invoiceNo', provider_invoice_no, 'series', provider_series,
    'issuedAt', issued_at, 'createdAt', created_at, 'updatedAt', updated_at)";

/// One page, newest first; returns the items and the id to continue below (if more).
pub async fn list(pool: &PgPool, filter: &ListFilter) -> Result<(Vec<Value>, Option<i64>), StorageError> {
    let rows: Vec<(i64, Value)> = list_query("", filter).build_query_as().fetch_all(pool).await?;
    let more = rows.len() as i64 > filter.limit;
    let items: Vec<(i64, Value)> = rows.into_iter().take(filter.limit as usize).collect();
    let next = if more { items.last().map(|(id, _)| *id) } else { None };
    Ok((items.into_iter().map(|(_, v)| v).collect(), next))
}

/// The statement of [`list`] for `filter`, after `prefix` (tests pass `EXPLAIN` to check its
/// plan): `(id, summary)` rows, a page and one more.
pub fn list_query(prefix: &str, filter: &ListFilter) -> sqlx::QueryBuilder<'static, sqlx::Postgres> {
    // Built per filter set so each shape gets its own plan on the index it needs
    // (`invoice_merchant_recent`, `invoice_by_order`, the primary key). A merchant is compared
    // with `=`, never `= ANY(..)`: Postgres reads `(merchant_id, id DESC)` in id order only for
    // one value, and with an array it fetched all of the merchant's invoices and sorted them
    // for every page. Several merchants are read one by one (`LATERAL`), each up to a page.
    let page = filter.limit + 1;
    let mut query = sqlx::QueryBuilder::new(prefix);
    let several = match filter.merchants.as_deref() {
        Some([_]) | None => None,
        Some(many) => Some(many),
    };
    match several {
        Some(merchants) => {
            query
                .push(format!("SELECT id, {SUMMARY} FROM (SELECT l.* FROM unnest("))
                .push_bind(merchants.to_vec())
                .push("::text[]) AS m(merchant_id), LATERAL (SELECT * FROM invoice WHERE merchant_id = m.merchant_id AND deleted_at IS NULL");
        }
        None => {
            query.push(format!("SELECT id, {SUMMARY} FROM invoice WHERE deleted_at IS NULL"));
            if let Some([one]) = filter.merchants.as_deref() {
                query.push(" AND merchant_id = ").push_bind(one.clone());
            }
        }
    }
    if let Some(order_id) = &filter.order_id {
        query.push(" AND order_id = ").push_bind(order_id.clone());
    }
    if let Some(status) = &filter.status {
        query.push(" AND status = ").push_bind(status.clone());
    }
    if let Some(before) = filter.before_id {
        query.push(" AND id < ").push_bind(before);
    }
    if several.is_some() {
        query.push(" ORDER BY id DESC LIMIT ").push_bind(page).push(") l) invoice");
    }
    query.push(" ORDER BY id DESC LIMIT ").push_bind(page);
    query
}

/// One invoice in full, with its merchant (for the scope check). The snapshot's sealed
/// credentials are replaced by `***`: not even ciphertext leaves the service.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<(String, Value)>, StorageError> {
    let row: Option<(String, Value, Value)> = sqlx::query_as(&format!(
        "SELECT merchant_id, {SUMMARY} || jsonb_build_object('buyer', buyer, 'lines', lines,
             'totalNet', total_net::text, 'totalVat', total_vat::text, 'transactionUuid', transaction_uuid,
             'attempts', attempts, 'nextAttemptAt', next_attempt_at, 'lastError', last_error,
             'reservationCode', reservation_code, 'taxAuthorityCode', tax_authority_code,
             'providerStatus', provider_status, 'cancelReason', cancel_reason,
             'replacementReason', replacement_reason),
             COALESCE(invoice_snapshot(config_snapshot, config_snapshot_digest), 'null'::jsonb)
         FROM invoice WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(merchant, mut invoice, snapshot)| {
        if let Some(object) = invoice.as_object_mut() {
            object.insert("configSnapshot".into(), mask_snapshot(snapshot));
        }
        (merchant, invoice)
    }))
}

/// The snapshot with its credentials masked.
pub fn mask_snapshot(mut snapshot: Value) -> Value {
    if let Some(credentials) = snapshot.get_mut("credentials") {
        *credentials = json!("***");
    }
    snapshot
}

/// The audit trail of an invoice, oldest first.
pub async fn audit(pool: &PgPool, id: i64, limit: i64) -> Result<Vec<Value>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_build_object('at', created_at, 'event', event_type, 'outcome', outcome, 'actor', actor,
             'reason', reason, 'before', before, 'after', after)
         FROM audit_log WHERE invoice_id = $1 ORDER BY id LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
