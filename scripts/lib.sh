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
