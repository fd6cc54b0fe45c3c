#!/usr/bin/env bash
# The project's test command (README and .ci/run). Sets up .venv if needed, lints, then runs
# pytest. "--slow" also runs tests marked slow. pytest's exit code 5 (no tests collected) is
# treated as a failure so an empty run can never pass silently.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
marker=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then marker=(); else args+=("$a"); fi
done
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
.venv/bin/python -m pytest "${marker[@]}" "${args[@]}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
