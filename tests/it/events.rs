//! Builders of input messages for tests.

use serde_json::{json, Value};

/// A merchant CDC envelope for `merchant_id` with `tax`, at LSN `lsn`.
pub fn cdc(op: &str, merchant_id: &str, tax: Value, lsn: i64) -> Value {
    let row = json!({"id": merchant_id, "name": format!("Shop {merchant_id}"), "metadata": json!({"tax": tax}).to_string(), "updated_at": lsn});
    let (before, after) = if op == "d" { (row, Value::Null) } else { (Value::Null, row) };
    json!({"before": before, "after": after, "source": {"lsn": lsn, "ts_ms": 1_795_000_000_000i64 + lsn}, "op": op, "ts_ms": 1_795_000_000_000i64 + lsn})
}

/// The tax member of an invoicing merchant.
pub fn tax(mode: &str) -> Value {
    json!({"taxCode": "0100109106", "legalName": "Công ty TNHH ABC", "address": "1 Tràng Tiền, Hà Nội",
           "email": "ketoan@abc.vn", "phone": "02812345678", "invoiceEnabled": true, "issuanceMode": mode,
           "claimWindowMinutes": 1440, "provider": "viettel"})
}

/// A valid payment of 1,080,000 đ.
pub fn payment(event_id: &str, order_id: &str, merchant_id: &str) -> Value {
    json!({
        "eventId": event_id, "orderId": order_id, "merchantId": merchant_id,
        "paidAt": "2026-11-24T10:15:00+07:00", "currency": "VND", "totalAmount": "1080000",
        "items": [{"sku": "SKU-1", "name": "Cà phê sữa", "unit": "ly", "quantity": "2", "unitPrice": "500000", "vatRate": "8"}],
        "buyer": {"name": "Nguyễn Văn A", "email": "a@example.vn", "phone": "0901234567", "taxCode": null, "legalName": null, "address": null}
    })
}
