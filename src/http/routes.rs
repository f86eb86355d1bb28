//! The route table: every method and path template the service answers, in one list that
//! dispatch, metrics labels and the OpenAPI consistency test all read.

/// A route's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    /// `GET /health`
    Health,
    /// `GET /ready`
    Ready,
    /// `GET /metrics`
    Metrics,
    /// `GET /v1/api/openapi.json`
    OpenApi,
    /// `POST /v1/api/webhooks/merchant`
    WebhookMerchant,
    /// `POST /v1/api/webhooks/internal`
    WebhookInternal,
    /// `GET /v1/api/claims/{token}`
    ClaimGet,
    /// `POST /v1/api/claims/{token}`
    ClaimPost,
    /// `GET /v1/api/invoices`
    InvoiceList,
    /// `GET /v1/api/invoices/{id}`
    InvoiceGet,
    /// `GET /v1/api/invoices/{id}/audit`
    InvoiceAudit,
    /// `POST /v1/api/invoices/{id}/replay`
    InvoiceReplay,
    /// `GET /v1/api/dlq`
    DlqList,
    /// `POST /v1/api/dlq/{orderId}/requeue`
    DlqRequeue,
    /// `PUT /v1/api/merchants/{merchantId}/provider-config`
    ProviderConfigPut,
    /// `GET /v1/api/merchants/{merchantId}/provider-config`
    ProviderConfigGet,
    /// `GET /v1/api/merchants/{merchantId}/tax-info`
    TaxInfo,
    /// `GET /v1/api/admin-units/provinces`
    Provinces,
    /// `GET /v1/api/admin-units/provinces/{code}/wards`
    Wards,
}

/// One entry: method, template, id, and whether it is served only in `api` mode.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path template with `{name}` parameters; also the metrics label.
    pub template: &'static str,
    /// Identity.
    pub id: RouteId,
    /// Served only by `api` (and `all`), not by the health listener of `stream`/`worker`.
    pub api_only: bool,
}

const fn r(method: &'static str, template: &'static str, id: RouteId, api_only: bool) -> Route {
    Route { method, template, id, api_only }
}

/// Every route.
pub const ROUTES: &[Route] = &[
    r("GET", "/health", RouteId::Health, false),
    r("GET", "/ready", RouteId::Ready, false),
    r("GET", "/metrics", RouteId::Metrics, false),
    r("GET", "/v1/api/openapi.json", RouteId::OpenApi, true),
    r("POST", "/v1/api/webhooks/merchant", RouteId::WebhookMerchant, true),
    r("POST", "/v1/api/webhooks/internal", RouteId::WebhookInternal, true),
    r("GET", "/v1/api/claims/{token}", RouteId::ClaimGet, true),
    r("POST", "/v1/api/claims/{token}", RouteId::ClaimPost, true),
    r("GET", "/v1/api/invoices", RouteId::InvoiceList, true),
    r("GET", "/v1/api/invoices/{id}", RouteId::InvoiceGet, true),
    r("GET", "/v1/api/invoices/{id}/audit", RouteId::InvoiceAudit, true),
    r("POST", "/v1/api/invoices/{id}/replay", RouteId::InvoiceReplay, true),
    r("GET", "/v1/api/dlq", RouteId::DlqList, true),
    r("POST", "/v1/api/dlq/{orderId}/requeue", RouteId::DlqRequeue, true),
    r("PUT", "/v1/api/merchants/{merchantId}/provider-config", RouteId::ProviderConfigPut, true),
    r("GET", "/v1/api/merchants/{merchantId}/provider-config", RouteId::ProviderConfigGet, true),
    r("GET", "/v1/api/merchants/{merchantId}/tax-info", RouteId::TaxInfo, true),
    r("GET", "/v1/api/admin-units/provinces", RouteId::Provinces, true),
    r("GET", "/v1/api/admin-units/provinces/{code}/wards", RouteId::Wards, true),
];

/// The result of matching a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<'p> {
    /// A route and its path parameters, in template order.
    Route(Route, Vec<&'p str>),
    /// The path exists with other methods (405); the template and the allowed methods.
    MethodNotAllowed(&'static str, Vec<&'static str>),
    /// No such path.
    NotFound,
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for Route {}

fn params<'p>(template: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut out = Vec::new();
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(out),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                out.push(ps);
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// Finds the route of `method path` among the routes served (`api` selects the API routes).
pub fn find<'p>(method: &str, path: &'p str, api: bool) -> Matched<'p> {
    // HEAD is answered like GET (hyper drops the body).
    let method = if method == "HEAD" { "GET" } else { method };
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let mut allowed = Vec::new();
    let mut template = None;
    for route in ROUTES.iter().filter(|r| api || !r.api_only) {
        if let Some(values) = params(route.template, path) {
            if route.method == method {
                return Matched::Route(*route, values);
            }
            allowed.push(route.method);
            template = Some(route.template);
        }
    }
    match template {
        Some(template) => Matched::MethodNotAllowed(template, allowed),
        None => Matched::NotFound,
    }
}

/// What a log line may say about a request's path: its route template, never the path itself
/// (a claim token in the path is a bearer secret).
pub fn loggable(method: &str, path: &str) -> &'static str {
    match find(method, path, true) {
        Matched::Route(route, _) => route.template,
        Matched::MethodNotAllowed(template, _) => template,
        Matched::NotFound => "(unmatched)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_paths_never_carry_a_claim_token() {
        let token = "AbCdEfGhIjKlMnOpQrStUvWxYz012345";
        for method in ["GET", "POST", "DELETE"] {
            for path in [format!("/v1/api/claims/{token}"), format!("/v1/api/claims/{token}/x")] {
                let logged = loggable(method, &path);
                assert!(!logged.contains(token), "{method} {path} logged as {logged}");
            }
        }
        assert_eq!(loggable("GET", "/v1/api/claims/abc"), "/v1/api/claims/{token}");
        assert_eq!(loggable("GET", "/nope"), "(unmatched)");
    }

    #[test]
    fn templates_match_with_their_parameters() {
        match find("GET", "/v1/api/invoices/123/audit", true) {
            Matched::Route(route, values) => {
                assert_eq!(route.id, RouteId::InvoiceAudit);
                assert_eq!(values, vec!["123"]);
            }
            other => panic!("{other:?}"),
        }
        match find("PUT", "/v1/api/merchants/M-1/provider-config/", true) {
            Matched::Route(route, values) => {
                assert_eq!(route.id, RouteId::ProviderConfigPut);
                assert_eq!(values, vec!["M-1"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(find("HEAD", "/health", false), Matched::Route(r, _) if r.id == RouteId::Health));
    }

    #[test]
    fn wrong_methods_and_unknown_paths_are_told_apart() {
        assert_eq!(
            find("DELETE", "/v1/api/merchants/M-1/provider-config", true),
            Matched::MethodNotAllowed("/v1/api/merchants/{merchantId}/provider-config", vec!["PUT", "GET"])
        );
        assert_eq!(find("GET", "/v1/api/invoices//audit", true), Matched::NotFound);
        assert_eq!(find("GET", "/v1/api/invoices", false), Matched::NotFound);
        assert_eq!(find("GET", "/nothing", true), Matched::NotFound);
    }
}
