# synapse-edge: a small image with the release binary.
#   docker build -t synapse-edge .
#   docker run --rm -v sockets:/sockets -v ./synapse:/data:ro -p 8008:8008 synapse-edge \
#     run --synapse-config=/data/homeserver.yaml --synapse-config=/data/workers --listen 0.0.0.0:8008
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY routes ./routes
COPY benches ./benches
RUN cargo build --release --locked --bin synapse-edge

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/synapse-edge /usr/local/bin/synapse-edge
# The edge must open the workers' Unix sockets (mode 666 by default in Synapse).
EXPOSE 8008 443 8448 9100
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:9100/metrics >/dev/null || exit 1
ENTRYPOINT ["synapse-edge"]
CMD ["--help"]
