# Builds every changewire binary; docker-compose runs one per service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
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
