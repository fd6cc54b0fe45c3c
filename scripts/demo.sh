#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the node demo on the embedded
# default model: a replayed synthetic C-arm sweep, 3 prompts, a subscriber printing live fps and
# latency, and an overlay animation at the end. Extra arguments go to `fluorosam-rt demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
out="${FLUOROSAM_DEMO_OUT:-$root/out/demo}"
mkdir -p "$out"
exec .venv/bin/fluorosam-rt demo --out "$out/demo.gif" "$@"
