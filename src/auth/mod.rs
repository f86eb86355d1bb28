//! Who may call the API: Standard Webhooks signatures for the two webhook endpoints and
//! ES256 JWTs for the operator endpoints (SPEC §5). Pure checks live here; the HTTP module
//! maps their errors to answers once.

pub mod jwt;
pub mod webhook;
