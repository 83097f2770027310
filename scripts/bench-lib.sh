# Shared by scripts/bench.sh and scripts/bench-cluster.sh (sourced, not run): starting and stopping the
# servers under test, and nchan's config derived from the shared one.

# The start shared by both scripts: parses --quick/--rounds/--only/--out (sets QUICK, ROUNDS, ONLY, OUT,
# RESULTS), raises the open-file limit (10 000 subscribers need 10 000 descriptors in the bench process and
# in each server), builds the release binaries unless HERALD_BIN and BENCH_BIN name prebuilt ones (copies,
# so that a rebuild during a long run cannot swap the binary under it; sets HERALD, BENCH), and makes sure
# nginx and nchan are there (unless NO_NCHAN=1). $1: the results directory's name prefix; $2: the last line of the calling
# script's usage comment (for --help); then the script's arguments.
bench_setup() {
  local prefix=$1 help_end=$2
  shift 2
  ROUNDS=3 QUICK=0 ONLY="" OUT=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --quick) QUICK=1; ROUNDS=1 ;;
      --rounds) ROUNDS=$2; shift ;;
      --only) ONLY=$2; shift ;;
      --out) OUT=$2; shift ;;
      -h|--help) sed -n "2,${help_end}p" "$0"; exit 0 ;;
      *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
  done
  OUT=${OUT:-target/bench/$prefix$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  RESULTS=$OUT/results.jsonl
  : > "$RESULTS"

  ulimit -n "$(ulimit -Hn)"
  echo "== open-file limit: $(ulimit -n)"

  if [ -z "${HERALD_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
    echo "== cargo build --release --workspace"
    cargo build --release --workspace --quiet
  fi
  HERALD=${HERALD_BIN:-$PWD/target/release/herald}
  BENCH=${BENCH_BIN:-$PWD/target/release/herald-bench}
  # NO_NCHAN=1: a script with no nchan peer (the inbox's) needs neither nginx nor the module.
  [ "${NO_NCHAN:-0}" = 1 ] || ensure_nchan
}

# Writes the markdown table of medians of $RESULTS to $OUT/results.md and the terminal; $1: a line that
# describes the setup (may be empty).
bench_report() {
  {
    echo "Rounds: $ROUNDS$([ "$QUICK" = 1 ] && echo ' (quick mode: sizes scaled down)'). Medians over rounds."
    [ -n "${1:-}" ] && echo "$1"
    echo
    "$BENCH" table "$RESULTS"
  } | tee "$OUT/results.md"
  echo "== results: $OUT/results.md (raw: $RESULTS, logs: $OUT/runs.log)"
}

# Waits until $1 answers over HTTP: up to $2 seconds (default 10; a server that recounts a large inbox
# at start-up needs longer).
wait_port() {
  for _ in $(seq 1 $((${2:-10} * 10))); do
    curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  echo "server did not come up: $1" >&2
  return 1
}

# Fails when something already listens on 127.0.0.1:$1: a stray server there would answer in place of the
# one about to start (which then fails to bind), and the run would measure the wrong process.
ensure_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "port $1 is already in use: stop whatever listens there first" >&2
    return 1
  fi
}

# Stops a process: TERM, up to 10 s to exit, then KILL.
stop_pid() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}

# Installs nginx with the nchan module when either is missing.
ensure_nchan() {
  if ! command -v nginx >/dev/null || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    echo "== installing nginx-light and libnginx-mod-nchan"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y nginx-light libnginx-mod-nchan >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y nginx-light libnginx-mod-nchan >/dev/null; }
  fi
}

# Writes a copy of the shared nchan config to $2/nchan.conf: its paths under $2, room for 10 000
# subscribers, listening on port $3 (the shared file's 8089 otherwise), and, with a Redis URL as $4, every
# channel kept in that Redis (nchan's cluster mode), so that several nginx instances act as one server. The
# shared file itself is not changed.
nchan_conf() {
  local src=$1 dir=$2 port=${3:-8089} redis=${4:-}
  mkdir -p "$dir/logs" "$dir/tmp"
  local redis_sed=()
  if [ -n "$redis" ]; then
    redis_sed=(-e "s#^http {#http {\n  upstream bench_redis { nchan_redis_server $redis; }#"
               -e 's#nchan_publisher;#nchan_publisher;\n      nchan_redis_pass bench_redis;#'
               -e 's#nchan_subscriber;#nchan_subscriber;\n      nchan_redis_pass bench_redis;#')
  fi
  sed -e "s#/tmp/nchan/#$dir/#g" \
      -e 's/worker_connections [0-9]*;/worker_connections 19000;/' \
      -e 's/^worker_processes 1;/worker_processes 1;\nworker_rlimit_nofile 20000;/' \
      -e "s/listen 127.0.0.1:8089;/listen 127.0.0.1:$port;/" \
      "${redis_sed[@]}" "$src" >"$dir/nchan.conf"
}
