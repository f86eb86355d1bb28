//! Standard Webhooks verification (SPEC §5): HMAC-SHA256 over `{id}.{timestamp}.{body}`,
//! the raw body as received, any `v1` signature matching the current or the previous secret,
//! compared in constant time on full-length MACs, timestamps within five minutes.
//!
//! Pure: the caller passes the clock, so tolerance edges are tested without waiting.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// How far a timestamp may be from now, either way.
pub const TOLERANCE_SECONDS: i64 = 300;
/// A `webhook-signature` header longer than this is refused before any HMAC work.
pub const MAX_SIGNATURE_HEADER: usize = 2048;
/// At most this many signatures per request (a rotation needs two).
pub const MAX_SIGNATURES: usize = 10;
/// Longest accepted `webhook-id`.
pub const MAX_ID_LEN: usize = 255;
/// Length of an HMAC-SHA256 tag.
const MAC_LEN: usize = 32;

/// Why a delivery was refused. [`Rejection::reason`] is the metric label; the `Display` text
/// is the problem `detail` and says which class of check failed, never which secret or MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A required header is absent.
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    /// `webhook-id` is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("`webhook-id` must be 1-255 characters of A-Z, a-z, 0-9, `_` and `-`")]
    InvalidId,
    /// `webhook-timestamp` is not a non-negative integer of seconds.
    #[error("`webhook-timestamp` must be Unix seconds")]
    InvalidTimestamp,
    /// The timestamp is more than five minutes old.
    #[error("`webhook-timestamp` is more than 5 minutes in the past")]
    StaleTimestamp,
    /// The timestamp is more than five minutes ahead.
    #[error("`webhook-timestamp` is more than 5 minutes in the future")]
    FutureTimestamp,
    /// The signature header is too long, has too many items, or no `v1` item.
    #[error("`webhook-signature` must be space-separated `v1,<base64>` items")]
    MalformedSignature,
    /// No signature matches.
    #[error("no signature in `webhook-signature` matches the body")]
    BadSignature,
}

impl Rejection {
    /// The `reason` label of `invoice_webhook_requests_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::MissingHeader(_) => "missing_header",
            Rejection::InvalidId => "invalid_id",
            Rejection::InvalidTimestamp => "invalid_timestamp",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::FutureTimestamp => "future_timestamp",
            Rejection::MalformedSignature => "malformed_signature",
            Rejection::BadSignature => "bad_signature",
        }
    }
}

/// The three headers of a delivery, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    /// `webhook-id`
    pub id: Option<&'a str>,
    /// `webhook-timestamp`
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`
    pub signature: Option<&'a str>,
}

/// The verifier of one endpoint: its current secret and, during a rotation, the previous one.
pub struct Verifier {
    keys: Vec<Secret<Vec<u8>>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.len()).finish()
    }
}

/// The key bytes of a configured secret: base64 after a `whsec_` prefix, else the UTF-8 bytes.
pub fn secret_bytes(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        // Configuration checked the base64 at start-up; an undecodable value cannot get here.
        Some(encoded) => base64::engine::general_purpose::STANDARD.decode(encoded).unwrap_or_default(),
        None => secret.as_bytes().to_vec(),
    }
}

impl Verifier {
    /// A verifier accepting `current` and, if given, `previous`.
    pub fn new(current: &Secret<String>, previous: Option<&Secret<String>>) -> Verifier {
        let keys = std::iter::once(current)
            .chain(previous)
            .map(|s| Secret::new(secret_bytes(s.expose())))
            .filter(|k| !k.expose().is_empty())
            .collect();
        Verifier { keys }
    }

    /// Checks a delivery received at Unix time `now`; returns the `webhook-id` on success.
    /// Cheap checks come first; the MAC is computed only for a well-formed, fresh delivery.
    pub fn verify<'a>(&self, headers: Headers<'a>, body: &[u8], now: i64) -> Result<&'a str, Rejection> {
        self.check_body(Self::check_headers(headers, now)?, body)
    }

    /// The checks that need no body: a delivery with missing, malformed or stale headers is
    /// refused before its body is read (security R5: no body buffered for unsigned requests).
    pub fn check_headers(headers: Headers<'_>, now: i64) -> Result<Checked<'_>, Rejection> {
        let id = headers.id.ok_or(Rejection::MissingHeader("webhook-id"))?;
        let timestamp = headers.timestamp.ok_or(Rejection::MissingHeader("webhook-timestamp"))?;
        let signature = headers.signature.ok_or(Rejection::MissingHeader("webhook-signature"))?;
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Rejection::InvalidId);
        }
        if timestamp.is_empty() || timestamp.len() > 12 || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Rejection::InvalidTimestamp);
        }
        let sent: i64 = timestamp.parse().map_err(|_| Rejection::InvalidTimestamp)?;
        if now - sent > TOLERANCE_SECONDS {
            return Err(Rejection::StaleTimestamp);
        }
        if sent - now > TOLERANCE_SECONDS {
            return Err(Rejection::FutureTimestamp);
        }
        // One MAC per key, compared with every candidate: a MAC per (key, candidate) made an
        // unsigned request carrying ten candidates hash its body twenty times.
        let candidates: Vec<Vec<u8>> =
            parse_signatures(signature)?.into_iter().filter(|c| c.len() == MAC_LEN).collect();
        if candidates.is_empty() {
            return Err(Rejection::BadSignature);
        }
        Ok(Checked { id, timestamp, candidates })
    }

    /// The MAC check of a delivery whose headers passed [`Verifier::check_headers`].
    pub fn check_body<'a>(&self, checked: Checked<'a>, body: &[u8]) -> Result<&'a str, Rejection> {
        for key in &self.keys {
            let Ok(mut mac) = HmacSha256::new_from_slice(key.expose()) else { continue };
            mac.update(checked.id.as_bytes());
            mac.update(b".");
            mac.update(checked.timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            let tag = mac.finalize().into_bytes();
            // Constant time, and lengths were checked: a truncated or empty signature can
            // never match (RUSTSEC-2024-0010).
            if checked.candidates.iter().any(|candidate| bool::from(tag.as_slice().ct_eq(candidate))) {
                return Ok(checked.id);
            }
        }
        Err(Rejection::BadSignature)
    }
}

/// A delivery's headers once they passed every check that needs no body.
#[derive(Debug)]
pub struct Checked<'a> {
    id: &'a str,
    timestamp: &'a str,
    /// The full-length `v1` MACs offered.
    candidates: Vec<Vec<u8>>,
}

/// The decoded `v1` MACs of a `webhook-signature` header. Other versions are ignored; an
/// item that is not valid base64 is ignored like a wrong signature.
pub fn parse_signatures(header: &str) -> Result<Vec<Vec<u8>>, Rejection> {
    if header.len() > MAX_SIGNATURE_HEADER {
        return Err(Rejection::MalformedSignature);
    }
    let items: Vec<&str> = header.split_ascii_whitespace().collect();
    if items.is_empty() || items.len() > MAX_SIGNATURES {
        return Err(Rejection::MalformedSignature);
    }
    let v1: Vec<&str> = items.iter().filter_map(|item| item.strip_prefix("v1,")).collect();
    if v1.is_empty() {
        return Err(Rejection::MalformedSignature);
    }
    Ok(v1.iter().filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok()).collect())
}

/// The `webhook-signature` value for a delivery: what a sender computes. Used by tests,
/// the benchmark and `sample-traffic`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = HmacSha256::new_from_slice(&secret_bytes(secret)) else { return String::new() };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Known-answer vector of the svix test suite.
    const KAT_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const KAT_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const KAT_TS: i64 = 1_649_367_553;
    const KAT_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const KAT_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn verifier(current: &str, previous: Option<&str>) -> Verifier {
        let previous = previous.map(|p| Secret::new(p.to_owned()));
        Verifier::new(&Secret::new(current.to_owned()), previous.as_ref())
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Headers<'a> {
        Headers { id: Some(id), timestamp: Some(ts), signature: Some(sig) }
    }

    #[test]
    fn known_answer_vector_verifies_and_sign_reproduces_it() {
        assert_eq!(sign(KAT_SECRET, KAT_ID, KAT_TS, KAT_BODY), KAT_SIG);
        let v = verifier(KAT_SECRET, None);
        let ts = KAT_TS.to_string();
        assert_eq!(v.verify(headers(KAT_ID, &ts, KAT_SIG), KAT_BODY, KAT_TS), Ok(KAT_ID));
    }

    #[test]
    fn tampered_body_and_wrong_secret_are_bad_signatures() {
        let ts = KAT_TS.to_string();
        let v = verifier(KAT_SECRET, None);
        let tampered = br#"{"email":"test@example.com","username":"test_user2"}"#;
        assert_eq!(v.verify(headers(KAT_ID, &ts, KAT_SIG), tampered, KAT_TS), Err(Rejection::BadSignature));
        // Same content, reformatted: the raw bytes are signed, not the JSON value.
        let reformatted = br#"{"email": "test@example.com", "username": "test_user"}"#;
        assert_eq!(
            v.verify(headers(KAT_ID, &ts, KAT_SIG), reformatted, KAT_TS),
            Err(Rejection::BadSignature)
        );
        let other = verifier("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", None);
        assert_eq!(
            other.verify(headers(KAT_ID, &ts, KAT_SIG), KAT_BODY, KAT_TS),
            Err(Rejection::BadSignature)
        );
        // A different id under the same signature.
        assert_eq!(
            v.verify(headers("msg_other", &ts, KAT_SIG), KAT_BODY, KAT_TS),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn previous_secret_is_accepted_during_a_rotation_and_not_after() {
        let ts = KAT_TS.to_string();
        let rotated = verifier("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", Some(KAT_SECRET));
        assert!(rotated.verify(headers(KAT_ID, &ts, KAT_SIG), KAT_BODY, KAT_TS).is_ok());
        let done = verifier("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", None);
        assert_eq!(
            done.verify(headers(KAT_ID, &ts, KAT_SIG), KAT_BODY, KAT_TS),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn truncated_empty_and_padded_signatures_never_match() {
        let ts = KAT_TS.to_string();
        let v = verifier(KAT_SECRET, None);
        for sig in [
            "v1,",
            "v1,AAAA",
            "v1,tZ1I4/hD",
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kk",
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3KkwAAAA=",
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=AAAA",
        ] {
            assert_eq!(
                v.verify(headers(KAT_ID, &ts, sig), KAT_BODY, KAT_TS),
                Err(Rejection::BadSignature),
                "{sig}"
            );
        }
        assert_eq!(
            v.verify(
                headers(KAT_ID, &ts, "v1a,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="),
                KAT_BODY,
                KAT_TS
            ),
            Err(Rejection::MalformedSignature)
        );
        assert_eq!(v.verify(headers(KAT_ID, &ts, ""), KAT_BODY, KAT_TS), Err(Rejection::MalformedSignature));
        let eleven = ["v1,AAAA"; 10].join(" ") + " " + KAT_SIG;
        assert_eq!(
            v.verify(headers(KAT_ID, &ts, &eleven), KAT_BODY, KAT_TS),
            Err(Rejection::MalformedSignature)
        );
        let long = format!("{KAT_SIG} v2,{}", "A".repeat(MAX_SIGNATURE_HEADER));
        assert_eq!(
            v.verify(headers(KAT_ID, &ts, &long), KAT_BODY, KAT_TS),
            Err(Rejection::MalformedSignature)
        );
    }

    #[test]
    fn a_good_signature_among_bad_ones_is_accepted() {
        let ts = KAT_TS.to_string();
        let v = verifier(KAT_SECRET, None);
        let sig = format!("v1,AAAA v2,whatever v1,Zm9vYmFy {KAT_SIG}");
        assert!(v.verify(headers(KAT_ID, &ts, &sig), KAT_BODY, KAT_TS).is_ok());
    }

    #[test]
    fn timestamps_are_checked_both_ways_at_five_minutes() {
        let v = verifier(KAT_SECRET, None);
        let ts = KAT_TS.to_string();
        for (now, expected) in [
            (KAT_TS + 299, Ok(KAT_ID)),
            (KAT_TS + 300, Ok(KAT_ID)),
            (KAT_TS + 301, Err(Rejection::StaleTimestamp)),
            (KAT_TS - 299, Ok(KAT_ID)),
            (KAT_TS - 301, Err(Rejection::FutureTimestamp)),
        ] {
            assert_eq!(v.verify(headers(KAT_ID, &ts, KAT_SIG), KAT_BODY, now), expected, "now {now}");
        }
        for bad in ["", "-1649367553", "1649367553.0", "abc", " 1649367553", "99999999999999999999"] {
            assert_eq!(
                v.verify(headers(KAT_ID, bad, KAT_SIG), KAT_BODY, KAT_TS),
                Err(Rejection::InvalidTimestamp),
                "{bad:?}"
            );
        }
        // The signed timestamp is part of the MAC: another header value does not verify.
        let other = (KAT_TS + 1).to_string();
        assert_eq!(
            v.verify(headers(KAT_ID, &other, KAT_SIG), KAT_BODY, KAT_TS),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn each_missing_header_is_named_and_ids_are_restricted() {
        let v = verifier(KAT_SECRET, None);
        let ts = KAT_TS.to_string();
        let full = headers(KAT_ID, &ts, KAT_SIG);
        assert_eq!(
            v.verify(Headers { id: None, ..full }, KAT_BODY, KAT_TS),
            Err(Rejection::MissingHeader("webhook-id"))
        );
        assert_eq!(
            v.verify(Headers { timestamp: None, ..full }, KAT_BODY, KAT_TS),
            Err(Rejection::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            v.verify(Headers { signature: None, ..full }, KAT_BODY, KAT_TS),
            Err(Rejection::MissingHeader("webhook-signature"))
        );
        let long = "a".repeat(256);
        for id in ["", "msg.1", "msg 1", "msg/1", long.as_str()] {
            assert_eq!(
                v.verify(headers(id, &ts, KAT_SIG), KAT_BODY, KAT_TS),
                Err(Rejection::InvalidId),
                "{id:?}"
            );
        }
    }

    #[test]
    fn a_plain_secret_is_used_as_utf8_bytes() {
        let secret = "an-internal-secret-of-sufficient-length";
        let sig = sign(secret, "evt_1", 1_700_000_000, b"{}");
        let v = verifier(secret, None);
        assert!(v.verify(headers("evt_1", "1700000000", &sig), b"{}", 1_700_000_000).is_ok());
    }

    proptest! {
        #[test]
        fn no_header_or_body_makes_the_verifier_panic_or_accept_a_forgery(
            id in "\\PC{0,40}", ts in "\\PC{0,16}", sig in "\\PC{0,300}", body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let v = verifier(KAT_SECRET, None);
            let result = v.verify(headers(&id, &ts, &sig), &body, KAT_TS);
            prop_assert!(result.is_err());
        }

        #[test]
        fn sign_then_verify_round_trips(id in "[A-Za-z0-9_-]{1,64}", body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sig = sign(KAT_SECRET, &id, KAT_TS, &body);
            let v = verifier(KAT_SECRET, None);
            let ts = KAT_TS.to_string();
            prop_assert_eq!(v.verify(headers(&id, &ts, &sig), &body, KAT_TS), Ok(id.as_str()));
        }
    }
}
