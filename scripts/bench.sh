#!/usr/bin/env bash
# Runs pgrt's benchmark suite side by side with its peers (pgbench, raw libpq, asyncpg's pool,
# psycopg's pool, psql COPY) on one throwaway PostgreSQL cluster, and writes docs/benchmarks.md,
# docs/benchmarks.json and the latency plot docs/benchmarks-latency.svg. Installs missing Debian
# packages first and builds the release preset. Works from any current directory.
#
#   scripts/bench.sh [--repetitions N] [--seconds S] [--only SECTION]
# Defaults: 5 repetitions of a 1 s window per contestant (about 5 minutes on 2 cores).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

"$root/scripts/install-deps.sh"
cd "$root"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { cmake --preset release && cmake --build --preset release --target pgrt_benchmarks pgrt_bench_server; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "bench.sh: building the benchmarks failed (output above)" >&2
  exit 1
fi
# Debian's python3, not a pyenv one earlier on PATH: only it sees python3-asyncpg and friends.
/usr/bin/python3 "$root/benches/bench.py" --build-dir "$root/build/release" --docs-dir "$root/docs" "$@"
