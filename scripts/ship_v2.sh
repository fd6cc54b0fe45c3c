#!/usr/bin/env bash
# Ship the v2 run as the embedded default model, then measure what was shipped.
#
#   bash scripts/ship_v2.sh [OUTDIR]        # default out/ship_v2; RUN=runs/v2
#
# 1. export the run's last checkpoint (read-only on the run folder) to OUTDIR/model.safetensors;
# 2. train.ship: calibrate the presence threshold on the calibration set (views of every training body,
#    never the held-out body, the eval sets or real images), install the file as
#    fluorosam_rt/assets/default_model.safetensors, precompute the vocabulary's prompt tokens and the
#    "did you mean" table (OUTDIR/ship.txt);
# 3. every issue-16 target of the shipped file, uncapped, with its own threshold (eval_v2.sh
#    --no-calibrate: the threshold train.ship wrote is the one under test) -> OUTDIR/eval/targets.md,
#    and its summaries (no per-case rows) -> fluorosam_rt/assets/default_model.metrics.json;
# 4. overlays of the real X-rays of configs/real_images.yaml (looking only) -> OUTDIR/real_overlays/;
# 5. the run's training curves -> OUTDIR/curves.png.
# Stop the training first (bash scripts/train_v2.sh stop): the export reads last.pt as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-out/ship_v2}"
run="${RUN:-runs/v2}"
[ -x .venv/bin/python ] || bash scripts/setup.sh
mkdir -p "$out"
step() { echo "[ship_v2] $(date -u +%FT%TZ) $*"; }
step "export $run"
.venv/bin/fluorosam-train export --run "$run" --out "$out/model.safetensors"
step "calibrate and install"
.venv/bin/python -m train.ship --checkpoint "$out/model.safetensors" --calib-data out/eval_sets/calib \
  --cases all | tee "$out/ship.txt"
step "evaluate the shipped model"
bash scripts/eval_v2.sh fluorosam_rt/assets/default_model.safetensors "$out/eval" --no-calibrate \
  >"$out/eval.log" 2>&1
tail -n 40 "$out/eval/targets.md"
step "metrics summary -> fluorosam_rt/assets/default_model.metrics.json"
.venv/bin/python - "$out/eval" <<'PY'
import json, sys
from pathlib import Path
ev = Path(sys.argv[1])
doc = {"_about": f"Metrics of fluorosam_rt/assets/default_model.safetensors: python -m train.eval_suite run "
       f"--checkpoint fluorosam_rt/assets/default_model.safetensors --out {ev} --no-calibrate (scripts/ship_v2.sh); "
       "see docs/model_card.md. Per-case rows are omitted."}
for split in ("real_chest", "heldout_body", "tools"):
    d = json.loads((ev / f"{split}.json").read_text())
    for k in ("cases", "paraphrase_cases", "montage", "reliability_plot"):
        d.pop(k, None)
    doc[split] = d
doc["targets"] = json.loads((ev / "targets.json").read_text())
Path("fluorosam_rt/assets/default_model.metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
PY
step "real-image overlays"
bash scripts/real_overlays.sh embedded "$out/real_overlays" >"$out/real_overlays.log" 2>&1
step "training curves"
.venv/bin/fluorosam-train curves --run "$run" --out "$out/curves.png"
step "done: $out"
