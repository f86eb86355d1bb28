//! Wire formats of the topics (SPEC §2): parsing and validation of the inputs into domain
//! types, with precise reasons for what is refused, and the output event shape.

pub mod invoice_events;
pub mod merchant_cdc;
pub mod payment;

/// Why an input message was refused; the text goes to the dead-letter `x-error` header, so
/// it names the field and what was expected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// An error about `field`.
    pub fn field(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Invalid {
        Invalid(format!("{field}: {reason}"))
    }

    /// The reason as it may travel in a header, a log line or a jsonb column: control
    /// characters (U+0000 above all) replaced, and at most 1,000 characters.
    pub fn sanitized(&self) -> String {
        self.0.chars().take(1000).map(|c| if c.is_control() { '\u{FFFD}' } else { c }).collect()
    }
}

/// Whether JSON text may hold U+0000. JSON carries it only escaped (`\u0000`: a raw control
/// character in a string is not JSON), so text without that sequence cannot; the cheap test
/// before [`contains_nul`] walks a whole document.
pub fn may_contain_nul(json_text: &[u8]) -> bool {
    json_text.windows(6).any(|w| w == br"\u0000")
}

/// Whether any string (or key) in `value` contains U+0000, which Postgres cannot store.
pub fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A short description of a JSON value's type, for error messages.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
