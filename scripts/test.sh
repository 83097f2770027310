#!/usr/bin/env bash
# Runs every test Herald has. Installs what the tests need when it is missing (Node packages, the Python
# virtualenv), so it works on a fresh machine. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

echo "== cargo build (the binaries the Node and Python tests start: herald, and the embed example)"
cargo build --workspace --bins --examples --quiet

echo "== Rust unit and integration tests"
cargo test --workspace --all-targets --no-fail-fast

echo "== Node tests with real npm clients, and the examples in headless Chromium"
shopt -s nullglob
node_tests=(tests/node/*.test.mjs)
if [ ${#node_tests[@]} -gt 0 ]; then
  HERALD_BIN="$PWD/target/debug/herald" node --test --test-concurrency=1 "${node_tests[@]}"
fi

echo "== Python tests with the official SDKs (cent, centrifuge-python; JSON and Protobuf)"
herald_bin="$PWD/target/debug/herald"
(cd tests/python && HERALD_BIN="$herald_bin" .venv/bin/python -m pytest -p no:cacheprovider)
