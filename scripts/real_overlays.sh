#!/usr/bin/env bash
# Segment every image of configs/real_images.yaml with its region's prompts (plus K-wire and
# screw) and write, per image, OUTDIR/<id>/ (masks, overlay.png, result.json, the segment log)
# and a contact sheet OUTDIR/sheet_<id>.png (the image, then one panel per prompt with its name,
# score, present/absent and area).
#   bash scripts/real_overlays.sh embedded out/real_overlays
#   bash scripts/real_overlays.sh path/to/model.safetensors out/real_overlays_x
# MODEL: "embedded" (the shipped default model) or a .safetensors path. Run
# scripts/fetch_real_images.sh first. Looking only: never train or tune on these images.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 2 ]]; then
    echo "usage: $0 MODEL OUTDIR   (MODEL: embedded | path/to/model.safetensors)" >&2
    exit 2
fi
model=$1 out=$2
PY=${PYTHON:-.venv/bin/python}
CLI=${FLUOROSAM_RT:-.venv/bin/fluorosam-rt}
ckpt=()
if [[ "$model" != embedded ]]; then
    [[ -f "$model" ]] || { echo "real_overlays: model $model not found" >&2; exit 2; }
    [[ "$model" == *.safetensors ]] || { echo "real_overlays: model must be 'embedded' or a .safetensors file" >&2; exit 2; }
    ckpt=(--checkpoint "$model")
fi
"$PY" scripts/real_images.py check >/dev/null
mkdir -p "$out"
n=0
while IFS=$'\t' read -r id file; do
    [[ -f "$file" ]] || { echo "real_overlays: $file missing; run scripts/fetch_real_images.sh" >&2; exit 2; }
    args=()
    while IFS= read -r p; do args+=(--prompt "$p"); done < <("$PY" scripts/real_images.py prompts "$id")
    rm -rf "${out:?}/$id"
    mkdir -p "$out/$id"
    nice -n 10 "$CLI" segment "$file" "${args[@]}" "${ckpt[@]}" --out "$out/$id" >"$out/$id/segment.log" 2>&1 ||
        { echo "real_overlays: segment failed on $id (log: $out/$id/segment.log)" >&2; cat "$out/$id/segment.log" >&2; exit 1; }
    "$PY" scripts/real_images.py sheet "$out/$id" "$out/sheet_$id.png" >/dev/null
    echo "$id: $(grep -c "(present)" "$out/$id/segment.log" || true) of $((${#args[@]} / 2)) prompts present -> $out/sheet_$id.png"
    n=$((n + 1))
done < <("$PY" scripts/real_images.py list)
echo "real_overlays: $n images, model $model, written to $out"
