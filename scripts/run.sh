#!/usr/bin/env bash
# `make run`: the whole flow on the local stack with development settings: the provider
# simulator, `invoice all` (API + stream + workers in one process) and a feed of sample
# payments of the demo merchant, printing invoice counts as they grow. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; source scripts/dev.env; set +a
bin=${INVOICE_BIN:-target/release/invoice}
addr=${APP_ENV_INVOICE_HTTP_ADDR:-127.0.0.1:31140}
sim_addr=${PROVIDER_SIM_ADDR:-127.0.0.1:31150}
rate=${SAMPLE_RATE:-5}
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM EXIT
"$bin" provider-sim --addr "$sim_addr" --latency-ms 30 >/tmp/invoice-provider-sim.log 2>&1 &
pids+=($!)
APP_ENV_INVOICE_HTTP_ADDR=$addr "$bin" all >/tmp/invoice-all.log 2>&1 &
pids+=($!)
# /ready also needs the identity provider's keys, and no identity provider runs here (the
# JWT routes answer 503; webhooks, claims and the whole payment flow work): wait for Postgres,
# Redis and Kafka only.
for _ in $(seq 1 200); do
  curl -sS "http://$addr/ready" 2>/dev/null | grep -Eq '"status":"ok"|"failed":\["jwks"\]' && break
  sleep 0.1
done
echo "invoice all:   http://$addr  (ready: $(curl -sS "http://$addr/ready"); logs /tmp/invoice-all.log)"
echo "               no identity provider runs here, so /ready names jwks and the JWT routes answer 503"
echo "provider sim:  http://$sim_addr/sim/stats  (logs /tmp/invoice-provider-sim.log)"
echo "metrics:       http://$addr/metrics"
echo "inspect one:   set -a; . scripts/dev.env; set +a; $bin inspect <orderId>"
echo "Sending $rate sample payments per second for merchant M-1001. Ctrl-C stops everything."
"$bin" sample-traffic --rate "$rate" &
pids+=($!)
wait "${pids[@]}"
