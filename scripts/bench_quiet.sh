#!/usr/bin/env bash
# Every speed figure the open issues ask for, in one sitting on a quiet machine, into one folder.
#
#   bash scripts/bench_quiet.sh OUTDIR [V2_CHECKPOINT] [V1_CHECKPOINT]
#
# V2_CHECKPOINT defaults to the embedded model (v2 since 2026-12-07); V1_CHECKPOINT to v1 as it was
# shipped, read from git (commit d935b98, the last change of the v1 embedded file).
#
# Pauses the background training and data jobs first (scripts/train_v2.sh stop checkpoints the run;
# scripts/synth_v2_data.sh stop discards the chunk in progress) and does not restart them: the
# caller does, so nothing competes with the figures. Waits until the 1-minute load average is under
# 1.0 (or 3 minutes), records the load before and after each step, then runs, each writing JSON:
#   node/        fluorosam-rt bench: v1 and v2 side by side, onnxruntime, 15 fps, K=3,10,
#                both at full work (every prompt present)
#   geometry/    fluorosam-rt bench --quick: the geometry stage's cost per sub-stage (K=10)
#   web/         the web viewer's cost to the other subscribers (python -m fluorosam_rt.bench.web_cost)
#   cine.json    fluorosam-rt bench-cine: XA cine at 30 fps, uncompressed vs JPEG Lossless
#   synth.json   fluorosam-train synth-bench --generator: multi-body images/s at 256², 2 workers
# Each step is independent: one that fails is reported and the next one still runs.
# STEPS="node web" (say) runs only those steps; WEB_ROUNDS sets the viewer comparison's rounds (4).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: $0 OUTDIR [V2_CHECKPOINT] [V1_CHECKPOINT]}"
v2="${2:-fluorosam_rt/assets/default_model.safetensors}"
v1="${3:-}"
mkdir -p "$out/models"
if [ -z "$v1" ]; then
  v1="$out/models/v1_shipped.safetensors"
  git show d935b98:fluorosam_rt/assets/default_model.safetensors >"$v1"
fi
py=.venv/bin/python
log="$out/bench_quiet.log"
note() { echo "[bench_quiet] $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg): $*" | tee -a "$log"; }

bash scripts/train_v2.sh stop | tee -a "$log"
bash scripts/synth_v2_data.sh stop | tee -a "$log"
for _ in $(seq 1 36); do
  awk '{exit !($1 < 1.0)}' /proc/loadavg && break
  sleep 5
done
note "start (v1: $v1, v2: $v2)"
# The latency comparison runs both models at full work: copies whose presence threshold is -1e9, so
# every prompt yields a mask on every frame (an uncalibrated or undertrained model would otherwise
# gate prompts away and look cheaper than it is).
"$py" - "$out/models" "$v1" "$v2" <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
out = Path(sys.argv[1])
for name, src in zip(("v1_full_work", "v2_full_work"), sys.argv[2:]):
    with safe_open(src, "pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(md.get("meta", "{}"))
    meta["presence_threshold"] = -1e9
    md["meta"] = json.dumps(meta)
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=md)
    print(f"{name}: {src} with presence_threshold -1e9")
PY
failed=()
step() {
  local name="$1"
  shift
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  note "$name: $*"
  if "$@" >>"$log" 2>&1; then note "$name: done"; else note "$name: FAILED (exit $?)"; failed+=("$name"); fi
}
step node .venv/bin/fluorosam-rt bench --engines onnxruntime --rates 15 --prompts 3,10 --warmup 4 \
  --measure 20 --no-geometry --checkpoint "$out/models/v1_full_work.safetensors" \
  --compare-checkpoint "$out/models/v2_full_work.safetensors" --out "$out/node"
step geometry .venv/bin/fluorosam-rt bench --quick --engines onnxruntime --rates 15 --prompts 10 \
  --out "$out/geometry"
step web "$py" -m fluorosam_rt.bench.web_cost --rounds "${WEB_ROUNDS:-4}" --out "$out/web"
step cine .venv/bin/fluorosam-rt bench-cine --repeats 2 --json "$out/cine.json"
step synth .venv/bin/fluorosam-train synth-bench --generator --bodies all --n 240 --workers 2 \
  --size 256 --seed 5 --json "$out/synth.json"
note "end; failed: ${failed[*]:-none}"
[ "${#failed[@]}" -eq 0 ]
