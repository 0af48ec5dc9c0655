#!/usr/bin/env bash
# Runs the libFuzzer targets in fuzz/ with cargo fuzz, installing cargo-fuzz
# when it is missing. Each target starts from a temporary copy of its seed
# corpus (fuzz/corpus/<target>/), so a run leaves the repository as it was;
# a crash input is written to fuzz/artifacts/<target>/ (ignored by git).
#
#   bash scripts/fuzz.sh                     smoke: every target for 5 s
#   bash scripts/fuzz.sh smoke [TARGET...]
#   bash scripts/fuzz.sh full [RUNS] [TARGET...]
#                                            every target for RUNS executions
#                                            (default 10000000)
#
# Exits non-zero when any target crashes or fails to build.
#
# Environment:
#   FUZZ_SECONDS     seconds per target in smoke mode (default 5)
#   FUZZ_SANITIZER   cargo fuzz --sanitizer (default none: the code under test
#                    is safe Rust, and AddressSanitizer cuts executions per
#                    second by 2-8x)
#   FUZZ_ARGS        extra libFuzzer flags for every target, e.g. -max_len=1024
#
# The targets need compiler flags that only nightly Rust accepts; the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1, which this script sets.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

export RUSTC_BOOTSTRAP=1
FUZZ_DIR="$REPO_ROOT/fuzz"
TARGET_DIR="$REPO_ROOT/target/fuzz"
SANITIZER="${FUZZ_SANITIZER:-none}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-5}"
FULL_RUNS=10000000

WORK="$(mktemp -d "${TMPDIR:-/tmp}/switchboard-fuzz.XXXXXX")"
cleanup() {
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit "${1:-0}"
}

ensure_cxx() {
  # libfuzzer-sys compiles libFuzzer's C++ sources.
  if have c++ || have g++ || have clang++; then
    return
  fi
  section "Installing a C++ compiler for libFuzzer"
  apt_install g++
}

ensure_cargo_fuzz() {
  if cargo fuzz --version >/dev/null 2>&1; then
    info "$(cargo fuzz --version)"
    return
  fi
  section "cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
}

fuzz_cmd() {
  local sub="$1"
  shift
  cargo fuzz "$sub" --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR" -s "$SANITIZER" "$@"
}

# The last value libFuzzer printed for `stat::NAME`, or "?".
stat_of() {
  local value
  value="$(sed -n "s/^stat::$2: *\([0-9.]*\)\$/\1/p" "$1" | tail -n 1)"
  printf '%s' "${value:-?}"
}

# The last "cov: N" / "corp: N/SIZE" figure libFuzzer printed, or "?".
field_of() {
  local value
  value="$(grep -o "$2: [0-9]*[/0-9A-Za-z]*" "$1" | tail -n 1 | cut -d' ' -f2)"
  printf '%s' "${value:-?}"
}

SUMMARY=()
FAILED=()

run_target() {
  local target="$1" limit="$2"
  local corpus="$WORK/corpus/$target" log="$WORK/$target.log"
  mkdir -p "$corpus"
  if [ -d "$FUZZ_DIR/corpus/$target" ]; then
    cp -R "$FUZZ_DIR/corpus/$target/." "$corpus/"
  fi
  section "cargo fuzz run $target ($limit)"
  local started=$SECONDS status=0
  # shellcheck disable=SC2086 # FUZZ_ARGS holds several flags
  fuzz_cmd run "$target" "$corpus" -- "$limit" -print_final_stats=1 ${FUZZ_ARGS:-} \
    >"$log" 2>&1 || status=$?
  local elapsed=$((SECONDS - started))
  local runs rate cov corp
  runs="$(stat_of "$log" number_of_executed_units)"
  rate="$(stat_of "$log" average_exec_per_sec)"
  cov="$(field_of "$log" cov)"
  corp="$(field_of "$log" corp)"
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    FAILED+=("$target")
    SUMMARY+=("$(printf '%-16s FAILED (exit %s) after %s s; see fuzz/artifacts/%s/' \
      "$target" "$status" "$elapsed" "$target")")
    return
  fi
  info "$runs runs in $elapsed s, $rate exec/s, cov $cov, corpus $corp"
  SUMMARY+=("$(printf '%-16s %10s runs %6s s %8s exec/s  cov %5s  corpus %s' \
    "$target" "$runs" "$elapsed" "$rate" "$cov" "$corp")")
}

main() {
  local mode="${1:-smoke}" limit
  [ $# -gt 0 ] && shift
  case "$mode" in
    smoke)
      limit="-max_total_time=$SECONDS_PER_TARGET"
      ;;
    full)
      local runs="$FULL_RUNS"
      if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
        runs="$1"
        shift
      fi
      limit="-runs=$runs"
      ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 >&2 ;;
  esac

  section "Prerequisites"
  have cargo || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
  ensure_cxx
  ensure_cargo_fuzz

  local targets=("$@")
  if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
  fi
  [ ${#targets[@]} -gt 0 ] || die "no fuzz targets found in $FUZZ_DIR"

  section "cargo fuzz build (sanitizer: $SANITIZER)"
  local started=$SECONDS
  fuzz_cmd build
  info "built in $((SECONDS - started)) s"

  for target in "${targets[@]}"; do
    run_target "$target" "$limit"
  done

  section "Summary ($mode)"
  printf '%s\n' "${SUMMARY[@]}"
  if [ ${#FAILED[@]} -gt 0 ]; then
    die "fuzz targets crashed: ${FAILED[*]}"
  fi
}

main "$@"
