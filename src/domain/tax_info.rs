//! A merchant's tax information (SPEC §2 `metadata.tax`) and the CDC rules that keep it
//! current: an event older than the stored position never overwrites newer state, and an
//! update whose canonical `tax` equals the stored one is skipped without a write.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// When invoices are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IssuanceMode {
    /// At payment (to a consumer unless the buyer is known); a claim may replace it.
    #[default]
    Immediate,
    /// Held until claimed or until the deadline.
    ClaimWindow,
}

impl IssuanceMode {
    /// The wire and database value.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuanceMode::Immediate => "immediate",
            IssuanceMode::ClaimWindow => "claim_window",
        }
    }
}

/// The typed tax information.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaxInfo {
    /// Seller tax code.
    pub tax_code: Option<String>,
    /// Seller legal name.
    pub legal_name: Option<String>,
    /// Seller address.
    pub address: Option<String>,
    /// Accounting email.
    pub email: Option<String>,
    /// Phone.
    pub phone: Option<String>,
    /// Whether invoices are issued at all.
    pub invoice_enabled: bool,
    /// When they are issued.
    pub issuance_mode: IssuanceMode,
    /// Claim window length.
    pub claim_window_minutes: u32,
    /// Provider name (e.g. `viettel`).
    pub provider: Option<String>,
}

/// The longest claim window kept: 31 days (longer ones are clamped).
pub const MAX_CLAIM_WINDOW_MINUTES: u64 = 60 * 24 * 31;

/// Default claim window when the merchant sets none: one day.
pub const DEFAULT_CLAIM_WINDOW_MINUTES: u32 = 1440;

/// Why a `tax` member is not acceptable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TaxInfoError {
    /// `tax` is not a JSON object.
    #[error("metadata.tax must be a JSON object")]
    NotAnObject,
    /// A member has the wrong type or value.
    #[error("metadata.tax.{field}: {reason}")]
    Field {
        /// The member.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The canonical form used for the tax-diff: object keys sorted (recursively), insignificant
/// whitespace gone (it is a value, not text), and numbers normalised so `1440`, `1440.0`
/// and `1.44e3` compare equal.
pub fn canonicalize(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for key in keys {
                if let Some(v) = map.get(key) {
                    out.insert(key.clone(), canonicalize(v));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonicalize).collect()),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                return value.clone();
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
                _ => value.clone(),
            }
        }
        other => other.clone(),
    }
}

fn string_field(map: &Map<String, Value>, field: &'static str) -> Result<Option<String>, TaxInfoError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.trim().is_empty())),
        Some(other) => {
            Err(TaxInfoError::Field { field, reason: format!("expected a string, found {}", kind(other)) })
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the typed tax information from a (canonical or not) `tax` value.
pub fn parse(tax: &Value) -> Result<TaxInfo, TaxInfoError> {
    let Value::Object(map) = tax else { return Err(TaxInfoError::NotAnObject) };
    let invoice_enabled = match map.get("invoiceEnabled") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(TaxInfoError::Field {
                field: "invoiceEnabled",
                reason: format!("expected a boolean, found {}", kind(other)),
            })
        }
    };
    let issuance_mode = match map.get("issuanceMode") {
        None | Some(Value::Null) => IssuanceMode::default(),
        Some(Value::String(s)) if s == "immediate" => IssuanceMode::Immediate,
        Some(Value::String(s)) if s == "claim_window" => IssuanceMode::ClaimWindow,
        Some(other) => {
            return Err(TaxInfoError::Field {
                field: "issuanceMode",
                reason: format!("expected \"immediate\" or \"claim_window\", found {other}"),
            })
        }
    };
    // A longer window than a month is clamped, not refused: the deadline stops at the end of
    // the sale day anyway, and refusing would throw away the rest of the update (an
    // `invoiceEnabled: false` with it). Digits in a string are read as the number.
    let claim_window_minutes = match map.get("claimWindowMinutes") {
        None | Some(Value::Null) => DEFAULT_CLAIM_WINDOW_MINUTES,
        Some(value @ (Value::Number(_) | Value::String(_))) => {
            let whole = match value {
                Value::Number(n) => n
                    .as_u64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)),
                Value::String(s)
                    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    s.parse::<u64>().ok()
                }
                _ => None,
            };
            match whole {
                Some(m) => m.min(MAX_CLAIM_WINDOW_MINUTES) as u32,
                None => {
                    return Err(TaxInfoError::Field {
                        field: "claimWindowMinutes",
                        reason: format!(
                            "expected whole minutes (0 or more), found {}",
                            value.to_string().chars().take(24).collect::<String>()
                        ),
                    })
                }
            }
        }
        Some(other) => {
            return Err(TaxInfoError::Field {
                field: "claimWindowMinutes",
                reason: format!("expected a number, found {}", kind(other)),
            })
        }
    };
    Ok(TaxInfo {
        tax_code: string_field(map, "taxCode")?,
        legal_name: string_field(map, "legalName")?,
        address: string_field(map, "address")?,
        email: string_field(map, "email")?,
        phone: string_field(map, "phone")?,
        invoice_enabled,
        issuance_mode,
        claim_window_minutes,
        provider: string_field(map, "provider")?,
    })
}

/// Where a CDC event sits in the source database's history: the Postgres LSN when the
/// connector gives one, else the source timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CdcPosition {
    /// `source.lsn`.
    pub lsn: Option<i64>,
    /// `source.ts_ms` (else the envelope's `ts_ms`).
    pub ts_ms: Option<i64>,
}

impl CdcPosition {
    /// Whether this event is strictly older than `stored`. LSNs are compared when both have
    /// one; otherwise timestamps; an event with neither cannot be ordered and is not stale.
    pub fn is_older_than(&self, stored: &CdcPosition) -> bool {
        match (self.lsn, stored.lsn) {
            (Some(a), Some(b)) => a < b,
            _ => match (self.ts_ms, stored.ts_ms) {
                (Some(a), Some(b)) => a < b,
                _ => false,
            },
        }
    }
}

/// What is stored for a merchant.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTax {
    /// Canonical `tax`.
    pub tax: Value,
    /// Position it came from.
    pub position: CdcPosition,
    /// Soft-deleted.
    pub deleted: bool,
}

/// A change event, reduced to what the rules need.
#[derive(Debug, Clone, PartialEq)]
pub enum CdcChange {
    /// `c`, `r` or `u` with the row's canonical `tax` (an absent `tax` is `{}`).
    Upsert {
        /// Debezium `op`.
        op: char,
        /// Canonical tax.
        tax: Value,
    },
    /// `d`.
    Delete,
    /// An update that did not carry the tax (Debezium's unavailable-value placeholder for an
    /// unchanged TOASTed column): the tax did not change.
    Unchanged {
        /// Debezium `op`.
        op: char,
    },
}

/// What to do with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdcOutcome {
    /// Write the new TaxInfo (insert, update, or undelete).
    Apply,
    /// `tax` equals the stored one: no write (the SPEC's `tax unchanged, SKIP`).
    SkipUnchanged,
    /// Older than the stored position: never overwrites.
    Stale,
    /// Soft-delete the TaxInfo.
    Delete,
    /// A delete of something unknown or already deleted: nothing to do.
    AlreadyDeleted,
}

impl CdcOutcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CdcOutcome::Apply => "applied",
            CdcOutcome::SkipUnchanged => "skipped",
            CdcOutcome::Stale => "stale",
            CdcOutcome::Delete => "deleted",
            CdcOutcome::AlreadyDeleted => "already_deleted",
        }
    }
}

/// The CDC rule: compares with the **stored** state, not only with `before`, which is what
/// stops drift when an update was missed or replayed.
pub fn decide_cdc(change: &CdcChange, position: &CdcPosition, stored: Option<&StoredTax>) -> CdcOutcome {
    if let Some(stored) = stored {
        if position.is_older_than(&stored.position) {
            return CdcOutcome::Stale;
        }
    }
    match change {
        CdcChange::Delete => match stored {
            Some(s) if !s.deleted => CdcOutcome::Delete,
            _ => CdcOutcome::AlreadyDeleted,
        },
        CdcChange::Upsert { tax, .. } => match stored {
            Some(s) if !s.deleted && &s.tax == tax => CdcOutcome::SkipUnchanged,
            _ => CdcOutcome::Apply,
        },
        CdcChange::Unchanged { .. } => CdcOutcome::SkipUnchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(tax: Value, lsn: i64) -> StoredTax {
        StoredTax {
            tax: canonicalize(&tax),
            position: CdcPosition { lsn: Some(lsn), ts_ms: Some(lsn) },
            deleted: false,
        }
    }

    #[test]
    fn canonical_form_ignores_key_order_whitespace_and_number_format() {
        let a: Value = serde_json::from_str(r#"{"b": 1440, "a": {"y": 1, "x": 2.50}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "a":{"x":2.5,"y":1.0},"b":1.44e3 }"#).unwrap();
        assert_eq!(canonicalize(&a), canonicalize(&b));
        assert_eq!(canonicalize(&a).to_string(), r#"{"a":{"x":2.5,"y":1},"b":1440}"#);
        assert_ne!(canonicalize(&json!({"a": "1"})), canonicalize(&json!({"a": 1})));
    }

    #[test]
    fn parse_reads_every_member_with_defaults() {
        let info = parse(&json!({"taxCode": "0100109106", "legalName": "ABC", "invoiceEnabled": true,
            "issuanceMode": "claim_window", "claimWindowMinutes": 60.0, "provider": "viettel"}))
        .unwrap();
        assert_eq!(info.issuance_mode, IssuanceMode::ClaimWindow);
        assert_eq!(info.claim_window_minutes, 60);
        assert!(info.invoice_enabled);
        let empty = parse(&json!({})).unwrap();
        assert!(!empty.invoice_enabled);
        assert_eq!(empty.issuance_mode, IssuanceMode::Immediate);
        assert_eq!(empty.claim_window_minutes, DEFAULT_CLAIM_WINDOW_MINUTES);
        // Longer than a month is clamped (the rest of the update still applies); digits in a
        // string are the number.
        let long = parse(&json!({"invoiceEnabled": false, "claimWindowMinutes": 50_000})).unwrap();
        assert_eq!((long.invoice_enabled, long.claim_window_minutes), (false, 44_640));
        assert_eq!(parse(&json!({"claimWindowMinutes": "1440"})).unwrap().claim_window_minutes, 1440);
    }

    #[test]
    fn parse_names_the_bad_member() {
        let cases = [
            (json!({"invoiceEnabled": "yes"}), "invoiceEnabled"),
            (json!({"issuanceMode": "weekly"}), "issuanceMode"),
            (json!({"claimWindowMinutes": -1}), "claimWindowMinutes"),
            (json!({"claimWindowMinutes": 1.5}), "claimWindowMinutes"),
            (json!({"claimWindowMinutes": "a day"}), "claimWindowMinutes"),
            (json!({"claimWindowMinutes": true}), "claimWindowMinutes"),
            (json!({"taxCode": 100}), "taxCode"),
        ];
        for (tax, field) in cases {
            match parse(&tax) {
                Err(TaxInfoError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{tax}: {other:?}"),
            }
        }
        assert_eq!(parse(&json!("x")), Err(TaxInfoError::NotAnObject));
    }

    #[test]
    fn cdc_rules() {
        let tax = canonicalize(&json!({"taxCode": "0100109106", "invoiceEnabled": true}));
        let s = stored(tax.clone(), 100);
        let newer = CdcPosition { lsn: Some(200), ts_ms: Some(200) };
        let older = CdcPosition { lsn: Some(50), ts_ms: Some(300) };
        let same = CdcChange::Upsert { op: 'u', tax: tax.clone() };
        let changed = CdcChange::Upsert { op: 'u', tax: canonicalize(&json!({"invoiceEnabled": false})) };
        assert_eq!(decide_cdc(&same, &newer, Some(&s)), CdcOutcome::SkipUnchanged);
        assert_eq!(decide_cdc(&changed, &newer, Some(&s)), CdcOutcome::Apply);
        assert_eq!(decide_cdc(&changed, &older, Some(&s)), CdcOutcome::Stale, "LSN wins over ts_ms");
        assert_eq!(decide_cdc(&changed, &newer, None), CdcOutcome::Apply);
        assert_eq!(decide_cdc(&CdcChange::Delete, &newer, Some(&s)), CdcOutcome::Delete);
        assert_eq!(decide_cdc(&CdcChange::Delete, &older, Some(&s)), CdcOutcome::Stale);
        let deleted = StoredTax { deleted: true, ..s.clone() };
        assert_eq!(decide_cdc(&CdcChange::Delete, &newer, Some(&deleted)), CdcOutcome::AlreadyDeleted);
        assert_eq!(
            decide_cdc(&same, &newer, Some(&deleted)),
            CdcOutcome::Apply,
            "a create after a delete revives it"
        );
        // Without LSNs, timestamps order; with neither, nothing is stale.
        let ts_only = StoredTax { position: CdcPosition { lsn: None, ts_ms: Some(100) }, ..s.clone() };
        assert_eq!(
            decide_cdc(&changed, &CdcPosition { lsn: None, ts_ms: Some(99) }, Some(&ts_only)),
            CdcOutcome::Stale
        );
        assert_eq!(decide_cdc(&changed, &CdcPosition::default(), Some(&ts_only)), CdcOutcome::Apply);
    }
}
