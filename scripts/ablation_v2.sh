#!/usr/bin/env bash
# The v2 trunk ablation: ImageNet-pretrained vs scratch Lite0 trunk, short fixed-step runs on the same
# data (out/chest1k2 + out/mb/chunk_*), one after the other, each then evaluated by scripts/eval_v2.sh.
#
#   bash scripts/ablation_v2.sh OUTDIR [--max-cases N ...]   (eval options pass through)
#
# Writes OUTDIR/{pretrained,scratch}/ (runs) and OUTDIR/eval_{pretrained,scratch}/ (targets.md).
# One thread each, at nice 5: it is meant to run beside the main training run on the other core.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:?usage: $0 OUTDIR [eval options]}"
shift
for arm in pretrained scratch; do
  OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/fluorosam-train fit --config "configs/train/v2_ablation_$arm.yaml" \
    --data out/chest1k2 --data 'out/mb/chunk_*' --out "$out/$arm" --no-progress
  bash scripts/eval_v2.sh "$out/$arm/model.safetensors" "$out/eval_$arm" "$@"
done
