#!/usr/bin/env bash
# Runs pgrt's benchmark suite side by side with its peers (pgbench, raw libpq, asyncpg's pool,
# psycopg's pool, psql COPY) on one throwaway PostgreSQL cluster, and writes docs/benchmarks.md,
# docs/benchmarks.json and the latency plot docs/benchmarks-latency.svg. Installs missing Debian
# packages first and builds the release preset. Works from any current directory.
#
#   scripts/bench.sh [--repetitions N] [--seconds S] [--only SECTION] [--baseline REV]
# Defaults: 5 repetitions of a 1 s window per contestant (about 5 minutes on 2 cores).
#
# --baseline REV (a commit, tag, branch or HEAD~3) compares instead: it checks REV out in
# build/baseline-<sha>/src (a detached git worktree, reused for the same sha) with its own release
# build in build/baseline-<sha>/release, runs the pool microbenchmarks (uncontended acquire +
# release, contended handoff) of both builds interleaved, and writes
# build/baseline-<sha>/comparison.md (and .json) with each benchmark's medians and the ratio
# current / baseline; docs/ is left alone. "current" is this checkout's working tree.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

fail() {
  echo "bench.sh: $*" >&2
  exit 1
}

baseline=""
pass=()
while (($# > 0)); do
  case "$1" in
    --baseline)
      (($# >= 2)) || fail "--baseline needs a git revision (e.g. main, HEAD~3 or a commit hash)"
      baseline=$2
      shift 2
      ;;
    --baseline=*)
      baseline=${1#--baseline=}
      shift
      ;;
    *)
      pass+=("$1")
      shift
      ;;
  esac
done

if [[ -n "$baseline" ]]; then
  sha=$(git -C "$root" rev-parse --verify --quiet "$baseline^{commit}") ||
    fail "--baseline $baseline is not a commit of this repository"
  short=$(git -C "$root" rev-parse --short=12 "$sha")
  git -C "$root" cat-file -e "$sha:benches/pgrt_benchmarks.cpp" 2>/dev/null ||
    fail "$baseline ($short) predates the benchmark suite (it has no benches/pgrt_benchmarks.cpp)"
fi

"$root/scripts/install-deps.sh"
cd "$root"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { cmake --preset release && cmake --build --preset release --target pgrt_benchmarks pgrt_bench_server; } >"$log" 2>&1; then
  cat "$log" >&2
  fail "building the benchmarks failed (output above)"
fi

if [[ -z "$baseline" ]]; then
  # Debian's python3, not a pyenv one earlier on PATH: only it sees python3-asyncpg and friends.
  /usr/bin/python3 "$root/benches/bench.py" --build-dir "$root/build/release" --docs-dir "$root/docs" "${pass[@]}"
  exit 0
fi

base="$root/build/baseline-$short"
if [[ -e "$base/src" ]]; then
  [[ "$(git -C "$base/src" rev-parse HEAD 2>/dev/null)" == "$sha" ]] ||
    fail "$base/src is not a checkout of $sha: remove it (git worktree remove --force $base/src)"
  [[ -z "$(git -C "$base/src" status --porcelain --untracked-files=no)" ]] ||
    fail "$base/src has local changes, so it is not $sha: remove it (git worktree remove --force $base/src)"
else
  mkdir -p "$base"
  # --force: the path may still be registered from a build/ that was deleted.
  git -C "$root" worktree add --force --detach "$base/src" "$sha" >"$log" 2>&1 ||
    { cat "$log" >&2; fail "checking out $baseline ($short) in $base/src failed"; }
fi
echo "bench.sh: building the baseline $baseline ($short) in $base/release" >&2
# REV's own release preset, so the baseline is built as it would have been built then.
if ! { (cd "$base/src" && cmake --preset release -B "$base/release") &&
  cmake --build "$base/release" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target pgrt_benchmarks; } >"$log" 2>&1; then
  cat "$log" >&2
  fail "building the baseline's benchmarks failed (output above)"
fi

current=$(git -C "$root" rev-parse --short=12 HEAD)
if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]]; then
  current+=" + uncommitted changes"
fi
/usr/bin/python3 "$root/benches/bench.py" --build-dir "$root/build/release" --docs-dir "$root/docs" \
  --baseline-build-dir "$base/release" --baseline-name "$baseline ($short)" \
  --current-name "working tree at $current" --baseline-report "$base/comparison.md" "${pass[@]}"
