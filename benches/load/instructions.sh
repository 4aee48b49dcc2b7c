#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the serving
# thread's user-space work (parsing, routing, headers, the runtime), without
# the kernel. Unlike the load benchmark's CPU figures it does not move with
# foreign load or the other core, so it shows a change of a few percent in
# the request path that timing cannot. Each binary runs under valgrind in
# front of the demo's stand-in workers, access log off as in the load
# benchmark, while wrk drives the benchmark's mix (mix.lua) through it.
#   benches/load/instructions.sh [BINARY...]   # default: target/release/synapse-edge
# Prints one line per binary: requests, instructions per request.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/scripts/demo-config-dir.sh"
PORT=${INSTR_PORT:-18810}   # uses PORT .. PORT+2 on 127.0.0.1
SECONDS_PER_RUN=${INSTR_SECONDS:-15}
[ $# -gt 0 ] || set -- "$ROOT/target/release/synapse-edge"
for tool in valgrind callgrind_annotate wrk; do
  command -v "$tool" >/dev/null || { echo "instructions: $tool is needed (apt-get install valgrind wrk)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/synapse-edge-instr.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$1" demo --listen "127.0.0.1:$((PORT + 2))" --metrics "127.0.0.1:$((PORT + 1))" >"$WORK/demo.log" 2>&1 &
pids+=($!)
DIR=$(demo_config_dir "$WORK/demo.log")
printf 'access_log: false\n' >"$WORK/edge.yaml"
for bin in "$@"; do
  out="$WORK/callgrind.$(basename "$bin").$$"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run --threads 1 --config "$WORK/edge.yaml" \
    --synapse-config "$DIR/homeserver.yaml" --synapse-config "$DIR/workers" \
    --listen "127.0.0.1:$PORT" >"$WORK/edge.log" 2>&1 &
  edge=$!
  pids+=($edge)
  up=""
  for _ in $(seq 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/_matrix/client/versions" 2>/dev/null && { up=1; break; }
    kill -0 "$edge" 2>/dev/null || break # it exited
    sleep 0.3
  done
  [ -n "$up" ] || { echo "instructions: $bin did not answer under valgrind (within 30 s); it said:" >&2; cat "$WORK/edge.log" >&2; exit 1; }
  summary=$(wrk -t1 -c16 -d"${SECONDS_PER_RUN}s" -s "$ROOT/benches/load/mix.lua" "http://127.0.0.1:$PORT" | tail -1)
  kill -TERM "$edge"
  wait "$edge" || true
  requests=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); assert s["non2xx"]==0 and s["errors"]==0, s; print(s["requests"])' "$summary")
  # The connections' tasks, inclusive: every request's work on the serving
  # thread, and none of start-up's. The task's outermost frame of ours is
  # `serve_conn`, or `start_tcp_conn` when the compiler inlined the one
  # into the other (it does, depending on the rest of the code); the
  # largest of them is the task. (callgrind_annotate appends the object's
  # name, ` [...]`, to some lines only.)
  serving=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null \
    | sed -n -E 's/^ *([0-9,]+) .*synapse_edge::listeners::(serve_conn|start_tcp_conn)::\{\{closure\}\}( \[.*)?$/\1/p' \
    | head -1 | tr -d ,)
  [ -n "$serving" ] || { echo "instructions: no serve_conn or start_tcp_conn frame in $out (a binary without symbols?)" >&2; exit 1; }
  echo "$bin: $requests requests, $((serving / requests)) instructions per request"
done
rm -rf "$WORK"
