#!/usr/bin/env bash
# One run on a lent GPU (<= ~8 minutes): CUDA back ends' parity and per-frame latency for the
# small default model, the v2 model (EfficientNet-Lite0, 256 px, 1152-channel embedding) and the
# official Swin-L architecture, in that order, written to one JSON to commit.
#   bash engines/gpu_check.sh                       # GPU, default output engines/results/gpu_check_h200.json
#   bash engines/gpu_check.sh --models small,v2     # only the real-time models
#   bash engines/gpu_check.sh --device cpu --models tiny,v2-tiny --runs 3 --warmup 1 --out /tmp/x.json  # CPU dry run
# Extra arguments go to engines/gpu_check.py. Exit codes: 0 ok, 1 a variant failed parity or
# errored, 3 no CUDA device, 124 the hard time limit was hit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
limit="${GPU_CHECK_LIMIT_S:-480}"
case " $* " in
  *" --device cpu "*) ;;
  *) command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true ;;
esac
has_out=0
for a in "$@"; do [ "$a" = "--out" ] && has_out=1; done
extra=()
[ "$has_out" = 1 ] || extra=(--out engines/results/gpu_check_h200.json)
# The budget leaves a minute inside the hard limit for the last variant and the JSON.
exec timeout --signal=TERM "$limit" "$py" -m engines.gpu_check --budget-s "$((limit - 90))" "${extra[@]}" "$@"
