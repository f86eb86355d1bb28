//! ES256 bearer tokens verified against the identity provider's JWKS (SPEC §5).
//!
//! The algorithm is pinned by configuration, never read from the token: `none`, HS256 with
//! the public key as secret, RS256 or ES384 are refused before any key is chosen. Keys are
//! cached by `kid`; an unknown `kid` triggers at most one single-flight refetch per cooldown
//! (30 s), so a flood of bogus `kid`s cannot hammer the IdP, and if the IdP is down the keys
//! already held keep working. Until the first successful load, JWT routes answer 503.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::metrics::Metrics;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 60;
/// Largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Where keys come from and how tokens are checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `APP_ENV_INVOICE_JWKS_URL`
    pub jwks_url: String,
    /// `APP_ENV_INVOICE_JWT_ISSUER`
    pub issuer: String,
    /// `APP_ENV_INVOICE_JWT_AUDIENCE`
    pub audience: String,
    /// Minimum time between two fetches caused by unknown `kid`s.
    pub refetch_cooldown: Duration,
    /// Background refresh period.
    pub refresh_every: Duration,
    /// One fetch's time limit.
    pub fetch_timeout: Duration,
}

impl Settings {
    /// The production timings (30 s cooldown, 10 min refresh, 5 s fetch timeout).
    pub fn new(jwks_url: String, issuer: String, audience: String) -> Settings {
        Settings {
            jwks_url,
            issuer,
            audience,
            refetch_cooldown: Duration::from_secs(30),
            refresh_every: Duration::from_secs(600),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `iss` + `sub`: who it is (ASVS 10.3.3).
    pub issuer: String,
    /// `sub`
    pub subject: String,
    /// `permissions`
    pub permissions: HashSet<String>,
    /// `merchant_ids`: whose data it may see (all with `invoice:admin`).
    pub merchant_ids: HashSet<String>,
}

/// The permission that sees every merchant.
pub const ADMIN: &str = "invoice:admin";

impl Principal {
    /// Whether the caller holds `permission`, exactly: `invoice:admin` widens the merchant
    /// scope ([`Principal::sees`]) and opens the DLQ, it does not stand in for the others
    /// (least privilege: an admin token that should write configuration says so).
    pub fn has(&self, permission: &str) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether the caller may see `merchant_id`'s data.
    pub fn sees(&self, merchant_id: &str) -> bool {
        self.permissions.contains(ADMIN) || self.merchant_ids.contains(merchant_id)
    }

    /// For audit rows: `jwt:{sub}` (the issuer is fixed by configuration).
    pub fn actor(&self) -> String {
        format!("jwt:{}", self.subject)
    }
}

/// Why a request is not authenticated. `Display` is the problem `detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("an `Authorization: Bearer <token>` header is required")]
    Missing,
    /// Not a JWT, or a header we refuse.
    #[error("the bearer token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` is not ES256.
    #[error("the token's algorithm is not accepted (ES256 only)")]
    Algorithm,
    /// The `kid` is not among the keys (after the allowed refetch).
    #[error("the token's signing key is unknown")]
    UnknownKey,
    /// Signature or claims invalid.
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    /// No keys could ever be loaded: the service cannot check tokens yet.
    #[error("signing keys are not available yet; retry shortly")]
    KeysUnavailable,
}

impl AuthError {
    /// The metric reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::Invalid(what) => what,
            AuthError::KeysUnavailable => "keys_unavailable",
        }
    }
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Arc<DecodingKey>>,
    loaded: bool,
    /// When an unknown `kid` last caused a fetch (the SPEC's 30 s cooldown).
    last_kid_fetch: Option<Instant>,
}

/// Verifies bearer tokens; cheap to clone (shared cache).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    http: reqwest::Client,
    cache: RwLock<KeyCache>,
    fetching: Mutex<()>,
    metrics: Metrics,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    merchant_ids: Vec<String>,
}

impl Authenticator {
    /// An authenticator with an empty cache (call [`Authenticator::refresh`] to load).
    pub fn new(settings: Settings, metrics: Metrics) -> anyhow::Result<Authenticator> {
        // Exactly one backend is compiled in; installing it explicitly avoids the
        // "cannot determine the CryptoProvider" panic if feature unification ever adds one.
        let _already = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let http = reqwest::Client::builder()
            .timeout(settings.fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Authenticator {
            inner: Arc::new(Inner {
                settings,
                http,
                cache: RwLock::new(KeyCache::default()),
                fetching: Mutex::new(()),
                metrics,
            }),
        })
    }

    /// Whether keys were ever loaded.
    pub async fn loaded(&self) -> bool {
        self.inner.cache.read().await.loaded
    }

    /// Fetches the JWKS now (start-up, background refresh); on failure the held keys stay.
    pub async fn refresh(&self, trigger: &'static str) -> bool {
        let inner = self.inner.clone();
        // In its own task: a request that gives up must not leave a fetch half done.
        tokio::spawn(async move { inner.fetch(trigger).await }).await.unwrap_or(false)
    }

    /// Keeps the keys fresh until `stop`; retries sooner while nothing was ever loaded.
    pub async fn run_refresh(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let wait = if self.loaded().await {
                self.inner.settings.refresh_every
            } else {
                self.inner.settings.refetch_cooldown.max(Duration::from_secs(1))
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            self.refresh("refresh").await;
        }
    }

    /// Checks the `Authorization` header value and returns the caller.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer(authorization)?;
        let header = unverified_header(token)?;
        if header.alg != "ES256" {
            return Err(AuthError::Algorithm);
        }
        let kid = header.kid.ok_or(AuthError::Malformed("the header has no `kid`"))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[&self.inner.settings.issuer]);
        validation.set_audience(&[&self.inner.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Invalid("expired"),
            ErrorKind::ImmatureSignature => AuthError::Invalid("not_yet_valid"),
            ErrorKind::InvalidIssuer => AuthError::Invalid("issuer"),
            ErrorKind::InvalidAudience => AuthError::Invalid("audience"),
            ErrorKind::InvalidSignature => AuthError::Invalid("signature"),
            ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing_claim"),
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
            _ => AuthError::Invalid("claims"),
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("missing_claim"));
        }
        Ok(Principal {
            issuer: claims.iss,
            subject: claims.sub,
            permissions: claims.permissions.into_iter().collect(),
            merchant_ids: claims.merchant_ids.into_iter().collect(),
        })
    }

    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        {
            let cache = self.inner.cache.read().await;
            if let Some(key) = cache.keys.get(kid) {
                return Ok(key.clone());
            }
        }
        let inner = self.inner.clone();
        let wanted = kid.to_owned();
        let fetched = tokio::spawn(async move { inner.refetch_for(&wanted).await }).await.unwrap_or(false);
        let cache = self.inner.cache.read().await;
        match cache.keys.get(kid) {
            Some(key) => Ok(key.clone()),
            None if !cache.loaded => Err(AuthError::KeysUnavailable),
            None => {
                let _ = fetched;
                Err(AuthError::UnknownKey)
            }
        }
    }
}

impl Inner {
    /// One single-flight fetch for an unknown `kid`, unless the cooldown forbids it.
    async fn refetch_for(&self, kid: &str) -> bool {
        let _flight = self.fetching.lock().await;
        {
            let cache = self.cache.read().await;
            if cache.keys.contains_key(kid) {
                return true;
            }
            if cache.last_kid_fetch.is_some_and(|at| at.elapsed() < self.settings.refetch_cooldown) {
                return false;
            }
        }
        // Only these fetches count toward the cooldown: a key rotated just after start-up or a
        // scheduled refresh must not wait 30 s to be found. Failed ones count too.
        self.cache.write().await.last_kid_fetch = Some(Instant::now());
        self.fetch_locked("unknown_kid").await
    }

    async fn fetch(&self, trigger: &'static str) -> bool {
        let _flight = self.fetching.lock().await;
        self.fetch_locked(trigger).await
    }

    async fn fetch_locked(&self, trigger: &'static str) -> bool {
        match self.download().await {
            Ok(keys) => {
                self.metrics.api.jwks_fetch(trigger, Some(keys.len()));
                tracing::info!(keys = keys.len(), trigger, "JWKS loaded");
                let mut cache = self.cache.write().await;
                cache.keys = keys;
                cache.loaded = true;
                true
            }
            Err(error) => {
                self.metrics.api.jwks_fetch(trigger, None);
                // Only the origin: a URL may carry a password or a token in its query.
                let origin = reqwest::Url::parse(&self.settings.jwks_url)
                    .map(|url| url.origin().ascii_serialization())
                    .unwrap_or_default();
                tracing::warn!(%error, trigger, jwks = %origin, "JWKS fetch failed; keeping the keys held");
                false
            }
        }
    }

    async fn download(&self) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
        // reqwest's errors quote the URL; it is never repeated (it may carry a secret).
        let mut response =
            self.http.get(&self.settings.jwks_url).send().await.map_err(reqwest::Error::without_url)?;
        if !response.status().is_success() {
            anyhow::bail!("the JWKS endpoint answered {}", response.status());
        }
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            anyhow::bail!("the JWKS is larger than {MAX_JWKS_BYTES} bytes");
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(reqwest::Error::without_url)? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                anyhow::bail!("the JWKS is larger than {MAX_JWKS_BYTES} bytes");
            }
        }
        let keys = parse_jwks(&body)?;
        // An empty set is an IdP mistake far more often than a wish to refuse everyone:
        // keep the held keys (and say so) rather than lock every operator out.
        if keys.is_empty() {
            anyhow::bail!("the JWKS holds no usable ES256 signing key");
        }
        Ok(keys)
    }
}

/// The usable keys of a JWKS document: EC P-256 keys for signatures with a `kid` (`use`
/// absent or `sig`, `alg` absent or `ES256`). Other keys are skipped, not errors, so an IdP
/// that also publishes RSA keys still works.
pub fn parse_jwks(body: &[u8]) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
    #[derive(Deserialize)]
    struct Jwk {
        kty: Option<String>,
        crv: Option<String>,
        kid: Option<String>,
        #[serde(rename = "use")]
        use_: Option<String>,
        alg: Option<String>,
        x: Option<String>,
        y: Option<String>,
    }
    #[derive(Deserialize)]
    struct Jwks {
        keys: Vec<serde_json::Value>,
    }
    let set: Jwks = serde_json::from_slice(body)?;
    let mut keys = HashMap::new();
    for raw in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else { continue };
        let usable = jwk.kty.as_deref() == Some("EC")
            && jwk.crv.as_deref() == Some("P-256")
            && jwk.use_.as_deref().is_none_or(|u| u == "sig")
            && jwk.alg.as_deref().is_none_or(|a| a == "ES256");
        let (Some(kid), Some(x), Some(y)) = (jwk.kid, jwk.x, jwk.y) else { continue };
        if !usable || kid.is_empty() {
            continue;
        }
        if let Ok(key) = DecodingKey::from_ec_components(&x, &y) {
            keys.insert(kid, Arc::new(key));
        }
    }
    Ok(keys)
}

fn bearer(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > 8192 {
        return Err(AuthError::Malformed("the token is empty or too long"));
    }
    Ok(token)
}

struct UnverifiedHeader {
    alg: String,
    kid: Option<String>,
}

/// The JOSE header, read without trusting it: only to refuse what we never accept (`crit`,
/// a foreign `typ`) and to pick the key by `kid`.
fn unverified_header(token: &str) -> Result<UnverifiedHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("not a signed JWT (three dot-separated parts)"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed("the header is not base64url"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed("the header is not JSON"))?;
    let object = value.as_object().ok_or(AuthError::Malformed("the header is not a JSON object"))?;
    if object.contains_key("crit") {
        return Err(AuthError::Malformed("critical header extensions are not supported"));
    }
    for trusted_elsewhere in ["jku", "x5u", "jwk", "x5c"] {
        if object.contains_key(trusted_elsewhere) {
            return Err(AuthError::Malformed("keys are only taken from the configured JWKS"));
        }
    }
    if let Some(typ) = object.get("typ") {
        let ok =
            typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("at+jwt"));
        if !ok {
            return Err(AuthError::Malformed("`typ` must be JWT or at+jwt"));
        }
    }
    let alg = object.get("alg").and_then(|a| a.as_str()).ok_or(AuthError::Algorithm)?.to_owned();
    let kid = object.get("kid").and_then(|k| k.as_str()).filter(|k| !k.is_empty() && k.len() <= 256);
    Ok(UnverifiedHeader { alg, kid: kid.map(str::to_owned) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Bearer")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("bearer abc")), Ok("abc"));
    }

    fn encode_header(v: serde_json::Value) -> String {
        format!("{}.e30.c2ln", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string()))
    }

    #[test]
    fn headers_we_never_accept_are_refused_before_any_key_lookup() {
        let h = |v| unverified_header(&encode_header(v)).map(|h| (h.alg, h.kid));
        assert_eq!(
            h(serde_json::json!({"alg": "ES256", "kid": "a"})),
            Ok(("ES256".to_owned(), Some("a".to_owned())))
        );
        assert!(h(serde_json::json!({"alg": "ES256", "kid": "a", "crit": ["exp"]})).is_err());
        assert!(h(serde_json::json!({"alg": "ES256", "kid": "a", "jku": "https://evil"})).is_err());
        assert!(h(serde_json::json!({"alg": "ES256", "kid": "a", "typ": "JWE"})).is_err());
        assert_eq!(h(serde_json::json!({"kid": "a"})), Err(AuthError::Algorithm));
        assert!(unverified_header("a.b").is_err());
        assert!(unverified_header("a.b.c.d").is_err());
        assert!(unverified_header("!!.b.c").is_err());
    }

    #[test]
    fn only_p256_signature_keys_with_a_kid_are_kept() {
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "a", "x": "NuyaU_AqxbDvejos1LmmC0FPpbxJTBbE-WVU0f9uELQ", "y": "0x8FNqdOWzDcLxHzQ1W8XNlc_sNR-tIKZzZlje1KoZY"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": "NuyaU_AqxbDvejos1LmmC0FPpbxJTBbE-WVU0f9uELQ", "y": "0x8FNqdOWzDcLxHzQ1W8XNlc_sNR-tIKZzZlje1KoZY"},
            {"kty": "EC", "crv": "P-256", "x": "NuyaU_AqxbDvejos1LmmC0FPpbxJTBbE-WVU0f9uELQ", "y": "0x8FNqdOWzDcLxHzQ1W8XNlc_sNR-tIKZzZlje1KoZY"},
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "EC", "crv": "P-256", "kid": "es384", "alg": "ES384", "x": "NuyaU_AqxbDvejos1LmmC0FPpbxJTBbE-WVU0f9uELQ", "y": "0x8FNqdOWzDcLxHzQ1W8XNlc_sNR-tIKZzZlje1KoZY"},
            "not an object"
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(parse_jwks(b"not json").is_err());
    }

    #[test]
    fn admin_sees_every_merchant_but_holds_only_its_own_permissions() {
        let p = Principal {
            issuer: "i".into(),
            subject: "s".into(),
            permissions: ["invoice:read".to_owned()].into(),
            merchant_ids: ["M-1".to_owned()].into(),
        };
        assert!(p.has("invoice:read") && !p.has("invoice:replay"));
        assert!(p.sees("M-1") && !p.sees("M-2"));
        let admin = Principal { permissions: [ADMIN.to_owned()].into(), ..p };
        assert!(admin.has(ADMIN) && admin.sees("M-2"));
        assert!(!admin.has("invoice:config:write"), "admin is a scope, not every permission");
    }
}
