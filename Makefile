# invoice — developer entry points. `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
# Development-only settings for `make run` (never used in production).
DEV_ENV := set -a; source scripts/dev.env; set +a;

.PHONY: help deps build-deps deps-down deps-status run test lint bench topics build tools helm-lint asyncapi

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Install if missing and start Postgres, Redis and Kafka on 127.0.0.1 (idempotent)
	@scripts/deps.sh up

deps-down: ## Stop the local Postgres, Redis and Kafka
	@scripts/deps.sh down

deps-status: ## Show whether each local dependency answers
	@scripts/deps.sh status

build-deps: ## Install what building needs beyond Rust (OpenSSL headers for librdkafka's TLS), if missing
	@scripts/deps.sh build

build: build-deps ## Build the release binary
	$(CARGO) build --locked --release --bin invoice

run: deps build ## Migrate with seed data, create topics, and run the service locally
	@$(DEV_ENV) target/release/invoice migrate --seed
	@$(DEV_ENV) target/release/invoice topics apply
	@scripts/run.sh

test: deps tools ## Start the dependencies and run every test
	@scripts/schemathesis.sh
	RUST_TEST_THREADS=$${RUST_TEST_THREADS:-4} $(CARGO) test --locked --all-targets

lint: build-deps ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets --all-features -- -D warnings

bench: deps ## Micro benchmarks (criterion), the end-to-end stream benchmark (target/bench/e2e.json) and the API benchmark (target/bench/api.json)
	$(CARGO) bench --locked --bench micro
	$(CARGO) bench --locked --bench stream
	$(CARGO) bench --locked --bench api

topics: deps build ## Create the Kafka topics of topics/ on the local broker, report differences
	@$(DEV_ENV) target/release/invoice topics apply

tools: ## Install helm (go install, pinned) and promtool (Debian's prometheus package) into target/tools/bin
	@scripts/tools.sh all

helm-lint: tools ## helm lint --strict and helm template (defaults, every feature on), promtool check and test of the alert rules
	target/tools/bin/helm lint --strict helm/invoice
	target/tools/bin/helm lint --strict helm/invoice -f helm/invoice/ci/all-features-values.yaml
	target/tools/bin/helm template invoice helm/invoice > /dev/null
	target/tools/bin/helm template invoice helm/invoice --kube-version 1.31.0 -f helm/invoice/ci/all-features-values.yaml > /dev/null
	target/tools/bin/promtool check rules helm/invoice/alerts/invoice-rules.yaml
	target/tools/bin/promtool test rules helm/invoice/alerts/tests.yaml

asyncapi: build-deps ## Regenerate docs/asyncapi.json (AsyncAPI 3.0) from topics/
	@$(DEV_ENV) $(CARGO) run --quiet --locked --bin invoice -- topics asyncapi > docs/asyncapi.json
