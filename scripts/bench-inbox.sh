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
# the fill, default 20m), READS (list/count requests per round, default 30000), TRANSPORT (sse or ws,
# default sse), HERALD_BIN, BENCH_BIN.
#   FILL=bulk      fill the list/count inboxes straight in SQL (scripts/inbox-bulk-fill.sh, under nice 19
#                  and ionice idle) instead of through inbox_notify (hours at 100 000 x 1 000).
#                  Then Herald starts on the filled file (its start-up recount builds the counts, timed),
#                  every round reads other users (no round finds an earlier one's pages cached), and one
#                  more round runs cold: Herald restarted and the inbox file dropped from the page cache.
#                  FILL_DIR: where that data directory goes (tens of GB at full scale; deleted at the end
#                  unless KEEP_FILL=1; one that holds a fill.json from an earlier fill is measured again,
#                  not refilled); FILL_SECS bounds the bulk fill (it stops between chunks, with every
#                  inbox the same size, and says so); it also stops when the disk has under 14 GB free.
#
# Every run starts a fresh Herald (fresh data directory, inbox on) on 127.0.0.1; the load tool is its own
# process. Every phase is bounded by the tool's time limits.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

NO_NCHAN=1 bench_setup inbox- 25 "$@"

PORT=${HERALD_PORT:-18090}
API_KEY=bench-inbox-key
TRANSPORT=${TRANSPORT:-sse}
FILL_USERS=${FILL_USERS:-10000}
FILL_ITEMS=${FILL_ITEMS:-1000}
FILL_LIMIT=${FILL_LIMIT:-20m}
FILL=${FILL:-notify}
WORK=$(mktemp -d /tmp/herald-bench-inbox.XXXXXX)
DATA=$WORK/data
SERVER_PID=""
stop_server() { stop_pid "$SERVER_PID"; SERVER_PID=""; }
cleanup() {
  stop_server
  rm -rf "$WORK"
  [ "$FILL" != bulk ] || [ "${KEEP_FILL:-0}" = 1 ] || rm -rf "$DATA"
}
trap cleanup EXIT

# A fresh Herald with the inbox on. inbox.user_rate is raised from 20/s to 1000/s per user: the mark-read
# run makes 0.5 changes per user per second, under either limit, so this only keeps a retry-after from
# ever mixing into the latencies.
# With "keep", on the data directory as it is (a filled one), waiting up to an hour for the start-up
# recount.
start_herald() {
  local wait=10
  if [ "${1:-}" = keep ]; then wait=3600; else rm -rf "$DATA"; fi
  mkdir -p "$DATA"
  ensure_free "$PORT"
  "$HERALD" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
    --set inbox.enabled=true --set centrifugo.api_key="$API_KEY" \
    --set limits.max_connections=20000 --set inbox.user_rate=1000 \
    >"$WORK/herald.out" 2>"$WORK/herald.err" &
  SERVER_PID=$!
  wait_port "http://127.0.0.1:$PORT/healthz" "$wait"
}

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$SERVER_PID/status"; }
# Drops the inbox file's pages from the page cache (its own pages only: fadvise DONTNEED through dd).
evict() { for f in "$DATA"/inbox.sqlite3*; do dd if="$f" iflag=nocache count=0 status=none; done; }
cached() { fincore -b -n -o RES "$DATA/inbox.sqlite3" 2>/dev/null || echo "?"; }
# Starts Herald on the filled directory and records how long it took to answer (the start-up recount of
# every inbox), what it repaired, and its memory, as one JSON line labelled $1.
start_filled() {
  local t0 t1 repaired
  t0=$(date +%s.%N)
  start_herald keep
  t1=$(date +%s.%N)
  repaired=$(grep -o 'repaired=[0-9]*' "$WORK/herald.err" | tail -1 | cut -d= -f2 || true)
  echo "{\"test\": \"start\", \"label\": \"$1\", \"round\": 1, \"start_secs\": $(echo "$t1 - $t0" | bc), \"repaired\": ${repaired:-0}, \"rss_kib\": $(rss_kib), \"inbox_bytes_cached\": $(cached), \"inbox_bytes\": $(stat -c %s "$DATA/inbox.sqlite3"), \"load\": \"$(uptime | sed 's/.*load average: //')\"}" \
    | tee -a "$RESULTS" >>"$OUT/runs.log"
}

bench() { # label round inbox-subcommand args...
  local label=$1 round=$2
  shift 2
  echo "-- round $round: $label ($(uptime | sed 's/.*load average/load average/'))" | tee -a "$OUT/runs.log"
  "$BENCH" inbox --addr "127.0.0.1:$PORT" --api-key "$API_KEY" --data-dir "$DATA" \
    --server-pid "$SERVER_PID" --label "$label" --round "$round" --json-out "$RESULTS" "$@" \
    >>"$OUT/runs.log" 2>&1 || echo "!! run failed: $label" | tee -a "$OUT/runs.log"
}

want() { [ -z "$ONLY" ] || [[ "$1" == *"$ONLY"* ]]; }

if [ "$QUICK" = 1 ]; then
  USERS=2000 CONNECTED=500 MR_USERS=100 MR_RATE=100 MR_SECS=5s
  FILL_USERS=1000 FILL_ITEMS=20 READS=3000
else
  USERS=100000 CONNECTED=10000 MR_USERS=1000 MR_RATE=500 MR_SECS=20s READS=${READS:-30000}
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
if want "$name" && [ "$FILL" = bulk ]; then
  DATA=${FILL_DIR:-$DATA}
  if [ -e "$DATA/fill.json" ]; then
    # A directory this script (or scripts/inbox-bulk-fill.sh) filled before: measure it again as it is.
    echo "-- reusing the fill in $DATA: $(cat "$DATA/fill.json")" | tee -a "$OUT/runs.log"
  else
    [ ! -e "$DATA" ] || { echo "FILL_DIR $DATA exists and holds no fill.json: give a new directory" >&2; exit 2; }
    start_herald   # Herald creates its inbox file (its schema, its indexes), then stops
    stop_server
    echo "-- bulk fill: $FILL_USERS inboxes x $FILL_ITEMS items ($(uptime | sed 's/.*load average/load average/'))" | tee -a "$OUT/runs.log"
    nice -n 19 ionice -c3 scripts/inbox-bulk-fill.sh "$DATA" "$FILL_USERS" "$FILL_ITEMS" 2>>"$OUT/runs.log" \
      >"$DATA/fill.json"
  fi
  sed 's/^{/{"test": "bulk_fill", "label": "bulk fill", "round": 1, /' "$DATA/fill.json" | tee -a "$RESULTS" >>"$OUT/runs.log"
  # The fill may have stopped short of FILL_ITEMS (disk, FILL_SECS): read at the scale it reached.
  FILL_USERS=$(grep -o '"users": [0-9]*' "$DATA/fill.json" | grep -o '[0-9]*$')
  ITEMS_DONE=$(grep -o '"items": [0-9]*' "$DATA/fill.json" | grep -o '[0-9]*$')
  name="list/count: $FILL_USERS inboxes x $ITEMS_DONE items (bulk)"
  start_filled "start on the filled inbox (recount)"
  PER_ROUND=$((READS / 3))
  for round in $(seq 1 "$ROUNDS"); do
    bench "$name" "$round" read --users "$FILL_USERS" --items "$ITEMS_DONE" --requests "$READS" \
      --concurrency 32 --time-limit 120s --user-offset $(((round - 1) * PER_ROUND))
  done
  echo "{\"test\": \"rss\", \"label\": \"after the reads\", \"round\": 1, \"rss_kib\": $(rss_kib)}" | tee -a "$RESULTS" >>"$OUT/runs.log"
  # Cold: a restart (its recount reads the table again), then the inbox file dropped from the page cache,
  # then users no round has read.
  stop_server
  evict
  start_filled "restart, inbox file evicted before it"
  evict
  bench "$name, cold" 1 read --users "$FILL_USERS" --items "$ITEMS_DONE" --requests "$READS" \
    --concurrency 32 --time-limit 120s --user-offset $((ROUNDS * PER_ROUND))
  stop_server
elif want "$name"; then
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
