//! The worker's decisions as pure functions: what to do with an unfinished invoice now, and
//! where a provider's outcome takes it. No I/O, so every branch is a unit test.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::providers::Outcome;
use crate::storage::issuance::Transition;

/// The facts about an invoice that decide the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State<'a> {
    /// `QUEUED`, `ISSUING` or `SUBMITTED`.
    pub status: &'a str,
    /// Deliveries that could call `create` so far.
    pub attempts: u32,
    /// When it is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// ISSUING lease end.
    pub lease_until: Option<DateTime<Utc>>,
    /// For a replacement: its original's status.
    pub original_status: Option<&'a str>,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Call `create` (QUEUED, attempts left).
    Create,
    /// A previous call may have issued it (ISSUING, lease expired): look up, and create with
    /// the same key only if the provider has nothing.
    LookupThenCreate,
    /// As above, but no attempt is left: look up only; nothing found fails the invoice.
    LookupOnly,
    /// SUBMITTED: ask for the number.
    Poll,
    /// Not yet: come back at this time.
    WaitUntil(DateTime<Utc>),
    /// A replacement whose original is not ISSUED (yet): come back later.
    WaitForOriginal,
    /// QUEUED with every attempt spent.
    Exhausted,
}

/// The next step for an invoice at `now`.
pub fn step(state: &State<'_>, now: DateTime<Utc>, max_attempts: u32) -> Step {
    let due = |at: Option<DateTime<Utc>>| at.is_none_or(|t| t <= now);
    match state.status {
        "QUEUED" => {
            if let Some(original) = state.original_status {
                if original != "ISSUED" {
                    return Step::WaitForOriginal;
                }
            }
            if !due(state.next_attempt_at) {
                return Step::WaitUntil(state.next_attempt_at.unwrap_or(now));
            }
            if state.attempts >= max_attempts {
                Step::Exhausted
            } else {
                Step::Create
            }
        }
        "ISSUING" => {
            // The lease covers the longest call: until it ends, the owner may still be
            // talking to the provider, and a second request with the key could issue twice.
            if !due(state.lease_until) {
                return Step::WaitUntil(state.lease_until.unwrap_or(now));
            }
            if state.attempts >= max_attempts {
                Step::LookupOnly
            } else {
                Step::LookupThenCreate
            }
        }
        "SUBMITTED" => {
            if due(state.next_attempt_at) {
                Step::Poll
            } else {
                Step::WaitUntil(state.next_attempt_at.unwrap_or(now))
            }
        }
        // Settled by someone else since it was read: nothing to do.
        _ => Step::WaitUntil(now),
    }
}

/// Timing settings the transitions need.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Wait after an ambiguous outcome.
    pub safe_wait: Duration,
    /// Interval of number lookups.
    pub lookup_interval: Duration,
    /// The longest delay before a retry, whatever a provider's `Retry-After` asks (SPEC §4:
    /// backoff cap).
    pub backoff_cap: Duration,
}

/// `now + d`, saturating at a far date instead of overflowing (a provider may send any
/// `Retry-After`).
pub fn at(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whether a provider's status of an issued invoice says the tax authority rejected it
/// (Viettel's `DIS_APPROVED`, DOMAIN §3). The invoice has a number but is not valid: someone
/// must act (fix and replace it), so it is counted and alerted on, never silently kept.
pub fn rejected_by_tax_authority(provider_status: Option<&str>) -> bool {
    provider_status.is_some_and(|s| s.to_ascii_uppercase().contains("DIS_APPROVED"))
}

/// Where the outcome of a `create` takes an ISSUING invoice on its `attempt`-th attempt.
/// `backoff` is the jittered delay for this attempt (drawn by the caller).
pub fn after_create(
    outcome: &Outcome,
    attempt: u32,
    series: &str,
    now: DateTime<Utc>,
    timing: &Timing,
    backoff: Duration,
) -> Transition {
    match outcome {
        Outcome::Issued(issued) => Transition::Issued {
            invoice_no: issued.invoice_no.clone(),
            series: series.to_owned(),
            reservation_code: issued.reservation_code.clone(),
            tax_authority_code: issued.tax_authority_code.clone(),
            provider_status: issued.status.clone(),
        },
        Outcome::Accepted => Transition::Submitted { next: at(now, timing.lookup_interval) },
        // "Not found" cannot answer a create; treat it as unknown rather than guess.
        Outcome::Ambiguous { code } => {
            Transition::Ambiguous { until: at(now, timing.safe_wait), error: format!("ambiguous: {code}") }
        }
        Outcome::NotFound => {
            Transition::Ambiguous { until: at(now, timing.safe_wait), error: "ambiguous: NOT_FOUND".into() }
        }
        Outcome::Retryable { code, retry_after } => {
            if attempt >= timing.max_attempts {
                Transition::Failed { error: format!("attempts exhausted ({attempt}); last error {code}") }
            } else {
                let delay = backoff.max(retry_after.unwrap_or(Duration::ZERO)).min(timing.backoff_cap);
                Transition::Retry { next: at(now, delay), error: format!("retryable: {code}") }
            }
        }
        Outcome::Permanent { code, message } => Transition::Failed { error: format!("{code}: {message}") },
    }
}

/// Where a lookup's outcome takes an invoice, or `None` when a `create` must follow (nothing
/// found and attempts left).
pub fn after_lookup(
    step: Step,
    outcome: &Outcome,
    series: &str,
    now: DateTime<Utc>,
    timing: &Timing,
    backoff: Duration,
) -> Option<Transition> {
    let issued = |i: &crate::providers::IssuedInvoice| Transition::Issued {
        invoice_no: i.invoice_no.clone(),
        series: series.to_owned(),
        reservation_code: i.reservation_code.clone(),
        tax_authority_code: i.tax_authority_code.clone(),
        provider_status: i.status.clone(),
    };
    match (step, outcome) {
        (_, Outcome::Issued(i)) => Some(issued(i)),
        (Step::Poll, Outcome::Accepted) => {
            Some(Transition::StillSubmitted { next: at(now, timing.lookup_interval) })
        }
        (_, Outcome::Accepted) => Some(Transition::Submitted { next: at(now, timing.lookup_interval) }),
        // A SUBMITTED invoice the provider cannot find (yet): keep asking.
        (Step::Poll, _) => {
            Some(Transition::StillSubmitted { next: at(now, timing.lookup_interval.max(backoff)) })
        }
        (Step::LookupThenCreate, Outcome::NotFound) => None,
        (_, Outcome::NotFound) => Some(Transition::Failed {
            error: "attempts exhausted; the provider has no invoice under this key".into(),
        }),
        // The lookup itself failed: still unknown; ask again later, never create blindly. Not
        // sooner than the number lookups' interval: a failed lookup counts no attempt, so the
        // backoff does not grow, and a provider that is down is not asked every second.
        (_, other) => Some(Transition::Ambiguous {
            until: at(now, backoff.max(timing.lookup_interval)),
            error: format!("lookup failed: {}", other.code().unwrap_or("unknown")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::IssuedInvoice;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 3, 0, 0).unwrap()
    }

    fn state(status: &str) -> State<'_> {
        State { status, attempts: 0, next_attempt_at: Some(now()), lease_until: None, original_status: None }
    }

    const TIMING: Timing = Timing {
        max_attempts: 8,
        safe_wait: Duration::from_secs(90),
        lookup_interval: Duration::from_secs(30),
        backoff_cap: Duration::from_secs(600),
    };

    #[test]
    fn a_tax_authority_rejection_is_recognised_in_any_case_and_nothing_else_is() {
        assert!(rejected_by_tax_authority(Some("DIS_APPROVED")));
        assert!(rejected_by_tax_authority(Some("dis_approved: sai mã số thuế")));
        for status in [None, Some(""), Some("Đã cấp mã"), Some("APPROVED"), Some("Chờ cấp số")] {
            assert!(!rejected_by_tax_authority(status), "{status:?}");
        }
    }

    #[test]
    fn times_saturate_instead_of_overflowing() {
        assert_eq!(at(now(), Duration::MAX), DateTime::<Utc>::MAX_UTC);
        let huge =
            Outcome::Retryable { code: "HTTP_429".into(), retry_after: Some(Duration::from_secs(u64::MAX)) };
        assert!(matches!(
            after_create(&huge, 1, "s", now(), &TIMING, Duration::ZERO),
            Transition::Retry { .. }
        ));
    }

    #[test]
    fn steps() {
        assert_eq!(step(&state("QUEUED"), now(), 8), Step::Create);
        let later = now() + chrono::Duration::seconds(5);
        assert_eq!(
            step(&State { next_attempt_at: Some(later), ..state("QUEUED") }, now(), 8),
            Step::WaitUntil(later)
        );
        assert_eq!(step(&State { attempts: 8, ..state("QUEUED") }, now(), 8), Step::Exhausted);
        assert_eq!(
            step(&State { original_status: Some("SUBMITTED"), ..state("QUEUED") }, now(), 8),
            Step::WaitForOriginal
        );
        assert_eq!(
            step(&State { original_status: Some("ISSUED"), ..state("QUEUED") }, now(), 8),
            Step::Create
        );
        // ISSUING: the lease protects a call that may still be running.
        assert_eq!(
            step(&State { lease_until: Some(later), ..state("ISSUING") }, now(), 8),
            Step::WaitUntil(later)
        );
        assert_eq!(
            step(&State { lease_until: Some(now()), ..state("ISSUING") }, now(), 8),
            Step::LookupThenCreate
        );
        assert_eq!(
            step(&State { lease_until: Some(now()), attempts: 8, ..state("ISSUING") }, now(), 8),
            Step::LookupOnly
        );
        assert_eq!(step(&state("SUBMITTED"), now(), 8), Step::Poll);
        assert_eq!(step(&state("ISSUED"), now(), 8), Step::WaitUntil(now()));
    }

    #[test]
    fn create_outcomes() {
        let b = Duration::from_secs(4);
        let issued =
            Outcome::Issued(IssuedInvoice { invoice_no: "C26TAA1".into(), ..IssuedInvoice::default() });
        assert!(matches!(after_create(&issued, 1, "1C26TAA", now(), &TIMING, b), Transition::Issued { .. }));
        assert_eq!(
            after_create(&Outcome::Accepted, 1, "s", now(), &TIMING, b),
            Transition::Submitted { next: now() + chrono::Duration::seconds(30) }
        );
        assert!(matches!(
            after_create(&Outcome::Ambiguous { code: "TIMEOUT".into() }, 1, "s", now(), &TIMING, b),
            Transition::Ambiguous { until, .. } if until == now() + chrono::Duration::seconds(90)
        ));
        let retry = Outcome::Retryable { code: "HTTP_503".into(), retry_after: None };
        assert!(matches!(after_create(&retry, 1, "s", now(), &TIMING, b),
            Transition::Retry { next, .. } if next == now() + chrono::Duration::seconds(4)));
        // Retry-After wins when longer than the backoff.
        let retry_after =
            Outcome::Retryable { code: "HTTP_429".into(), retry_after: Some(Duration::from_secs(60)) };
        assert!(matches!(after_create(&retry_after, 1, "s", now(), &TIMING, b),
            Transition::Retry { next, .. } if next == now() + chrono::Duration::seconds(60)));
        // ... up to the backoff cap.
        let hour =
            Outcome::Retryable { code: "HTTP_429".into(), retry_after: Some(Duration::from_secs(3_600)) };
        assert!(matches!(after_create(&hour, 1, "s", now(), &TIMING, b),
            Transition::Retry { next, .. } if next == now() + chrono::Duration::seconds(600)));
        assert!(matches!(after_create(&retry, 8, "s", now(), &TIMING, b), Transition::Failed { .. }));
        let permanent = Outcome::Permanent { code: "VAT_AMOUNT_INVALID".into(), message: "m".into() };
        assert!(matches!(after_create(&permanent, 1, "s", now(), &TIMING, b), Transition::Failed { .. }));
    }

    #[test]
    fn lookup_outcomes() {
        let b = Duration::from_secs(4);
        let issued =
            Outcome::Issued(IssuedInvoice { invoice_no: "C26TAA1".into(), ..IssuedInvoice::default() });
        assert!(matches!(
            after_lookup(Step::LookupThenCreate, &issued, "s", now(), &TIMING, b),
            Some(Transition::Issued { .. })
        ));
        assert_eq!(after_lookup(Step::LookupThenCreate, &Outcome::NotFound, "s", now(), &TIMING, b), None);
        assert!(matches!(
            after_lookup(Step::LookupOnly, &Outcome::NotFound, "s", now(), &TIMING, b),
            Some(Transition::Failed { .. })
        ));
        assert!(
            matches!(
                after_lookup(
                    Step::LookupThenCreate,
                    &Outcome::Retryable { code: "x".into(), retry_after: None },
                    "s",
                    now(),
                    &TIMING,
                    b
                ),
                Some(Transition::Ambiguous { until, .. }) if until == now() + chrono::Duration::seconds(30)
            ),
            "a failed lookup is asked again after the lookup interval, not a 4 s backoff"
        );
        assert!(matches!(
            after_lookup(Step::Poll, &Outcome::Accepted, "s", now(), &TIMING, b),
            Some(Transition::StillSubmitted { .. })
        ));
        assert!(matches!(
            after_lookup(Step::LookupThenCreate, &Outcome::Accepted, "s", now(), &TIMING, b),
            Some(Transition::Submitted { .. })
        ));
        assert!(matches!(
            after_lookup(Step::Poll, &issued, "s", now(), &TIMING, b),
            Some(Transition::Issued { .. })
        ));
    }
}
