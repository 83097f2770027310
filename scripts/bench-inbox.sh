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
#                  Then Herald starts on the filled file (timed to its first answer), its start-up check
#                  (in the background) builds the counts, and the script waits for it (timed, bounded by
#                  CHECK_WAIT seconds, default 3600); every round reads other users (no round finds an
#                  earlier one's pages cached). Then Herald is restarted with the inbox file dropped from
#                  the page cache: one round reads while its check runs, and once the check is done (or
#                  CHECK_WAIT is over) the file is dropped again and one more round runs cold.
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
# With "keep", on the data directory as it is (a filled one).
start_herald() {
  local wait=10
  if [ "${1:-}" = keep ]; then wait=120; else rm -rf "$DATA"; fi
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
# Starts Herald on the filled directory and records how long it took to answer (its start-up check runs
# in the background), its memory, and whether the check was still running then, as one JSON line
# labelled $1.
start_filled() {
  local t0 t1
  t0=$(date +%s.%N)
  start_herald keep
  t1=$(date +%s.%N)
  echo "{\"test\": \"start\", \"label\": \"$1\", \"round\": 1, \"start_secs\": $(echo "$t1 - $t0" | bc), \"check_running\": $(check_running), \"rss_kib\": $(rss_kib), \"inbox_bytes_cached\": $(cached), \"inbox_bytes\": $(stat -c %s "$DATA/inbox.sqlite3"), \"load\": \"$(uptime | sed 's/.*load average: //')\"}" \
    | tee -a "$RESULTS" >>"$OUT/runs.log"
}
# Whether the running Herald's start-up check has not finished yet (its metric; not inbox_stats, whose
# count_mismatches reads every item).
check_running() {
  if curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" | grep -q '^herald_inbox_startup_check_finished 1'; then
    echo false
  else
    echo true
  fi
}
# Waits (up to CHECK_WAIT seconds) for the start-up check to finish and records what its log line says
# (seconds, users, counts repaired), labelled $1.
wait_check() {
  local line="" t0
  t0=$(date +%s)
  while [ $(($(date +%s) - t0)) -lt "${CHECK_WAIT:-3600}" ]; do
    line=$(grep 'start-up check done' "$WORK/herald.err" | tail -1 || true)
    [ -z "$line" ] || break
    sleep 1
  done
  num() { local v; v=$(echo "$line" | grep -o "$1=[0-9.]*" | cut -d= -f2); echo "${v:-null}"; }
  local finished=false secs=null users=null repaired=null
  # Unfinished: how far it got (its gauge of inboxes checked).
  users=$(curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" | awk '/^herald_inbox_startup_check_users / { print $2 }')
  users=${users:-null}
  if [ -n "$line" ]; then
    finished=true secs=$(num secs) users=$(num users) repaired=$(num repaired)
    [ "$repaired" != null ] || repaired=0   # the log names repairs only when there were some
  fi
  echo "{\"test\": \"check\", \"label\": \"$1\", \"round\": 1, \"finished\": $finished, \"check_secs\": $secs, \"waited_secs\": $(($(date +%s) - t0)), \"users\": $users, \"repaired\": $repaired, \"rss_kib\": $(rss_kib), \"load\": \"$(uptime | sed 's/.*load average: //')\"}" \
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
  start_filled "start on the filled inbox"
  wait_check "start-up check on the filled inbox"
  PER_ROUND=$((READS / 3))
  for round in $(seq 1 "$ROUNDS"); do
    bench "$name" "$round" read --users "$FILL_USERS" --items "$ITEMS_DONE" --requests "$READS" \
      --concurrency 32 --time-limit 120s --user-offset $(((round - 1) * PER_ROUND))
  done
  echo "{\"test\": \"rss\", \"label\": \"after the reads\", \"round\": 1, \"rss_kib\": $(rss_kib)}" | tee -a "$RESULTS" >>"$OUT/runs.log"
  # A restart with the inbox file dropped from the page cache first: one round while its check runs, then
  # (the check done, which read the file back in) the file dropped again and a cold round; users no
  # round has read.
  stop_server
  evict
  start_filled "restart, inbox file evicted before it"
  bench "$name, during the check" 1 read --users "$FILL_USERS" --items "$ITEMS_DONE" \
    --requests "$READS" --concurrency 32 --time-limit 120s --user-offset $((ROUNDS * PER_ROUND))
  wait_check "start-up check after the restart"
  evict
  bench "$name, cold" 1 read --users "$FILL_USERS" --items "$ITEMS_DONE" --requests "$READS" \
    --concurrency 32 --time-limit 120s --user-offset $(((ROUNDS + 1) * PER_ROUND))
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
