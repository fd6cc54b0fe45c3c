#!/usr/bin/env bash
# The project's test command (README and .ci/run). Sets up .venv if needed, lints, then runs
# pytest. "--slow" also runs tests marked slow. pytest's exit code 5 (no tests collected) is
# treated as a failure so an empty run can never pass silently.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# The DICOM ingest tests use a real client nobody here wrote: dcmtk's storescu (Debian package).
if ! command -v storescu >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq dcmtk) >/dev/null || echo "[test] could not install dcmtk" >&2
fi
# The transfer-syntax tests (tests/test_dicom_syntaxes.py) make HTJ2K fixtures with OpenJPH's
# ojph_compress/ojph_expand (dcmtk 3.6.7 has no HTJ2K); a missing tool fails those tests.
if ! command -v ojph_compress >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq openjph-tools) >/dev/null || echo "[test] could not install openjph-tools" >&2
fi
# The C subscriber test (tests/test_bridge_integration.py) builds bridge/c against libzmq.
if command -v cc >/dev/null 2>&1 && [ ! -e /usr/include/zmq.h ]; then
  (apt-get update -qq && apt-get install -y -qq libzmq3-dev) >/dev/null || echo "[test] could not install libzmq3-dev" >&2
fi
# dicom3tools' dciodvfy validates the bridge's DICOM SEG objects (dcmtk has no IOD validator).
if ! command -v dciodvfy >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq dicom3tools) >/dev/null || echo "[test] could not install dicom3tools" >&2
fi
# The web viewer's tests (tests/test_bridge_web.py) drive Debian's headless chromium through its
# chromedriver; without them those tests fail (they never skip).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null || echo "[test] could not install chromium/chromium-driver" >&2
fi
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
