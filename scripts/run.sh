#!/usr/bin/env bash
# Runs the server locally with the in-memory store and development sign-in.
#
#   bash scripts/run.sh
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

have cargo || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
ensure_node
ensure_node_modules

URL="http://127.0.0.1:5000"
echo "Open $URL in your browser"
if have xdg-open; then
  (sleep 3 && xdg-open "$URL" >/dev/null 2>&1 || true) &
fi
exec cargo run -p switchboard --bin switchboard -- serve --store memory --dev --listen 127.0.0.1:5000
