//! Amounts in Vietnamese words, as printed in an invoice's `TgTTTBChu` field (DOMAIN §2 "Words",
//! §7 "Money").
//!
//! Conventions, chosen to match what Viettel S-Invoice and MISA meInvoice print:
//!
//! * Digits: không, một, hai, ba, bốn, năm, sáu, bảy, tám, chín.
//! * Tens: "mười" for 10–19, "<digit> mươi" from 20 up.
//! * Units after a tens word: "mốt" for 1 and "tư" for 4 after "mươi" (hai mươi mốt, hai mươi tư),
//!   but "một"/"bốn" after "mười" (mười một, mười bốn); "lăm" for 5 after either (mười lăm,
//!   hai mươi lăm).
//! * A zero tens digit between hundreds and a nonzero unit is read "linh" (the northern form;
//!   the southern "lẻ" is not used): 105 → "một trăm linh năm".
//! * Every 3-digit group after the leading one is read in full, so a zero hundreds digit is
//!   spoken: 1 005 → "một nghìn không trăm linh năm", 1 050 000 → "một triệu không trăm năm
//!   mươi nghìn". Groups that are entirely zero are skipped together with their scale word:
//!   1 000 000 → "một triệu", 1 000 000 005 → "một tỷ không trăm linh năm".
//! * Scales: nghìn (10³), triệu (10⁶), tỷ (10⁹). Beyond that the number is cut into 9-digit
//!   chunks and each chunk carries "tỷ" once per chunk below it, so the part above a tỷ is
//!   itself read as a number: 10¹² → "một nghìn tỷ", 10¹⁵ → "một triệu tỷ", 1 005 × 10⁹ →
//!   "một nghìn không trăm linh năm tỷ", 10¹⁸ → "một tỷ tỷ". Reading per 9-digit chunk rather
//!   than giving every 3-digit group its own compound scale ("một nghìn tỷ không trăm linh năm
//!   tỷ") is how people actually say such amounts, and it stays unambiguous up to `u64::MAX`.
//!
//! Readings of invoice-sized amounts (below 10¹⁵, the 15 integer digits the XML schema allows)
//! stay well inside the field's 255-character limit; a test pins that.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

const DIGITS: [&str; 10] = ["không", "một", "hai", "ba", "bốn", "năm", "sáu", "bảy", "tám", "chín"];

const BILLION: u64 = 1_000_000_000;

/// Why an amount could not be read in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordsError {
    /// The currency is not a three-letter ISO 4217 code.
    #[error("currency {0:?} is not a three-letter ISO 4217 code")]
    InvalidCurrency(String),
    /// The amount is below zero; no sign word ("âm") is produced, so the caller must decide.
    #[error("cannot read negative amount {0} in words")]
    Negative(Decimal),
    /// The integer part does not fit in a `u64`.
    #[error("amount {0} is too large to read in words (the integer part must not exceed {max})", max = u64::MAX)]
    TooLarge(Decimal),
    /// A VND amount with a fractional part: the đồng has no minor unit.
    #[error("VND amount {0} is not a whole number of đồng")]
    FractionalVnd(Decimal),
    /// A USD amount with more than two decimal places (sub-cent precision).
    #[error("USD amount {0} has more than two decimal places")]
    SubCent(Decimal),
    /// A fractional amount in a currency whose minor unit has no word here.
    #[error("{currency} amount {amount} has a fractional part; only USD cents can be read in words")]
    FractionUnsupported {
        /// The amount as given.
        amount: Decimal,
        /// The normalised (upper-case) currency code.
        currency: String,
    },
}

/// Reads `n` in lower-case Vietnamese words without a unit, e.g. 21 → "hai mươi mốt",
/// 0 → "không". See the module documentation for the conventions.
pub fn number_in_words(n: u64) -> String {
    if n == 0 {
        return DIGITS[0].to_owned();
    }
    // Little-endian 9-digit chunks: chunk `i` is followed by "tỷ" repeated `i` times.
    let mut chunks = Vec::with_capacity(3);
    let mut rest = n;
    while rest > 0 {
        chunks.push(rest % BILLION);
        rest /= BILLION;
    }
    let leading_index = chunks.len().saturating_sub(1);
    let mut words: Vec<&'static str> = Vec::with_capacity(48);
    for (i, &chunk) in chunks.iter().enumerate().rev() {
        if chunk == 0 {
            continue;
        }
        push_chunk(&mut words, chunk, i == leading_index);
        words.extend(std::iter::repeat_n("tỷ", i));
    }
    words.join(" ")
}

/// Reads a whole amount of đồng, capitalised and ending in " đồng", e.g. 1 080 000 →
/// "Một triệu không trăm tám mươi nghìn đồng", 0 → "Không đồng".
pub fn amount_in_words_vnd(amount: u64) -> String {
    let mut words = number_in_words(amount);
    words.push_str(" đồng");
    capitalise(&words)
}

/// Reads a non-negative amount in `currency` (ISO 4217, case-insensitive, surrounding
/// whitespace ignored), capitalised.
///
/// * `VND`: the amount must be whole; read as by [`amount_in_words_vnd`].
/// * `USD`: the integer part followed by "đô la Mỹ", then, when there are cents (at most two
///   decimal places), " và <cents> cent": 12.05 → "Mười hai đô la Mỹ và năm cent".
/// * Any other currency: the integer part followed by the upper-case ISO code
///   ("Một trăm EUR"). Fractional amounts are refused rather than guessed, because the name of
///   the minor unit (or whether there is one) differs per currency and the words are a legal
///   field of the invoice.
pub fn amount_in_words(amount: &Decimal, currency: &str) -> Result<String, WordsError> {
    let code = currency.trim();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(WordsError::InvalidCurrency(currency.to_owned()));
    }
    let code = code.to_ascii_uppercase();
    // Comparing with zero (not checking the sign bit) lets a "-0" through as zero.
    if *amount < Decimal::ZERO {
        return Err(WordsError::Negative(*amount));
    }
    let whole = amount.trunc().to_u64().ok_or(WordsError::TooLarge(*amount))?;
    let fraction = amount.fract();
    match code.as_str() {
        "VND" => {
            if !fraction.is_zero() {
                return Err(WordsError::FractionalVnd(*amount));
            }
            Ok(amount_in_words_vnd(whole))
        }
        "USD" => {
            let cents = fraction.checked_mul(Decimal::ONE_HUNDRED).ok_or(WordsError::SubCent(*amount))?;
            if !cents.fract().is_zero() {
                return Err(WordsError::SubCent(*amount));
            }
            let cents = cents.to_u64().ok_or(WordsError::SubCent(*amount))?;
            let mut words = number_in_words(whole);
            words.push_str(" đô la Mỹ");
            if cents > 0 {
                words.push_str(" và ");
                words.push_str(&number_in_words(cents));
                words.push_str(" cent");
            }
            Ok(capitalise(&words))
        }
        _ => {
            if !fraction.is_zero() {
                return Err(WordsError::FractionUnsupported { amount: *amount, currency: code });
            }
            Ok(capitalise(&format!("{} {code}", number_in_words(whole))))
        }
    }
}

/// Reads one nonzero 9-digit chunk (below 10⁹). In the leading chunk the leading zero groups
/// are silent and the first nonzero group is read without "không trăm"; in any later chunk
/// every nonzero group is read in full.
fn push_chunk(words: &mut Vec<&'static str>, chunk: u64, leading_chunk: bool) {
    let groups = [(chunk / 1_000_000, "triệu"), (chunk / 1_000 % 1_000, "nghìn"), (chunk % 1_000, "")];
    let mut leading = leading_chunk;
    for (group, scale) in groups {
        if group == 0 {
            continue;
        }
        push_group(words, group, !leading);
        leading = false;
        if !scale.is_empty() {
            words.push(scale);
        }
    }
}

/// Reads a nonzero group below 1000. `full` forces the hundreds digit to be spoken even when
/// it is zero, which is what marks the place value of a non-leading group.
fn push_group(words: &mut Vec<&'static str>, group: u64, full: bool) {
    let hundreds = group / 100 % 10;
    let tens = group / 10 % 10;
    let units = group % 10;
    let spoken_hundreds = hundreds > 0 || full;
    if spoken_hundreds {
        words.push(digit(hundreds));
        words.push("trăm");
    }
    match tens {
        0 => {
            if units > 0 {
                if spoken_hundreds {
                    words.push("linh");
                }
                words.push(digit(units));
            }
        }
        1 => {
            words.push("mười");
            match units {
                0 => {}
                5 => words.push("lăm"),
                _ => words.push(digit(units)),
            }
        }
        _ => {
            words.push(digit(tens));
            words.push("mươi");
            match units {
                0 => {}
                1 => words.push("mốt"),
                4 => words.push("tư"),
                5 => words.push("lăm"),
                _ => words.push(digit(units)),
            }
        }
    }
}

fn digit(d: u64) -> &'static str {
    // `% 10` keeps the index in range whatever the caller passes.
    DIGITS[(d % 10) as usize]
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    const GOLDEN: &[(u64, &str)] = &[
        (0, "Không đồng"),
        (1, "Một đồng"),
        (4, "Bốn đồng"),
        (5, "Năm đồng"),
        (10, "Mười đồng"),
        (11, "Mười một đồng"),
        (14, "Mười bốn đồng"),
        (15, "Mười lăm đồng"),
        (20, "Hai mươi đồng"),
        (21, "Hai mươi mốt đồng"),
        (24, "Hai mươi tư đồng"),
        (25, "Hai mươi lăm đồng"),
        (55, "Năm mươi lăm đồng"),
        (99, "Chín mươi chín đồng"),
        (100, "Một trăm đồng"),
        (101, "Một trăm linh một đồng"),
        (104, "Một trăm linh bốn đồng"),
        (105, "Một trăm linh năm đồng"),
        (110, "Một trăm mười đồng"),
        (111, "Một trăm mười một đồng"),
        (115, "Một trăm mười lăm đồng"),
        (121, "Một trăm hai mươi mốt đồng"),
        (1_000, "Một nghìn đồng"),
        (1_001, "Một nghìn không trăm linh một đồng"),
        (1_005, "Một nghìn không trăm linh năm đồng"),
        (1_010, "Một nghìn không trăm mười đồng"),
        (1_015, "Một nghìn không trăm mười lăm đồng"),
        (1_100, "Một nghìn một trăm đồng"),
        (10_000, "Mười nghìn đồng"),
        (12_345, "Mười hai nghìn ba trăm bốn mươi lăm đồng"),
        (15_000, "Mười lăm nghìn đồng"),
        (21_000, "Hai mươi mốt nghìn đồng"),
        (100_000, "Một trăm nghìn đồng"),
        (105_000, "Một trăm linh năm nghìn đồng"),
        (1_000_000, "Một triệu đồng"),
        (1_000_005, "Một triệu không trăm linh năm đồng"),
        (1_000_010, "Một triệu không trăm mười đồng"),
        (1_050_000, "Một triệu không trăm năm mươi nghìn đồng"),
        (1_080_000, "Một triệu không trăm tám mươi nghìn đồng"),
        (2_500_000, "Hai triệu năm trăm nghìn đồng"),
        (10_000_000, "Mười triệu đồng"),
        (25_000_000, "Hai mươi lăm triệu đồng"),
        (1_000_000_000, "Một tỷ đồng"),
        (1_000_000_005, "Một tỷ không trăm linh năm đồng"),
        (1_000_050_000, "Một tỷ không trăm năm mươi nghìn đồng"),
        (
            1_234_567_890,
            "Một tỷ hai trăm ba mươi tư triệu năm trăm sáu mươi bảy nghìn tám trăm chín mươi đồng",
        ),
        (1_000_000_000_000, "Một nghìn tỷ đồng"),
        (1_005_000_000_000, "Một nghìn không trăm linh năm tỷ đồng"),
        (1_000_001_000_000, "Một nghìn tỷ không trăm linh một triệu đồng"),
        (100_000_000_000_000, "Một trăm nghìn tỷ đồng"),
        (
            999_999_999_999_999,
            "Chín trăm chín mươi chín nghìn chín trăm chín mươi chín tỷ chín trăm chín mươi chín triệu \
             chín trăm chín mươi chín nghìn chín trăm chín mươi chín đồng",
        ),
        (1_000_000_000_000_000, "Một triệu tỷ đồng"),
        (1_000_000_000_000_000_000, "Một tỷ tỷ đồng"),
        (1_000_000_000_000_000_005, "Một tỷ tỷ không trăm linh năm đồng"),
        (
            u64::MAX,
            "Mười tám tỷ tỷ bốn trăm bốn mươi sáu triệu bảy trăm bốn mươi tư nghìn không trăm bảy \
             mươi ba tỷ bảy trăm linh chín triệu năm trăm năm mươi mốt nghìn sáu trăm mười lăm đồng",
        ),
    ];

    #[test]
    fn golden_values() {
        for &(n, expected) in GOLDEN {
            assert_eq!(amount_in_words_vnd(n), expected, "amount {n}");
        }
    }

    #[test]
    fn golden_values_parse_back() {
        for &(n, expected) in GOLDEN {
            assert_eq!(parse_vnd_reading(expected), Some(u128::from(n)), "{expected}");
        }
    }

    #[test]
    fn the_test_reader_rejects_forbidden_forms() {
        for bad in [
            "Hai mươi một đồng",
            "Hai mươi bốn đồng",
            "Hai mươi năm đồng",
            "Mười năm đồng",
            "Mười mốt đồng",
            "Mười tư đồng",
            "Một trăm năm đồng",
            "Một trăm lẻ năm đồng",
            "Một nghìn năm đồng",
            "Một nghìn linh năm đồng",
            "Một triệu năm mươi nghìn đồng",
            "Không trăm năm đồng",
            "Một mươi đồng",
            "một đồng",
            "Một",
        ] {
            assert_eq!(parse_vnd_reading(bad), None, "{bad}");
        }
    }

    #[test]
    fn number_in_words_is_lower_case_without_unit() {
        assert_eq!(number_in_words(0), "không");
        assert_eq!(number_in_words(21), "hai mươi mốt");
        assert_eq!(number_in_words(1_005), "một nghìn không trăm linh năm");
    }

    #[test]
    fn small_numbers_round_trip_exhaustively() {
        for n in 0..=20_000u64 {
            let words = amount_in_words_vnd(n);
            assert_eq!(parse_vnd_reading(&words), Some(u128::from(n)), "{n}: {words}");
        }
    }

    #[test]
    fn large_values_do_not_panic() {
        for n in [u64::MAX, u64::MAX - 1, u64::MAX / 2, 10_000_000_000_000_000_000, 1 << 63] {
            let words = amount_in_words_vnd(n);
            assert_eq!(parse_vnd_reading(&words), Some(u128::from(n)), "{words}");
        }
    }

    #[test]
    fn invoice_sized_readings_fit_the_255_character_field() {
        // "không trăm chín mươi chín" is the longest full group, so this is the longest reading
        // below 10^15 (154 characters); even counted in UTF-8 bytes it stays under 255.
        for n in [999_099_099_099_099u64, 999_999_999_999_999, 777_777_777_777_777] {
            let words = amount_in_words_vnd(n);
            assert!(words.len() <= 255, "{n}: {} bytes", words.len());
        }
        assert_eq!(amount_in_words_vnd(999_099_099_099_099).chars().count(), 154);
    }

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn decimal_vnd() {
        assert_eq!(
            amount_in_words(&dec("1080000"), "VND").unwrap(),
            "Một triệu không trăm tám mươi nghìn đồng"
        );
        // Trailing zero decimals are still a whole number of đồng.
        assert_eq!(amount_in_words(&dec("1080000.00"), " vnd ").unwrap(), amount_in_words_vnd(1_080_000));
        assert_eq!(amount_in_words(&dec("0"), "VND").unwrap(), "Không đồng");
        assert_eq!(amount_in_words(&dec("-0"), "VND").unwrap(), "Không đồng");
        assert_eq!(amount_in_words(&dec("1000.5"), "VND"), Err(WordsError::FractionalVnd(dec("1000.5"))));
        assert_eq!(amount_in_words(&dec("-1"), "VND"), Err(WordsError::Negative(dec("-1"))));
        let huge = dec("18446744073709551616");
        assert_eq!(amount_in_words(&huge, "VND"), Err(WordsError::TooLarge(huge)));
        assert_eq!(
            amount_in_words(&dec("18446744073709551615"), "VND").unwrap(),
            amount_in_words_vnd(u64::MAX)
        );
    }

    #[test]
    fn decimal_usd() {
        assert_eq!(amount_in_words(&dec("100"), "USD").unwrap(), "Một trăm đô la Mỹ");
        assert_eq!(amount_in_words(&dec("100.00"), "usd").unwrap(), "Một trăm đô la Mỹ");
        assert_eq!(amount_in_words(&dec("12.05"), "USD").unwrap(), "Mười hai đô la Mỹ và năm cent");
        assert_eq!(amount_in_words(&dec("21.5"), "USD").unwrap(), "Hai mươi mốt đô la Mỹ và năm mươi cent");
        assert_eq!(amount_in_words(&dec("1.99"), "USD").unwrap(), "Một đô la Mỹ và chín mươi chín cent");
        assert_eq!(amount_in_words(&dec("0.25"), "USD").unwrap(), "Không đô la Mỹ và hai mươi lăm cent");
        assert_eq!(amount_in_words(&dec("1.250"), "USD").unwrap(), "Một đô la Mỹ và hai mươi lăm cent");
        assert_eq!(amount_in_words(&dec("1.255"), "USD"), Err(WordsError::SubCent(dec("1.255"))));
        assert_eq!(amount_in_words(&dec("-0.01"), "USD"), Err(WordsError::Negative(dec("-0.01"))));
    }

    #[test]
    fn decimal_other_currencies() {
        assert_eq!(amount_in_words(&dec("100"), "eur").unwrap(), "Một trăm EUR");
        assert_eq!(amount_in_words(&dec("1005"), "JPY").unwrap(), "Một nghìn không trăm linh năm JPY");
        assert_eq!(
            amount_in_words(&dec("10.50"), "EUR"),
            Err(WordsError::FractionUnsupported { amount: dec("10.50"), currency: "EUR".into() })
        );
        for bad in ["", "US", "USDT", "U$D", "đồn"] {
            assert_eq!(
                amount_in_words(&dec("1"), bad),
                Err(WordsError::InvalidCurrency(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_have_readable_messages() {
        assert_eq!(
            WordsError::FractionalVnd(dec("1.5")).to_string(),
            "VND amount 1.5 is not a whole number of đồng"
        );
        assert!(WordsError::TooLarge(dec("1e20")).to_string().contains("18446744073709551615"));
    }

    proptest! {
        #[test]
        fn readings_are_well_formed(n in 0u64..1_000_000_000_000_000) {
            let words = amount_in_words_vnd(n);
            prop_assert!(!words.is_empty());
            prop_assert!(words.chars().next().is_some_and(char::is_uppercase), "{}", words);
            prop_assert!(words.ends_with(" đồng"), "{}", words);
            prop_assert!(!words.contains("  "), "{}", words);
            prop_assert_eq!(words.trim(), words.as_str());
            prop_assert!(words.chars().count() <= 255, "{}", words);
        }

        #[test]
        fn every_u64_reads_back_to_itself(n in any::<u64>()) {
            let words = amount_in_words_vnd(n);
            prop_assert_eq!(parse_vnd_reading(&words), Some(u128::from(n)), "{}", words);
        }

        #[test]
        fn invoice_sized_amounts_read_back_to_themselves(n in 0u64..1_000_000_000_000_000) {
            let words = amount_in_words_vnd(n);
            prop_assert_eq!(parse_vnd_reading(&words), Some(u128::from(n)), "{}", words);
        }

        #[test]
        fn whole_decimal_vnd_matches_integer_reading(n in any::<u64>()) {
            prop_assert_eq!(amount_in_words(&Decimal::from(n), "VND"), Ok(amount_in_words_vnd(n)));
        }
    }

    /// An independent, strict reader of the generated text: it rejects the forms the
    /// conventions forbid (e.g. "hai mươi một", "mười năm", "linh" without "trăm", a stray
    /// "không"), so a round trip checks both the value and the wording.
    fn parse_vnd_reading(s: &str) -> Option<u128> {
        let body = s.strip_suffix(" đồng")?;
        let mut chars = body.chars();
        let first = chars.next()?;
        if !first.is_uppercase() {
            return None;
        }
        let lower: String = first.to_lowercase().chain(chars).collect();
        parse_number(&lower)
    }

    fn parse_number(s: &str) -> Option<u128> {
        let tokens: Vec<&str> = s.split(' ').collect();
        if tokens == ["không"] {
            return Some(0);
        }
        let mut total: u128 = 0;
        let mut chunk: u128 = 0;
        let mut group: u128 = 0;
        let mut pending: Option<u128> = None;
        // A group after a scale word must open with "<digit> trăm"; the leading one never
        // opens with "không trăm".
        let mut group_start = true;
        let mut after_scale = false;
        let mut i = 0;
        while i < tokens.len() {
            let token = tokens[i];
            let prev = if i == 0 { "" } else { tokens[i - 1] };
            let next = tokens.get(i + 1).copied().unwrap_or("");
            // "tỷ" may follow another scale word directly ("một nghìn tỷ"): it ends the chunk.
            if group_start && token != "tỷ" {
                if after_scale && !(DIGITS.contains(&token) && next == "trăm") {
                    return None;
                }
                if !after_scale && token == "không" {
                    return None;
                }
                group_start = false;
            }
            if matches!(token, "nghìn" | "triệu" | "tỷ") {
                group_start = true;
                after_scale = true;
            }
            match token {
                "trăm" => group += pending.take()? * 100,
                "mươi" => {
                    let d = pending.take()?;
                    if d < 2 {
                        return None;
                    }
                    group += d * 10;
                }
                "mười" => {
                    if pending.is_some() {
                        return None;
                    }
                    group += 10;
                }
                "linh" => {
                    if prev != "trăm" || !DIGITS[1..].contains(&next) {
                        return None;
                    }
                }
                "mốt" | "tư" if prev == "mươi" => group += if token == "mốt" { 1 } else { 4 },
                "lăm" if prev == "mươi" || prev == "mười" => group += 5,
                "nghìn" | "triệu" => {
                    group += pending.take().unwrap_or(0);
                    if group == 0 {
                        return None;
                    }
                    chunk += group * if token == "nghìn" { 1_000 } else { 1_000_000 };
                    group = 0;
                }
                "tỷ" => {
                    group += pending.take().unwrap_or(0);
                    chunk += group;
                    group = 0;
                    if chunk == 0 {
                        return None;
                    }
                    let mut repeats = 1;
                    while tokens.get(i + 1) == Some(&"tỷ") {
                        repeats += 1;
                        i += 1;
                    }
                    total += chunk * 1_000_000_000u128.pow(repeats);
                    chunk = 0;
                }
                _ => {
                    let d = DIGITS.iter().position(|w| *w == token)? as u128;
                    if pending.is_some() || (d == 0 && next != "trăm") {
                        return None;
                    }
                    match prev {
                        // After "trăm" a digit must open a tens word; a bare unit needs "linh".
                        "trăm" if next != "mươi" => return None,
                        "mươi" if matches!(d, 1 | 4 | 5) => return None,
                        "mười" if d == 5 => return None,
                        "mươi" | "mười" | "linh" => group += d,
                        _ => pending = Some(d),
                    }
                }
            }
            i += 1;
        }
        group += pending.take().unwrap_or(0);
        Some(total + chunk + group)
    }
}
