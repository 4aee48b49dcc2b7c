#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests, and the
# end-to-end suite against real Synapse (tests/e2e/run.sh installs what it
# needs: PostgreSQL, Redis, a Python venv with pinned Synapse and matrix-nio),
# and Chromium for the status page test.
# Then the PGO build the Docker image ships (scripts/build-pgo.sh: trained
# under load with no error answers), and its binary routing the demo.
# SKIP_E2E=1 skips the end-to-end suite, SKIP_PGO=1 the PGO build, for a
# quick local run.
set -euo pipefail
cd "$(dirname "$0")/.."

# On CI (a clean clone, built once) keep the disk use down: CI has failed
# once with "No space left on device" in the PGO build. No incremental
# build state (about 1 GiB), and line tables instead of full debug info in
# the test binaries (about 2 GiB less; backtraces keep file and line).
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
  export CARGO_PROFILE_DEV_DEBUG=line-tables-only
fi

# The status page test renders the page in headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian package) for the status page test"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi

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
if [ -z "${SKIP_PGO:-}" ]; then
  echo "== PGO build (scripts/build-pgo.sh)"
  # The debug build has served the tests and the end-to-end suite; on CI
  # its room is wanted for the two release builds.
  if [ -n "${CI:-}" ]; then rm -rf target/debug; fi
  scripts/check-pgo.sh
fi
