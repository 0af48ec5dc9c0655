#!/usr/bin/env bash
# The project's test command: installs what is missing, runs the Rust checks
# and tests, builds the server, and runs the end-to-end tests (official
# SignalR Node client and headless Chromium) against it. Redis and
# PostgreSQL come from Debian's redis-server and postgresql packages when
# missing; only their binaries are used: every Redis and PostgreSQL the tests
# need is started here (or by the test itself) on a free loopback port, with
# its data in a temporary directory (PostgreSQL as the postgres user when
# root), and stopped again. Azurite (the Azure Storage emulator, for the azure
# store) comes from web/node_modules, installed before the Rust tests run,
# which start it too.
#
#   bash scripts/test.sh
#
# Environment:
#   SWITCHBOARD_BIN   server binary for the end-to-end tests, with the groups,
#                     sql and azure stores and both backplanes (default features)
#                     (default: target/debug/switchboard, built here)
#   CHROMIUM_PATH     Chromium for the browser tests (default: /usr/bin/chromium)
#   SKIP_RUST=1       skip fmt, clippy and cargo test (still builds the binary)
#   SKIP_FUZZ=1       skip the fuzz smoke run (a few seconds per target)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# Processes started by this script, stopped on exit whatever happens.
STARTED_PIDS=()
TEMP_FILES=()
TEMP_DIRS=()
cleanup() {
  local status=$?
  rm -f "${TEMP_FILES[@]}"
  for pid in "${STARTED_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if ((${#TEMP_DIRS[@]})); then rm -rf "${TEMP_DIRS[@]}"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
export CHROMIUM_PATH

ensure_chromium() {
  if [ -x "$CHROMIUM_PATH" ]; then
    info "chromium at $CHROMIUM_PATH"
    return
  fi
  section "Installing Chromium"
  apt_install chromium
  [ -x "$CHROMIUM_PATH" ] || die "Chromium is still missing at $CHROMIUM_PATH"
}

run_rust_checks() {
  if [ "${SKIP_RUST:-0}" = 1 ]; then
    section "Rust checks skipped (SKIP_RUST=1)"
    return
  fi
  section "cargo fmt --all --check"
  cargo fmt --all --check
  section "cargo clippy --workspace --all-targets --all-features -- -D warnings"
  cargo clippy --workspace --all-targets --all-features -- -D warnings
  section "cargo test --workspace --all-features"
  cargo test --workspace --all-features
}

build_server() {
  if [ -n "${SWITCHBOARD_BIN:-}" ]; then
    section "Using server binary $SWITCHBOARD_BIN"
    [ -x "$SWITCHBOARD_BIN" ] || die "SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable"
    return
  fi
  # The default features include the groups, sql and azure stores and both backplanes.
  section "cargo build -p switchboard --bin switchboard"
  cargo build -p switchboard --bin switchboard
  SWITCHBOARD_BIN="$REPO_ROOT/target/debug/switchboard"
}

# Runs the README's first command (scripts/run.sh) the way a newcomer does, checks that it
# serves the chat page and the SignalR browser client, and stops it.
check_run_command() {
  section "The README's run command: bash scripts/run.sh"
  local url="http://127.0.0.1:5000" log pid ok=0 page
  if curl -fsS -o /dev/null --max-time 2 "$url/" 2>/dev/null; then
    die "something already listens on $url: stop it, so the run command can be checked"
  fi
  log="$(mktemp)"
  TEMP_FILES+=("$log")
  # Its own session and process group, so stopping it stops cargo and the server alike.
  setsid bash "$REPO_ROOT/scripts/run.sh" >"$log" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 1 180); do
    if curl -fsS -o /dev/null --max-time 2 "$url/" 2>/dev/null; then
      ok=1
      break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if [ "$ok" = 1 ]; then
    page="$(curl -fsS --max-time 5 "$url/")"
    case "$page" in
      *'/vendor/signalr.min.js'*) ;;
      *) ok=0; info "the page at $url/ does not load the SignalR browser client" ;;
    esac
    if ! curl -fsS --max-time 5 "$url/vendor/signalr.min.js" | grep -q 'signalR'; then
      ok=0
      info "$url/vendor/signalr.min.js is not the SignalR browser client"
    fi
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$ok" != 1 ]; then
    tail -n 20 "$log" >&2
    die "bash scripts/run.sh did not serve the chat page and the browser client at $url"
  fi
  info "bash scripts/run.sh served $url/ and /vendor/signalr.min.js"
}

# Store and backplane pairs the end-to-end suite runs against: the whole suite
# on the first (multinode.test.mjs among it, which starts its own Redis and
# three nodes per deployment whatever the target), the official-client
# interop tests on the others. A target whose backplane is redis gets a
# redis-server of its own; a sql target gets a PostgreSQL of its own, an azure
# target an Azurite table service (in memory) of its own.
E2E_TARGETS=("memory:none" "groups:redis" "sql:postgres" "azure:redis")

run_js_tests() {
  local target status=0 first=1
  for target in "${E2E_TARGETS[@]}"; do
    if ((first)); then
      run_js_suite "$target" "$REPO_ROOT"/web/tests/*.test.mjs || status=$?
      first=0
    else
      run_js_suite "$target" "$REPO_ROOT"/web/tests/interop.test.mjs || status=$?
    fi
  done
  return "$status"
}

# run_js_suite STORE:BACKPLANE FILE...
run_js_suite() {
  local store="${1%%:*}" backplane="${1#*:}"
  shift
  section "End-to-end tests (store $store, backplane $backplane): node --test web/tests/"
  local started=$SECONDS report status=0 args="" redis_pid="" pg_pid="" azurite_pid=""
  report="$(mktemp)"
  TEMP_FILES+=("$report")
  if [ "$backplane" = redis ]; then
    start_redis E2E_REDIS_URL
    redis_pid="${STARTED_PIDS[-1]}"
    args="--redis-url $E2E_REDIS_URL"
  fi
  if [ "$store" = sql ]; then
    start_postgres E2E_DATABASE_URL
    pg_pid="${STARTED_PIDS[-1]}"
    args="$args --database-url $E2E_DATABASE_URL"
  fi
  if [ "$store" = azure ]; then
    start_azurite E2E_AZURE_CONNECTION_STRING
    azurite_pid="${STARTED_PIDS[-1]}"
    args="$args --azure-connection-string $E2E_AZURE_CONNECTION_STRING"
  fi
  # One file at a time: each starts its own servers and browsers, and the
  # timings of the checks are steadier without them competing for the CPU.
  SWITCHBOARD_BIN="$SWITCHBOARD_BIN" SWITCHBOARD_E2E_STORE="$store" \
    SWITCHBOARD_E2E_BACKPLANE="$backplane" SWITCHBOARD_E2E_ARGS="$args" node --test --test-concurrency=1 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$report" \
    "$@" || status=$?
  if [ -n "$redis_pid" ]; then stop_pid "$redis_pid"; fi
  if [ -n "$pg_pid" ]; then stop_pid "$pg_pid"; fi
  if [ -n "$azurite_pid" ]; then stop_pid "$azurite_pid"; fi
  local passed failed cancelled
  passed="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$report" | tail -n 1)"
  failed="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$report" | tail -n 1)"
  # Tests of a suite whose before hook failed count as cancelled, not failed.
  cancelled="$(sed -n 's/^# cancelled \([0-9]*\)$/\1/p' "$report" | tail -n 1)"
  info "end-to-end tests took $((SECONDS - started)) s"
  echo "e2e: ${passed:-0} passed, ${failed:-0} failed, ${cancelled:-0} cancelled"
  return "$status"
}

run_fuzz_smoke() {
  if [ "${SKIP_FUZZ:-0}" = 1 ]; then
    section "Fuzz smoke run skipped (SKIP_FUZZ=1)"
    return
  fi
  section "Fuzz smoke run: bash scripts/fuzz.sh smoke"
  bash "$REPO_ROOT/scripts/fuzz.sh" smoke
}

main() {
  section "Prerequisites"
  have cargo || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
  ensure_node
  ensure_chromium
  # Before the Rust tests: they start Azurite from web/node_modules/.bin.
  ensure_node_modules
  ensure_redis
  ensure_postgres
  run_rust_checks
  build_server
  check_run_command
  run_js_tests
  run_fuzz_smoke
}

main "$@"
