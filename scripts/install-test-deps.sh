#!/usr/bin/env bash
# Installs what the test suite needs and the machine may lack. Idempotent; fast when all is present.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" = 0 ]; then
    if [ -z "${HERALD_APT_UPDATED:-}" ]; then apt-get update -qq; export HERALD_APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  fi
}

command -v node >/dev/null || apt_install nodejs npm

# Chromium from Debian for the browser test (playwright-core drives it; it cannot download its own).
if [ ! -x /usr/bin/chromium ]; then
  echo "== installing chromium"
  apt_install chromium
fi

# nats-server from Debian for the NATS engine's tests (each test starts its own on a free port, with its own
# store; the machine's shared instance, if any, is never used).
if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  echo "== installing nats-server"
  apt_install nats-server
fi

# The examples' vite builds (examples/vue, examples/react: vite 8) need Node 20.19 or later.
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
  echo "Node $(node --version) is too old: the examples' builds (vite) need Node 20.19 or later" >&2
  exit 1
fi

# Every example with npm packages, and the Node tests: `npm ci` from the committed lock file, again only when
# the lock file changed.
for lock in examples/*/package-lock.json tests/node/package-lock.json; do
  dir=$(dirname "$lock")
  if [ ! -d "$dir/node_modules" ] || [ "$lock" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "== npm ci ($dir)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
done

# Python tests (tests/python): a virtualenv with the pinned packages of requirements.txt, installed again only
# when that file changes.
py_venv=tests/python/.venv
py_req=tests/python/requirements.txt
command -v python3 >/dev/null || apt_install python3 python3-venv
if [ ! -x "$py_venv/bin/python" ] || ! "$py_venv/bin/python" -c '' 2>/dev/null; then
  echo "== python venv (tests/python/.venv)"
  rm -rf "$py_venv"
  # Debian's python3 needs python3-venv (ensurepip) for this.
  if ! python3 -m venv "$py_venv" >/dev/null 2>&1; then
    rm -rf "$py_venv"
    apt_install python3-venv
    python3 -m venv "$py_venv"
  fi
fi
if ! cmp -s "$py_req" "$py_venv/.requirements.installed"; then
  echo "== pip install (tests/python)"
  "$py_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$py_req"
  cp "$py_req" "$py_venv/.requirements.installed"
fi

# redis-server for the Redis engine's cluster tests (tests/it/cluster_redis.rs): each test runs its own on a
# free port with a temporary directory, never a shared instance.
if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server"
  apt_install redis-server
fi

# The inbox and push tests on the cluster engines (tests/it/inbox*.rs, push_redis.rs, the stores' unit tests)
# use the machine's Redis at 127.0.0.1:6379 and NATS with JetStream at 127.0.0.1:4222, each test under keys,
# buckets and streams of its own (HERALD_TEST_REDIS / HERALD_TEST_NATS point elsewhere). A machine that runs
# neither gets one started here, in the background, keeping its data under target/test-services.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
services="$PWD/target/test-services"
if [ -z "${HERALD_TEST_REDIS:-}" ] && ! listening 6379; then
  echo "== starting redis-server on 127.0.0.1:6379"
  mkdir -p "$services/redis"
  redis-server --bind 127.0.0.1 --port 6379 --dir "$services/redis" --daemonize yes \
    --logfile "$services/redis.log" >/dev/null
fi
if [ -z "${HERALD_TEST_NATS:-}" ] && ! listening 4222; then
  echo "== starting nats-server (JetStream) on 127.0.0.1:4222"
  mkdir -p "$services/nats"
  nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  nohup "$nats_bin" -js -a 127.0.0.1 -p 4222 -sd "$services/nats" >"$services/nats.log" 2>&1 &
fi
for port in ${HERALD_TEST_REDIS:+} ${HERALD_TEST_REDIS:-6379} ${HERALD_TEST_NATS:-4222}; do
  case "$port" in *[!0-9]*) continue ;; esac # pointed elsewhere: that server is the caller's business
  for _ in $(seq 1 100); do listening "$port" && break; sleep 0.1; done
  listening "$port" || { echo "nothing listens on 127.0.0.1:$port (see $services)" >&2; exit 1; }
done
