//! The issuance decision (SPEC §3, DOMAIN §7): for a paid order, given what is known about
//! the merchant, the order and the buyer, whether and how to create its invoice. A pure
//! function: the stream gathers the facts, calls [`decide`], and writes the outcome.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::buyer::{BuyerKind, ValidBuyer};
use super::claim;
use super::money::{Line, Totals};
use super::tax_info::{IssuanceMode, TaxInfo};

/// A validated paid order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Unique per event.
    pub event_id: String,
    /// Order id (the Kafka key, the queue job id).
    pub order_id: String,
    /// Merchant id.
    pub merchant_id: String,
    /// When it was paid.
    pub paid_at: DateTime<Utc>,
    /// ISO currency.
    pub currency: String,
    /// The paid total (equal to `totals.gross`).
    pub total: Decimal,
    /// Lines with computed amounts.
    pub lines: Vec<Line>,
    /// Totals of the lines.
    pub totals: Totals,
    /// The buyer, if the payment carries one.
    pub buyer: Option<ValidBuyer>,
}

/// Invoice states (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InvoiceStatus {
    /// Waiting for the buyer's claim or the deadline.
    PendingClaim,
    /// Due for issuance.
    Queued,
    /// A worker is calling the provider.
    Issuing,
    /// Accepted by the provider, number pending.
    Submitted,
    /// Issued.
    Issued,
    /// Failed permanently (an operator may replay it).
    Failed,
    /// Cancelled before issuance.
    Cancelled,
    /// Replaced by a replacement invoice.
    Replaced,
}

impl InvoiceStatus {
    /// The database and wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::PendingClaim => "PENDING_CLAIM",
            InvoiceStatus::Queued => "QUEUED",
            InvoiceStatus::Issuing => "ISSUING",
            InvoiceStatus::Submitted => "SUBMITTED",
            InvoiceStatus::Issued => "ISSUED",
            InvoiceStatus::Failed => "FAILED",
            InvoiceStatus::Cancelled => "CANCELLED",
            InvoiceStatus::Replaced => "REPLACED",
        }
    }
}

/// What is known of the merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merchant<'a> {
    /// No TaxInfo was ever received.
    Unknown,
    /// The TaxInfo was deleted (CDC `d`).
    Deleted,
    /// Current TaxInfo.
    Known(&'a TaxInfo),
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The payment.
    pub payment: &'a Payment,
    /// The merchant.
    pub merchant: Merchant<'a>,
    /// Whether the merchant has a live provider configuration.
    pub provider_configured: bool,
    /// A buyer's request recorded before the payment arrived.
    pub pending_request: Option<&'a ValidBuyer>,
    /// This event id was decided before (a redelivery or replay).
    pub event_already_decided: bool,
    /// The order already has an active invoice (another event for the same order).
    pub active_invoice_exists: bool,
}

/// Why no invoice is created; none of these is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The event was already decided.
    DuplicateEvent,
    /// The order already has an active invoice.
    ActiveInvoiceExists,
    /// No TaxInfo for the merchant.
    MerchantUnknown,
    /// The merchant's TaxInfo was deleted.
    TaxInfoDeleted,
    /// The merchant does not issue invoices.
    InvoicingDisabled,
    /// The merchant has no provider configuration.
    NoProviderConfig,
    /// Nothing to invoice.
    ZeroTotal,
}

impl SkipReason {
    /// Metric label and stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::DuplicateEvent => "duplicate_event",
            SkipReason::ActiveInvoiceExists => "active_invoice_exists",
            SkipReason::MerchantUnknown => "merchant_unknown",
            SkipReason::TaxInfoDeleted => "tax_info_deleted",
            SkipReason::InvoicingDisabled => "invoicing_disabled",
            SkipReason::NoProviderConfig => "no_provider_config",
            SkipReason::ZeroTotal => "zero_total",
        }
    }
}

/// Where the invoice's buyer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuyerSource {
    /// No buyer identity: a consumer invoice.
    None,
    /// The payment's buyer carried a tax code.
    Payment,
    /// A request recorded before the payment.
    Request,
}

/// The invoice to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoicePlan {
    /// `QUEUED` or `PENDING_CLAIM`.
    pub status: InvoiceStatus,
    /// The merchant's mode at decision time.
    pub mode: IssuanceMode,
    /// The buyer printed on the invoice (`None`: consumer).
    pub buyer: Option<ValidBuyer>,
    /// Its kind.
    pub buyer_kind: BuyerKind,
    /// Where it came from.
    pub buyer_source: BuyerSource,
    /// Deadline of the claim to open, if one is opened.
    pub claim_deadline: Option<DateTime<Utc>>,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Create the invoice.
    Create(InvoicePlan),
    /// Create nothing.
    Skip(SkipReason),
}

/// Decides what a payment leads to. Checks run in a fixed order so the reported reason is
/// stable: duplicates first (they must never create anything), then the merchant, then the
/// amount.
pub fn decide(facts: &Facts<'_>) -> Decision {
    if facts.event_already_decided {
        return Decision::Skip(SkipReason::DuplicateEvent);
    }
    if facts.active_invoice_exists {
        return Decision::Skip(SkipReason::ActiveInvoiceExists);
    }
    let tax = match facts.merchant {
        Merchant::Unknown => return Decision::Skip(SkipReason::MerchantUnknown),
        Merchant::Deleted => return Decision::Skip(SkipReason::TaxInfoDeleted),
        Merchant::Known(tax) => tax,
    };
    if !tax.invoice_enabled {
        return Decision::Skip(SkipReason::InvoicingDisabled);
    }
    if !facts.provider_configured {
        return Decision::Skip(SkipReason::NoProviderConfig);
    }
    let payment = facts.payment;
    if payment.total.is_zero() {
        return Decision::Skip(SkipReason::ZeroTotal);
    }
    // A buyer with a tax identity on the payment means "a company invoice now"; a request
    // recorded earlier counts the same. A buyer without a tax code stays a consumer but
    // keeps their contact details for delivery.
    let (buyer, source) = match (&payment.buyer, facts.pending_request) {
        (Some(b), _) if b.kind != BuyerKind::Consumer => (Some(b.clone()), BuyerSource::Payment),
        (_, Some(request)) => (Some(request.clone()), BuyerSource::Request),
        (b, None) => (b.clone(), BuyerSource::None),
    };
    let buyer_kind = buyer.as_ref().map(|b| b.kind).unwrap_or(BuyerKind::Consumer);
    let buyer_known = source != BuyerSource::None;
    let deadline = claim::deadline(payment.paid_at, tax.claim_window_minutes, tax.issuance_mode);
    let (status, claim_deadline) = match (tax.issuance_mode, buyer_known) {
        (_, true) => (InvoiceStatus::Queued, None),
        // Issued to a consumer now; the claim may still bring a replacement.
        (IssuanceMode::Immediate, false) => (InvoiceStatus::Queued, Some(deadline)),
        (IssuanceMode::ClaimWindow, false) => (InvoiceStatus::PendingClaim, Some(deadline)),
    };
    Decision::Create(InvoicePlan {
        status,
        mode: tax.issuance_mode,
        buyer,
        buyer_kind,
        buyer_source: source,
        claim_deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::buyer::Buyer;
    use crate::domain::money::{compute, LineInput, VatRate};
    use proptest::prelude::*;

    fn payment(total: i64) -> Payment {
        let items = vec![LineInput {
            sku: None,
            name: "Cà phê".into(),
            unit: None,
            quantity: Decimal::ONE,
            unit_price: Decimal::from(total),
            vat_rate: VatRate::Zero,
        }];
        let (lines, totals) = compute("VND", &items).unwrap();
        Payment {
            event_id: "e-1".into(),
            order_id: "ORD-1".into(),
            merchant_id: "M-1".into(),
            paid_at: DateTime::parse_from_rfc3339("2026-11-24T10:15:00+07:00").unwrap().with_timezone(&Utc),
            currency: "VND".into(),
            total: totals.gross,
            lines,
            totals,
            buyer: None,
        }
    }

    fn tax(mode: IssuanceMode) -> TaxInfo {
        TaxInfo {
            tax_code: Some("0100109106".into()),
            legal_name: Some("ABC".into()),
            address: None,
            email: None,
            phone: None,
            invoice_enabled: true,
            issuance_mode: mode,
            claim_window_minutes: 1440,
            provider: Some("viettel".into()),
        }
    }

    fn company() -> ValidBuyer {
        Buyer {
            legal_name: Some("Công ty B".into()),
            tax_code: Some("0101243150".into()),
            address: Some("HCM".into()),
            ..Buyer::default()
        }
        .validate()
        .unwrap()
    }

    fn facts<'a>(p: &'a Payment, t: &'a TaxInfo) -> Facts<'a> {
        Facts {
            payment: p,
            merchant: Merchant::Known(t),
            provider_configured: true,
            pending_request: None,
            event_already_decided: false,
            active_invoice_exists: false,
        }
    }

    fn plan(d: Decision) -> InvoicePlan {
        match d {
            Decision::Create(plan) => plan,
            Decision::Skip(reason) => panic!("skipped: {reason:?}"),
        }
    }

    #[test]
    fn every_skip_reason() {
        let p = payment(1000);
        let t = tax(IssuanceMode::Immediate);
        let disabled = TaxInfo { invoice_enabled: false, ..t.clone() };
        let zero = payment(0);
        let cases = [
            (Facts { event_already_decided: true, ..facts(&p, &t) }, SkipReason::DuplicateEvent),
            (Facts { active_invoice_exists: true, ..facts(&p, &t) }, SkipReason::ActiveInvoiceExists),
            (Facts { merchant: Merchant::Unknown, ..facts(&p, &t) }, SkipReason::MerchantUnknown),
            (Facts { merchant: Merchant::Deleted, ..facts(&p, &t) }, SkipReason::TaxInfoDeleted),
            (facts(&p, &disabled), SkipReason::InvoicingDisabled),
            (Facts { provider_configured: false, ..facts(&p, &t) }, SkipReason::NoProviderConfig),
            (facts(&zero, &t), SkipReason::ZeroTotal),
        ];
        for (f, reason) in cases {
            assert_eq!(decide(&f), Decision::Skip(reason));
        }
        // Duplicates win over everything else.
        let f = Facts { event_already_decided: true, merchant: Merchant::Unknown, ..facts(&zero, &t) };
        assert_eq!(decide(&f), Decision::Skip(SkipReason::DuplicateEvent));
    }

    #[test]
    fn immediate_queues_a_consumer_invoice_and_opens_a_claim() {
        let p = payment(1000);
        let t = tax(IssuanceMode::Immediate);
        let plan = plan(decide(&facts(&p, &t)));
        assert_eq!(plan.status, InvoiceStatus::Queued);
        assert_eq!(plan.buyer_kind, BuyerKind::Consumer);
        assert_eq!(plan.buyer_source, BuyerSource::None);
        assert_eq!(plan.claim_deadline, Some(p.paid_at + chrono::Duration::minutes(1440)));
    }

    #[test]
    fn claim_window_holds_until_the_deadline() {
        let p = payment(1000);
        let t = tax(IssuanceMode::ClaimWindow);
        let plan = plan(decide(&facts(&p, &t)));
        assert_eq!(plan.status, InvoiceStatus::PendingClaim);
        assert_eq!(
            plan.claim_deadline,
            Some(DateTime::parse_from_rfc3339("2026-11-25T00:00:00+07:00").unwrap().with_timezone(&Utc))
        );
    }

    #[test]
    fn a_known_buyer_goes_straight_to_the_queue_in_both_modes() {
        for mode in [IssuanceMode::Immediate, IssuanceMode::ClaimWindow] {
            let t = tax(mode);
            let mut p = payment(1000);
            p.buyer = Some(company());
            let plan_from_payment = plan(decide(&facts(&p, &t)));
            assert_eq!(plan_from_payment.status, InvoiceStatus::Queued);
            assert_eq!(plan_from_payment.buyer_source, BuyerSource::Payment);
            assert_eq!(plan_from_payment.buyer_kind, BuyerKind::Company);
            assert_eq!(plan_from_payment.claim_deadline, None);

            let p = payment(1000);
            let request = company();
            let f = Facts { pending_request: Some(&request), ..facts(&p, &t) };
            let plan_from_request = plan(decide(&f));
            assert_eq!(plan_from_request.status, InvoiceStatus::Queued);
            assert_eq!(plan_from_request.buyer_source, BuyerSource::Request);
            assert_eq!(plan_from_request.buyer, Some(request));
        }
    }

    #[test]
    fn a_consumer_buyer_with_contact_details_keeps_them_but_stays_a_consumer() {
        let t = tax(IssuanceMode::ClaimWindow);
        let mut p = payment(1000);
        let consumer = Buyer { email: Some("a@example.vn".into()), ..Buyer::default() }.validate().unwrap();
        p.buyer = Some(consumer.clone());
        let plan = plan(decide(&facts(&p, &t)));
        assert_eq!(plan.status, InvoiceStatus::PendingClaim);
        assert_eq!(plan.buyer, Some(consumer));
        assert_eq!(plan.buyer_kind, BuyerKind::Consumer);
    }

    proptest! {
        #[test]
        fn deciding_twice_gives_the_same_answer(
            total in 0i64..10_000_000, dup: bool, active: bool, merchant in 0u8..3, enabled: bool,
            provider: bool, claim_window: bool, with_request: bool,
        ) {
            let p = payment(total);
            let mode = if claim_window { IssuanceMode::ClaimWindow } else { IssuanceMode::Immediate };
            let t = TaxInfo { invoice_enabled: enabled, ..tax(mode) };
            let request = company();
            let f = Facts {
                payment: &p,
                merchant: match merchant { 0 => Merchant::Unknown, 1 => Merchant::Deleted, _ => Merchant::Known(&t) },
                provider_configured: provider,
                pending_request: with_request.then_some(&request),
                event_already_decided: dup,
                active_invoice_exists: active,
            };
            let first = decide(&f);
            prop_assert_eq!(&first, &decide(&f));
            if let Decision::Create(plan) = first {
                prop_assert!(!dup && !active && enabled && provider && total > 0);
                if let Some(deadline) = plan.claim_deadline {
                    prop_assert!(deadline >= p.paid_at);
                    if mode == IssuanceMode::ClaimWindow {
                        prop_assert!(deadline <= claim::end_of_sale_day(p.paid_at));
                    }
                }
            }
        }
    }
}
