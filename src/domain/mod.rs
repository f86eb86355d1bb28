//! Pure domain logic: knows nothing of Kafka, Redis, Postgres or HTTP, does no I/O and
//! reads no clock (times are passed in), so every rule is a plain function tested with unit
//! and property tests.

pub mod assign;
pub mod buyer;
pub mod claim;
pub mod decision;
pub mod document;
pub mod money;
pub mod rules;
pub mod tax_code;
pub mod tax_info;
pub mod text;
pub mod words;
