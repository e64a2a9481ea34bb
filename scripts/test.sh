#!/usr/bin/env bash
# Builds pgrt with warnings as errors and runs the whole test suite (ctest prints its summary line).
# Installs missing Debian packages first. Works from any current directory.
#
#   scripts/test.sh [ctest arguments...]     e.g. scripts/test.sh -R harness
# Environment: PGRT_PRESET (default dev; also release, asan, tsan).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
preset=${PGRT_PRESET:-dev}

"$root/scripts/install-deps.sh"
cd "$root"
cmake --preset "$preset"
cmake --build --preset "$preset"
ctest --preset "$preset" "$@"
