//! The invoice as it is sent to a provider, and its validation before any call (DOMAIN §2,
//! §6 "Validation before any provider call", §7): a document that fails here is a permanent
//! error and never reaches the provider, so no retry budget is spent on it.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::buyer::{Buyer, BuyerKind};
use super::claim::vietnam;
use super::money::{self, Line, LineInput, Totals, VatRate};
use super::rules::{self, ConsumerWording, RuleSet};
use super::tax_code;
use super::words;

/// The seller, from the invoice's config snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seller {
    /// Tax code (the provider's `supplierTaxCode`). Empty when the merchant's TaxInfo had
    /// none (snapshots written before they fell back to `supplierTaxCode` hold `null`):
    /// the worker then uses the configuration's.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tax_code: String,
    /// Legal name.
    pub legal_name: Option<String>,
    /// Address.
    pub address: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Phone.
    pub phone: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

/// The invoice a replacement replaces, as the provider knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Original {
    /// Its number at the provider (e.g. `C26TAA12`).
    pub invoice_no: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// Its template code.
    pub template_code: String,
    /// Its series.
    pub series: String,
    /// Why it is replaced (printed on the replacement).
    pub reason: String,
}

/// Everything needed to issue one invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Our id.
    pub invoice_id: i64,
    /// The idempotency key at the provider.
    pub transaction_uuid: String,
    /// Registered template, e.g. `1/001` (its first digit is the invoice type).
    pub template_code: String,
    /// Series without the type digit, e.g. `C26TAA`.
    pub series: String,
    /// When the sale happened (chooses the rule set: VAT rates, wording).
    pub legal_time: DateTime<Utc>,
    /// Issue time: now, never back-dated (DOMAIN §7).
    pub issued_at: DateTime<Utc>,
    /// ISO currency.
    pub currency: String,
    /// Seller.
    pub seller: Seller,
    /// Buyer; `None` is a consumer who asked for nothing.
    pub buyer: Option<Buyer>,
    /// Lines with their amounts as stored.
    pub lines: Vec<Line>,
    /// Totals as stored.
    pub totals: Totals,
    /// The amount paid (the invoice total must equal it).
    pub paid_total: Decimal,
    /// Set on a replacement invoice.
    pub replaces: Option<Original>,
    /// Which buyer name a consumer gets (configured).
    pub consumer_wording: ConsumerWording,
}

/// A document that passed validation, with what validation derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The rules in force at the legal time.
    pub rules: &'static RuleSet,
    /// The buyer's kind.
    pub buyer_kind: BuyerKind,
    /// The printed buyer name for a consumer (by the legal day and the configured wording).
    pub consumer_buyer_name: &'static str,
    /// The total in Vietnamese words.
    pub amount_in_words: String,
    /// Type digit + series, e.g. `1C26TAA`.
    pub symbol: String,
}

/// Why a document cannot be sent. Permanent: fixing it needs new data or configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// The seller's tax code is malformed.
    #[error("seller tax code: {0}")]
    SellerTaxCode(String),
    /// The buyer is not acceptable.
    #[error("{0}")]
    Buyer(String),
    /// The template or series does not make a legal symbol.
    #[error("template `{template}` and series `{series}` do not form a legal symbol (e.g. 1/001 + C26TAA)")]
    Symbol {
        /// Template code.
        template: String,
        /// Series.
        series: String,
    },
    /// No rule set covers the legal date.
    #[error("{0}")]
    NoRules(String),
    /// A VAT rate is not allowed on the legal date.
    #[error("line {line}: VAT rate {rate} is not allowed on {day}")]
    RateNotAllowed {
        /// 1-based line number.
        line: usize,
        /// The rate.
        rate: String,
        /// The legal day.
        day: chrono::NaiveDate,
    },
    /// A text is longer than the invoice format allows.
    #[error("{field} is longer than {max} characters")]
    TooLong {
        /// Which field.
        field: String,
        /// Its limit.
        max: usize,
    },
    /// A required text is empty.
    #[error("{0} is required")]
    Required(String),
    /// A foreign currency: the invoice would need its exchange rate to VND (DOMAIN §2), which
    /// a payment does not carry; sent with rate 1, its tax base would be wrong.
    #[error("currency {0}: an invoice in a foreign currency needs the exchange rate to VND, which the payment does not carry; only VND invoices are issued")]
    ForeignCurrency(String),
    /// Stored amounts do not follow the money rules.
    #[error("amounts: {0}")]
    Arithmetic(String),
    /// No lines.
    #[error("an invoice needs at least one line")]
    NoLines,
    /// The words could not be produced.
    #[error("amount in words: {0}")]
    Words(String),
    /// The idempotency key is not 10–36 characters.
    #[error("transaction uuid must be 10–36 characters")]
    TransactionUuid,
}

fn check_len(field: impl Into<String>, value: Option<&str>, max: usize) -> Result<(), DocumentError> {
    match value {
        Some(v) if v.chars().count() > max => Err(DocumentError::TooLong { field: field.into(), max }),
        _ => Ok(()),
    }
}

/// Validates a document against DOMAIN §2/§7 at its legal time.
pub fn validate(doc: &Document) -> Result<Prepared, DocumentError> {
    if !(10..=36).contains(&doc.transaction_uuid.len()) {
        return Err(DocumentError::TransactionUuid);
    }
    tax_code::parse(&doc.seller.tax_code).map_err(|e| DocumentError::SellerTaxCode(e.to_string()))?;
    if !tax_code::parse(&doc.seller.tax_code).is_ok_and(|c| c.is_business()) {
        return Err(DocumentError::SellerTaxCode("a seller needs a business tax code".into()));
    }
    check_len("seller.legalName", doc.seller.legal_name.as_deref(), 400)?;
    check_len("seller.address", doc.seller.address.as_deref(), 400)?;

    let type_digit = doc.template_code.chars().next().filter(char::is_ascii_digit);
    let symbol = format!("{}{}", type_digit.map(String::from).unwrap_or_default(), doc.series);
    if type_digit.is_none() || !rules::valid_symbol(&symbol) {
        return Err(DocumentError::Symbol {
            template: doc.template_code.clone(),
            series: doc.series.clone(),
        });
    }

    if doc.currency != "VND" {
        return Err(DocumentError::ForeignCurrency(doc.currency.clone()));
    }

    let legal_day = doc.legal_time.with_timezone(&vietnam()).date_naive();
    let rules = rules::rules_for(legal_day).map_err(|e| DocumentError::NoRules(e.to_string()))?;

    let buyer_kind = match &doc.buyer {
        None => BuyerKind::Consumer,
        Some(buyer) => buyer.validate().map_err(|e| DocumentError::Buyer(e.to_string()))?.kind,
    };

    if doc.lines.is_empty() {
        return Err(DocumentError::NoLines);
    }
    for (i, line) in doc.lines.iter().enumerate() {
        let n = i + 1;
        if line.input.name.trim().is_empty() {
            return Err(DocumentError::Required(format!("line {n}: name")));
        }
        check_len(format!("line {n}: name"), Some(&line.input.name), 500)?;
        check_len(format!("line {n}: sku"), line.input.sku.as_deref(), 50)?;
        check_len(format!("line {n}: unit"), line.input.unit.as_deref(), 50)?;
        if line.input.vat_rate == VatRate::Eight && !rules.eight_percent_allowed {
            return Err(DocumentError::RateNotAllowed { line: n, rate: "8%".into(), day: legal_day });
        }
    }

    // Exact arithmetic: the stored amounts must be what the money rules give, and the total
    // what was paid.
    let inputs: Vec<LineInput> = doc.lines.iter().map(|l| l.input.clone()).collect();
    let (lines, totals) =
        money::compute(&doc.currency, &inputs).map_err(|e| DocumentError::Arithmetic(e.to_string()))?;
    for (i, (stored, computed)) in doc.lines.iter().zip(&lines).enumerate() {
        if stored.net != computed.net || stored.vat != computed.vat || stored.gross != computed.gross {
            return Err(DocumentError::Arithmetic(format!(
                "line {}: stored net/VAT/gross {}/{}/{} differ from computed {}/{}/{}",
                i + 1,
                stored.net,
                stored.vat,
                stored.gross,
                computed.net,
                computed.vat,
                computed.gross
            )));
        }
    }
    if totals != doc.totals {
        return Err(DocumentError::Arithmetic("stored totals are not the sums of the lines".into()));
    }
    if totals.gross != doc.paid_total {
        return Err(DocumentError::Arithmetic(format!(
            "invoice total {} differs from the amount paid {}",
            totals.gross, doc.paid_total
        )));
    }
    let amount_in_words = words::amount_in_words(&totals.gross, &doc.currency)
        .map_err(|e| DocumentError::Words(e.to_string()))?;

    if let Some(original) = &doc.replaces {
        if original.invoice_no.trim().is_empty() {
            return Err(DocumentError::Required("the replaced invoice's number".into()));
        }
        check_len("replacement reason", Some(&original.reason), 255)?;
    }

    Ok(Prepared {
        rules,
        buyer_kind,
        consumer_buyer_name: doc.consumer_wording.name_on(legal_day),
        amount_in_words,
        symbol,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// A valid consumer document of `inputs` sold and issued at `at` (for tests here and in
    /// the provider adapters).
    pub(crate) fn sample(inputs: Vec<LineInput>, at: DateTime<Utc>) -> Document {
        let (lines, totals) = money::compute("VND", &inputs).unwrap();
        Document {
            invoice_id: 1,
            transaction_uuid: "8f0e4c52-5a8d-8c3e-9d2a-0123456789ab".into(),
            template_code: "1/001".into(),
            series: "C26TAA".into(),
            legal_time: at,
            issued_at: at,
            currency: "VND".into(),
            seller: Seller {
                tax_code: "0100109106".into(),
                legal_name: Some("Công ty TNHH Demo".into()),
                ..Seller::default()
            },
            buyer: None,
            paid_total: totals.gross,
            lines,
            totals,
            replaces: None,
            consumer_wording: ConsumerWording::default(),
        }
    }

    fn doc(rate: &str, paid_at: DateTime<Utc>) -> Document {
        let inputs = vec![LineInput {
            sku: Some("CF-01".into()),
            name: "Cà phê sữa đá".into(),
            unit: Some("ly".into()),
            quantity: dec("2"),
            unit_price: dec("500000"),
            vat_rate: VatRate::parse(rate).unwrap(),
        }];
        sample(inputs, paid_at)
    }

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    #[test]
    fn a_snapshot_seller_without_a_tax_code_reads_as_empty() {
        let seller: Seller =
            serde_json::from_value(serde_json::json!({"taxCode": null, "legalName": "ABC"})).unwrap();
        assert_eq!((seller.tax_code.as_str(), seller.legal_name.as_deref()), ("", Some("ABC")));
        let seller: Seller = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(seller.tax_code, "");
    }

    #[test]
    fn a_good_document_gets_words_and_the_dated_consumer_wording() {
        let p = validate(&doc("8", at(2026, 6, 30, 10))).unwrap();
        assert_eq!(p.amount_in_words, "Một triệu không trăm tám mươi nghìn đồng");
        assert_eq!(p.consumer_buyer_name, "Người mua không lấy hóa đơn");
        assert_eq!(p.symbol, "1C26TAA");
        let p = validate(&doc("8", at(2026, 7, 1, 10))).unwrap();
        assert_eq!(p.consumer_buyer_name, "Bán cho người tiêu dùng");
        // The switch is configurable: DOMAIN §0 could not verify the 2026 rule.
        let kept =
            Document { consumer_wording: ConsumerWording { from: None }, ..doc("8", at(2026, 7, 1, 10)) };
        assert_eq!(validate(&kept).unwrap().consumer_buyer_name, "Người mua không lấy hóa đơn");
    }

    #[test]
    fn eight_percent_at_each_boundary_of_its_window() {
        // 2026-12-31 23:30 in Vietnam is 16:30 UTC: still in the window.
        assert!(validate(&doc("8", at(2026, 12, 31, 16))).is_ok());
        // 17:00 UTC is midnight in Vietnam: 2027-01-01, the window is over.
        assert!(matches!(
            validate(&doc("8", at(2026, 12, 31, 17))),
            Err(DocumentError::RateNotAllowed { .. })
        ));
        assert!(validate(&doc("10", at(2026, 12, 31, 17))).is_ok());
        assert!(matches!(
            validate(&doc("8", at(2023, 6, 30, 10))),
            Err(DocumentError::RateNotAllowed { .. })
        ));
        assert!(validate(&doc("8", at(2023, 7, 1, 10))).is_ok());
    }

    #[test]
    fn tampered_amounts_are_refused() {
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.lines[0].vat += Decimal::ONE;
        assert!(matches!(validate(&d), Err(DocumentError::Arithmetic(_))));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.paid_total -= Decimal::ONE;
        assert!(matches!(validate(&d), Err(DocumentError::Arithmetic(_))));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.totals.net += Decimal::ONE;
        assert!(matches!(validate(&d), Err(DocumentError::Arithmetic(_))));
    }

    #[test]
    fn configuration_and_data_errors_are_named() {
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.series = "C26QAA".into();
        assert!(matches!(validate(&d), Err(DocumentError::Symbol { .. })));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.template_code = "x/001".into();
        assert!(matches!(validate(&d), Err(DocumentError::Symbol { .. })));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.seller.tax_code = "0100109107".into();
        assert!(matches!(validate(&d), Err(DocumentError::SellerTaxCode(_))));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.buyer = Some(Buyer { tax_code: Some("0100109106".into()), ..Buyer::default() });
        assert_eq!(validate(&d).unwrap_err().to_string(), "buyer.legalName is required with a tax code");
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.lines[0].input.name = "x".repeat(501);
        assert!(matches!(validate(&d), Err(DocumentError::TooLong { .. })));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.lines.clear();
        assert_eq!(validate(&d), Err(DocumentError::NoLines));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.transaction_uuid = "short".into();
        assert_eq!(validate(&d), Err(DocumentError::TransactionUuid));
        let mut d = doc("10", at(2026, 3, 1, 10));
        d.currency = "USD".into();
        assert_eq!(validate(&d), Err(DocumentError::ForeignCurrency("USD".into())));
    }
}
