//! `GET /v1/api/openapi.json`: the OpenAPI 3.1 description of every route, kept next to the
//! route table; a test fails if one has an entry the other lacks.

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use super::server::bytes_body::Body;

/// The document, as shipped.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// The response.
pub fn document() -> Response<Body> {
    let mut response = Response::new(Body::from(DOCUMENT));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_route_is_described_and_every_description_is_a_route() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut described = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                described.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = super::super::routes::ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.template.to_owned()))
            .collect();
        assert_eq!(described, routed, "openapi.json and routes::ROUTES disagree");
    }

    #[test]
    fn every_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        fn walk(v: &serde_json::Value, doc: &serde_json::Value) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(r) = map.get("$ref").and_then(|r| r.as_str()) {
                        let pointer = r.trim_start_matches('#');
                        assert!(doc.pointer(pointer).is_some(), "unresolved {r}");
                    }
                    map.values().for_each(|x| walk(x, doc));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|x| walk(x, doc)),
                _ => {}
            }
        }
        walk(&doc, &doc);
    }
}
