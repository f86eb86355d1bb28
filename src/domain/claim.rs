//! Claim deadlines (DOMAIN §7). A `claim_window` merchant holds the invoice until
//! min(paidAt + window, end of the sale day in Asia/Ho_Chi_Minh); an `immediate` merchant
//! still opens a claim for the window, which may produce a replacement invoice.

use chrono::{DateTime, Duration, FixedOffset, NaiveTime, TimeZone, Utc};
use sha2::{Digest, Sha256};

use super::tax_info::IssuanceMode;

/// Asia/Ho_Chi_Minh: UTC+7 all year (Vietnam has kept no daylight saving time since 1975),
/// so a fixed offset is exact and needs no time-zone database.
pub fn vietnam() -> FixedOffset {
    VIETNAM
}

const VIETNAM: FixedOffset = match FixedOffset::east_opt(7 * 3600) {
    Some(offset) => offset,
    None => panic!("UTC+7 is a valid offset"),
};

/// The sale day's end: the next midnight in Vietnam after `paid_at`.
pub fn end_of_sale_day(paid_at: DateTime<Utc>) -> DateTime<Utc> {
    let local = paid_at.with_timezone(&vietnam());
    let next_midnight = local.date_naive().succ_opt().unwrap_or(local.date_naive()).and_time(NaiveTime::MIN);
    vietnam().from_local_datetime(&next_midnight).single().map(|d| d.with_timezone(&Utc)).unwrap_or(paid_at)
}

/// The deadline of the claim opened for a payment.
pub fn deadline(paid_at: DateTime<Utc>, window_minutes: u32, mode: IssuanceMode) -> DateTime<Utc> {
    let by_window = paid_at + Duration::minutes(i64::from(window_minutes));
    match mode {
        IssuanceMode::ClaimWindow => by_window.min(end_of_sale_day(paid_at)),
        IssuanceMode::Immediate => by_window,
    }
}

/// The stored form of a claim token: SHA-256 of its text. The clear token is shown once.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn claim_window_stops_at_the_end_of_the_sale_day() {
        // Paid 10:15 in Hà Nội, 24 h window → cut at midnight local (17:00 UTC).
        let paid = utc("2026-11-24T10:15:00+07:00");
        assert_eq!(deadline(paid, 1440, IssuanceMode::ClaimWindow), utc("2026-11-25T00:00:00+07:00"));
        // A short window ends before midnight.
        assert_eq!(deadline(paid, 30, IssuanceMode::ClaimWindow), utc("2026-11-24T10:45:00+07:00"));
        // 23:59:30 local: 30 s left in the day.
        let late = utc("2026-11-24T23:59:30+07:00");
        assert_eq!(deadline(late, 1440, IssuanceMode::ClaimWindow), utc("2026-11-25T00:00:00+07:00"));
        // 00:30 local is 17:30 UTC the day before; the sale day is the local one.
        let early = utc("2026-11-24T17:30:00Z");
        assert_eq!(end_of_sale_day(early), utc("2026-11-26T00:00:00+07:00"));
    }

    #[test]
    fn immediate_claims_run_the_whole_window() {
        let paid = utc("2026-11-24T10:15:00+07:00");
        assert_eq!(deadline(paid, 1440, IssuanceMode::Immediate), utc("2026-11-25T10:15:00+07:00"));
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(
            hex::encode(token_hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn a_claim_window_deadline_is_never_past_the_sale_day(secs in 1_735_689_600i64..2_000_000_000, window in 0u32..100_000) {
            let paid = Utc.timestamp_opt(secs, 0).unwrap();
            let d = deadline(paid, window, IssuanceMode::ClaimWindow);
            prop_assert!(d >= paid);
            prop_assert!(d <= end_of_sale_day(paid));
            prop_assert_eq!(d.with_timezone(&vietnam()).date_naive() == paid.with_timezone(&vietnam()).date_naive()
                || d == end_of_sale_day(paid), true);
        }
    }
}
