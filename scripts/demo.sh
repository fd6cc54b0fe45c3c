#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the node demo on the embedded
# default model: a replayed synthetic C-arm sweep, 3 prompts, a subscriber printing live fps and
# latency, and an overlay animation at the end. Extra arguments go to `fluorosam-rt demo`
# (--loop keeps the sweep going until Ctrl-C).
# The live view in a browser (`fluorosam-rt bridge web`) runs beside it and prints its URL;
# FLUOROSAM_DEMO_WEB=0 leaves it out, FLUOROSAM_WEB_PORT picks its port (default 8080).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
out="${FLUOROSAM_DEMO_OUT:-$root/out/demo}"
mkdir -p "$out"
demo_args=()
if [ "${FLUOROSAM_DEMO_WEB:-1}" != "0" ]; then
  masks="tcp://127.0.0.1:${FLUOROSAM_DEMO_PUB_PORT:-5565}"
  control="tcp://127.0.0.1:${FLUOROSAM_DEMO_CONTROL_PORT:-5566}"
  .venv/bin/fluorosam-rt bridge web --connect "$masks" --control "$control" \
    --port "${FLUOROSAM_WEB_PORT:-8080}" >"$out/viewer.log" 2>&1 &
  viewer=$!
  trap 'kill "$viewer" 2>/dev/null || true; wait "$viewer" 2>/dev/null || true' EXIT
  for _ in $(seq 100); do  # its first line is the URL (or why it could not start)
    if [ -s "$out/viewer.log" ] || ! kill -0 "$viewer" 2>/dev/null; then break; fi
    sleep 0.1
  done
  cat "$out/viewer.log"
  demo_args=(--publish "$masks" --control "$control")
  echo "demo: open that URL in a browser here; from another machine use an SSH tunnel" \
    "(ssh -L 8080:127.0.0.1:8080 THIS_HOST, then http://127.0.0.1:8080/). --loop keeps the sweep going."
fi
.venv/bin/fluorosam-rt demo --out "$out/demo.gif" "${demo_args[@]}" "$@"
