#!/usr/bin/env bash
# Counts what one prepared `SELECT 1` costs per query (syscalls by name, wake-ups, heap
# allocations, coroutine frames, instructions and whose code runs them), through a pgrt lease and
# with raw libpq on one connection, against a throwaway PostgreSQL over its unix socket, and
# writes the tables of docs/performance.md (between its generated-section markers) and
# docs/performance.json. Counts, not timings: they hold on a noisy machine. Installs what is
# missing (pgrt's packages, linux-perf and valgrind), builds the release preset's
# pgrt_query_cost and pgrt_bench_server, then runs benches/query_cost.py. Works from any current
# directory.
#
#   scripts/query-cost.sh [--queries Q] [--callgrind-queries C] [--repetitions R] [--modes M,...]
#                         [--baseline REV]
# Defaults: 3 runs of 20,000 queries under perf trace, runs of 2,000 and 4,000 under callgrind.
#
# --baseline REV (a commit, tag, branch or HEAD~3) sets REV's counts beside this working tree's: it
# checks REV out in build/baseline-<sha>/src (the detached git worktree scripts/bench.sh --baseline
# uses, reused for the same sha), builds REV's pgrt_query_cost in build/baseline-<sha>/release with
# REV's own release preset, runs both drivers against one server, and writes
# build/baseline-<sha>/query-cost.md (and .json); docs/ is left alone. REV must have the driver
# (benches/query_cost.cpp).
#
# Without --baseline, docs/performance.md also gets "before and after": the lease mode of the
# query path as it was before issue 12 changed it (commit query_path_before below, built the same way in
# build/baseline-<sha>/, once) beside this working tree's.
#
# The build uses CMAKE_BUILD_PARALLEL_LEVEL jobs (default 1).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-1}

fail() {
  echo "query-cost.sh: $*" >&2
  exit 1
}

# The query path before issue 12's changes (the commit that added the per-query cost driver).
query_path_before=701d607

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

# Checks REV out in build/baseline-<sha>/src and builds its driver in build/baseline-<sha>/release;
# sets base (that directory) and short (REV's short sha).
build_baseline() {
  local rev=$1 sha
  sha=$(git -C "$root" rev-parse --verify --quiet "$rev^{commit}") ||
    fail "--baseline $rev is not a commit of this repository"
  short=$(git -C "$root" rev-parse --short=12 "$sha")
  git -C "$root" cat-file -e "$sha:benches/query_cost.cpp" 2>/dev/null ||
    fail "$rev ($short) predates the per-query cost driver (it has no benches/query_cost.cpp)"
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
      { cat "$log" >&2; fail "checking out $rev ($short) in $base/src failed"; }
  fi
  echo "query-cost.sh: building $rev ($short) in $base/release" >&2
  if ! { (cd "$base/src" && cmake --preset release -B "$base/release") &&
    cmake --build "$base/release" --parallel "$jobs" --target pgrt_query_cost; } >"$log" 2>&1; then
    cat "$log" >&2
    fail "building $rev's driver failed (output above)"
  fi
}

# pgrt's own packages and the counting tools (only this script needs them, so they are not in
# install-deps.sh's own list).
"$root/scripts/install-deps.sh" linux-perf valgrind
# perf trace reads the syscall tracepoints: root, or a kernel that lets others (perf_event_paranoid).
if [[ $(id -u) -ne 0 ]] && (($(cat /proc/sys/kernel/perf_event_paranoid) > -1)); then
  fail "perf trace needs root, or: sudo sysctl kernel.perf_event_paranoid=-1 (and read access to /sys/kernel/tracing)"
fi

cd "$root"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { cmake --preset release && cmake --build build/release --parallel "$jobs" --target pgrt_query_cost pgrt_bench_server; } >"$log" 2>&1; then
  cat "$log" >&2
  fail "building the driver failed (output above)"
fi

if [[ -z "$baseline" ]]; then
  build_baseline "$query_path_before"
  /usr/bin/python3 "$root/benches/query_cost.py" --build-dir "$root/build/release" --docs-dir "$root/docs" \
    --before-build-dir "$base/release" --before-name "$short" "${pass[@]}"
  exit 0
fi

build_baseline "$baseline"
current=$(git -C "$root" rev-parse --short=12 HEAD)
if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]]; then
  current+=" + uncommitted changes"
fi
/usr/bin/python3 "$root/benches/query_cost.py" --build-dir "$root/build/release" --docs-dir "$root/docs" \
  --baseline-build-dir "$base/release" --baseline-name "$baseline ($short)" \
  --current-name "working tree at $current" --baseline-report "$base/query-cost.md" "${pass[@]}"
