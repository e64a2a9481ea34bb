#!/usr/bin/env bash
# Interrupts the demo with SIGINT at several points (during start-up, while serving) and checks that
# it exits with 130 and leaves no PostgreSQL process and no temporary directory behind.
#   demo_interrupt_test.sh <path to pgrt_demo>
set -euo pipefail
demo=$1
work=$(mktemp -d /tmp/pgrt-demo-test-XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
export PGRT_TEMP_DIR=$work
unset DATABASE_URL
export PGRT_INSTANCE=interrupt-test  # the instance lock: not the same as a demo run beside it

leftovers() {
  local found=0
  if [[ -n $(ls -A "$work" | grep -v '^out$' || true) ]]; then
    echo "left behind in $work: $(ls -A "$work")"; found=1
  fi
  if pgrep -f -- "$work/" >/dev/null; then
    echo "processes left behind:"; pgrep -a -f -- "$work/"; found=1
  fi
  return $found
}

wait_for_output() {  # <text> <seconds>
  for ((i = 0; i < $2 * 20; i++)); do
    grep -q -- "$1" "$work/out" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "the demo never printed '$1'; it printed:"; cat "$work/out"; return 1
}

check_interrupt() {  # <description> <text to wait for> <extra delay> [text it must not print]
  "$demo" --duration 60 >"$work/out" 2>&1 &
  local pid=$!
  wait_for_output "$2" 60
  sleep "$3"
  kill -INT "$pid"
  local code=0
  wait "$pid" || code=$?
  if ((code != 130)); then
    echo "FAIL ($1): exit code $code, expected 130. Output:"; cat "$work/out"; exit 1
  fi
  if [[ -n ${4:-} ]] && grep -q -- "$4" "$work/out"; then
    echo "FAIL ($1): the interrupt came too late to test this case. Output:"; cat "$work/out"; exit 1
  fi
  if ! leftovers; then echo "FAIL ($1)"; exit 1; fi
  rm -f "$work/out"
  echo "ok: $1"
}

check_interrupt "interrupted during start-up" "starting a throwaway" 0.2 "cluster ready"
check_interrupt "interrupted while serving" "requests/s" 0

"$demo" --duration 1 >"$work/out" 2>&1 || { echo "FAIL: plain run failed:"; cat "$work/out"; exit 1; }
grep -q "stopped (duration, exit code 0).*failed 0" "$work/out" ||
  { echo "FAIL: no final report"; cat "$work/out"; exit 1; }
if ! leftovers; then echo "FAIL (plain run)"; exit 1; fi
echo "ok: a run with --duration reports and cleans up"

# --json: stdout is one JSON report and nothing else; the rest (logs, status lines, the cluster's
# start and removal) goes to stderr.
"$demo" --json --duration 1 >"$work/json" 2>"$work/out" ||
  { echo "FAIL: --json run failed:"; cat "$work/json" "$work/out"; exit 1; }
if [[ $(wc -l <"$work/json") != 1 ]] || ! grep -q '^{"writes_accepted":.*}$' "$work/json" ||
  ! grep -q "shutdown phase 5: the pool is closed" "$work/out" ||
  ! grep -q "removing the throwaway cluster" "$work/out" ||
  ! grep -q "the throwaway cluster is removed" "$work/out"; then
  echo "FAIL: --json (stdout, then stderr):"; cat "$work/json" "$work/out"; exit 1
fi
rm -f "$work/json"
if ! leftovers; then echo "FAIL (--json run)"; exit 1; fi
echo "ok: --json writes only the report on stdout, and the cluster's removal is said"

"$demo" --help >"$work/out" 2>&1 || { echo "FAIL: --help exits non-zero"; cat "$work/out"; exit 1; }
grep -q "^usage: pgrt_demo" "$work/out" || { echo "FAIL: --help"; cat "$work/out"; exit 1; }
echo "ok: --help"

# A server that is down: the start waits for it (here 1 s, PGRT_START_WAIT_S), then a clear error,
# exit 1, and the password never printed.
code=0
PGRT_START_WAIT_S=1 DATABASE_URL="postgresql://app:hunter2-secret@127.0.0.1:1/appdb" "$demo" --duration 1 >"$work/out" 2>&1 || code=$?
if ((code != 1)) || ! grep -q "failed to start: the database did not answer within 1000 ms of the start: could not connect to 127.0.0.1:1" "$work/out" ||
  ! grep -q "HINT" "$work/out" || grep -q "hunter2-secret" "$work/out"; then
  echo "FAIL: bad DATABASE_URL (exit $code):"; cat "$work/out"; exit 1
fi
rm -f "$work/out"
echo "ok: a bad DATABASE_URL gives a clear error without the password"
