//! `merchant.cdc.v1`: Debezium change events of the merchant table (JSON converter, with
//! or without `schemas.enable`). `metadata` is an object or a string holding one (Debezium
//! emits `jsonb` as a string); its `tax` member is the merchant's TaxInfo.

use serde_json::{Map, Value};

use super::{json_kind, Invalid};
use crate::domain::tax_info::{self, CdcChange, CdcPosition, TaxInfo};

/// A parsed change event.
#[derive(Debug, Clone, PartialEq)]
pub enum MerchantEvent {
    /// A null value (log-compaction tombstone): ignored.
    Tombstone,
    /// A change of one merchant.
    Change(Box<MerchantChange>),
}

/// What Debezium puts in an unchanged TOASTed column (`metadata` over about 2 KB) of an
/// update when the table's REPLICA IDENTITY is not FULL.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// One merchant's change.
#[derive(Debug, Clone, PartialEq)]
pub struct MerchantChange {
    /// The merchant id (row `id`, as text).
    pub merchant_id: String,
    /// Row `name`.
    pub merchant_name: Option<String>,
    /// Upsert with canonical tax, or delete.
    pub change: CdcChange,
    /// Typed tax information of an upsert.
    pub tax_info: Option<TaxInfo>,
    /// Source position.
    pub position: CdcPosition,
}

fn unwrap_schema(value: &Value) -> &Value {
    // With `schemas.enable=true` the converter wraps everything as {schema, payload}.
    match value {
        Value::Object(map) if map.contains_key("payload") && map.contains_key("schema") => &map["payload"],
        other => other,
    }
}

fn id_text(value: &Value, field: &str) -> Result<String, Invalid> {
    match value {
        Value::String(s) if !s.trim().is_empty() && s.len() <= 64 => Ok(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        other => Err(Invalid::field(
            field,
            format!("expected a non-empty id (string ≤ 64 or integer), found {}", json_kind(other)),
        )),
    }
}

fn integer(map: &Map<String, Value>, field: &str) -> Option<i64> {
    match map.get(field) {
        Some(Value::Number(n)) => n.as_i64(),
        // Some connectors stringify LSNs.
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

/// Parses one message (`key` is used when a delete carries no `before` row).
pub fn parse(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<MerchantEvent, Invalid> {
    let Some(value) = value else { return Ok(MerchantEvent::Tombstone) };
    let json: Value = serde_json::from_slice(value).map_err(|e| Invalid(format!("not JSON: {e}")))?;
    if super::contains_nul(&json) {
        return Err(Invalid("a string contains the NUL character (U+0000)".into()));
    }
    let envelope = unwrap_schema(&json);
    let envelope = match envelope {
        Value::Null => return Ok(MerchantEvent::Tombstone),
        Value::Object(map) => map,
        other => {
            return Err(Invalid(format!("expected a Debezium envelope object, found {}", json_kind(other))))
        }
    };
    let op = match envelope.get("op") {
        Some(Value::String(op)) if matches!(op.as_str(), "c" | "u" | "d" | "r") => {
            op.chars().next().unwrap_or('?')
        }
        Some(Value::String(op)) => {
            return Err(Invalid::field("op", format!("unknown op `{op}` (expected c, u, d or r)")))
        }
        None | Some(Value::Null) => return Err(Invalid::field("op", "required")),
        Some(other) => {
            return Err(Invalid::field("op", format!("expected a string, found {}", json_kind(other))))
        }
    };
    let source = match envelope.get("source") {
        Some(Value::Object(source)) => Some(source),
        _ => None,
    };
    let position = CdcPosition {
        lsn: source.and_then(|s| integer(s, "lsn")),
        ts_ms: source.and_then(|s| integer(s, "ts_ms")).or_else(|| integer(envelope, "ts_ms")),
    };
    let row_field = if op == 'd' { "before" } else { "after" };
    let row = match envelope.get(row_field) {
        Some(Value::Object(row)) => Some(row),
        None | Some(Value::Null) if op == 'd' => None,
        None | Some(Value::Null) => return Err(Invalid::field(row_field, format!("required for op `{op}`"))),
        Some(other) => {
            return Err(Invalid::field(row_field, format!("expected an object, found {}", json_kind(other))))
        }
    };
    let merchant_id = match row.and_then(|r| r.get("id")) {
        Some(id) => id_text(id, &format!("{row_field}.id"))?,
        None => {
            // A delete under REPLICA IDENTITY DEFAULT may carry no row: use the key {"id": …}.
            let key: Value = key.and_then(|k| serde_json::from_slice(k).ok()).ok_or_else(|| {
                Invalid::field(format!("{row_field}.id"), "required (and the key has no id)")
            })?;
            // Postgres text refuses NUL: let through, it would fail the batch for ever.
            if super::contains_nul(&key) {
                return Err(Invalid("the key contains the NUL character (U+0000)".into()));
            }
            match unwrap_schema(&key) {
                Value::Object(k) => id_text(k.get("id").unwrap_or(&Value::Null), "key.id")?,
                other => id_text(other, "key")?,
            }
        }
    };
    if op == 'd' {
        return Ok(MerchantEvent::Change(Box::new(MerchantChange {
            merchant_id,
            merchant_name: None,
            change: CdcChange::Delete,
            tax_info: None,
            position,
        })));
    }
    let row = row.ok_or_else(|| Invalid::field("after", "required"))?;
    let merchant_name = match row.get("name") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    // Borrowed where the message already holds an object; only a string is parsed into a value
    // of its own.
    let empty = Value::Object(Map::new());
    let from_string: Value;
    let metadata = match row.get("metadata") {
        // The column did not change and Debezium did not send it: neither did the tax.
        Some(Value::String(text)) if text == UNAVAILABLE_VALUE => {
            return Ok(MerchantEvent::Change(Box::new(MerchantChange {
                merchant_id,
                merchant_name,
                change: CdcChange::Unchanged { op },
                tax_info: None,
                position,
            })))
        }
        None | Some(Value::Null) => &empty,
        Some(Value::String(text)) => {
            from_string = serde_json::from_str(text)
                .map_err(|e| Invalid::field("after.metadata", format!("a string that is not JSON ({e})")))?;
            // The envelope's check saw only the escape (`\\u0000`); decoded here, it is a NUL.
            if super::contains_nul(&from_string) {
                return Err(Invalid::field("after.metadata", "a string contains the NUL character (U+0000)"));
            }
            &from_string
        }
        Some(obj @ Value::Object(_)) => obj,
        Some(other) => {
            return Err(Invalid::field(
                "after.metadata",
                format!("expected an object or a JSON string, found {}", json_kind(other)),
            ))
        }
    };
    let tax = match metadata {
        Value::Object(m) => match m.get("tax") {
            None | Some(Value::Null) => &empty,
            Some(tax) => tax,
        },
        other => {
            return Err(Invalid::field(
                "after.metadata",
                format!("expected a JSON object, found {}", json_kind(other)),
            ))
        }
    };
    let tax_info = tax_info::parse(tax).map_err(|e| Invalid(format!("after.{e}")))?;
    Ok(MerchantEvent::Change(Box::new(MerchantChange {
        merchant_id,
        merchant_name,
        change: CdcChange::Upsert { op, tax: tax_info::canonicalize(tax) },
        tax_info: Some(tax_info),
        position,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tax_info::IssuanceMode;
    use proptest::prelude::*;
    use serde_json::json;

    fn tax() -> Value {
        json!({"taxCode": "0100109106", "legalName": "Công ty TNHH ABC", "invoiceEnabled": true,
               "issuanceMode": "claim_window", "claimWindowMinutes": 1440, "provider": "viettel"})
    }

    fn envelope(op: &str, metadata: Value) -> Value {
        json!({"before": null, "after": {"id": "M-1", "name": "Shop", "metadata": metadata, "updated_at": 1},
               "source": {"lsn": 1234, "ts_ms": 1700}, "op": op, "ts_ms": 1800})
    }

    fn change(v: &Value) -> MerchantChange {
        match parse(Some(br#"{"id":"M-1"}"#), Some(v.to_string().as_bytes())).unwrap() {
            MerchantEvent::Change(c) => *c,
            MerchantEvent::Tombstone => panic!("tombstone"),
        }
    }

    #[test]
    fn metadata_as_object_and_as_string_give_the_same_change() {
        let as_object = change(&envelope("u", json!({"tax": tax()})));
        let as_string = change(&envelope("u", json!(json!({"tax": tax()}).to_string())));
        assert_eq!(as_object, as_string);
        assert_eq!(as_object.merchant_id, "M-1");
        assert_eq!(as_object.position, CdcPosition { lsn: Some(1234), ts_ms: Some(1700) });
        assert_eq!(as_object.tax_info.unwrap().issuance_mode, IssuanceMode::ClaimWindow);
    }

    #[test]
    fn the_schema_wrapper_is_accepted() {
        let inner = envelope("c", json!({"tax": tax()}));
        let wrapped = json!({"schema": {"type": "struct"}, "payload": inner});
        assert_eq!(change(&wrapped), change(&inner));
        let key = json!({"schema": {}, "payload": {"id": 7}});
        let delete = json!({"schema": {}, "payload": {"before": null, "after": null, "op": "d", "ts_ms": 5}});
        match parse(Some(key.to_string().as_bytes()), Some(delete.to_string().as_bytes())).unwrap() {
            MerchantEvent::Change(c) => {
                assert_eq!(c.merchant_id, "7");
                assert_eq!(c.change, CdcChange::Delete);
                assert_eq!(c.position, CdcPosition { lsn: None, ts_ms: Some(5) });
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tombstones_are_ignored() {
        assert_eq!(parse(Some(b"{}"), None).unwrap(), MerchantEvent::Tombstone);
        assert_eq!(
            parse(Some(b"{}"), Some(br#"{"schema":{},"payload":null}"#)).unwrap(),
            MerchantEvent::Tombstone
        );
    }

    #[test]
    fn the_topic_file_example_parses() {
        let spec: Value = serde_json::from_str(include_str!("../../topics/merchant.cdc.v1.json")).unwrap();
        assert!(matches!(
            parse(None, Some(spec["example"].to_string().as_bytes())),
            Ok(MerchantEvent::Change(_))
        ));
    }

    #[test]
    fn bad_events_have_precise_reasons() {
        let bad = |v: Value| parse(None, Some(v.to_string().as_bytes())).unwrap_err().0;
        assert_eq!(bad(envelope("x", json!({}))), "op: unknown op `x` (expected c, u, d or r)");
        assert_eq!(bad(json!({"after": {"id": "M"}})), "op: required");
        assert!(
            bad(envelope("u", json!("{not json"))).starts_with("after.metadata: a string that is not JSON")
        );
        assert!(bad(envelope("u", json!({"tax": {"issuanceMode": "weekly"}})))
            .starts_with("after.metadata.tax.issuanceMode"));
        assert_eq!(bad(json!({"op": "u", "after": null})), "after: required for op `u`");
        assert!(bad(json!({"op": "u", "after": {"name": "x"}})).starts_with("after.id: required"));
        assert!(parse(None, Some(b"nope")).unwrap_err().0.starts_with("not JSON"));
    }

    #[test]
    fn a_nul_hidden_in_the_key_or_in_metadata_as_a_string_is_refused() {
        // Escaped once more than the envelope: only decoding the inner text shows the NUL.
        let mut t = tax();
        t["legalName"] = json!("A\u{0}B");
        let hidden = envelope("u", json!(json!({"tax": t}).to_string()));
        let error = parse(Some(br#"{"id":"M-1"}"#), Some(hidden.to_string().as_bytes())).unwrap_err().0;
        assert_eq!(error, "after.metadata: a string contains the NUL character (U+0000)");
        // A delete without its row takes the merchant id from the key.
        let delete = json!({"before": null, "after": null, "op": "d", "ts_ms": 5}).to_string();
        let error = parse(Some(br#"{"id":"M\u0000"}"#), Some(delete.as_bytes())).unwrap_err().0;
        assert_eq!(error, "the key contains the NUL character (U+0000)");
        assert!(parse(Some(br#"{"id":"M-1"}"#), Some(delete.as_bytes())).is_ok());
    }

    #[test]
    fn an_unavailable_toasted_metadata_means_unchanged() {
        let c = change(&envelope("u", json!(UNAVAILABLE_VALUE)));
        assert_eq!(c.change, CdcChange::Unchanged { op: 'u' });
    }

    #[test]
    fn a_merchant_without_tax_is_disabled() {
        let c = change(&envelope("c", json!({"other": 1})));
        assert_eq!(c.change, CdcChange::Upsert { op: 'c', tax: json!({}) });
        assert!(!c.tax_info.unwrap().invoice_enabled);
    }

    proptest! {
        #[test]
        fn no_input_panics(key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                           value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512))) {
            let _ = parse(key.as_deref(), value.as_deref());
        }
    }
}
