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

fn payments(c: &mut Criterion) {
    // The shape `make bench` produces (one line, consumer buyer).
    let payment = br#"{"eventId":"ev-123456","orderId":"ORD-123456","merchantId":"M-56","paidAt":"2026-11-24T10:15:00+07:00","currency":"VND","totalAmount":"1100000","items":[{"sku":"SKU-1","name":"C\u00e0 ph\u00ea s\u1eefa","unit":"ly","quantity":"2","unitPrice":"500000","vatRate":"10"}]}"#;
    c.bench_function("payment parse", |b| b.iter(|| invoice::events::payment::parse(black_box(payment))));
}

criterion_group!(benches, ids, crypto, payments);
criterion_main!(benches);
