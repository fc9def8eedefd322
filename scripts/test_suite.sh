#!/usr/bin/env bash
# The whole suite for `make test`. The system tests drive a real Airflow stack and spend most of their
# time waiting on it, so they run in their own pytest process beside the rest of the suite (and the
# linters) rather than after it: on a 2-core machine the two overlap instead of adding up.
# Arguments are pytest flags given to both halves (e.g. -x, -k name).
set -uo pipefail
PY=${PY:-.venv/bin/python}
log=$(mktemp)
"$PY" -m pytest -q -p no:cacheprovider -m "not distributed" tests/system "$@" >"$log" 2>&1 &
system=$!
rest=0
{ .venv/bin/ruff check . && "$PY" -m mypy && "$PY" -m pytest -q -p no:cacheprovider -m "not distributed" \
    --ignore=tests/system "$@"; } || rest=$?
wait "$system"
system_rc=$?
echo "========== tests/system (run beside the rest; exit code $system_rc) =========="
cat "$log"
rm -f "$log"
# pytest exits 5 when a -k filter leaves one half with nothing to run: that half did not fail.
[ "$rest" -eq 5 ] && [ "$system_rc" -ne 5 ] && rest=0
[ "$system_rc" -eq 5 ] && [ "$rest" -ne 5 ] && system_rc=0
[ "$rest" -ne 0 ] && exit "$rest"
exit "$system_rc"
