//! `payment.succeeded.v1`: parsing and validation into a domain [`Payment`]. Amounts and
//! quantities must be decimal strings (a JSON number is refused: floats lose đồng), the VAT
//! rate must be allowed on the payment's date, and the total must equal the sum of the lines.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::{json_kind, Invalid};
use crate::domain::buyer::Buyer;
use crate::domain::claim::vietnam;
use crate::domain::decision::Payment;
use crate::domain::money::{self, LineInput, VatRate};
use crate::domain::rules;

const MAX_ID: usize = 64;
const MAX_ITEMS: usize = 1000;
/// Amounts are stored as NUMERIC(27, 6): anything at or above 10^21 is refused here rather
/// than failing the batch's transaction.
const MAX_AMOUNT_DIGITS: u32 = 21;

/// `path.field`, the name a reason gives; built only for a reason (a valid message has
/// dozens of fields, and this ran once per field read).
fn member(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn string<'a>(map: &'a Map<String, Value>, path: &str, field: &str, max: usize) -> Result<&'a str, Invalid> {
    let name = || member(path, field);
    match map.get(field) {
        None | Some(Value::Null) => Err(Invalid::field(name(), "required")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(Invalid::field(name(), "must not be empty")),
        // Bytes are at least as many as characters: count the characters only when the
        // bytes could be too many.
        Some(Value::String(s)) if s.len() > max && s.chars().count() > max => {
            Err(Invalid::field(name(), format!("longer than {max} characters")))
        }
        Some(Value::String(s)) => match crate::domain::text::forbidden_char(s) {
            Some(c) => Err(Invalid::field(name(), crate::domain::text::forbidden_reason(c))),
            None => Ok(s),
        },
        Some(other) => Err(Invalid::field(name(), format!("expected a string, found {}", json_kind(other)))),
    }
}

fn optional_string(
    map: &Map<String, Value>,
    path: &str,
    field: &str,
    max: usize,
) -> Result<Option<String>, Invalid> {
    match map.get(field) {
        // An empty optional member is an absent one (the topic's schema allows "").
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(_) => string(map, path, field, max).map(|s| Some(s.to_owned())),
    }
}

fn decimal(map: &Map<String, Value>, path: &str, field: &str) -> Result<Decimal, Invalid> {
    let name = || member(path, field);
    match map.get(field) {
        None | Some(Value::Null) => Err(Invalid::field(name(), "required")),
        Some(Value::String(s)) => {
            let unsigned = s.strip_prefix('-').unwrap_or(s);
            let plain = !unsigned.is_empty()
                && unsigned.split_once('.').map_or(unsigned.bytes().all(|b| b.is_ascii_digit()), |(i, f)| {
                    !i.is_empty() && !f.is_empty() && (i.bytes().chain(f.bytes())).all(|b| b.is_ascii_digit())
                });
            if !plain {
                return Err(Invalid::field(
                    name(),
                    format!("`{s}` is not a plain decimal (digits, optional point)"),
                ));
            }
            let value =
                Decimal::from_str(s).map_err(|_| Invalid::field(name(), format!("`{s}` is out of range")))?;
            let limit = Decimal::from_i128_with_scale(10i128.pow(MAX_AMOUNT_DIGITS), 0);
            if value.abs() >= limit {
                return Err(Invalid::field(
                    name(),
                    format!("`{s}` is out of range (at most {MAX_AMOUNT_DIGITS} integer digits)"),
                ));
            }
            Ok(value)
        }
        Some(Value::Number(n)) => Err(Invalid::field(
            name(),
            format!("expected a decimal string, found the number {n} (floats are refused)"),
        )),
        Some(other) => {
            Err(Invalid::field(name(), format!("expected a decimal string, found {}", json_kind(other))))
        }
    }
}

/// Parses and validates one message value.
pub fn parse(value: &[u8]) -> Result<Payment, Invalid> {
    let json: Value = serde_json::from_slice(value).map_err(|e| Invalid(format!("not JSON: {e}")))?;
    // Postgres text and jsonb cannot hold U+0000: such a message would fail its batch's
    // transaction forever instead of being dead-lettered.
    if super::may_contain_nul(value) && super::contains_nul(&json) {
        return Err(Invalid("a string contains the NUL character (U+0000)".into()));
    }
    let Value::Object(map) = &json else {
        return Err(Invalid(format!("expected a JSON object, found {}", json_kind(&json))));
    };
    let event_id = string(map, "", "eventId", MAX_ID)?.to_owned();
    let order_id = string(map, "", "orderId", MAX_ID)?.to_owned();
    let merchant_id = string(map, "", "merchantId", MAX_ID)?.to_owned();
    let paid_at_text = string(map, "", "paidAt", 64)?;
    let paid_at = DateTime::parse_from_rfc3339(paid_at_text)
        .map_err(|_| {
            Invalid::field("paidAt", format!("`{paid_at_text}` is not an RFC 3339 date-time with offset"))
        })?
        .with_timezone(&Utc);
    let currency = string(map, "", "currency", 3)?.to_owned();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::field("currency", format!("`{currency}` is not an ISO 4217 code")));
    }
    // Refused here rather than decided: an invoice (and a claim shown to the buyer) would be
    // created only to fail at validation, as no exchange rate travels with a payment.
    if currency != "VND" {
        return Err(Invalid::field(
            "currency",
            format!("`{currency}`: only VND payments are invoiced (a payment carries no exchange rate)"),
        ));
    }
    let total = decimal(map, "", "totalAmount")?;
    money::check_scale("totalAmount", total, &currency).map_err(|e| Invalid(e.to_string()))?;

    let legal_day = paid_at.with_timezone(&vietnam()).date_naive();
    let rule = rules::rules_for(legal_day).map_err(|e| Invalid::field("paidAt", e))?;

    let items = match map.get("items") {
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(Invalid::field("items", "must not be empty"))
        }
        Some(Value::Array(items)) if items.len() > MAX_ITEMS => {
            return Err(Invalid::field("items", format!("more than {MAX_ITEMS} lines")))
        }
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err(Invalid::field("items", "required")),
        Some(other) => {
            return Err(Invalid::field("items", format!("expected an array, found {}", json_kind(other))))
        }
    };
    let mut inputs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("items[{i}]");
        let Value::Object(item) = item else {
            return Err(Invalid::field(&path, format!("expected an object, found {}", json_kind(item))));
        };
        let rate_text = string(item, &path, "vatRate", 16)?;
        let vat_rate = VatRate::parse(rate_text).map_err(|e| Invalid::field(format!("{path}.vatRate"), e))?;
        if vat_rate == VatRate::Eight && !rule.eight_percent_allowed {
            return Err(Invalid::field(
                format!("{path}.vatRate"),
                format!("8% is not allowed on {legal_day} ({})", rule.basis),
            ));
        }
        let quantity = decimal(item, &path, "quantity")?;
        let unit_price = decimal(item, &path, "unitPrice")?;
        inputs.push(LineInput {
            sku: optional_string(item, &path, "sku", 50)?,
            name: string(item, &path, "name", 500)?.to_owned(),
            unit: optional_string(item, &path, "unit", 50)?,
            quantity,
            unit_price,
            vat_rate,
        });
    }
    let (lines, totals) = money::compute(&currency, &inputs).map_err(|e| {
        // Point at the first line that fails on its own, for a precise message.
        let line = inputs.iter().position(|l| money::compute(&currency, std::slice::from_ref(l)).is_err());
        match line {
            Some(i) => Invalid::field(format!("items[{i}]"), e),
            None => Invalid::field("items", e),
        }
    })?;
    let limit = Decimal::from_i128_with_scale(10i128.pow(MAX_AMOUNT_DIGITS), 0);
    if totals.gross >= limit || totals.net >= limit {
        return Err(Invalid::field(
            "items",
            format!("line amounts add up beyond {MAX_AMOUNT_DIGITS} integer digits"),
        ));
    }
    if totals.gross != total {
        return Err(Invalid::field(
            "totalAmount",
            format!("{total} does not equal the sum of the lines with VAT ({})", totals.gross),
        ));
    }
    let buyer = match map.get("buyer") {
        None | Some(Value::Null) => None,
        Some(b @ Value::Object(_)) => {
            // serde's message would quote the value (a personal id number, say): name the
            // member and its JSON type only.
            // Members the invoice does not use are ignored, whatever their type.
            let known = ["name", "legalName", "taxCode", "address", "email", "phone"];
            if let Some((member, value)) = b.as_object().and_then(|m| {
                m.iter().find(|(k, v)| {
                    known.contains(&k.as_str()) && !matches!(v, Value::String(_) | Value::Null)
                })
            }) {
                return Err(Invalid::field(
                    format!("buyer.{member}"),
                    format!("expected a string or null, found {}", json_kind(value)),
                ));
            }
            let buyer: Buyer = serde_json::from_value(b.clone())
                .map_err(|_| Invalid::field("buyer", "members must be strings or null"))?;
            let (valid, dropped) = buyer.validate_lenient().map_err(|e| Invalid(e.to_string()))?;
            if !dropped.is_empty() {
                tracing::warn!(orderId = %order_id, merchantId = %merchant_id, fields = ?dropped,
                    "[handlePaymentSuccess] buyer contact details that are not valid were left off the invoice");
            }
            Some(valid)
        }
        Some(other) => {
            return Err(Invalid::field("buyer", format!("expected an object, found {}", json_kind(other))))
        }
    };
    Ok(Payment { event_id, order_id, merchant_id, paid_at, currency, total, lines, totals, buyer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn example() -> Value {
        json!({
            "eventId": "0b7c2f9e-5d1a-4f7e-9a57-1f6b7b1d2c3e",
            "orderId": "ORD-2026-000123",
            "merchantId": "M-1001",
            "paidAt": "2026-11-24T10:15:00+07:00",
            "currency": "VND",
            "totalAmount": "1080000",
            "items": [{"sku": "SKU-1", "name": "Cà phê sữa", "unit": "ly", "quantity": "2", "unitPrice": "500000", "vatRate": "8"}],
            "buyer": {"name": "Nguyễn Văn A", "email": "a@example.vn", "phone": "0901234567", "taxCode": null, "legalName": null, "address": null}
        })
    }

    fn reason(mut edit: impl FnMut(&mut Value)) -> String {
        let mut v = example();
        edit(&mut v);
        parse(v.to_string().as_bytes()).unwrap_err().0
    }

    #[test]
    fn the_spec_example_parses() {
        let p = parse(example().to_string().as_bytes()).unwrap();
        assert_eq!(p.order_id, "ORD-2026-000123");
        assert_eq!(p.total, Decimal::from(1_080_000));
        assert_eq!(p.totals.vat, Decimal::from(80_000));
        assert_eq!(p.paid_at.to_rfc3339(), "2026-11-24T03:15:00+00:00");
        assert_eq!(p.buyer.unwrap().buyer.email.as_deref(), Some("a@example.vn"));
    }

    #[test]
    fn the_topic_file_example_parses() {
        let spec: Value =
            serde_json::from_str(include_str!("../../topics/payment.succeeded.v1.json")).unwrap();
        assert!(parse(spec["example"].to_string().as_bytes()).is_ok());
    }

    #[test]
    fn precise_reasons() {
        assert!(parse(b"{not json").unwrap_err().0.starts_with("not JSON"));
        assert_eq!(parse(b"[1]").unwrap_err().0, "expected a JSON object, found an array");
        assert_eq!(
            reason(|v| {
                v.as_object_mut().unwrap().remove("orderId");
            }),
            "orderId: required"
        );
        assert_eq!(
            reason(|v| v["items"][0]["quantity"] = json!(2.0)),
            "items[0].quantity: expected a decimal string, found the number 2.0 (floats are refused)"
        );
        assert_eq!(
            reason(|v| v["totalAmount"] = json!(1080000)),
            "totalAmount: expected a decimal string, found the number 1080000 (floats are refused)"
        );
        assert!(reason(|v| v["items"][0]["vatRate"] = json!("7"))
            .starts_with("items[0].vatRate: unknown VAT rate `7`"));
        assert_eq!(
            reason(|v| v["totalAmount"] = json!("1000000")),
            "totalAmount: 1000000 does not equal the sum of the lines with VAT (1080000)"
        );
        assert!(reason(|v| v["paidAt"] = json!("yesterday"))
            .starts_with("paidAt: `yesterday` is not an RFC 3339"));
        assert!(reason(|v| v["items"][0]["unitPrice"] = json!("1e5")).contains("not a plain decimal"));
        for sign_only in ["-", "--5", "-.5", "-5."] {
            assert!(
                reason(|v| v["items"][0]["unitPrice"] = json!(sign_only)).contains("not a plain decimal"),
                "{sign_only}"
            );
        }
        assert!(reason(|v| v["totalAmount"] = json!("1080000.5")).contains("more decimals than VND allows"));
        assert_eq!(reason(|v| v["items"] = json!([])), "items: must not be empty");
        assert!(reason(|v| v["items"][0]["quantity"] = json!("0"))
            .starts_with("items[0]: quantity must be greater than zero"));
        assert!(reason(|v| v["buyer"]["taxCode"] = json!("0100109106"))
            .starts_with("buyer.legalName is required"));
        assert!(reason(|v| v["buyer"]["taxCode"] = json!("123")).starts_with("buyer.taxCode: "));
        assert_eq!(reason(|v| v["currency"] = json!("vnd")), "currency: `vnd` is not an ISO 4217 code");
        assert!(reason(|v| v["currency"] = json!("USD")).starts_with("currency: `USD`: only VND payments"));
        // A member of the wrong type is named with its type, never quoted (a personal id).
        assert_eq!(
            reason(|v| v["buyer"]["taxCode"] = json!(1203004567u64)),
            "buyer.taxCode: expected a string or null, found a number"
        );
        // Members the invoice does not use may be anything (the schema allows them).
        let mut v = example();
        v["buyer"]["customerId"] = json!(42);
        assert!(parse(v.to_string().as_bytes()).is_ok());
        assert_eq!(
            reason(|v| v["items"][0]["name"] = json!("bell\u{7}")),
            "items[0].name: contains the character U+0007, which an invoice cannot carry"
        );
        assert_eq!(
            reason(|v| v["orderId"] = json!("A\u{0}")),
            "a string contains the NUL character (U+0000)"
        );
        assert_eq!(
            reason(|v| v["buyer"]["name"] = json!("x\u{0}")),
            "a string contains the NUL character (U+0000)"
        );
        assert!(
            reason(|v| v["items"][0]["unitPrice"] = json!("1000000000000000000000")).contains("out of range")
        );
    }

    #[test]
    fn what_the_topic_allows_is_decided_not_dead_lettered() {
        // Empty optional members are absent ones.
        let mut v = example();
        v["items"][0]["sku"] = json!("");
        v["items"][0]["unit"] = json!(" ");
        let p = parse(v.to_string().as_bytes()).unwrap();
        assert_eq!((p.lines[0].input.sku.as_deref(), p.lines[0].input.unit.as_deref()), (None, None));
        // A consumer's contact details that fail are left off; the payment is still decided.
        let mut v = example();
        v["buyer"]["email"] = json!("a@localhost");
        v["buyer"]["phone"] = json!("028 3823 4567 ext 1");
        let buyer = parse(v.to_string().as_bytes()).unwrap().buyer.unwrap();
        assert_eq!((buyer.buyer.email, buyer.buyer.phone), (None, None));
        assert_eq!(buyer.buyer.name.as_deref(), Some("Nguyễn Văn A"));
    }

    #[test]
    fn eight_percent_follows_the_dated_rules() {
        let r = reason(|v| v["paidAt"] = json!("2027-01-01T00:00:00+07:00"));
        assert!(r.starts_with("items[0].vatRate: 8% is not allowed on 2027-01-01"), "{r}");
        // 2026-12-31 23:59 in Hà Nội is still inside the window although it is 2026-12-31 in UTC too.
        let mut v = example();
        v["paidAt"] = json!("2026-12-31T23:59:59+07:00");
        assert!(parse(v.to_string().as_bytes()).is_ok());
        // 2026-12-31T17:30Z is 2027-01-01 00:30 in Hà Nội: the legal day is local.
        let r = reason(|v| v["paidAt"] = json!("2026-12-31T17:30:00Z"));
        assert!(r.contains("2027-01-01"), "{r}");
    }

    #[test]
    fn a_buyer_with_a_tax_code_is_a_company() {
        let mut v = example();
        v["buyer"] = json!({"legalName": "Công ty B", "taxCode": "0101243150", "address": "HCM"});
        let p = parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(p.buyer.unwrap().kind, crate::domain::buyer::BuyerKind::Company);
    }

    proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn no_json_edit_panics(field in prop_oneof![Just("eventId"), Just("totalAmount"), Just("items"), Just("buyer"), Just("paidAt")],
                               value in prop_oneof![Just(json!(null)), Just(json!(1.5)), Just(json!("x")), Just(json!([])), Just(json!({})), Just(json!(true))]) {
            let mut v = example();
            v[field] = value;
            let _ = parse(v.to_string().as_bytes());
        }
    }
}
