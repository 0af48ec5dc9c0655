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
# it is already in step with the lockfile. Besides the SignalR client it holds
# Azurite, which the Rust tests of the azure store start too.
ensure_node_modules() {
  local web="$REPO_ROOT/web"
  local stamp="$web/node_modules/.package-lock.json"
  if [ -f "$stamp" ] && [ -d "$web/node_modules/@microsoft/signalr/dist/browser" ] &&
    [ -x "$web/node_modules/.bin/azurite-table" ] &&
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

# The azurite-table executable of web/node_modules (npm package azurite).
azurite_table_bin() {
  printf '%s\n' "${SWITCHBOARD_AZURITE_TABLE:-$REPO_ROOT/web/node_modules/.bin/azurite-table}"
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_accepts() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_azurite VAR: starts a throwaway Azurite table service (in memory) on a
# free loopback port, waits until it accepts connections, appends its PID to
# STARTED_PIDS and its directory (cwd and log) to TEMP_DIRS, and sets and
# exports VAR as a full connection string of the development storage account
# pointed at it. Not to be run in a subshell.
start_azurite() {
  local var="$1" bin dir port pid attempt i
  bin="$(azurite_table_bin)"
  [ -x "$bin" ] || die "Azurite is not installed at $bin: run npm ci --prefix web"
  for attempt in 1 2 3; do
    port="$(free_port)"
    dir="$(mktemp -d /tmp/switchboard-azurite-XXXXXX)"
    TEMP_DIRS+=("$dir")
    (cd "$dir" && exec "$bin" --tableHost 127.0.0.1 --tablePort "$port" --inMemoryPersistence \
      --disableTelemetry >"$dir/azurite.log" 2>&1 </dev/null) &
    pid=$!
    STARTED_PIDS+=("$pid")
    for i in $(seq 1 300); do
      if port_accepts "$port"; then
        info "Azurite table service (PID $pid) on 127.0.0.1:$port"
        printf -v "$var" '%s' "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;TableEndpoint=http://127.0.0.1:$port/devstoreaccount1;"
        export "${var?}"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    stop_pid "$pid"
    info "Azurite on port $port did not accept connections (attempt $attempt):"
    tail -n 10 "$dir/azurite.log" >&2
  done
  die "could not start Azurite"
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

# PostgreSQL's server binaries directory (newest version under /usr/lib/postgresql).
pg_bin_dir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ]; then
      printf '%s\n' "$dir"
      return 0
    fi
  done
  return 1
}

# PostgreSQL's server binaries, from Debian's postgresql package when missing.
# Only the binaries are used: the tests initialise their own clusters in
# temporary directories on free loopback ports; a cluster the package may have
# started is left alone.
ensure_postgres() {
  local dir
  if dir="$(pg_bin_dir)"; then
    info "$("$dir/postgres" --version)"
    return
  fi
  section "Installing PostgreSQL"
  apt_install postgresql
  dir="$(pg_bin_dir)" || die "PostgreSQL's server binaries are still missing under /usr/lib/postgresql"
  id postgres >/dev/null 2>&1 || die "the postgresql package did not create the postgres user"
}

# Runs a command as the postgres user when root (PostgreSQL refuses to run as
# root), else as the current user.
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid postgres --regid postgres --init-groups -- "$@"
  else
    "$@"
  fi
}

# start_postgres VAR: initialises a cluster in a temporary directory, starts it
# on a free loopback port (trust authentication, fsync off: the data is thrown
# away), waits until it accepts connections, appends its PID to STARTED_PIDS
# and its directory to TEMP_DIRS, and sets and exports VAR as its postgres://
# URL. Not to be run in a subshell.
start_postgres() {
  local var="$1" bin dir port pid i
  bin="$(pg_bin_dir)" || die "PostgreSQL is not installed"
  dir="$(mktemp -d /tmp/switchboard-pg-XXXXXX)"
  TEMP_DIRS+=("$dir")
  chmod 755 "$dir"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  port="$(free_port)"
  as_postgres "$bin/postgres" -D "$dir/data" -p "$port" -c listen_addresses=127.0.0.1 \
    -c "unix_socket_directories=$dir" -c fsync=off -c max_connections=300 \
    >"$dir/server.log" 2>&1 </dev/null &
  pid=$!
  STARTED_PIDS+=("$pid")
  for i in $(seq 1 300); do
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres; then
      info "PostgreSQL (PID $pid) on 127.0.0.1:$port"
      printf -v "$var" 'postgres://postgres@127.0.0.1:%s/postgres' "$port"
      export "${var?}"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$dir/server.log" >&2
  die "PostgreSQL did not accept connections on port $port"
}
