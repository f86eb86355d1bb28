//! `sqlx::migrate!` embeds `migrations/` in the binary, but on stable Rust it cannot ask cargo
//! to watch the directory: without this, a new migration file is left out of incremental
//! builds (a clean build has it), and tests run against a schema without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
