#!/usr/bin/env bash
# One v2 training segment on a lent GPU: synthesise fresh multi-body data there, resume runs/v2's
# checkpoint (packed by scripts/gpu_pack.sh into .gpu_carry/), train, and leave the results in $OUT.
#
#   bash scripts/gpu_train.sh                    # on the device (the run tool sets $OUT); CUDA
#   bash scripts/gpu_train.sh --device cpu       # the same segment on a CPU, only slower
#   bash scripts/gpu_train.sh --dry-run          # print the plan and check the inputs; seconds
#
# Budgets (seconds, env): SYNTH_BUDGET_S (no new chunk starts after it), FIT_BUDGET_S (fit is sent
# SIGTERM then: it finishes the step, checkpoints and writes its ledger row). Defaults fit one device
# call of timeout_s 600: about 40 s set-up, 170 s synth, 300 s fit, 20 s packing the results.
# Other env: CHUNKS, PER_CHUNK (images per synth chunk), SYNTH_WORKERS, SEED0 (chunk k uses seed
# SEED0+k; the CPU chunks use 1000+k), WORK (scratch, default /tmp/fluorosam_gpu), SET (extra
# fit config key=value, space-separated), MAX_STEPS (cap the segment's steps), PYTHON.
# $OUT gets: model.safetensors, last.pt.part00.. + last.pt.parts.json (each <= 15 MiB), log.csv,
# ledger.csv, gpu_run.json (device, steps, per-step timing, synth images/s), gpu_train.log.
# Fold them into runs/v2 with: python -m train.device_run fold <results folder>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
device="${DEVICE:-cuda}"
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --device=*) device="${1#*=}"; shift ;;
    --dry-run) dry=1; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--dry-run]" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "[gpu_train] --device must be cuda or cpu, got $device" >&2; exit 2 ;; esac
py="${PYTHON:-python3}"
carry="${CARRY:-$root/.gpu_carry}"
work="${WORK:-/tmp/fluorosam_gpu}"
out="${OUT:-$work/out}"
chunks="${CHUNKS:-3}"
per_chunk="${PER_CHUNK:-280}"
synth_workers="${SYNTH_WORKERS:-14}"
seed0="${SEED0:-5000}"
synth_budget="${SYNTH_BUDGET_S:-170}"
fit_budget="${FIT_BUDGET_S:-300}"
t_start=$(date +%s.%N)
now() { date +%s.%N; }
since() { "$py" -c "import sys;print(round(float(sys.argv[2])-float(sys.argv[1]),1))" "$1" "$(now)"; }

# -- inputs ---------------------------------------------------------------------------------------------
missing=()
for f in pack.json last.pt.xz text_features.pt bodies.tar.xz physics.npz shim/spekpy/__init__.py \
         shim/xraydb/__init__.py; do
  [ -e "$carry/$f" ] || missing+=("$f")
done
[ -f configs/train/v2_stage2.yaml ] && [ -f configs/train/v2_gpu.yaml ] || missing+=("configs/train/v2_*.yaml")
if [ ${#missing[@]} -gt 0 ]; then
  echo "[gpu_train] missing in .gpu_carry: ${missing[*]} (run scripts/gpu_pack.sh here first)" >&2; exit 1
fi
case "$(realpath -m "$work")" in "$(realpath -m "$root/runs")"*) echo "[gpu_train] WORK must not be under runs/" >&2; exit 1 ;; esac
base_step="$("$py" -c "import json,sys;print(json.load(open(sys.argv[1]))['step'])" "$carry/pack.json")"
echo "[gpu_train] plan: device $device; resume step $base_step from .gpu_carry/last.pt.xz"
echo "[gpu_train]   synth: up to $chunks chunks x $per_chunk images, $synth_workers workers, seeds $seed0.., no new chunk after ${synth_budget}s"
echo "[gpu_train]   fit: configs/train/v2_stage2.yaml + v2_gpu.yaml${SET:+ + $SET}, SIGTERM after ${fit_budget}s${MAX_STEPS:+, at most $MAX_STEPS steps}"
echo "[gpu_train]   scratch $work, results $out"
if [ "$dry" = 1 ]; then
  "$py" -m train.device_run config --base configs/train/v2_stage2.yaml --override configs/train/v2_gpu.yaml \
    ${SET:+$(printf -- '--set %s ' $SET)} --out /dev/null
  echo "[gpu_train] dry run: inputs and config are valid"; exit 0
fi
mkdir -p "$work" "$out"
exec > >(tee -a "$out/gpu_train.log") 2>&1

# -- set-up: wheels, bodies, checkpoint ----------------------------------------------------------------
t0=$(now)
if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$carry"/wheels/*.whl
fi
export PYTHONPATH="$carry/shim:$work/site:$root${PYTHONPATH:+:$PYTHONPATH}"
export FLUOROSAM_PHYSICS_TABLE="$carry/physics.npz" FLUOROSAM_BODIES="$work/bodies"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
rm -rf "$work/bodies" "$work/run" "$work/data"
mkdir -p "$work/run" "$work/data"
"$py" -m train.device_pack unpack --archive "$carry/bodies.tar.xz" --dest "$work/bodies"
xz -dc "$carry/last.pt.xz" >"$work/run/last.pt"
want="$("$py" -c "import json,sys;print(json.load(open(sys.argv[1]))['checkpoint_sha256'])" "$carry/pack.json")"
[ "$(sha256sum "$work/run/last.pt" | cut -d' ' -f1)" = "$want" ] || { echo "[gpu_train] checkpoint sha256 differs" >&2; exit 1; }
cp "$carry/text_features.pt" "$work/text_features.pt"
"$py" -c "import torch;print('[gpu_train] torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
t_setup=$(since "$t0")

# -- synth: chunks of fresh data until the budget ------------------------------------------------------
t0=$(now)
for k in $(seq 0 $((chunks - 1))); do
  if [ "$k" -gt 0 ] && [ "$(since "$t0" | cut -d. -f1)" -ge "$synth_budget" ]; then
    echo "[gpu_train] synth budget reached after $k chunks"; break
  fi
  nice -n 5 "$py" -m train.cli synth --bodies all --n "$per_chunk" --size 256 --workers "$synth_workers" \
    --device "$device" --seed $((seed0 + k)) --variation 1.0 --min-path lungs=30 --contact-sheet 0 \
    --no-progress --out "$work/data/chunk_$(printf %03d "$k")"
done
t_synth=$(since "$t0")

# -- fit: resume, train until SIGTERM (or MAX_STEPS), checkpoint -------------------------------------
t0=$(now)
"$py" -m train.device_run config --base configs/train/v2_stage2.yaml --override configs/train/v2_gpu.yaml \
  ${SET:+$(printf -- '--set %s ' $SET)} --out "$work/fit.yaml"
max_steps=()
[ -n "${MAX_STEPS:-}" ] && max_steps=(--max-steps $((base_step + MAX_STEPS)))
rc=0
timeout --signal=TERM --kill-after=90 "$fit_budget" "$py" -m train.device_run fit --bank "$work/text_features.pt" -- \
  --config "$work/fit.yaml" --data "$work/data/chunk_*" --out "$work/run" --resume "$work/run/last.pt" \
  --text-cache "$work/text_features.pt" --no-progress "${max_steps[@]}" || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 124 ] || { echo "[gpu_train] fit failed (exit $rc)" >&2; exit "$rc"; }
t_fit=$(since "$t0")

# -- results --------------------------------------------------------------------------------------------
t0=$(now)
"$py" -m train.device_run split "$work/run/last.pt" "$out"
cp "$work/run/model.safetensors" "$work/run/log.csv" "$work/run/ledger.csv" "$out/"
"$py" -m train.device_run report --work "$work" --out "$out" --device "$device" --base-step "$base_step" \
  --phases "{\"setup\": $t_setup, \"synth\": $t_synth, \"fit\": $t_fit, \"results\": $(since "$t0"), \"total\": $(since "$t_start")}"
ls -l "$out"
