//! `invoice sample-traffic`: feeds the local Kafka with payments of the demo merchant (as
//! `make run` does) and prints the invoice counts as they grow, so a newcomer sees the whole
//! flow: payments in, decisions, invoices issued at the provider simulator. Development only:
//! it writes to whatever brokers the configuration names.

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::domain::money::{self, LineInput, VatRate};
use crate::domain::rules;

const MENU: &[(&str, &str, i64)] = &[
    ("CF-SUA-DA", "Cà phê sữa đá", 29_000),
    ("BANH-MI", "Bánh mì thịt", 25_000),
    ("TRA-DAO", "Trà đào cam sả", 35_000),
    ("BAC-XIU", "Bạc xỉu", 32_000),
    ("CROISSANT", "Bánh sừng bò", 27_000),
];

/// One sample payment, number `n` of run `run`: a few menu lines at today's reduced or
/// standard rate; every 10th carries a company buyer.
pub fn payment(run: &str, n: u64, merchant_id: &str) -> Value {
    let today = Utc::now().with_timezone(&crate::domain::claim::vietnam()).date_naive();
    let rate = match rules::rules_for(today) {
        Ok(r) if r.eight_percent_allowed => VatRate::Eight,
        _ => VatRate::Ten,
    };
    let lines: Vec<LineInput> = (0..1 + n % 3)
        .map(|i| {
            let (sku, name, price) = MENU[((n + i) % MENU.len() as u64) as usize];
            LineInput {
                sku: Some(sku.into()),
                name: name.into(),
                unit: Some("ly".into()),
                quantity: Decimal::from(1 + (n + i) % 2),
                unit_price: Decimal::from(price),
                vat_rate: rate,
            }
        })
        .collect();
    let total = money::compute("VND", &lines).map(|(_, t)| t.gross).unwrap_or_default();
    let order_id = format!("DEMO-{run}-{n:06}");
    let buyer = if n % 10 == 9 {
        json!({"legalName": "Công ty TNHH Khách Hàng Mẫu", "taxCode": "0101243150",
               "address": "2 Lý Thường Kiệt, Phường Cửa Nam, Thành phố Hà Nội", "email": "ketoan@khachhang.vn"})
    } else {
        json!({"name": "Khách lẻ", "email": null})
    };
    json!({
        "eventId": uuid::Uuid::new_v4().to_string(),
        "orderId": order_id,
        "merchantId": merchant_id,
        "paidAt": crate::events::invoice_events::rfc3339(Utc::now()),
        "currency": "VND",
        "totalAmount": total.to_string(),
        "items": lines.iter().map(|l| json!({
            "sku": l.sku, "name": l.name, "unit": l.unit, "quantity": l.quantity.to_string(),
            "unitPrice": l.unit_price.to_string(), "vatRate": l.vat_rate.to_string()})).collect::<Vec<_>>(),
        "buyer": buyer,
    })
}

/// Produces `rate` payments per second (stopping after `count` if given) to `topic` and
/// prints the counts of their invoices from `db` every two seconds, until `stop`.
pub async fn run(
    producer: FutureProducer,
    topic: &str,
    db: sqlx::PgPool,
    merchant_id: &str,
    rate: u32,
    count: Option<u64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // Orders of a run of their own: a second `make run` on the same day must not send the
    // orders of the first again (the stream would rightly skip them as already invoiced).
    let run = Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {},
            _ = stop.cancelled() => break,
        }
        if count.is_none_or(|c| sent < c) {
            let value = payment(&run, sent, merchant_id);
            let key = value["orderId"].as_str().unwrap_or("").to_owned();
            let body = value.to_string();
            let record = FutureRecord::to(topic).key(&key).payload(&body);
            if let Err((error, _)) = producer.send(record, Duration::from_secs(10)).await {
                eprintln!("sample-traffic: cannot produce: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            sent += 1;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            let counts: Vec<(String, i64)> = sqlx::query_as(
                "SELECT status, count(*) FROM invoice WHERE order_id LIKE $1 GROUP BY status ORDER BY status",
            )
            .bind(format!("DEMO-{run}-%"))
            .fetch_all(&db)
            .await
            .unwrap_or_default();
            let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let line = format!(
                "[{:>5.0}s] payments sent {sent} · their invoices: {}",
                started.elapsed().as_secs_f64(),
                if counts.is_empty() { "none yet".into() } else { counts.join(" · ") }
            );
            // The point of this command is to print progress for a person at a terminal.
            #[allow(clippy::print_stdout)]
            {
                println!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_payments_parse_and_their_totals_match() {
        for n in 0..30 {
            let value = payment("20261207-041200", n, "M-1001");
            let parsed = crate::events::payment::parse(value.to_string().as_bytes());
            assert!(parsed.is_ok(), "{n}: {parsed:?} {value}");
        }
        assert!(payment("20261207-041200", 9, "M-1001")["buyer"]["taxCode"].is_string());
        assert_eq!(payment("20261207-041200", 7, "M-1001")["orderId"], "DEMO-20261207-041200-000007");
    }
}
