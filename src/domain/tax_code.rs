//! Vietnamese tax codes (mã số thuế, MST) as accepted from buyers and merchants (DOMAIN §2
//! "Tax codes", §7 "Tax codes").
//!
//! Three shapes are valid, anything else is invalid input:
//!
//! * `NNNNNNNNNN`: 10 digits whose last digit is the check digit of the first nine, issued
//!   to organisations (and, before 2025-07-01, also to individuals and households);
//! * `NNNNNNNNNN-NNN`: a dependent unit (branch) of such a code, suffix `001`–`999`;
//! * 12 digits: a citizen ID number used as the tax code of an individual or household since
//!   2025-07-01. It carries no check digit, so only its shape is checked.
//!
//! Check digit: with weights 31, 29, 23, 19, 17, 13, 7, 5, 3 on digits 1–9 and
//! `r = Σ mod 11`, the tenth digit is `10 − r`; `r = 10` gives `0`, and `r = 0` would give
//! `10`, which is no digit, so such prefixes have no valid code (validators in the wild
//! differ here; DOMAIN §2 says to treat them as invalid).
//!
//! Error messages never echo the input: a 12-digit personal ID is personal data and these
//! errors end up in logs and API responses.

use std::fmt;
use std::str::FromStr;

const CHECK_WEIGHTS: [u32; 9] = [31, 29, 23, 19, 17, 13, 7, 5, 3];

/// A syntactically valid tax code, as produced by [`parse`]. The string is the trimmed input,
/// which for a valid code is already canonical (digits and at most one `-`).
///
/// Construct values through [`parse`] (or [`FromStr`]) only: the variants are public so that
/// callers can match on the kind, but building one directly bypasses validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TaxCode {
    /// Ten digits with a valid check digit.
    Organisation(String),
    /// A valid ten-digit code, `-`, and a branch suffix `001`–`999` (14 characters).
    Branch(String),
    /// A twelve-digit personal (citizen ID) number; no check digit.
    PersonalId(String),
}

/// Why a string is not a valid tax code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaxCodeError {
    /// Nothing but whitespace was given.
    #[error("tax code is empty")]
    Empty,
    /// The shape matches none of the accepted forms.
    #[error(
        "malformed tax code ({reason}): expected 10 digits, 10 digits + \"-\" + a 3-digit branch \
         suffix, or a 12-digit personal ID"
    )]
    BadFormat {
        /// What is wrong with the shape, without repeating the input.
        reason: String,
    },
    /// The tenth digit is not the check digit of the first nine.
    #[error("tax code check digit is {found}, expected {expected}")]
    BadCheckDigit {
        /// The tenth digit as given.
        found: u8,
        /// The check digit computed from the first nine digits.
        expected: u8,
    },
    /// The first nine digits have a weighted sum divisible by 11, for which no check digit
    /// exists, so no valid code starts with them.
    #[error(
        "tax code is invalid: its first nine digits admit no check digit (weighted sum divisible by 11)"
    )]
    NoCheckDigit,
    /// The part after `-` is not three digits from `001` to `999`.
    #[error("tax code branch suffix must be 3 digits from 001 to 999")]
    BadBranchSuffix,
}

impl TaxCode {
    /// Parses and validates a tax code; same as the free function [`parse`].
    pub fn parse(input: &str) -> Result<Self, TaxCodeError> {
        parse(input)
    }

    /// The code as written, e.g. `0100109106-001`.
    pub fn as_str(&self) -> &str {
        match self {
            TaxCode::Organisation(code) | TaxCode::Branch(code) | TaxCode::PersonalId(code) => code,
        }
    }

    /// Whether the code identifies a business (organisation or one of its branches) rather
    /// than an individual's personal ID. Decides, for example, whether a legal name is required.
    pub fn is_business(&self) -> bool {
        matches!(self, TaxCode::Organisation(_) | TaxCode::Branch(_))
    }

    /// The ten-digit code of the organisation: the whole code for an organisation, the part
    /// before `-` for a branch, `None` for a personal ID.
    pub fn organisation_code(&self) -> Option<&str> {
        match self {
            TaxCode::Organisation(code) => Some(code),
            TaxCode::Branch(code) => code.get(..10),
            TaxCode::PersonalId(_) => None,
        }
    }

    /// The three-digit branch suffix (`001`–`999`) of a branch code, else `None`.
    pub fn branch_suffix(&self) -> Option<&str> {
        match self {
            TaxCode::Branch(code) => code.get(11..),
            TaxCode::Organisation(_) | TaxCode::PersonalId(_) => None,
        }
    }
}

impl fmt::Display for TaxCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for TaxCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl FromStr for TaxCode {
    type Err = TaxCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl From<TaxCode> for String {
    fn from(code: TaxCode) -> Self {
        match code {
            TaxCode::Organisation(code) | TaxCode::Branch(code) | TaxCode::PersonalId(code) => code,
        }
    }
}

/// Parses and validates a tax code, ignoring surrounding whitespace (including the
/// non-breaking spaces that copy-paste brings). Inner spaces, dots or other separators are
/// refused rather than normalised, so what is stored is exactly what will be sent.
pub fn parse(input: &str) -> Result<TaxCode, TaxCodeError> {
    let code = input.trim();
    if code.is_empty() {
        return Err(TaxCodeError::Empty);
    }
    if let Some((base, suffix)) = code.split_once('-') {
        if !is_digits(base, 10) {
            return Err(bad_format("the part before \"-\" is not 10 digits"));
        }
        if !is_digits(suffix, 3) || suffix == "000" {
            return Err(TaxCodeError::BadBranchSuffix);
        }
        verify_check_digit(base)?;
        return Ok(TaxCode::Branch(code.to_owned()));
    }
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_format("contains a character other than the digits 0-9"));
    }
    match code.len() {
        10 => {
            verify_check_digit(code)?;
            Ok(TaxCode::Organisation(code.to_owned()))
        }
        12 => Ok(TaxCode::PersonalId(code.to_owned())),
        n => Err(bad_format(&format!("{n} digits"))),
    }
}

/// The check digit (0–9) for a nine-digit prefix, or `None` when `prefix` is not exactly nine
/// ASCII digits or when its weighted sum is divisible by 11 (no valid code has that prefix).
pub fn check_digit(prefix: &str) -> Option<u8> {
    if !is_digits(prefix, 9) {
        return None;
    }
    let sum: u32 = prefix.bytes().zip(CHECK_WEIGHTS).map(|(b, weight)| u32::from(b - b'0') * weight).sum();
    match sum % 11 {
        0 => None,
        remainder => u8::try_from(10 - remainder).ok(),
    }
}

/// `code` must already be ten ASCII digits.
fn verify_check_digit(code: &str) -> Result<(), TaxCodeError> {
    let (prefix, last) = code.split_at(9);
    let found = last.bytes().next().map_or(0, |b| b - b'0');
    match check_digit(prefix) {
        None => Err(TaxCodeError::NoCheckDigit),
        Some(expected) if expected == found => Ok(()),
        Some(expected) => Err(TaxCodeError::BadCheckDigit { found, expected }),
    }
}

fn is_digits(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
}

fn bad_format(reason: &str) -> TaxCodeError {
    TaxCodeError::BadFormat { reason: reason.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn real_organisation_codes_validate() {
        // 0100109106: Σ = 114, 114 mod 11 = 4 → 6. 0101243150: Σ = 175, remainder 10 → 0.
        for code in ["0100109106", "0101243150"] {
            assert_eq!(parse(code), Ok(TaxCode::Organisation(code.to_owned())));
        }
        assert_eq!(check_digit("010124315"), Some(0));
        assert_eq!(check_digit("010010910"), Some(6));
    }

    #[test]
    fn surrounding_whitespace_is_trimmed() {
        let code = parse(" \t0100109106\u{a0}\n").unwrap();
        assert_eq!(code.as_str(), "0100109106");
        assert_eq!(code.to_string(), "0100109106");
    }

    #[test]
    fn branch_codes() {
        let code = parse("0100109106-001").unwrap();
        assert_eq!(code, TaxCode::Branch("0100109106-001".into()));
        assert!(code.is_business());
        assert_eq!(code.organisation_code(), Some("0100109106"));
        assert_eq!(code.branch_suffix(), Some("001"));
        assert!(parse("0101243150-999").is_ok());
        assert_eq!(parse("0100109106-000"), Err(TaxCodeError::BadBranchSuffix));
        for bad in ["0100109106-", "0100109106-01", "0100109106-0001", "0100109106-0a1", "0100109106-001-002"]
        {
            assert_eq!(parse(bad), Err(TaxCodeError::BadBranchSuffix), "{bad}");
        }
        // The organisation part of a branch is checked like an organisation code.
        assert_eq!(parse("0100109107-001"), Err(TaxCodeError::BadCheckDigit { found: 7, expected: 6 }));
        assert!(matches!(parse("010010910-001"), Err(TaxCodeError::BadFormat { .. })));
        assert!(matches!(parse("-001"), Err(TaxCodeError::BadFormat { .. })));
        assert!(matches!(parse("0100109106 -001"), Err(TaxCodeError::BadFormat { .. })));
    }

    #[test]
    fn personal_ids() {
        let code = parse("001203004567").unwrap();
        assert_eq!(code, TaxCode::PersonalId("001203004567".into()));
        assert!(!code.is_business());
        assert_eq!(code.organisation_code(), None);
        assert_eq!(code.branch_suffix(), None);
        // No check digit: any twelve digits pass.
        assert!(parse("999999999999").is_ok());
    }

    #[test]
    fn organisation_accessors() {
        let code: TaxCode = "0101243150".parse().unwrap();
        assert!(code.is_business());
        assert_eq!(code.organisation_code(), Some("0101243150"));
        assert_eq!(code.branch_suffix(), None);
        assert_eq!(code.as_ref(), "0101243150");
        assert_eq!(String::from(code), "0101243150");
    }

    #[test]
    fn wrong_check_digit() {
        assert_eq!(parse("0100109107"), Err(TaxCodeError::BadCheckDigit { found: 7, expected: 6 }));
        assert_eq!(parse("0101243151"), Err(TaxCodeError::BadCheckDigit { found: 1, expected: 0 }));
    }

    #[test]
    fn prefix_without_check_digit_is_invalid() {
        // 100000008: Σ = 31 + 8 × 3 = 55 ≡ 0 (mod 11).
        let prefix = "100000008";
        assert_eq!(check_digit(prefix), None);
        for d in 0..=9 {
            assert_eq!(parse(&format!("{prefix}{d}")), Err(TaxCodeError::NoCheckDigit));
        }
        assert_eq!(check_digit("000000000"), None, "Σ = 0 is divisible by 11");
        assert_eq!(parse("0000000000"), Err(TaxCodeError::NoCheckDigit));
    }

    #[test]
    fn wrong_lengths_and_characters() {
        for bad in ["010010910", "01001091061", "0100109106123", "1", "01234567890123"] {
            assert!(matches!(parse(bad), Err(TaxCodeError::BadFormat { .. })), "{bad}");
        }
        for bad in ["01001O9106", "abcdefghij", "0100 109106", "0100.109.106", "０１００１０９１０６"]
        {
            assert!(matches!(parse(bad), Err(TaxCodeError::BadFormat { .. })), "{bad}");
        }
        assert_eq!(parse(""), Err(TaxCodeError::Empty));
        assert_eq!(parse("   "), Err(TaxCodeError::Empty));
    }

    #[test]
    fn check_digit_rejects_non_prefixes() {
        assert_eq!(check_digit("01001091"), None);
        assert_eq!(check_digit("0100109106"), None);
        assert_eq!(check_digit("01001091a"), None);
    }

    #[test]
    fn messages_do_not_echo_the_input() {
        let err = parse("00120300456").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("11 digits"), "{message}");
        assert!(!message.contains("00120300456"), "{message}");
        assert_eq!(parse("0100109107").unwrap_err().to_string(), "tax code check digit is 7, expected 6");
    }

    proptest! {
        #[test]
        fn computable_prefix_has_exactly_one_valid_tenth_digit(prefix in "[0-9]{9}") {
            let valid: Vec<u8> = (0..=9u8).filter(|d| parse(&format!("{prefix}{d}")).is_ok()).collect();
            match check_digit(&prefix) {
                Some(expected) => prop_assert_eq!(valid, vec![expected]),
                None => prop_assert!(valid.is_empty()),
            }
        }

        #[test]
        fn valid_codes_round_trip_through_as_str(prefix in "[0-9]{9}", branch in 1u16..1000) {
            if let Some(d) = check_digit(&prefix) {
                let org = format!("{prefix}{d}");
                let parsed_org = parse(&org)?;
                prop_assert_eq!(parsed_org.as_str(), org.as_str());
                let branch_code = format!("{org}-{branch:03}");
                let parsed = parse(&branch_code)?;
                prop_assert_eq!(parsed.as_str(), branch_code.as_str());
                prop_assert_eq!(parsed.organisation_code(), Some(org.as_str()));
            }
        }

        #[test]
        fn parse_never_panics(input in "\\PC{0,20}") {
            let _ = parse(&input);
        }
    }
}
