//! `invoice.events.v1`: the lifecycle events written to the outbox (SPEC §2).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// Event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// `invoice.created`
    #[serde(rename = "invoice.created")]
    Created,
    /// `invoice.claim_opened` (the only place the claim token is shown)
    #[serde(rename = "invoice.claim_opened")]
    ClaimOpened,
    /// `invoice.claimed`
    #[serde(rename = "invoice.claimed")]
    Claimed,
    /// `invoice.claim_expired`
    #[serde(rename = "invoice.claim_expired")]
    ClaimExpired,
    /// `invoice.issued`
    #[serde(rename = "invoice.issued")]
    Issued,
    /// `invoice.failed`
    #[serde(rename = "invoice.failed")]
    Failed,
    /// `invoice.cancelled`
    #[serde(rename = "invoice.cancelled")]
    Cancelled,
}

impl EventType {
    /// The wire name, also used as the audit event type.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "invoice.created",
            EventType::ClaimOpened => "invoice.claim_opened",
            EventType::Claimed => "invoice.claimed",
            EventType::ClaimExpired => "invoice.claim_expired",
            EventType::Issued => "invoice.issued",
            EventType::Failed => "invoice.failed",
            EventType::Cancelled => "invoice.cancelled",
        }
    }
}

/// The claim member of `invoice.claim_opened`.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimMember {
    /// The clear token.
    pub token: String,
    /// RFC 3339.
    pub deadline: String,
}

/// The provider member of `invoice.issued`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderMember {
    /// Provider name.
    pub name: String,
    /// Invoice number.
    pub invoice_no: String,
    /// Symbol.
    pub series: String,
    /// Buyer lookup code.
    pub lookup_code: String,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InvoiceEvent {
    /// UUID; a redelivery carries the same.
    pub event_id: String,
    /// Type.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the change happened (RFC 3339, ms, UTC).
    pub occurred_at: String,
    /// Snowflake id as a string.
    pub invoice_id: String,
    /// Order id.
    pub order_id: String,
    /// Merchant id.
    pub merchant_id: String,
    /// Status after the change.
    pub status: &'static str,
    /// On `invoice.claim_opened` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimMember>,
    /// On `invoice.issued`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderMember>,
}

/// RFC 3339 with milliseconds in UTC, as every time on the wire.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
