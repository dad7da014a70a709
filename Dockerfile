# syntax=docker/dockerfile:1
# Builds the two changewire binaries; docker-compose runs one container per service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Only the shipped binaries (not the tests' benches and fakes). The registry and the
# target directory are build caches: a source change rebuilds changewire's crates,
# not its dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p changewire-producer -p changewire-consumer \
 && mkdir /out && cp target/release/changewire-producer target/release/changewire-consumer /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/changewire --create-home changewire
COPY --from=build /out/ /usr/local/bin/
COPY config/ /etc/changewire/
USER changewire
WORKDIR /var/lib/changewire
