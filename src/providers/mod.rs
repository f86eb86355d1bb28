//! E-invoice providers. Each speaks its provider's API and maps every answer, per
//! operation, to one [`Outcome`] in one exhaustive place; the worker decides what to do with
//! an outcome and never looks at provider codes.
//!
//! - [`viettel`]: Viettel S-Invoice (DOMAIN §3).
//! - [`sim`]: `invoice provider-sim`, a local server speaking the same API, for `make run`,
//!   tests and benchmarks.

pub mod egress;
pub mod sim;
pub mod viettel;

/// The provider names a configuration may name (those [`Registry::new`] registers).
pub const KNOWN: &[&str] = &["viettel"];

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::config::Secret;
use crate::domain::document::{Document, Prepared};

/// Where and as whom to call, from the invoice's config snapshot. Credentials are decrypted
/// just before the call and dropped after it.
pub struct Target {
    /// Base URL of the provider's API.
    pub endpoint: String,
    /// The seller's tax code as the provider knows it.
    pub supplier_tax_code: String,
    /// Login name.
    pub username: String,
    /// Password.
    pub password: Secret<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("endpoint", &self.endpoint)
            .field("supplier_tax_code", &self.supplier_tax_code)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// What the provider gave for an issued invoice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IssuedInvoice {
    /// The invoice number (series + number for Viettel).
    pub invoice_no: String,
    /// Buyer lookup code (Viettel `reservationCode`).
    pub reservation_code: Option<String>,
    /// Tax authority code (cash-register invoices).
    pub tax_authority_code: Option<String>,
    /// Provider's transaction id.
    pub provider_transaction_id: Option<String>,
    /// Status text (lookups), e.g. the tax authority's exchange status.
    pub status: Option<String>,
}

/// Every answer of a provider, as the worker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Issued, with its number.
    Issued(IssuedInvoice),
    /// Accepted but without a number yet: look it up later.
    Accepted,
    /// (Lookup only) the provider has no invoice under this key.
    NotFound,
    /// Certainly not issued; safe to resend with the same key after a delay.
    Retryable {
        /// Provider or transport code.
        code: String,
        /// Delay the provider asked for (429 `Retry-After`).
        retry_after: Option<Duration>,
    },
    /// May or may not have been issued (timeout or 5xx after sending, a duplicate-key answer):
    /// never resend at once; look up after the provider's safe wait.
    Ambiguous {
        /// Provider or transport code.
        code: String,
    },
    /// Will not succeed by retrying (validation, configuration, quota, credentials).
    Permanent {
        /// Provider code.
        code: String,
        /// A short, secret-free explanation.
        message: String,
    },
}

impl Outcome {
    /// The `issuance_attempt.outcome` and metric label value.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Issued(_) => "issued",
            Outcome::Accepted => "accepted",
            Outcome::NotFound => "not_found",
            Outcome::Retryable { .. } => "retryable",
            Outcome::Ambiguous { .. } => "ambiguous",
            Outcome::Permanent { .. } => "permanent",
        }
    }

    /// The provider or transport code, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Retryable { code, .. }
            | Outcome::Ambiguous { code }
            | Outcome::Permanent { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How long a provider client may take to connect, for a call of `timeout`: a request
/// checked against its send-by instant is written at most this much later.
pub fn connect_timeout(timeout: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(10).min(timeout)
}

/// The code of a create that wrote nothing because its `send_by` had passed.
pub const NOT_SENT: &str = "NOT_SENT";

/// One provider call as it is recorded: the outcome, and the request and response with
/// credentials and personal data redacted.
#[derive(Debug, Clone)]
pub struct Call {
    /// The outcome.
    pub outcome: Outcome,
    /// Redacted request.
    pub request: Option<Value>,
    /// Redacted response.
    pub response: Option<Value>,
    /// How long it took (including a re-login).
    pub duration: Duration,
}

/// An e-invoice provider.
pub trait Provider: Send + Sync {
    /// The name in configurations and metrics (`viettel`).
    fn name(&self) -> &'static str;

    /// Issues `doc` (or its replacement) under its transaction UUID. No request may be
    /// written after `send_by` (the caller's lease would no longer cover the call): a
    /// provider still waiting for a token then answers `Retryable` with code [`NOT_SENT`].
    fn create<'a>(
        &'a self,
        target: &'a Target,
        doc: &'a Document,
        prepared: &'a Prepared,
        send_by: tokio::time::Instant,
    ) -> BoxFuture<'a, Call>;

    /// Looks up what the provider holds under `transaction_uuid`.
    fn lookup<'a>(&'a self, target: &'a Target, transaction_uuid: &'a str) -> BoxFuture<'a, Call>;

    /// Invoices of one (merchant, series) that may be in flight at once: providers that
    /// number invoices in order reject or misorder under a flood (DOMAIN §5).
    fn concurrency_per_series(&self) -> usize;
}

/// The providers this process can call, by name.
#[derive(Clone, Default)]
pub struct Registry {
    providers: HashMap<&'static str, Arc<dyn Provider>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.providers.keys()).finish()
    }
}

impl Registry {
    /// Every provider we speak, with the client settings of the configuration.
    pub fn new(settings: &viettel::Settings) -> Result<Registry, ProviderInitError> {
        let mut registry = Registry::default();
        registry.add(Arc::new(viettel::Viettel::new(settings.clone())?));
        Ok(registry)
    }

    /// Adds (or replaces) a provider.
    pub fn add(&mut self, provider: Arc<dyn Provider>) {
        self.providers.insert(provider.name(), provider);
    }

    /// The provider named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(name).cloned()
    }

    /// The names of the registered providers.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.providers.keys().copied()
    }
}

/// The HTTP client could not be built (TLS roots, …).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the provider HTTP client: {0}")]
pub struct ProviderInitError(pub String);

/// Replaces personal data and secrets in a JSON document (recursively) by `***`, by key.
pub fn redact(value: &mut Value, keys: &[&str]) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if keys.contains(&k.as_str()) {
                    if !v.is_null() {
                        *v = Value::String("***".into());
                    }
                } else {
                    redact(v, keys);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, keys)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redaction_replaces_listed_keys_at_any_depth_and_keeps_nulls() {
        let mut v = json!({"buyerInfo": {"buyerEmail": "a@b.vn", "buyerTaxCode": "0100109106", "buyerPhoneNumber": null},
                           "list": [{"password": "x"}]});
        redact(&mut v, &["buyerEmail", "buyerPhoneNumber", "password"]);
        assert_eq!(
            v,
            json!({"buyerInfo": {"buyerEmail": "***", "buyerTaxCode": "0100109106", "buyerPhoneNumber": null},
                             "list": [{"password": "***"}]})
        );
    }

    #[test]
    fn target_debug_hides_the_password() {
        let t = Target {
            endpoint: "http://x".into(),
            supplier_tax_code: "0100109106".into(),
            username: "u".into(),
            password: Secret::new("hunter2".into()),
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
