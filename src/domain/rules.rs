//! The dated rule set (DOMAIN §0, §7): what the law allows depends on the invoice's legal
//! time, so rates, symbol shapes and the consumer wording are rows of one table chosen by
//! date, never constants scattered in code.

use chrono::NaiveDate;

/// One period of rules, valid from `from` (inclusive) until the next row's `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSet {
    /// First day (Asia/Ho_Chi_Minh) the row applies.
    pub from: NaiveDate,
    /// Legal basis, for audit and `inspect`.
    pub basis: &'static str,
    /// Whether the reduced 8% VAT rate may be used.
    pub eight_percent_allowed: bool,
}

const fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    match NaiveDate::from_ymd_opt(y, m, d) {
        Some(date) => date,
        None => panic!("invalid date in the rule table"),
    }
}

/// The consumer wording of Decree 123/2020 + Circular 78/2021.
pub const NOT_TAKING: &str = "Người mua không lấy hóa đơn";
/// The consumer wording reported for Decree 254/2026 (DOMAIN §0: not verified).
pub const CONSUMER_2026: &str = "Bán cho người tiêu dùng";
/// The first day [`CONSUMER_2026`] is printed unless configured otherwise.
pub const CONSUMER_2026_FROM: NaiveDate = date(2026, 7, 1);

/// Which buyer name a consumer who asked for nothing gets (DOMAIN §7: both wordings kept,
/// the switch configurable, because the 2026 rule is reported and not verified):
/// [`NOT_TAKING`] before `from`, [`CONSUMER_2026`] from it, [`NOT_TAKING`] always if `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerWording {
    /// First legal day of [`CONSUMER_2026`]; `None`: never.
    pub from: Option<NaiveDate>,
}

impl Default for ConsumerWording {
    fn default() -> Self {
        ConsumerWording { from: Some(CONSUMER_2026_FROM) }
    }
}

impl ConsumerWording {
    /// The consumer buyer name printed for a sale on `day` (Asia/Ho_Chi_Minh).
    pub fn name_on(&self, day: NaiveDate) -> &'static str {
        match self.from {
            Some(from) if day >= from => CONSUMER_2026,
            _ => NOT_TAKING,
        }
    }
}

/// The table, oldest first. 8% windows: Decree 15/2022 (until 2022-12-31; the table starts
/// inside it), Decree 44/2023 (2023-07-01), 94/2023 (2024-01-01),
/// 72/2024 (2024-07-01), 180/2024 (2025-01-01), 174/2025 under Resolution 204/2025
/// (2025-07-01 → 2026-12-31); nothing is known for 2027, so 8% ends there. The consumer
/// wording "Bán cho người tiêu dùng" is reported for Decree 254/2026 from 2026-07-01 (not
/// verified against the official text: DOMAIN §0), so it is not a column here but
/// [`ConsumerWording`], whose switch date is configurable.
pub const RULES: &[RuleSet] = &[
    RuleSet {
        from: date(2022, 7, 1),
        basis: "Decree 123/2020 + Circular 78/2021; Decree 15/2022 (8% window)",
        eight_percent_allowed: true,
    },
    RuleSet {
        from: date(2023, 1, 1),
        basis: "Decree 123/2020 + Circular 78/2021 (no 8% window)",
        eight_percent_allowed: false,
    },
    RuleSet { from: date(2023, 7, 1), basis: "Decree 44/2023 (8% window)", eight_percent_allowed: true },
    RuleSet {
        from: date(2025, 6, 1),
        basis: "Decree 70/2025 + Circular 32/2025; Decrees 180/2024, 174/2025 (8%)",
        eight_percent_allowed: true,
    },
    RuleSet {
        from: date(2026, 7, 1),
        basis: "Decree 254/2026 + Circular 91/2026 (reported); Decree 174/2025 (8%)",
        eight_percent_allowed: true,
    },
    RuleSet {
        from: date(2027, 1, 1),
        basis: "Decree 254/2026 + Circular 91/2026 (reported); 8% window ended",
        eight_percent_allowed: false,
    },
];

/// Why no rule applies.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no e-invoice rule set covers {0} (the table starts on 2022-07-01)")]
pub struct NoRuleSet(pub NaiveDate);

/// The rules in force on `day` (the legal date in Asia/Ho_Chi_Minh).
pub fn rules_for(day: NaiveDate) -> Result<&'static RuleSet, NoRuleSet> {
    RULES.iter().rev().find(|r| r.from <= day).ok_or(NoRuleSet(day))
}

/// Whether an invoice symbol (e.g. `1C26TAA`) has the legal shape
/// `^[1-9][CK]\d{2}[TDLMNBGHXF][A-Z]{2}$`.
pub fn valid_symbol(symbol: &str) -> bool {
    let b = symbol.as_bytes();
    b.len() == 7
        && matches!(b[0], b'1'..=b'9')
        && matches!(b[1], b'C' | b'K')
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
        && matches!(b[4], b'T' | b'D' | b'L' | b'M' | b'N' | b'B' | b'G' | b'H' | b'X' | b'F')
        && b[5].is_ascii_uppercase()
        && b[6].is_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn the_table_is_ordered() {
        assert!(RULES.windows(2).all(|w| w[0].from < w[1].from));
    }

    #[test]
    fn eight_percent_window_boundaries() {
        assert!(rules_for(d(2022, 12, 31)).unwrap().eight_percent_allowed);
        assert!(!rules_for(d(2023, 1, 1)).unwrap().eight_percent_allowed);
        assert!(!rules_for(d(2023, 6, 30)).unwrap().eight_percent_allowed);
        assert!(rules_for(d(2023, 7, 1)).unwrap().eight_percent_allowed);
        assert!(rules_for(d(2025, 7, 1)).unwrap().eight_percent_allowed);
        assert!(rules_for(d(2026, 12, 31)).unwrap().eight_percent_allowed);
        assert!(!rules_for(d(2027, 1, 1)).unwrap().eight_percent_allowed);
    }

    #[test]
    fn consumer_wording_changes_on_2026_07_01_unless_configured_otherwise() {
        let wording = ConsumerWording::default();
        assert_eq!(wording.name_on(d(2026, 6, 30)), "Người mua không lấy hóa đơn");
        assert_eq!(wording.name_on(d(2026, 7, 1)), "Bán cho người tiêu dùng");
        let never = ConsumerWording { from: None };
        assert_eq!(never.name_on(d(2030, 1, 1)), "Người mua không lấy hóa đơn");
        let later = ConsumerWording { from: Some(d(2026, 9, 1)) };
        assert_eq!(later.name_on(d(2026, 8, 31)), "Người mua không lấy hóa đơn");
        assert_eq!(later.name_on(d(2026, 9, 1)), "Bán cho người tiêu dùng");
    }

    #[test]
    fn dates_before_the_table_have_no_rules() {
        assert_eq!(rules_for(d(2022, 6, 30)), Err(NoRuleSet(d(2022, 6, 30))));
        assert!(rules_for(d(2022, 7, 1)).is_ok());
    }

    #[test]
    fn symbols() {
        for ok in ["1C26TAA", "2K25MYY", "1C25XAB", "1C26FZZ"] {
            assert!(valid_symbol(ok), "{ok}");
        }
        for bad in ["C26TAA", "0C26TAA", "1A26TAA", "1C2TAAA", "1C26QAA", "1C26Taa", "1C26TAAA", ""] {
            assert!(!valid_symbol(bad), "{bad}");
        }
    }
}
