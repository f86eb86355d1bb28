//! A test identity provider: serves a JWKS document over HTTP on loopback (counting fetches,
//! able to rotate keys and to go down), and signs tokens with the fixture keys in
//! `tests/fixtures/jwt`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// Issuer and audience the test API is configured with.
pub const ISSUER: &str = "https://auth.test";
/// Audience.
pub const AUDIENCE: &str = "invoice";

/// A fixture key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// PEM (PKCS#8) private key.
    pub pem: &'static str,
    /// Public x.
    pub x: &'static str,
    /// Public y.
    pub y: &'static str,
}

/// P-256 key A.
pub const KEY_A: Key = Key {
    pem: include_str!("../../fixtures/jwt/es256-a.pem"),
    x: "NuyaU_AqxbDvejos1LmmC0FPpbxJTBbE-WVU0f9uELQ",
    y: "0x8FNqdOWzDcLxHzQ1W8XNlc_sNR-tIKZzZlje1KoZY",
};
/// P-256 key B (rotation).
pub const KEY_B: Key = Key {
    pem: include_str!("../../fixtures/jwt/es256-b.pem"),
    x: "kXsz-GWlwlfGTALck09ofs-jhmU9m7wM-cgEF0cw1Ws",
    y: "ZeAshCZQoAb-nG8_YNRmV-956VX8QtlarAx0g3N1vEM",
};
/// A P-384 key (wrong algorithm).
pub const ES384_PEM: &str = include_str!("../../fixtures/jwt/es384.pem");

/// The JWK of `key` under `kid`.
pub fn jwk(kid: &str, key: Key) -> Value {
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": key.x, "y": key.y})
}

/// The serving identity provider.
pub struct TestIdp {
    /// Where it listens.
    pub addr: SocketAddr,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl TestIdp {
    /// Serves `{"keys": [jwk("a", KEY_A)]}`.
    pub async fn spawn() -> TestIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let jwks = Arc::new(Mutex::new(json!({"keys": [jwk("a", KEY_A)]})));
        let fetches = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (j, f, d) = (jwks.clone(), fetches.clone(), down.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (j, f, d) = (j.clone(), f.clone(), d.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_request| {
                        let (j, f, d) = (j.clone(), f.clone(), d.clone());
                        async move {
                            f.fetch_add(1, Ordering::SeqCst);
                            let mut response = if d.load(Ordering::SeqCst) {
                                let mut r = Response::new(Full::new(Bytes::from_static(b"down")));
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                r
                            } else {
                                Response::new(Full::new(Bytes::from(j.lock().unwrap().to_string())))
                            };
                            response
                                .headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestIdp { addr, jwks, fetches, down }
    }

    /// The JWKS URL.
    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Requests served so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Replaces the published key set.
    pub fn publish(&self, keys: Vec<Value>) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    /// Makes every fetch fail with 503 (or serve again).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

/// Claims valid now for `permissions` on `merchants`.
pub fn claims(permissions: &[&str], merchants: &[&str]) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "operator-1", "iat": now, "nbf": now - 5, "exp": now + 600,
           "permissions": permissions, "merchant_ids": merchants})
}

/// An ES256 token over `claims` with `kid`, signed by `key`.
pub fn sign(key: Key, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap()).unwrap()
}

/// A token signed with key A under kid `a` (the default published key).
pub fn token(permissions: &[&str], merchants: &[&str]) -> String {
    sign(KEY_A, Some("a"), &claims(permissions, merchants))
}
