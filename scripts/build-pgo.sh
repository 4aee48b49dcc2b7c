#!/usr/bin/env bash
# A release binary of synapse-edge optimised with a profile of itself under
# load (profile-guided optimisation), as the Docker image ships it:
#   1. build an instrumented binary (-Cprofile-generate);
#   2. run it in front of the demo's stand-in workers and drive a training
#      load through it: wrk over HTTP/1.1 and HTTPS (scripts/pgo/train.lua),
#      h2load over HTTP/2, a few uploads; stop it with SIGTERM, which writes
#      its profile;
#   3. merge the profile (llvm-profdata, from rustup's llvm-tools);
#   4. build again with -Cprofile-use.
# The result is target/pgo/synapse-edge (about 5 minutes on two cores).
# It takes 7 to 12% less CPU per request than `cargo build --release` in
# the load benchmark (BENCHMARKS.md, "Profile-guided build"). The training load is not the benchmark's
# mix, so the build is not tuned to the figures it is judged by.
#   scripts/build-pgo.sh            # installs llvm-tools, wrk, h2load if missing
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/demo-config-dir.sh"
OUT=$ROOT/target/pgo
PORT=${PGO_PORT:-18701}   # uses PORT .. PORT+3 on 127.0.0.1

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
SYSROOT=$(rustc --print sysroot)
PROFDATA=$SYSROOT/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
[ -x "$PROFDATA" ] || rustup component add llvm-tools
[ -x "$PROFDATA" ] || { echo "build-pgo: no llvm-profdata at $PROFDATA (rustup component add llvm-tools)" >&2; exit 1; }

rm -rf "$OUT/raw" "$OUT/discard" "$OUT/train"
mkdir -p "$OUT/raw" "$OUT/discard" "$OUT/train"
cd "$ROOT"

echo "build-pgo: 1/4 instrumented build" >&2
# Build scripts are instrumented too: their profiles go to discard/.
LLVM_PROFILE_FILE="$OUT/discard/%p.profraw" RUSTFLAGS="-Cprofile-generate=$OUT/raw" \
  cargo build --release --locked --quiet --bin synapse-edge --target-dir "$OUT/gen"
GEN=$OUT/gen/release/synapse-edge

echo "build-pgo: 2/4 training load" >&2
T=$OUT/train
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# The demo's stand-in workers (their own profile is not wanted: discard/).
LLVM_PROFILE_FILE="$OUT/discard/%p.profraw" "$GEN" demo --listen "127.0.0.1:$((PORT + 3))" \
  --metrics "127.0.0.1:$((PORT + 2))" >"$T/demo.log" 2>&1 &
pids+=($!)
DIR=$(demo_config_dir "$T/demo.log")
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=train \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$T/key.pem" -out "$T/cert.pem" 2>/dev/null
# The edge being trained: its defaults (access log on), one serving thread.
LLVM_PROFILE_FILE="$OUT/raw/edge-%p.profraw" "$GEN" run --threads 1 \
  --synapse-config "$DIR/homeserver.yaml" --synapse-config "$DIR/workers" \
  --listen "127.0.0.1:$PORT" --listen-tls "127.0.0.1:$((PORT + 1))" \
  --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" >"$T/edge.log" 2>&1 &
edge=$!
pids+=($edge)
for _ in $(seq 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$PORT/_matrix/client/versions" 2>/dev/null && break
  sleep 0.1
done
curl -fsS -o /dev/null "http://127.0.0.1:$PORT/_matrix/client/versions" \
  || { echo "build-pgo: the edge did not start:" >&2; cat "$T/edge.log" >&2; exit 1; }
wrk -t1 -c64 -d8s -s scripts/pgo/train.lua "http://127.0.0.1:$PORT" >"$T/wrk-http.txt"
wrk -t1 -c64 -d8s -s scripts/pgo/train.lua "https://127.0.0.1:$((PORT + 1))" >"$T/wrk-https.txt"
for i in $(seq 0 1999); do
  case $((i % 5)) in
    0|1) echo "https://127.0.0.1:$((PORT + 1))/_matrix/client/v3/rooms/%21h$((i * 31 % 900))%3Atrain.example/messages?dir=b&limit=20" ;;
    2) echo "https://127.0.0.1:$((PORT + 1))/_matrix/client/v3/sync?since=s$i&timeout=0&access_token=syt_aDI$((i % 400))_Zq8Xw2Lp0Rt6Yc4Vb1Nm_3f9e7d" ;;
    3) echo "https://127.0.0.1:$((PORT + 1))/_matrix/client/v1/media/thumbnail/train.example/h$((i % 500))?width=32&height=32" ;;
    4) echo "https://127.0.0.1:$((PORT + 1))/_matrix/client/v3/pushrules/" ;;
  esac
done >"$T/h2-targets"
h2load -t1 -c64 -m1 -D 8 -i "$T/h2-targets" >"$T/h2load.txt"
head -c $((8 * 1024 * 1024)) /dev/zero >"$T/upload.bin"
for _ in $(seq 20); do
  curl -fsS -o /dev/null -X POST --data-binary "@$T/upload.bin" -H "Content-Type: application/octet-stream" \
    "http://127.0.0.1:$PORT/_matrix/media/v3/upload"
done
grep -h -E 'Requests/sec|requests:' "$T/wrk-http.txt" "$T/wrk-https.txt" "$T/h2load.txt" >&2
# A profile of error answers would mark the wrong paths hot.
if grep -h -E 'Non-2xx|Socket errors' "$T/wrk-http.txt" "$T/wrk-https.txt" >&2 \
  || ! grep -q ' 0 failed, 0 errored' "$T/h2load.txt"; then
  echo "build-pgo: the training load had errors (above; $T)" >&2
  exit 1
fi
kill -TERM "$edge"
wait "$edge" || true
cleanup # the demo's stand-ins too, before the long build

echo "build-pgo: 3/4 merging the profile" >&2
"$PROFDATA" merge -o "$OUT/edge.profdata" "$OUT"/raw/*.profraw

# The instrumented build and the training's files are spent. On CI (a
# clean clone) free their room for the optimised build; kept elsewhere so
# that the next run rebuilds only what changed.
if [ -n "${CI:-}" ]; then rm -rf "$OUT/gen" "$OUT/train" "$OUT/discard" "$OUT/raw"; fi

echo "build-pgo: 4/4 optimised build" >&2
RUSTFLAGS="-Cprofile-use=$OUT/edge.profdata" \
  cargo build --release --locked --quiet --bin synapse-edge --target-dir "$OUT/use"
cp "$OUT/use/release/synapse-edge" "$OUT/synapse-edge"
echo "build-pgo: $OUT/synapse-edge" >&2
