#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the main job on the embedded
# default model. Extra arguments are passed to the job.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
out="${FLUOROSAM_DEMO_OUT:-$root/out/demo}"
if .venv/bin/fluorosam-rt demo --help >/dev/null 2>&1; then
  exec .venv/bin/fluorosam-rt demo --out "$out" "$@"
fi
exec .venv/bin/fluorosam-rt segment fluorosam_rt/assets/samples/chest_pa_2c35005f.png \
  --prompt lungs --prompt heart --prompt spine --out "$out" "$@"
