#!/usr/bin/env bash
# Builds pgrt with warnings as errors and runs the test suite (ctest prints its summary line).
# Installs missing Debian packages first. Works from any current directory.
#
#   scripts/test.sh [ctest arguments...]     e.g. scripts/test.sh -R harness
#
# Without PGRT_PRESET (what CI runs): the whole suite under AddressSanitizer + UndefinedBehavior-
# Sanitizer (with LeakSanitizer), then the concurrency-heavy tests (label tsan: the unit tests,
# the pool, pending writes, and whole processes under the lifecycle manager) under
# ThreadSanitizer. docs/development.md says why this split.
# PGRT_PRESET=dev (or release, asan, tsan) runs that one preset only; several may be given,
# space-separated, e.g. PGRT_PRESET="dev tsan".
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
presets=${PGRT_PRESET:-asan tsan}

"$root/scripts/install-deps.sh"
cd "$root"
status=0
failed_presets=()
for preset in $presets; do
  echo "pgrt: === preset $preset ===" >&2
  cmake --preset "$preset"
  cmake --build --preset "$preset"
  if ! ctest --preset "$preset" "$@"; then
    status=1
    failed_presets+=("$preset")
  fi
done
# A digest of what failed, last, so that it is in the tail of a long log: each failed test case
# and its first lines of failure (gtest assertions, sanitizer reports, ctest timeouts).
for preset in "${failed_presets[@]}"; do
  log="$root/build/$preset/Testing/Temporary/LastTest.log"
  [[ -f $log ]] || continue
  echo "pgrt: --- what failed under preset $preset (from $log) ---" >&2
  grep -E -A3 '^[^ ]*:[0-9]+: Failure$|^\[  FAILED  \] [A-Za-z]|WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer|runtime error:|Timeout|\*\*\*Exception' \
    "$log" | head -n 60 >&2 || true
done
exit "$status"
