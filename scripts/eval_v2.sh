#!/usr/bin/env bash
# Every issue-16 target of a checkpoint, evaluated text-only, with a one-page table.
#
#   bash scripts/eval_v2.sh CHECKPOINT OUTDIR [--max-cases N] [--max-calib-cases N] [--max-absent K]
#                                             [--max-phrasings K] [--only real_chest,heldout_body,tools]
#                                             [--no-calibrate] [--sets-dir DIR] [--chest DIR]
#
# Writes OUTDIR/{real_chest,heldout_body,tools}.json (fluorosam-train eval JSONs with the paraphrase
# drop), calibration.json, model_calibrated.safetensors (CHECKPOINT itself is never modified),
# targets.json and targets.md. The eval sets (out/eval_sets: held-out body, tools, calibration; seeds
# 777001, 777002-777003, 777100+k, never used for training) are generated first when missing. How
# each number is made, and the presence-calibration rule: train/eval_suite.py.
# Runs at nice 10 with passive OpenMP waits: the machine is shared with training and data generation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CHECKPOINT OUTDIR [options of python -m train.eval_suite run]" >&2
  exit 2
fi
ckpt="$1"
out="$2"
shift 2
[ -x .venv/bin/python ] || bash scripts/setup.sh
OMP_WAIT_POLICY=PASSIVE exec nice -n 10 .venv/bin/python -m train.eval_suite run \
  --checkpoint "$ckpt" --out "$out" "$@"
