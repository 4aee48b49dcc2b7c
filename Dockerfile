# synapse-edge: a small image with the release binary.
#   docker build -t synapse-edge .
#   docker run --rm -v sockets:/sockets -v ./synapse:/data:ro -p 8008:8008 synapse-edge \
#     run --synapse-config=/data/homeserver.yaml --synapse-config=/data/workers --listen 0.0.0.0:8008
#   docker build --build-arg PGO=0 -t synapse-edge .   # plain `cargo build --release`
# Docker's default seccomp profile refuses io_uring: the edge then writes its
# requests to workers one system call each instead of one per batch (its
# start-up line says worker_writes=...). A profile that also allows
# io_uring_setup and io_uring_enter (--security-opt seccomp=<file>) gives
# the batched writes.
FROM rust:1.95-bookworm AS build
# PGO=1: a profile-guided build (scripts/build-pgo.sh: an instrumented build
# trained under a load of its own, then the optimised build; it installs
# wrk, h2load and rustup's llvm-tools). 7 to 12% less CPU per request in the
# load benchmark, for about twice the build time.
ARG PGO=1
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY routes ./routes
COPY benches ./benches
COPY scripts ./scripts
RUN if [ "$PGO" = 1 ]; then scripts/build-pgo.sh && cp target/pgo/synapse-edge /synapse-edge; \
    else cargo build --release --locked --bin synapse-edge && cp target/release/synapse-edge /synapse-edge; fi

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /synapse-edge /usr/local/bin/synapse-edge
# The edge must open the workers' Unix sockets (mode 666 by default in Synapse).
EXPOSE 8008 443 8448 9100
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS http://127.0.0.1:9100/metrics >/dev/null || exit 1
ENTRYPOINT ["synapse-edge"]
CMD ["--help"]
