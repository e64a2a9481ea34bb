#!/usr/bin/env bash
# Installs the Debian packages pgrt needs to build, test, benchmark and run its demo, and any
# further packages named as arguments (scripts/query-cost.sh adds linux-perf and valgrind).
# Idempotent: when every package is already installed it changes nothing and exits 0.
# Runs apt-get directly as root, through sudo otherwise.
#
#   scripts/install-deps.sh [EXTRA_PACKAGE...]
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libboost1.81-dev   # Asio, Signals2 (header-only)
  libpq-dev          # libpq client library
  libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev
  libbenchmark-dev
  postgresql-15      # server binaries for the throwaway test cluster, demo and benchmarks
  openssl            # the CA and server certificate of the TLS test cluster
  pgbouncer          # the transaction-mode pooler the tests put in front of the cluster
  util-linux         # setpriv, used to start PostgreSQL as an unprivileged user when run as root
  iptables           # a packet-level blackhole for the vanished-host budget test (root only)
  curl               # the demo's metrics endpoint read as a scraper would (tests, README)
  python3-prometheus-client  # a real Prometheus text parser for the metrics tests
  # The peers of scripts/bench.sh (its ctest smoke run too), for Debian's /usr/bin/python3:
  python3-asyncpg python3-uvloop   # asyncpg's pool
  python3-psycopg-pool             # psycopg 3's pool (Debian's psycopg is the pure-Python build)
  gnuplot-nox                      # the latency plot of docs/benchmarks.md
  "$@"
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "pgrt: installing missing Debian packages: ${missing[*]}" >&2
if [[ $(id -u) -eq 0 ]]; then
  run_as_root=()
elif command -v sudo >/dev/null 2>&1; then
  run_as_root=(sudo)
else
  echo "pgrt: cannot install ${missing[*]}: not root and sudo is not available." >&2
  echo "      Install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${run_as_root[@]}" apt-get update -qq
"${run_as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
