# Shared helpers for the scripts in this folder. Source it; do not run it.
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

# Prints a section header.
section() {
  printf '\n==> %s\n' "$*"
}

info() {
  printf '    %s\n' "$*"
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

have() {
  command -v "$1" >/dev/null 2>&1
}

# Runs a command as root: directly when already root, else through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif have sudo; then
    sudo "$@"
  else
    die "need root to run: $*"
  fi
}

APT_UPDATED=0
# apt-get install of the given Debian packages, running apt-get update once first.
apt_install() {
  have apt-get || die "apt-get not found: install $* by hand"
  if [ "$APT_UPDATED" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# Node.js and npm, from Debian when node is missing.
ensure_node() {
  if have node && have npm; then
    info "node $(node --version), npm $(npm --version 2>/dev/null)"
    return
  fi
  section "Installing Node.js and npm"
  apt_install nodejs npm
}

# web/node_modules installed from web/package-lock.json (npm ci), skipped when
# it is already in step with the lockfile.
ensure_node_modules() {
  local web="$REPO_ROOT/web"
  local stamp="$web/node_modules/.package-lock.json"
  if [ -f "$stamp" ] && [ -d "$web/node_modules/@microsoft/signalr/dist/browser" ] &&
    [ ! "$web/package-lock.json" -nt "$stamp" ] && [ ! "$web/package.json" -nt "$stamp" ]; then
    info "web/node_modules is up to date"
    return
  fi
  section "npm ci --prefix web"
  npm ci --prefix "$web" --no-audit --no-fund
}

# redis-server and redis-cli, from Debian's redis-server package when missing.
# Only the binaries are used: the tests start their own instances on free
# loopback ports, and a service the package may have started is left alone.
ensure_redis() {
  if have redis-server && have redis-cli; then
    info "$(redis-server --version | head -n 1)"
    return
  fi
  section "Installing redis-server"
  apt_install redis-server
  have redis-server && have redis-cli || die "redis-server or redis-cli is still missing"
}

# Prints a TCP port that was free on 127.0.0.1 a moment ago (the kernel's
# choice for a listener on port 0).
free_port() {
  node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

# start_redis VAR: starts a throwaway redis-server (no persistence) on a free
# loopback port, waits until it answers PING, appends its PID to STARTED_PIDS
# and its log to TEMP_FILES (arrays the caller defines and cleans up on exit)
# and sets and exports VAR as its redis:// URL. Not to be run in a subshell.
start_redis() {
  local var="$1" port pid log attempt i
  for attempt in 1 2 3; do
    port="$(free_port)"
    log="$(mktemp)"
    TEMP_FILES+=("$log")
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
      >"$log" 2>&1 </dev/null &
    pid=$!
    STARTED_PIDS+=("$pid")
    for i in $(seq 1 100); do
      if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
        info "redis-server (PID $pid) on 127.0.0.1:$port"
        printf -v "$var" 'redis://127.0.0.1:%s' "$port"
        export "${var?}"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    stop_pid "$pid"
    info "redis-server on port $port did not answer PING (attempt $attempt):"
    tail -n 5 "$log" >&2
  done
  die "could not start redis-server"
}

# stop_pid PID: SIGTERM, then SIGKILL when it is still running after 5 s; waits for it.
stop_pid() {
  local pid="$1" i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
