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
