#!/usr/bin/env bash
# The notification inbox's benchmark (docs/BENCHMARKS.md, "Notification inbox"): notify to many inboxes
# beside the server API's broadcast to the same users' personal channels, mark-read latency between two
# devices with a drift check, and list/count latency on filled inboxes. Medians over rounds.
#
# Usage: scripts/bench-inbox.sh [--quick] [--rounds N] [--only SUBSTRING] [--out DIR]
#   --quick        small sizes, 1 round: a smoke check of the whole pipeline
#   --rounds N     rounds of every workload (default 3)
#   --only S       only workloads whose name contains S (e.g. --only notify)
#   --out DIR      where results.jsonl and results.md go (default target/bench/inbox-<date>)
# Environment: FILL_USERS, FILL_ITEMS (the list/count scale, default 10000 x 1000), FILL_LIMIT (bound of
# the fill, default 20m), TRANSPORT (sse or ws, default sse), HERALD_BIN, BENCH_BIN.
#
# Every run starts a fresh Herald (fresh data directory, inbox on) on 127.0.0.1; the load tool is its own
# process. Every phase is bounded by the tool's time limits.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

bench_setup inbox- 14 "$@"

PORT=${HERALD_PORT:-18090}
API_KEY=bench-inbox-key
TRANSPORT=${TRANSPORT:-sse}
FILL_USERS=${FILL_USERS:-10000}
FILL_ITEMS=${FILL_ITEMS:-1000}
FILL_LIMIT=${FILL_LIMIT:-20m}
WORK=$(mktemp -d /tmp/herald-bench-inbox.XXXXXX)
SERVER_PID=""
stop_server() { stop_pid "$SERVER_PID"; SERVER_PID=""; }
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT

# A fresh Herald with the inbox on. inbox.user_rate is raised from 20/s to 1000/s per user: the mark-read
# run makes 0.5 changes per user per second, under either limit, so this only keeps a retry-after from
# ever mixing into the latencies.
start_herald() {
  rm -rf "$WORK/data"
  mkdir -p "$WORK/data"
  ensure_free "$PORT"
  "$HERALD" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --set inbox.enabled=true --set centrifugo.api_key="$API_KEY" \
    --set limits.max_connections=20000 --set inbox.user_rate=1000 \
    >"$WORK/herald.out" 2>"$WORK/herald.err" &
  SERVER_PID=$!
  wait_port "http://127.0.0.1:$PORT/healthz"
}

bench() { # label round inbox-subcommand args...
  local label=$1 round=$2
  shift 2
  echo "-- round $round: $label ($(uptime | sed 's/.*load average/load average/'))" | tee -a "$OUT/runs.log"
  "$BENCH" inbox --addr "127.0.0.1:$PORT" --api-key "$API_KEY" --data-dir "$WORK/data" \
    --server-pid "$SERVER_PID" --label "$label" --round "$round" --json-out "$RESULTS" "$@" \
    >>"$OUT/runs.log" 2>&1 || echo "!! run failed: $label" | tee -a "$OUT/runs.log"
}

want() { [ -z "$ONLY" ] || [[ "$1" == *"$ONLY"* ]]; }

if [ "$QUICK" = 1 ]; then
  USERS=2000 CONNECTED=500 MR_USERS=100 MR_RATE=100 MR_SECS=5s
  FILL_USERS=1000 FILL_ITEMS=20 READS=3000
else
  USERS=100000 CONNECTED=10000 MR_USERS=1000 MR_RATE=500 MR_SECS=20s READS=30000
fi

uptime | tee -a "$OUT/runs.log"
for round in $(seq 1 "$ROUNDS"); do
  # Alternate which goes first, so neither always runs on a warmer machine.
  if [ $((round % 2)) = 1 ]; then order="notify broadcast"; else order="broadcast notify"; fi
  for mode in $order; do
    name="fanout $mode: $USERS inboxes, $CONNECTED connected ($TRANSPORT)"
    want "$name" || continue
    start_herald
    bench "$name" "$round" fanout --mode "$mode" --transport "$TRANSPORT" --users "$USERS" \
      --connected "$CONNECTED" --per-call 1000 --concurrency 8
    stop_server
  done
  name="mark-read: $MR_USERS users x 2 devices, $MR_RATE changes/s ($TRANSPORT)"
  if want "$name"; then
    start_herald
    bench "$name" "$round" markread --transport "$TRANSPORT" --users "$MR_USERS" --items 10 \
      --rate "$MR_RATE" --duration "$MR_SECS"
    stop_server
  fi
done

# List and counts: one fill (bounded by FILL_LIMIT), then every round of reads on it.
name="list/count: $FILL_USERS inboxes x $FILL_ITEMS items"
if want "$name"; then
  start_herald
  bench "fill: $FILL_USERS inboxes x $FILL_ITEMS items" 1 fill --users "$FILL_USERS" \
    --items "$FILL_ITEMS" --per-call 1000 --concurrency 8 --time-limit "$FILL_LIMIT"
  for round in $(seq 1 "$ROUNDS"); do
    bench "$name" "$round" read --users "$FILL_USERS" --items "$FILL_ITEMS" --requests "$READS" \
      --concurrency 32 --time-limit 120s
  done
  stop_server
fi
uptime | tee -a "$OUT/runs.log"

{
  echo "Rounds: $ROUNDS$([ "$QUICK" = 1 ] && echo ' (quick mode: sizes scaled down)'). Medians over rounds."
  echo "Herald $(git rev-parse --short HEAD 2>/dev/null || echo '?'); load: $(uptime | sed 's/.*load average/load average/')"
  echo
  "$BENCH" inbox table "$RESULTS"
} | tee "$OUT/results.md"
echo "== results: $OUT/results.md (raw: $RESULTS, logs: $OUT/runs.log)"
