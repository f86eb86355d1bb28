#!/usr/bin/env bash
# `make run`: the service on the local stack with development settings. For now that is the
# HTTP API (health, readiness, metrics); the stream, the workers and sample traffic join
# here as their issues land. Stops on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
set -a; source scripts/dev.env; set +a
bin=target/release/invoice
echo "invoice api on http://${APP_ENV_INVOICE_HTTP_ADDR:-127.0.0.1:31140} (Ctrl-C stops)"
"$bin" api &
api=$!
trap 'kill -TERM $api 2>/dev/null; wait $api' INT TERM
for _ in $(seq 1 100); do
  curl -fsS "http://${APP_ENV_INVOICE_HTTP_ADDR:-127.0.0.1:31140}/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sS "http://${APP_ENV_INVOICE_HTTP_ADDR:-127.0.0.1:31140}/ready"; echo
wait $api
