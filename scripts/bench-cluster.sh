#!/usr/bin/env bash
# Three Herald nodes as one cluster, on Redis and on NATS JetStream, beside three nchan instances sharing one
# Redis (nchan's own cluster mode): the same workloads, alternating servers, several rounds, then a markdown
# table of medians and Herald/nchan ratios (docs/BENCHMARKS.md explains the numbers).
#
# Usage: scripts/bench-cluster.sh [--quick] [--rounds N] [--only SUBSTRING] [--out DIR]
#   --quick        small sizes, 1 round
#   --rounds N     rounds of every workload on each server (default 3)
#   --only S       only workloads whose name contains S
#   --out DIR      where results.jsonl and results.md go (default target/bench/cluster-<date>)
#
# The bench tool spreads subscribers and publishes over the three nodes (every channel has subscribers on
# every node), so most deliveries cross the engine. Redis and NATS run here as dedicated throwaway servers
# (ports 16379 and 14222, nothing on disk for Redis, a temporary store for JetStream), emptied before every
# run, so the machine's own Redis and NATS are not touched. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

bench_setup cluster- 15 "$@"

REDIS_PORT=16379
NATS_PORT=14222
HERALD_PORTS=(18081 18082 18083)
NCHAN_PORTS=(8091 8092 8093)
NCHAN_CONF_SRC=$ROOT/../shared/bench/nchan.nginx.conf

if ! command -v redis-server >/dev/null || ! command -v nats-server >/dev/null; then
  echo "== installing redis-server and nats-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y redis-server nats-server >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y redis-server nats-server >/dev/null; }
fi
[ -f "$NCHAN_CONF_SRC" ] || { echo "missing $NCHAN_CONF_SRC" >&2; exit 1; }

WORK=$(mktemp -d /tmp/herald-bench-cluster.XXXXXX)
PIDS=()
REDIS_PID=""
NATS_PID=""
stop_servers() { for p in "${PIDS[@]}"; do stop_pid "$p"; done; PIDS=(); }
cleanup() { stop_servers; stop_pid "$REDIS_PID"; stop_pid "$NATS_PID"; rm -rf "$WORK"; }
trap cleanup EXIT

for port in "$REDIS_PORT" "$NATS_PORT" "${HERALD_PORTS[@]}" "${NCHAN_PORTS[@]}"; do ensure_free "$port"; done
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# A fresh JetStream store for every run: a stopped server's directory is removed and a new one started.
start_nats() {
  stop_pid "$NATS_PID"
  rm -rf "$WORK/nats"
  ensure_free "$NATS_PORT"
  nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
  NATS_PID=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "nats-server did not come up" >&2
  return 1
}

start_herald_cluster() { # engine kind (redis | nats)
  local kind=$1 url
  if [ "$kind" = redis ]; then
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    url=redis://127.0.0.1:$REDIS_PORT
  else
    start_nats
    url=nats://127.0.0.1:$NATS_PORT
  fi
  local n=0
  for port in "${HERALD_PORTS[@]}"; do
    n=$((n + 1))
    rm -rf "$WORK/herald$n"
    ensure_free "$port"
    mkdir -p "$WORK/herald$n"
    "$HERALD" serve --listen "127.0.0.1:$port" --allow-anonymous --data-dir "$WORK/herald$n" \
      --set limits.max_connections=20000 --set engine.kind="$kind" --set engine.url="$url" \
      --set engine.prefix=bench >"$WORK/herald$n.out" 2>"$WORK/herald$n.err" &
    PIDS+=($!)
  done
  for port in "${HERALD_PORTS[@]}"; do wait_port "http://127.0.0.1:$port/healthz"; done
}

start_nchan_cluster() {
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  local n=0
  for port in "${NCHAN_PORTS[@]}"; do
    n=$((n + 1))
    local dir=$WORK/nchan$n
    rm -rf "$dir"
    ensure_free "$port"
    nchan_conf "$NCHAN_CONF_SRC" "$dir" "$port" "redis://127.0.0.1:$REDIS_PORT"
    nginx -c "$dir/nchan.conf" -p "$dir/" >"$dir/out.log" 2>&1 &
    PIDS+=($!)
  done
  for port in "${NCHAN_PORTS[@]}"; do wait_port "http://127.0.0.1:$port/nchan_status"; done
}

# name | transport | subscribers | channels | messages | rate | concurrency | extra herald-bench arguments
if [ "$QUICK" = 1 ]; then
  WORKLOADS=(
    "3k SSE, 1 channel|sse|300|1|200|0|16"
    "3k WS, 1 channel|ws|300|1|200|0|16"
    "1k SSE at 500 msg/s|sse|100|1|500|500|16"
    "durable publish, no subscribers|sse|0|1|500|0|32"
    "3k idle WS (memory, all nodes)|ws|300|1|0|0|1"
  )
else
  WORKLOADS=(
    "3k SSE, 1 channel|sse|3000|1|1000|0|16"
    "3k WS, 1 channel|ws|3000|1|1000|0|16"
    "1k SSE at 500 msg/s|sse|1000|1|3000|500|16"
    "durable publish, no subscribers|sse|0|1|5000|0|32"
    "3k idle WS (memory, all nodes)|ws|3000|1|0|0|1"
  )
fi

run_one() { # server(herald-redis | herald-nats | nchan) label name transport n channels m rate concurrency round extra
  local server=$1 label=$2 transport=$3 n=$4 ch=$5 m=$6 rate=$7 conc=$8 round=$9 extra=${10:-}
  local kind addrs
  case "$server" in
    herald-*) start_herald_cluster "${server#herald-}"; kind=herald
              addrs=$(printf '127.0.0.1:%s,' "${HERALD_PORTS[@]}") ;;
    nchan)    start_nchan_cluster; kind=nchan
              addrs=$(printf '127.0.0.1:%s,' "${NCHAN_PORTS[@]}") ;;
  esac
  echo "-- round $round: $label on $server"
  "$BENCH" run --server "$kind" --addr "${addrs%,}" --transport "$transport" -n "$n" --channels "$ch" \
    -m "$m" --rate "$rate" --concurrency "$conc" --label "$label" --round "$round" \
    --publish-timeout 90s --drain 15s --settle 2s --json-out "$RESULTS" $extra \
    2>&1 | tee -a "$OUT/runs.log" || echo "!! run failed: $label on $server" | tee -a "$OUT/runs.log"
  stop_servers
}

for round in $(seq 1 "$ROUNDS"); do
  for wl in "${WORKLOADS[@]}"; do
    IFS='|' read -r name transport n ch m rate conc extra <<<"$wl"
    if [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
    # nchan on Redis is the peer of both engines: it runs once per engine so each row pairs with it.
    for engine in redis nats; do
      case "$engine" in redis) label="Redis, 3 nodes: $name" ;; nats) label="NATS, 3 nodes: $name" ;; esac
      if [ $((round % 2)) = 1 ]; then order="herald-$engine nchan"; else order="nchan herald-$engine"; fi
      for server in $order; do
        run_one "$server" "$label" "$transport" "$n" "$ch" "$m" "$rate" "$conc" "$round" "$extra"
      done
    done
  done
done

bench_report "Herald: 3 nodes on one engine; nchan: 3 nginx instances on one Redis (nchan_redis_pass)."
