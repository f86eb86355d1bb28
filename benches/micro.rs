//! Micro benchmarks of the hot pure functions (`make bench`).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use invoice::config::Secret;
use invoice::crypto::Keyring;
use invoice::ids::{partition_of, Snowflake, SystemClock};

fn ids(c: &mut Criterion) {
    let gen = Snowflake::new(1, Arc::new(SystemClock), 0);
    c.bench_function("snowflake next_id", |b| b.iter(|| black_box(gen.next_id())));
    c.bench_function("partition_of (ASCII order id)", |b| {
        b.iter(|| partition_of(black_box("ORD-2026-000123"), 3))
    });
    c.bench_function("partition_of (Vietnamese order id)", |b| {
        b.iter(|| partition_of(black_box("ĐƠN-HÀNG-2026-000123"), 3))
    });
}

fn crypto(c: &mut Criterion) {
    let ring = Keyring::new(Secret::new([7u8; 32]));
    let credentials = br#"{"username":"0100109106-509","password":"correct horse battery staple"}"#;
    let sealed = ring.seal(credentials, b"provider_config:M-1001:1");
    c.bench_function("credentials seal", |b| {
        b.iter(|| ring.seal(black_box(credentials), b"provider_config:M-1001:1"))
    });
    c.bench_function("credentials open", |b| {
        b.iter(|| ring.open(black_box(&sealed), b"provider_config:M-1001:1"))
    });
}

criterion_group!(benches, ids, crypto);
criterion_main!(benches);
