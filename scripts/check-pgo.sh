#!/usr/bin/env bash
# The PGO build the Docker image ships (scripts/build-pgo.sh, which fails
# on any error answer in its training load), then its binary serving the
# demo: /typing must reach the typing stream writer (client_sync1 in the
# guide's topology). Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# (Already installed, rustup answers without the network.)
if ! rustup component add llvm-tools >/dev/null 2>&1; then
  echo "!! PGO build not checked: rustup cannot install llvm-tools here (no network to static.rust-lang.org?)"
  exit 0
fi
scripts/build-pgo.sh
PORT=${PGO_CHECK_PORT:-18797}
target/pgo/synapse-edge demo --listen "127.0.0.1:$PORT" --metrics "127.0.0.1:$((PORT + 1))" >target/pgo/demo-check.log 2>&1 &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT
worker=""
for _ in $(seq 50); do
  worker=$(curl -sS -D- -o /dev/null -X PUT -d '{}' \
    "http://127.0.0.1:$PORT/_matrix/client/v3/rooms/%21demo%3Ademo.example/typing/%40a%3Ademo.example" 2>/dev/null \
    | tr -d '\r' | sed -n 's/^x-worker: //Ip') || true # not up yet
  [ -n "$worker" ] && break
  sleep 0.2
done
if [ "$worker" != client_sync1 ]; then
  echo "PGO build: /typing went to '$worker', not client_sync1; the demo said:"
  cat target/pgo/demo-check.log
  exit 1
fi
echo "PGO build: target/pgo/synapse-edge routes /typing to $worker"
