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
for preset in $presets; do
  echo "pgrt: === preset $preset ===" >&2
  cmake --preset "$preset"
  cmake --build --preset "$preset"
  ctest --preset "$preset" "$@" || status=$?
done
exit "$status"
