#!/usr/bin/env bash
# End-to-end suite: real Synapse (PyPI matrix-synapse) with PostgreSQL and
# Redis, workers on Unix sockets in the guide's shape, synapse-edge in front,
# driven by matrix-nio. Installs what it needs (idempotently), starts
# everything in a temporary folder, and tears it all down, also on failure.
#
#   tests/e2e/run.sh                         # pinned Synapse
#   SYNAPSE_VERSION=1.162.0 tests/e2e/run.sh # another Synapse release
#   KEEP_E2E=1 tests/e2e/run.sh              # keep the folder (logs) afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SYNAPSE_VERSION=${SYNAPSE_VERSION:-1.163.2}
NIO_VERSION=0.26.0
VENV=$ROOT/target/e2e-venv-$SYNAPSE_VERSION
T0=$(date +%s)

log() { printf '== e2e: %s\n' "$*"; }

install() {
  local need=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v curl >/dev/null || need+=(curl)
  command -v runuser >/dev/null || need+=(util-linux)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
  fi
  if ! "$VENV/bin/python" -c "import synapse, nio, PIL; assert synapse.__version__ == '$SYNAPSE_VERSION'" 2>/dev/null; then
    log "installing matrix-synapse $SYNAPSE_VERSION and matrix-nio $NIO_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "matrix-synapse[postgres,redis]==$SYNAPSE_VERSION" "matrix-nio==$NIO_VERSION"
  fi
}

install
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PY=$VENV/bin/python

log "building synapse-edge"
(cd "$ROOT" && cargo build --locked --quiet)
EDGE_BIN=$ROOT/target/debug/synapse-edge

RUN=$(mktemp -d /tmp/synapse-edge-e2e.XXXXXX)
chmod 755 "$RUN"
PIDS=()

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -f "$RUN/redis.pid" ] && kill "$(cat "$RUN/redis.pid")" 2>/dev/null || true
  [ -d "$RUN/pg" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN/pg" -m immediate stop >/dev/null 2>&1 || true
  if [ $rc -ne 0 ] || [ -n "${KEEP_E2E:-}" ]; then
    log "logs kept in $RUN/logs"
  else
    rm -rf "$RUN"
  fi
  exit $rc
}
trap cleanup EXIT INT TERM

log "generating the Synapse config in $RUN (workers by synapse-edge generate)"
"$PY" "$ROOT/tests/e2e/synapse_config.py" "$RUN" "$EDGE_BIN"

log "starting PostgreSQL and Redis"
mkdir -p "$RUN/pg" "$RUN/pgsock"
chown postgres "$RUN/pg" "$RUN/pgsock"
runuser -u postgres -- "$PGBIN/initdb" -D "$RUN/pg" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$RUN/pg" -l "$RUN/pg/postgres.log" -w \
  -o "-c listen_addresses='' -c unix_socket_directories=$RUN/pgsock -c fsync=off -c full_page_writes=off -c synchronous_commit=off" start >/dev/null
"$PGBIN/createdb" -h "$RUN/pgsock" -U postgres -E UTF8 --lc-collate=C --lc-ctype=C -T template0 synapse
redis-server --port 0 --unixsocket "$RUN/sockets/synapse_redis.sock" --unixsocketperm 700 --save '' --appendonly no \
  --daemonize yes --pidfile "$RUN/redis.pid" --logfile "$RUN/logs/redis.txt"

"$PY" -m synapse.app.homeserver --config-path "$RUN/homeserver.yaml" --generate-keys >/dev/null

wait_health() { # name socket
  local name=$1 sock=$2
  for _ in $(seq 1 120); do
    curl -fsS --unix-socket "$sock" http://localhost/health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "$name never answered /health on $sock; last lines of its logs:"
  tail -n 30 "$RUN/logs/${name%%[0-9]*}.log" "$RUN/logs/$name.out" 2>/dev/null || true
  return 1
}

start_synapse() { # name app config-paths...
  local name=$1 app=$2; shift 2
  local args=()
  for c in "$@"; do args+=(--config-path "$c"); done
  "$PY" -m "$app" "${args[@]}" >"$RUN/logs/$name.out" 2>&1 &
  PIDS+=($!)
}

log "starting Synapse main"
SHARED=("$RUN/homeserver.yaml" "$RUN/gen/homeserver-workers.yaml")
start_synapse main synapse.app.homeserver "${SHARED[@]}"
wait_health main "$RUN/sockets/synapse_inbound_main.sock"

log "starting the workers"
WORKERS=(client_sync1 rooms1 rooms2 federation_reader1 media1 sender1 tasks1)
for w in "${WORKERS[@]}"; do
  start_synapse "$w" synapse.app.generic_worker "${SHARED[@]}" "$RUN/gen/workers/$w.yaml"
done
for w in "${WORKERS[@]}"; do
  sock=$RUN/sockets/synapse_inbound_$w.sock
  grep -q inbound "$RUN/gen/workers/$w.yaml" || sock=$RUN/sockets/synapse_replication_$w.sock
  wait_health "$w" "$sock"
done
log "Synapse is up ($(( $(date +%s) - T0 )) s since start)"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$EDGE_BIN" run --synapse-config "$RUN/homeserver.yaml" --synapse-config "$RUN/gen/homeserver-workers.yaml" \
  --synapse-config "$RUN/gen/workers" --config "$RUN/gen/edge.yaml" \
  --listen "127.0.0.1:$PORT" >"$RUN/logs/edge.txt" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do
  curl -fsS "http://127.0.0.1:$PORT/_matrix/client/versions" >/dev/null 2>&1 && break
  sleep 0.2
done

log "running the client flows"
"$PY" "$ROOT/tests/e2e/flows.py" --edge "http://127.0.0.1:$PORT" --run-dir "$RUN" --edge-bin "$EDGE_BIN"
log "done in $(( $(date +%s) - T0 )) s"
