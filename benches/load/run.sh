#!/usr/bin/env bash
# Load benchmark: synapse-edge vs Nginx vs direct on the same stand-in
# workers (not part of the test suite). Installs nginx, wrk and matplotlib
# if missing, builds the release binary and the PGO one
# (scripts/build-pgo.sh, as the Docker image ships it), runs
# benches/load/run.py: the PGO build is "edge", the plain `cargo build
# --release` is "edge-b" beside it in the short-request scenarios.
#   BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONNECTIONS=64 BENCH_PARKED=2000 benches/load/run.sh
# Also: BENCH_SCENARIOS=http,https (a subset), BENCH_ANSWER_BYTES=2000 (larger
# worker answers), BENCH_PGO=0 (the plain build alone, no PGO build),
# BENCH_EDGE_B=path/to/other/synapse-edge (an A/B of two builds).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
command -v taskset >/dev/null || need+=(util-linux)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
VENV=$ROOT/target/bench-venv
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import matplotlib" 2>/dev/null || {
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib
}
(cd "$ROOT" && cargo build --release --locked --quiet)
if [ "${BENCH_PGO:-1}" = 1 ]; then
  "$ROOT/scripts/build-pgo.sh"
  export BENCH_EDGE=$ROOT/target/pgo/synapse-edge
  export BENCH_EDGE_NAME="PGO build (scripts/build-pgo.sh), as the Docker image ships it"
  # The plain build beside it (not while profiling: the flame graphs are the PGO build's).
  if [ -z "${BENCH_EDGE_B:-}" ] && [ -z "${BENCH_PROFILE:-}" ]; then
    export BENCH_EDGE_B=$ROOT/target/release/synapse-edge
    export BENCH_EDGE_B_NAME="plain build (cargo build --release)"
  fi
fi
# The builds leave gigabytes of dirty pages: written back during the first
# runs, they had made them noisy (Nginx A/A 0.77). Flush them first.
sync
sleep 5
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$VENV/bin/python" "$ROOT/benches/load/run.py"
