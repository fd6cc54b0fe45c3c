#!/usr/bin/env bash
# The long fuzz run of issue 9 (docs/reliability.md): every atheris harness in fuzz/ for RUNS
# inputs (default 100000) at the lowest CPU priority, one after the other. Prints one line per
# target (runs, wall time, crashes) and exits 1 if any target crashed; each log and crashing
# input stays under FUZZ_DIR/TARGET (default out/fuzz, ignored by git). Arguments go to libFuzzer.
#
#   bash scripts/fuzz_long.sh                       # 100,000 inputs per target
#   RUNS=5000 TARGETS=dicom bash scripts/fuzz_long.sh -seed=7
#   .venv/bin/python fuzz/fuzz_dicom.py out/fuzz/dicom/crash-SHA1   # replay one saved input
#
# The hypothesis long run over the same pure-Python targets (and the preprocessor) is separate:
#   FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_fuzz.py -p no:cacheprovider -W ignore
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
runs="${RUNS:-100000}"
targets="${TARGETS:-dicom control wire}"
export FUZZ_DIR="${FUZZ_DIR:-$root/out/fuzz}"
mkdir -p "$FUZZ_DIR"
py=.venv/bin/python
echo "[fuzz] $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)," \
  "$("$py" -c 'import atheris, pydicom, sys; print(f"python {sys.version.split()[0]}, pydicom {pydicom.__version__}")')," \
  "$runs runs per target"
failed=0
for t in $targets; do
  mkdir -p "$FUZZ_DIR/$t"
  log="$FUZZ_DIR/$t/fuzz.log"
  marker="$FUZZ_DIR/$t/.started"
  touch "$marker"
  start=$(date +%s)
  set +e
  # -timeout: one input running this long is reported as a hang (a crash of its own).
  nice -n 19 "$py" "fuzz/fuzz_$t.py" "-runs=$runs" -timeout=60 -print_final_stats=1 "$@" >"$log" 2>&1
  rc=$?
  set -e
  wall=$(($(date +%s) - start))
  done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [ -n "$done_runs" ] || done_runs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
  crashes=$(find "$FUZZ_DIR/$t" -maxdepth 1 -newer "$marker" \
    \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'slow-unit-*' \) | wc -l)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
  echo "[fuzz] $t: runs=${done_runs:-?} wall=${wall}s coverage=${cov:-?} crashes=$crashes exit=$rc log=$log"
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    find "$FUZZ_DIR/$t" -maxdepth 1 -newer "$marker" -name '*-*' ! -name fuzz.log -printf '[fuzz]   %p\n'
  fi
done
exit "$failed"
