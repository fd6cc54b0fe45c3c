#!/usr/bin/env bash
# The project's test command (README and .ci/run). Sets up .venv if needed, installs the
# external tools the tests use, lints (ruff, and lint-imports for the layers), then runs pytest. "--slow" also runs tests marked slow
# (and installs what they need). A required tool that is missing and cannot be installed fails
# the run here, before pytest: no test may skip or pass silently for want of it. pytest's exit
# code 5 (no tests collected) is treated as a failure so an empty run can never pass silently.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
marker=(-m "not slow")
setup_args=()
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then
    marker=()
    setup_args=(--reference)  # diffdrr's renderer for tests/test_synth_reference.py
  else
    args+=("$a")
  fi
done
bash scripts/setup.sh "${setup_args[@]}"

# Debian packages the tests drive as real peers nobody here wrote. Each row: what proves the
# tool is there (a command, or a file path), the package, and who needs it.
tools=(
  "storescu|dcmtk|the DICOM ingest tests send with dcmtk's storescu; dcmdump parses the SEG output"
  "ojph_compress|openjph-tools|tests/test_dicom_syntaxes.py makes HTJ2K fixtures (dcmtk 3.6.7 has none)"
  "cc|gcc|tests/test_bridge_integration.py builds the C subscriber (bridge/c)"
  "/usr/include/zmq.h|libzmq3-dev|the C subscriber links against libzmq"
  "dciodvfy|dicom3tools|tests/test_bridge_integration.py validates the DICOM SEG objects against the IOD"
  "chromium|chromium|tests/test_bridge_web.py drives a headless browser"
  "chromedriver|chromium-driver|tests/test_bridge_web.py drives it through chromedriver"
)
have() { if [ "${1:0:1}" = "/" ]; then [ -e "$1" ]; else command -v "$1" >/dev/null 2>&1; fi; }
missing=()
for row in "${tools[@]}"; do
  IFS='|' read -r probe pkg _why <<<"$row"
  have "$probe" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[test] installing ${missing[*]} (Debian packages the tests use)"
  apt_log="$(mktemp)"
  # Another apt run (a second session's test.sh) may hold the lock: wait for it, not fail.
  if ! { apt-get -o DPkg::Lock::Timeout=300 update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}"; } \
    >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
  fi
  rm -f "$apt_log"
fi
failed=0
for row in "${tools[@]}"; do
  IFS='|' read -r probe pkg why <<<"$row"
  if ! have "$probe"; then
    echo "[test] missing $probe (Debian package $pkg): $why" >&2
    failed=1
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "[test] install the packages above (apt-get install ...) and rerun: failing before the tests" >&2
  exit 1
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache  # the layers and boundaries in pyproject.toml [tool.importlinter]
set +e
.venv/bin/python -m pytest "${marker[@]}" "${args[@]}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
