#!/usr/bin/env bash
# Builds and runs the pgrt demo. With DATABASE_URL unset the demo starts a throwaway PostgreSQL
# cluster and removes it when it exits (also on Ctrl+C). Arguments are passed to the demo program.
# Installs missing Debian packages first. Works from any current directory.
#
#   scripts/demo.sh [--serve-seconds N]
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
preset=${PGRT_PRESET:-dev}

"$root/scripts/install-deps.sh"
cd "$root"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" --target pgrt_demo >/dev/null
exec "$root/build/$preset/examples/pgrt_demo" "$@"
