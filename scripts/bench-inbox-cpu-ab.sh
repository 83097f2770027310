#!/usr/bin/env bash
# A/B of the server's CPU time for one inbox fan-out, builds interleaved (A, B, A, B, ...): the whole
# server's and its threads' (the inbox writer `herald-inbox`, the log writer `herald-writer`) from
# /proc, which other load on a shared machine does not inflate, beside the load tool's own results.
#
# Usage: scripts/bench-inbox-cpu-ab.sh HERALD_A HERALD_B [...]
# Environment: MODE (notify or broadcast, default notify), USERS (default 20000), CONNECTED (default
# 2000), ROUNDS (default 3), BENCH_BIN (default target/release/herald-bench), OUT (default
# target/bench/inbox-cpu-ab). Each run: a fresh `herald serve` with the settings of bench-inbox.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-notify} USERS=${USERS:-20000} CONNECTED=${CONNECTED:-2000} ROUNDS=${ROUNDS:-3}
BENCH=${BENCH_BIN:-$PWD/target/release/herald-bench}
OUT=${OUT:-$PWD/target/bench/inbox-cpu-ab}
PORT=${HERALD_PORT:-18197}
mkdir -p "$OUT"
ticks() { awk '{print $14 + $15}' "$1" 2>/dev/null || echo 0; }
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    data=$(mktemp -d "$OUT/data.XXXXXX")
    "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$data" --set inbox.enabled=true \
      --set centrifugo.api_key=bench-inbox-key --set limits.max_connections=20000 \
      --set inbox.user_rate=1000 >"$data/herald.out" 2>"$data/herald.err" &
    pid=$!
    for _ in $(seq 1 150); do
      curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
      sleep 0.2
    done
    load=$(cut -d' ' -f1 /proc/loadavg)
    before=$(ticks "/proc/$pid/stat")
    "$BENCH" inbox --addr "127.0.0.1:$PORT" --api-key bench-inbox-key --data-dir "$data" \
      --server-pid "$pid" --label "$bin" --round "$round" --json-out "$OUT/results.jsonl" \
      fanout --mode "$MODE" --transport sse --users "$USERS" --connected "$CONNECTED" \
      --per-call 1000 --concurrency 8 >"$OUT/bench.log" 2>&1 || echo "!! run failed: $bin"
    after=$(ticks "/proc/$pid/stat")
    inbox=0 writer=0
    for t in /proc/"$pid"/task/*; do
      case $(cat "$t/comm") in
        herald-inbox) inbox=$(ticks "$t/stat") ;;
        herald-writer) writer=$(ticks "$t/stat") ;;
      esac
    done
    echo "round $round $bin load=$load server_ticks=$((after - before)) herald-inbox=$inbox herald-writer=$writer" |
      tee -a "$OUT/cpu.log"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$data"
  done
done
echo "== CPU: $OUT/cpu.log; the load tool's results: $OUT/results.jsonl"
