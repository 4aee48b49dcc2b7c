#!/usr/bin/env bash
# Flame graphs of both proxies under the load benchmark's short-request
# scenarios (HTTP, HTTPS, HTTP/2, HTTP with access logs): one round of
# run.py with each proxy sampled by perf, folded and drawn by inferno into
# benches/load/results/flamegraphs/{http,https,h2,logged}-{nginx,edge}.svg
# (and logged-nginx-buffered.svg; the .folded stacks are kept for diffing
# with inferno-diff-folded).
# Installs perf and inferno if missing. The figures of a profiled run are
# not comparable (perf takes CPU), so results/latest.* are left alone.
#   BENCH_SECONDS=10 benches/load/profile.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v perf >/dev/null || {
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf >/dev/null
}
[ -x "$ROOT/target/tools/bin/inferno-flamegraph" ] || cargo install inferno --locked --quiet --root "$ROOT/target/tools"
OUT=$ROOT/benches/load/results/flamegraphs
mkdir -p "$OUT"
rm -f "$OUT"/*.perf.data
export BENCH_PROFILE=$OUT BENCH_ROUNDS=1 BENCH_SCENARIOS=${BENCH_SCENARIOS:-http,https,h2,logged}
exec "$ROOT/benches/load/run.sh"
