//! What giving an order's invoice a buyer does (SPEC §3, §5; DOMAIN §7), whether the buyer
//! comes from a claim or from an `invoice.request` webhook: the same rules, one function.

use chrono::{DateTime, Utc};

/// The facts about the order's active original invoice that decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// Its status (`PENDING_CLAIM`, `QUEUED`, …).
    pub status: &'a str,
    /// Whether it already names a buyer (individual or company).
    pub has_buyer: bool,
    /// Whether an active replacement exists already.
    pub replaced: bool,
    /// Whether that replacement FAILED (nothing was created at the provider under its key).
    pub replacement_failed: bool,
    /// The claim deadline, if a claim was opened for it.
    pub deadline: Option<DateTime<Utc>>,
    /// Whether the merchant issues at payment (`immediate`); only those invoices are replaced
    /// for a late buyer (a `claim_window` invoice is issued to a consumer only after its
    /// deadline).
    pub immediate: bool,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PENDING_CLAIM or FAILED → QUEUED for the buyer (attempts reset), and enqueue.
    Queue,
    /// QUEUED: not yet taken by a worker; the buyer replaces the consumer.
    SetBuyer,
    /// ISSUED to a consumer, within the deadline: a replacement invoice for the buyer.
    Replace,
    /// Its replacement FAILED (the provider refused it, e.g. for the buyer's data): the
    /// replacement is queued again for this buyer, within the deadline.
    RetryReplacement,
    /// Being issued right now (ISSUING, SUBMITTED): decide again once it settles.
    Later,
    /// Refused, with why.
    Refuse(Refusal),
}

/// Why a buyer cannot be given to the invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The invoice was cancelled.
    #[error("the invoice was cancelled")]
    Cancelled,
    /// A buyer was given already.
    #[error("the invoice already has a buyer")]
    AlreadyHasBuyer,
    /// The claim deadline has passed (for an issued consumer invoice: no replacement).
    #[error("the claim deadline has passed")]
    DeadlinePassed,
    /// The invoice has been (or is being) replaced already.
    #[error("the invoice has already been replaced")]
    AlreadyReplaced,
}

/// Decides what giving a buyer at `now` does to `target`.
pub fn action(target: Target<'_>, now: DateTime<Utc>) -> Action {
    match target.status {
        "CANCELLED" => return Action::Refuse(Refusal::Cancelled),
        "REPLACED" => return Action::Refuse(Refusal::AlreadyReplaced),
        _ => {}
    }
    if target.replaced {
        return match (target.status, target.deadline) {
            ("ISSUED", Some(deadline))
                if target.replacement_failed && target.immediate && now <= deadline =>
            {
                Action::RetryReplacement
            }
            ("ISSUED", _) if target.replacement_failed => Action::Refuse(Refusal::DeadlinePassed),
            _ => Action::Refuse(Refusal::AlreadyReplaced),
        };
    }
    if target.has_buyer && target.status != "FAILED" {
        return Action::Refuse(Refusal::AlreadyHasBuyer);
    }
    match target.status {
        "PENDING_CLAIM" | "FAILED" => Action::Queue,
        "QUEUED" => Action::SetBuyer,
        "ISSUING" | "SUBMITTED" => Action::Later,
        "ISSUED" => match target.deadline {
            Some(deadline) if target.immediate && now <= deadline => Action::Replace,
            _ => Action::Refuse(Refusal::DeadlinePassed),
        },
        _ => Action::Later,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn target(status: &str) -> Target<'_> {
        Target {
            status,
            has_buyer: false,
            replaced: false,
            replacement_failed: false,
            deadline: None,
            immediate: true,
        }
    }

    #[test]
    fn every_status_has_its_answer() {
        let now = Utc::now();
        assert_eq!(action(target("PENDING_CLAIM"), now), Action::Queue);
        assert_eq!(action(target("FAILED"), now), Action::Queue);
        assert_eq!(action(target("QUEUED"), now), Action::SetBuyer);
        assert_eq!(action(target("ISSUING"), now), Action::Later);
        assert_eq!(action(target("SUBMITTED"), now), Action::Later);
        assert_eq!(action(target("CANCELLED"), now), Action::Refuse(Refusal::Cancelled));
        assert_eq!(action(target("REPLACED"), now), Action::Refuse(Refusal::AlreadyReplaced));
    }

    #[test]
    fn an_issued_consumer_invoice_is_replaced_only_within_the_deadline() {
        let now = Utc::now();
        let within = Target { deadline: Some(now + Duration::minutes(5)), ..target("ISSUED") };
        assert_eq!(action(within, now), Action::Replace);
        assert_eq!(action(within, now + Duration::minutes(5)), Action::Replace);
        assert_eq!(action(within, now + Duration::minutes(6)), Action::Refuse(Refusal::DeadlinePassed));
        assert_eq!(action(target("ISSUED"), now), Action::Refuse(Refusal::DeadlinePassed));
        let replaced = Target { replaced: true, ..within };
        assert_eq!(action(replaced, now), Action::Refuse(Refusal::AlreadyReplaced));
        let claim_window = Target { immediate: false, ..within };
        assert_eq!(action(claim_window, now), Action::Refuse(Refusal::DeadlinePassed));
        // A replacement the provider refused is queued again for corrected data, in time.
        let failed = Target { replacement_failed: true, ..replaced };
        assert_eq!(action(failed, now), Action::RetryReplacement);
        assert_eq!(action(failed, now + Duration::minutes(6)), Action::Refuse(Refusal::DeadlinePassed));
        // Replaced already (the replacement issued): the original's status says so.
        assert_eq!(
            action(Target { status: "REPLACED", ..failed }, now),
            Action::Refuse(Refusal::AlreadyReplaced)
        );
    }

    #[test]
    fn a_buyer_is_given_once_except_to_retry_a_failure() {
        let now = Utc::now();
        for status in ["PENDING_CLAIM", "QUEUED", "ISSUED", "ISSUING"] {
            let t = Target { has_buyer: true, deadline: Some(now), ..target(status) };
            assert_eq!(action(t, now), Action::Refuse(Refusal::AlreadyHasBuyer), "{status}");
        }
        let failed = Target { has_buyer: true, ..target("FAILED") };
        assert_eq!(action(failed, now), Action::Queue);
    }
}
