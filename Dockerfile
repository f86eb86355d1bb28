# The image the Helm chart runs (`command: ["invoice"]`, user 10001, read-only root
# filesystem). Multi-stage: build with the pinned toolchain, run on a slim Debian with only
# the CA roots (rustls verifies provider and JWKS endpoints) and the binary.
#   docker build -t registry.example.vn/payments/invoice:0.1.0 .
# (No Docker engine exists on the development machine: this file is not built by `make test`.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys (`cmake`-free default build needs a C
# toolchain and these headers).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3 zlib1g-dev \
    libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY migrations migrations
COPY topics topics
COPY data data
RUN cargo build --locked --release --bin invoice

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin invoice
COPY --from=build /src/target/release/invoice /usr/local/bin/invoice
USER 10001:10001
EXPOSE 31140
ENTRYPOINT ["invoice"]
