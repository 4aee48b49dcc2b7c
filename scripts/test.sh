#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests, and the
# end-to-end suite against real Synapse (tests/e2e/run.sh installs what it
# needs: PostgreSQL, Redis, a Python venv with pinned Synapse and matrix-nio).
# SKIP_E2E=1 skips the end-to-end suite for a quick local run.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== formatting"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== tests"
cargo test --locked --all-targets
if [ -z "${SKIP_E2E:-}" ]; then
  echo "== end-to-end (real Synapse)"
  tests/e2e/run.sh
fi
