#!/usr/bin/env bash
# `make run`: the service on the local stack with development settings: the HTTP API and the
# stream processor (each its own process, so each has its own snowflake worker id). The
# issuance workers and sample traffic join here as their issues land. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; source scripts/dev.env; set +a
bin=target/release/invoice
api_addr=${APP_ENV_INVOICE_HTTP_ADDR:-127.0.0.1:31140}
stream_addr=${INVOICE_STREAM_HTTP_ADDR:-127.0.0.1:31142}
APP_ENV_INVOICE_WORKER_ID=1 APP_ENV_INVOICE_HTTP_ADDR=$api_addr "$bin" api &
api=$!
APP_ENV_INVOICE_WORKER_ID=2 APP_ENV_INVOICE_HTTP_ADDR=$stream_addr "$bin" stream &
stream=$!
trap 'kill -TERM $api $stream 2>/dev/null; wait $api $stream' INT TERM
for _ in $(seq 1 100); do
  curl -fsS "http://$api_addr/ready" >/dev/null 2>&1 && curl -fsS "http://$stream_addr/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "api:    http://$api_addr  (ready: $(curl -sS "http://$api_addr/ready"))"
echo "stream: http://$stream_addr/metrics  (consuming ${APP_ENV_INVOICE_TOPIC_PAYMENT:-payment.succeeded.v1}, ${APP_ENV_INVOICE_TOPIC_MERCHANT_CDC:-merchant.cdc.v1})"
echo "Ctrl-C stops both."
wait $api $stream
