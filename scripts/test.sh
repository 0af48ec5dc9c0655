#!/usr/bin/env bash
# The project's test command: installs what is missing, runs the Rust checks
# and tests, builds the server, and runs the end-to-end tests (official
# SignalR Node client and headless Chromium) against it.
#
#   bash scripts/test.sh
#
# Environment:
#   SWITCHBOARD_BIN   server binary for the end-to-end tests
#                     (default: target/debug/switchboard, built here)
#   CHROMIUM_PATH     Chromium for the browser tests (default: /usr/bin/chromium)
#   SKIP_RUST=1       skip fmt, clippy and cargo test (still builds the binary)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# Processes started by this script, stopped on exit whatever happens.
STARTED_PIDS=()
TEMP_FILES=()
cleanup() {
  local status=$?
  rm -f "${TEMP_FILES[@]}"
  for pid in "${STARTED_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
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
  section "cargo build -p switchboard --bin switchboard"
  cargo build -p switchboard --bin switchboard
  SWITCHBOARD_BIN="$REPO_ROOT/target/debug/switchboard"
}

run_js_tests() {
  section "End-to-end tests: node --test web/tests/"
  local started=$SECONDS report status=0
  report="$(mktemp)"
  TEMP_FILES+=("$report")
  # One file at a time: each starts its own servers and browsers, and the
  # timings of the checks are steadier without them competing for the CPU.
  SWITCHBOARD_BIN="$SWITCHBOARD_BIN" node --test --test-concurrency=1 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$report" \
    "$REPO_ROOT"/web/tests/*.test.mjs || status=$?
  local passed failed
  passed="$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$report" | tail -n 1)"
  failed="$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$report" | tail -n 1)"
  info "end-to-end tests took $((SECONDS - started)) s"
  echo "e2e: ${passed:-0} passed, ${failed:-0} failed"
  return "$status"
}

main() {
  section "Prerequisites"
  have cargo || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
  ensure_node
  ensure_chromium
  ensure_node_modules
  run_rust_checks
  build_server
  run_js_tests
}

main "$@"
