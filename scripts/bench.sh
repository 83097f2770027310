#!/usr/bin/env bash
# Herald against nchan, side by side on this machine: the same workloads, alternating servers, several rounds,
# then a markdown table of medians and Herald/nchan ratios (docs/BENCHMARKS.md explains the numbers).
#
# Usage: scripts/bench.sh [--quick] [--rounds N] [--only SUBSTRING] [--out DIR]
#   --quick        small sizes, 1 round: for trying things out (a minute or two)
#   --rounds N     rounds of every workload on each server (default 3)
#   --only S       only workloads whose name contains S (e.g. --only "10k SSE")
#   --out DIR      where results.jsonl and results.md go (default target/bench/<date>)
#
# Each run starts a fresh server (fresh data directory), so memory readings start from a clean process.
# Everything listens on 127.0.0.1 only; every run is bounded in time by the bench tool's own limits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

bench_setup '' 12 "$@"

HERALD_PORT=${HERALD_PORT:-18080}
NCHAN_PORT=8089   # fixed by the shared nginx config
NCHAN_CONF_SRC=$ROOT/../shared/bench/nchan.nginx.conf

[ -f "$NCHAN_CONF_SRC" ] || { echo "missing $NCHAN_CONF_SRC" >&2; exit 1; }

WORK=$(mktemp -d /tmp/herald-bench.XXXXXX)
SERVER_PID=""
stop_server() { stop_pid "$SERVER_PID"; SERVER_PID=""; }
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT

start_herald() {
  rm -rf "$WORK/herald"
  ensure_free "$HERALD_PORT"
  mkdir -p "$WORK/herald"
  "$HERALD" serve --listen "127.0.0.1:$HERALD_PORT" --allow-anonymous --data-dir "$WORK/herald" \
    --set limits.max_connections=20000 >"$WORK/herald.out" 2>"$WORK/herald.err" &
  SERVER_PID=$!
  wait_port "http://127.0.0.1:$HERALD_PORT/healthz"
}

start_nchan() {
  local dir=$WORK/nchan
  rm -rf "$dir"
  ensure_free "$NCHAN_PORT"
  nchan_conf "$NCHAN_CONF_SRC" "$dir"
  nginx -c "$dir/nchan.conf" -p "$dir/" >"$dir/out.log" 2>&1 &
  SERVER_PID=$!
  wait_port "http://127.0.0.1:$NCHAN_PORT/nchan_status"
}

# name | transport | subscribers | channels | messages | rate | concurrency | extra herald-bench arguments
if [ "$QUICK" = 1 ]; then
  WORKLOADS=(
    "1k SSE, 1 channel|sse|200|1|200|0|16"
    "1k SSE at 1k msg/s (p99 goal)|sse|200|1|500|1000|16"
    "100 SSE at 1k msg/s|sse|100|1|500|1000|16"
    "1k SSE, highest rate with p99 < 100 ms|sse|200|1|20000|100|32|--max-p99 100ms --phase 2s"
    "10k SSE, 1 channel|sse|1000|1|100|0|16"
    "10k WS, 1 channel|ws|1000|1|100|0|16"
    "10k WS Protobuf, 1 channel|ws-protobuf|1000|1|100|0|16"
    "1k channels x 10 SSE|sse|1000|100|1000|0|16"
    "10k idle SSE (memory)|sse|1000|1|0|0|1"
    "10k idle WS (memory)|ws|1000|1|0|0|1"
    "10k idle WS Protobuf (memory)|ws-protobuf|1000|1|0|0|1"
    "durable publish, no subscribers|sse|0|1|1000|0|32"
    "durable publish, 1k subscribers|sse|200|1|1000|0|32"
  )
else
  WORKLOADS=(
    "1k SSE, 1 channel|sse|1000|1|2000|0|16"
    "1k SSE at 1k msg/s (p99 goal)|sse|1000|1|3000|1000|16"
    "100 SSE at 1k msg/s|sse|100|1|3000|1000|16"
    "1k SSE, highest rate with p99 < 100 ms|sse|1000|1|60000|100|32|--max-p99 100ms --phase 2s"
    "10k SSE, 1 channel|sse|10000|1|300|0|16"
    "10k WS, 1 channel|ws|10000|1|300|0|16"
    "10k WS Protobuf, 1 channel|ws-protobuf|10000|1|300|0|16"
    "1k channels x 10 SSE|sse|10000|1000|10000|0|16"
    "10k idle SSE (memory)|sse|10000|1|0|0|1"
    "10k idle WS (memory)|ws|10000|1|0|0|1"
    "10k idle WS Protobuf (memory)|ws-protobuf|10000|1|0|0|1"
    "durable publish, no subscribers|sse|0|1|5000|0|32"
    "durable publish, 1k subscribers|sse|1000|1|5000|0|32"
  )
fi

run_one() { # server name transport n channels m rate concurrency round extra
  local server=$1 name=$2 transport=$3 n=$4 ch=$5 m=$6 rate=$7 conc=$8 round=$9 extra=${10:-} addr
  if [ "$server" = herald ]; then start_herald; addr=127.0.0.1:$HERALD_PORT; else start_nchan; addr=127.0.0.1:$NCHAN_PORT; fi
  echo "-- round $round: $name on $server"
  "$BENCH" run --server "$server" --addr "$addr" --transport "$transport" -n "$n" --channels "$ch" \
    -m "$m" --rate "$rate" --concurrency "$conc" --label "$name" --round "$round" \
    --publish-timeout 90s --drain 15s --settle 2s --json-out "$RESULTS" $extra \
    2>&1 | tee -a "$OUT/runs.log" || echo "!! run failed: $name on $server" | tee -a "$OUT/runs.log"
  stop_server
}

for round in $(seq 1 "$ROUNDS"); do
  for wl in "${WORKLOADS[@]}"; do
    IFS='|' read -r name transport n ch m rate conc extra <<<"$wl"
    if [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
    # Alternate which server goes first, so neither always runs on a warmer machine.
    if [ $((round % 2)) = 1 ]; then order="herald nchan"; else order="nchan herald"; fi
    # nchan has no Protobuf codec: those rows are Herald's, to compare with its JSON rows.
    if [ "$transport" = ws-protobuf ]; then order="herald"; fi
    for server in $order; do
      run_one "$server" "$name" "$transport" "$n" "$ch" "$m" "$rate" "$conc" "$round" "$extra"
    done
  done
done

bench_report
