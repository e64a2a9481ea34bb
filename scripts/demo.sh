#!/usr/bin/env bash
# Builds (quietly; build errors are shown) and runs the pgrt demo service: 200 workers on a micro
# pool (max 3) writing through pending writes until Ctrl+C, SIGTERM or --duration. With
# DATABASE_URL unset it starts a throwaway PostgreSQL cluster and removes it when it exits. The
# demo is exec'd, so a signal sent to this script's pid reaches it (as under Kubernetes or
# systemd). Installs missing Debian packages first. Works from any current directory.
#
#   scripts/demo.sh [--duration SECONDS] [--workers N] [--json]
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
preset=${PGRT_PRESET:-dev}

"$root/scripts/install-deps.sh"
cd "$root"
echo "demo.sh: building the demo (preset $preset; a first build takes a few minutes)..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { cmake --preset "$preset" && cmake --build --preset "$preset" --target pgrt_demo; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "demo.sh: building the demo failed (output above)" >&2
  exit 1
fi
rm -f "$log"
trap - EXIT
echo "demo.sh: built; starting it" >&2
exec "$root/build/$preset/examples/pgrt_demo" "$@"
