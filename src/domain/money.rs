//! Money (DOMAIN §7): exact decimals, never floats. Line net = quantity × unit price (net of
//! VAT), line VAT = net × rate rounded half up, line gross = net + VAT, totals are sums of
//! lines. Amounts are rounded to the currency's minor unit (whole đồng for VND) per line.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// A VAT rate code of the payment event (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VatRate {
    /// 0%.
    Zero,
    /// 5%.
    Five,
    /// 8% (reduced rate, only in dated windows: see `rules`).
    Eight,
    /// 10%.
    Ten,
    /// Not subject to VAT (không chịu thuế).
    Kct,
    /// Not declared, not paid (không kê khai, tính nộp).
    Kkknt,
    /// Another rate (`KHAC`, or `KHAC:x%` with the rate given).
    Khac(Option<Decimal>),
}

/// Why an amount or rate is not acceptable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    /// Not one of the rate codes.
    #[error("unknown VAT rate `{0}` (expected 0, 5, 8, 10, KCT, KKKNT, KHAC or KHAC:x%)")]
    UnknownVatRate(String),
    /// A value that must not be negative is.
    #[error("{field} must not be negative")]
    Negative {
        /// Which value.
        field: &'static str,
    },
    /// A quantity of zero.
    #[error("quantity must be greater than zero")]
    ZeroQuantity,
    /// More decimals than the minor unit allows.
    #[error("{field} has more decimals than {currency} allows ({scale})")]
    TooPrecise {
        /// Which value.
        field: &'static str,
        /// The currency.
        currency: String,
        /// Allowed decimals.
        scale: u32,
    },
    /// The arithmetic left the 96-bit range.
    #[error("amount out of range")]
    Overflow,
}

impl VatRate {
    /// Parses a rate code.
    pub fn parse(code: &str) -> Result<VatRate, MoneyError> {
        Ok(match code {
            "0" => VatRate::Zero,
            "5" => VatRate::Five,
            "8" => VatRate::Eight,
            "10" => VatRate::Ten,
            "KCT" => VatRate::Kct,
            "KKKNT" => VatRate::Kkknt,
            "KHAC" => VatRate::Khac(None),
            other => {
                let rate = other
                    .strip_prefix("KHAC:")
                    .map(|r| r.strip_suffix('%').unwrap_or(r))
                    .and_then(|r| Decimal::from_str(r).ok())
                    .filter(|r| *r >= Decimal::ZERO && *r < Decimal::ONE_HUNDRED && r.scale() <= 2)
                    .ok_or_else(|| MoneyError::UnknownVatRate(other.to_owned()))?;
                // `KHAC:8%` is the 8 % rate under another name: taken as such, it meets the
                // dated rule for 8 % (which it would otherwise get round) and joins the
                // rate's tax breakdown instead of printing a second 8 % group.
                match rate.normalize() {
                    r if r.is_zero() => VatRate::Zero,
                    r if r == Decimal::from(5) => VatRate::Five,
                    r if r == Decimal::from(8) => VatRate::Eight,
                    r if r == Decimal::from(10) => VatRate::Ten,
                    r => VatRate::Khac(Some(r)),
                }
            }
        })
    }

    /// The percentage applied to the net amount. `KCT`, `KKKNT` and a bare `KHAC` carry no
    /// VAT on the invoice.
    pub fn percent(self) -> Decimal {
        match self {
            VatRate::Zero | VatRate::Kct | VatRate::Kkknt | VatRate::Khac(None) => Decimal::ZERO,
            VatRate::Five => Decimal::from(5),
            VatRate::Eight => Decimal::from(8),
            VatRate::Ten => Decimal::from(10),
            VatRate::Khac(Some(rate)) => rate,
        }
    }
}

impl fmt::Display for VatRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VatRate::Zero => f.write_str("0"),
            VatRate::Five => f.write_str("5"),
            VatRate::Eight => f.write_str("8"),
            VatRate::Ten => f.write_str("10"),
            VatRate::Kct => f.write_str("KCT"),
            VatRate::Kkknt => f.write_str("KKKNT"),
            VatRate::Khac(None) => f.write_str("KHAC"),
            VatRate::Khac(Some(rate)) => write!(f, "KHAC:{rate}%"),
        }
    }
}

impl Serialize for VatRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VatRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = String::deserialize(d)?;
        VatRate::parse(&code).map_err(serde::de::Error::custom)
    }
}

/// Decimals of a currency's minor unit: VND has none; others are taken as 2.
pub fn minor_unit_scale(currency: &str) -> u32 {
    match currency {
        "VND" | "JPY" | "KRW" => 0,
        _ => 2,
    }
}

/// A line as the payment describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LineInput {
    /// Item code.
    pub sku: Option<String>,
    /// Item name.
    pub name: String,
    /// Unit of measure.
    pub unit: Option<String>,
    /// Quantity (> 0).
    pub quantity: Decimal,
    /// Unit price net of VAT (≥ 0).
    pub unit_price: Decimal,
    /// VAT rate.
    pub vat_rate: VatRate,
}

/// A line with its computed amounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// The input.
    #[serde(flatten)]
    pub input: LineInput,
    /// quantity × unit price, in the minor unit.
    pub net: Decimal,
    /// net × rate, rounded half up to the minor unit.
    pub vat: Decimal,
    /// net + VAT.
    pub gross: Decimal,
}

/// Sums of the lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Sum of nets.
    pub net: Decimal,
    /// Sum of VAT.
    pub vat: Decimal,
    /// Sum of gross amounts: what the buyer paid.
    pub gross: Decimal,
}

fn round(value: Decimal, scale: u32) -> Decimal {
    value.round_dp_with_strategy(scale, RoundingStrategy::MidpointAwayFromZero)
}

/// Computes every line's amounts and the totals.
pub fn compute(currency: &str, items: &[LineInput]) -> Result<(Vec<Line>, Totals), MoneyError> {
    let scale = minor_unit_scale(currency);
    let mut totals = Totals::default();
    let mut lines = Vec::with_capacity(items.len());
    for item in items {
        if item.quantity.is_sign_negative() && !item.quantity.is_zero() {
            return Err(MoneyError::Negative { field: "quantity" });
        }
        if item.quantity.is_zero() {
            return Err(MoneyError::ZeroQuantity);
        }
        if item.unit_price.is_sign_negative() && !item.unit_price.is_zero() {
            return Err(MoneyError::Negative { field: "unitPrice" });
        }
        let raw_net = item.quantity.checked_mul(item.unit_price).ok_or(MoneyError::Overflow)?;
        let net = round(raw_net, scale);
        let vat = round(
            net.checked_mul(item.vat_rate.percent()).ok_or(MoneyError::Overflow)? / Decimal::ONE_HUNDRED,
            scale,
        );
        let gross = net.checked_add(vat).ok_or(MoneyError::Overflow)?;
        totals.net = totals.net.checked_add(net).ok_or(MoneyError::Overflow)?;
        totals.vat = totals.vat.checked_add(vat).ok_or(MoneyError::Overflow)?;
        totals.gross = totals.gross.checked_add(gross).ok_or(MoneyError::Overflow)?;
        lines.push(Line {
            input: item.clone(),
            net: net.normalize(),
            vat: vat.normalize(),
            gross: gross.normalize(),
        });
    }
    totals.net = totals.net.normalize();
    totals.vat = totals.vat.normalize();
    totals.gross = totals.gross.normalize();
    Ok((lines, totals))
}

/// Checks that `amount` has no more decimals than the currency allows.
pub fn check_scale(field: &'static str, amount: Decimal, currency: &str) -> Result<(), MoneyError> {
    let scale = minor_unit_scale(currency);
    if amount.normalize().scale() > scale {
        return Err(MoneyError::TooPrecise { field, currency: currency.to_owned(), scale });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn item(quantity: &str, unit_price: &str, rate: &str) -> LineInput {
        LineInput {
            sku: None,
            name: "x".into(),
            unit: None,
            quantity: dec(quantity),
            unit_price: dec(unit_price),
            vat_rate: VatRate::parse(rate).unwrap(),
        }
    }

    #[test]
    fn the_spec_example_adds_up() {
        let (lines, totals) = compute("VND", &[item("2", "500000", "8")]).unwrap();
        assert_eq!(
            (lines[0].net, lines[0].vat, lines[0].gross),
            (dec("1000000"), dec("80000"), dec("1080000"))
        );
        assert_eq!(totals, Totals { net: dec("1000000"), vat: dec("80000"), gross: dec("1080000") });
    }

    #[test]
    fn vat_is_rounded_half_up_per_line_to_whole_dong() {
        // 12 345 × 8% = 987.6 → 988; 12 345 × 10% = 1 234.5 → 1 235 (half up).
        let (lines, totals) = compute("VND", &[item("1", "12345", "8"), item("1", "12345", "10")]).unwrap();
        assert_eq!(lines[0].vat, dec("988"));
        assert_eq!(lines[1].vat, dec("1235"));
        assert_eq!(totals.gross, dec("12345") * Decimal::TWO + dec("988") + dec("1235"));
        // Per-line rounding differs from rounding the total: 3 × (1 × 5 đ at 10%) = 3 × 1 đ.
        let (_, totals) =
            compute("VND", &[item("1", "5", "10"), item("1", "5", "10"), item("1", "5", "10")]).unwrap();
        assert_eq!(totals.vat, dec("3"));
    }

    #[test]
    fn fractional_quantities_round_the_net_to_the_minor_unit() {
        let (lines, _) = compute("VND", &[item("0.5", "15001", "0")]).unwrap();
        assert_eq!(lines[0].net, dec("7501"));
        let (lines, _) = compute("USD", &[item("3", "0.335", "10")]).unwrap();
        assert_eq!((lines[0].net, lines[0].vat), (dec("1.01"), dec("0.10")));
    }

    #[test]
    fn rate_codes() {
        for (code, percent) in [
            ("0", "0"),
            ("5", "5"),
            ("8", "8"),
            ("10", "10"),
            ("KCT", "0"),
            ("KKKNT", "0"),
            ("KHAC", "0"),
            ("KHAC:5.26%", "5.26"),
            ("KHAC:3.5", "3.5"),
        ] {
            assert_eq!(VatRate::parse(code).unwrap().percent(), dec(percent), "{code}");
        }
        for bad in ["", "7", "10%", "8.0", "kct", "KHAC:", "KHAC:x", "KHAC:100", "KHAC:1.234", "KHAC:-1"] {
            assert!(VatRate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(VatRate::parse("KHAC:5.26%").unwrap().to_string(), "KHAC:5.26%");
        for (code, standard) in [
            ("KHAC:8%", VatRate::Eight),
            ("KHAC:8.00", VatRate::Eight),
            ("KHAC:0%", VatRate::Zero),
            ("KHAC:5", VatRate::Five),
            ("KHAC:10.0%", VatRate::Ten),
        ] {
            assert_eq!(VatRate::parse(code).unwrap(), standard, "{code}");
        }
        assert_eq!(serde_json::to_string(&VatRate::Eight).unwrap(), "\"8\"");
    }

    #[test]
    fn bad_quantities_and_prices_are_refused() {
        assert_eq!(compute("VND", &[item("0", "1", "0")]), Err(MoneyError::ZeroQuantity));
        assert_eq!(compute("VND", &[item("-1", "1", "0")]), Err(MoneyError::Negative { field: "quantity" }));
        assert_eq!(compute("VND", &[item("1", "-1", "0")]), Err(MoneyError::Negative { field: "unitPrice" }));
        assert!(check_scale("totalAmount", dec("10.5"), "VND").is_err());
        assert!(check_scale("totalAmount", dec("10.50"), "USD").is_ok());
        assert!(check_scale("totalAmount", dec("10.00"), "VND").is_ok());
    }

    proptest! {
        #[test]
        fn totals_are_exact_sums_and_vat_is_within_half_a_dong(
            lines in proptest::collection::vec((1u32..1000, 0u64..10_000_000, prop_oneof![Just("0"), Just("5"), Just("8"), Just("10"), Just("KCT")]), 1..20)
        ) {
            let items: Vec<LineInput> = lines.iter().map(|(q, p, r)| item(&q.to_string(), &p.to_string(), r)).collect();
            let (computed, totals) = compute("VND", &items).unwrap();
            let mut sum = Totals::default();
            for line in &computed {
                prop_assert_eq!(line.net, line.input.quantity * line.input.unit_price);
                let exact = line.net * line.input.vat_rate.percent() / Decimal::ONE_HUNDRED;
                prop_assert!((line.vat - exact).abs() <= dec("0.5"));
                prop_assert_eq!(line.vat.scale(), 0);
                prop_assert_eq!(line.gross, line.net + line.vat);
                sum.net += line.net; sum.vat += line.vat; sum.gross += line.gross;
            }
            prop_assert_eq!(totals.net, sum.net);
            prop_assert_eq!(totals.vat, sum.vat);
            prop_assert_eq!(totals.gross, sum.gross);
        }
    }
}
