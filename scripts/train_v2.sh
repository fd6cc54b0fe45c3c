#!/usr/bin/env bash
# Start, continue or stop the v2 embedded model's training as a background process.
#
#   bash scripts/train_v2.sh start    # starts, or resumes from runs/v2/last.pt (exactly: data order,
#                                     # optimiser, schedule position and clicks follow the step)
#   bash scripts/train_v2.sh status   # pid, last log line, ledger totals (steps, wall and CPU hours)
#   bash scripts/train_v2.sh stop     # SIGTERM: finishes the step, checkpoints, appends a ledger row
#
# A 2-core CPU trains slowly, so the run spans sessions: stop it before a session ends and start it
# again in the next one. Every segment adds a row to runs/v2/ledger.csv (train/fit.py). Data: the
# chest set plus every finished multi-body chunk (out/mb/chunk_*), re-scanned each epoch so chunks
# the data engine finishes meanwhile join the run (scripts/synth_v2_data.sh writes them).
# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning while they wait. On a machine
# shared with other jobs, spinning threads burnt ~6x the CPU time per step (measured: 12 vs 2 CPU-s).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run="${RUN:-runs/v2}"
config="${CONFIG:-configs/train/v2_stage3.yaml}"  # stage 1: steps 0-10.7k, stage 2: to 18.1k (ledger config column)
read -r -a data <<<"${DATA:---data out/chest1k2 --data out/mb/chunk_*}"
mkdir -p "$run"
pidfile="$run/train.pid"
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
case "${1:-start}" in
  start)
    if running; then echo "[train_v2] already running (pid $(cat "$pidfile"))"; exit 0; fi
    bash scripts/setup.sh
    OMP_WAIT_POLICY=PASSIVE nohup .venv/bin/fluorosam-train fit --config "$config" "${data[@]}" \
      --out "$run" --resume auto --no-progress >>"$run/train.log" 2>&1 &
    echo $! >"$pidfile"
    echo "[train_v2] started pid $(cat "$pidfile"); log: $run/train.log, ledger: $run/ledger.csv"
    ;;
  stop)
    if ! running; then echo "[train_v2] not running"; exit 0; fi
    pid="$(cat "$pidfile")"
    kill -TERM "$pid"
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then echo "[train_v2] still running after 600 s" >&2; exit 1; fi
    rm -f "$pidfile"
    echo "[train_v2] stopped; checkpoint $run/last.pt"
    ;;
  status)
    if running; then echo "[train_v2] running (pid $(cat "$pidfile"))"; else echo "[train_v2] not running"; fi
    [ -f "$run/log.csv" ] && tail -n 1 "$run/log.csv"
    if [ -f "$run/ledger.csv" ]; then
      .venv/bin/python - "$run" <<'PY'
import sys
from train.fit import ledger_totals, read_ledger
t = ledger_totals(read_ledger(sys.argv[1]))
extra = f" ({t['segments_without_cpu']} segments without a CPU figure)" if t["segments_without_cpu"] else ""
print(f"[train_v2] ledger: {t['segments']} segments, {t['steps']} steps, {t['wall_h']:.2f} wall-h, {t['cpu_h']:.2f} CPU-h{extra}")
PY
    fi
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
