#!/usr/bin/env bash
# The v2 model's multi-body training data, written as chunks beside a running training job.
#
#   bash scripts/synth_v2_data.sh start [FIRST] [COUNT]   # chunks FIRST..FIRST+COUNT-1 in the background
#   bash scripts/synth_v2_data.sh stop                    # stops after nothing: the chunk in progress is
#                                                         # discarded (synth writes a chunk whole or not at all)
#
# Chunk k is `fluorosam-train synth --bodies all --seed 1000+k` (every built training body, never the
# held-out one; region views, region tool sites and per-case anatomical variation), so each chunk is
# reproducible on its own and the chunks together are one deterministic data set. A finished chunk is
# renamed into out/mb/chunk_<k> by synth itself; `fit` with data out/mb/chunk_* and rescan_data picks it
# up at its next epoch. Bodies must be built first: fluorosam-train bodies fetch && bodies build all.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT_ROOT:-out/mb}"
per_chunk="${PER_CHUNK:-400}"
workers="${WORKERS:-1}"
pidfile="$out/synth.pid"
mkdir -p "$out"
case "${1:-start}" in
  start)
    first="${2:-0}"
    count="${3:-20}"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "[synth_v2] already running (pid $(cat "$pidfile"))"; exit 0
    fi
    (
      for k in $(seq "$first" $((first + count - 1))); do
        dest="$out/chunk_$(printf %03d "$k")"
        [ -d "$dest" ] && continue
        OMP_WAIT_POLICY=PASSIVE .venv/bin/fluorosam-train synth --bodies all --n "$per_chunk" --size 256 \
          --workers "$workers" --seed $((1000 + k)) --variation 1.0 --min-path lungs=30 \
          --no-progress --out "$dest" >>"$out/synth.log" 2>&1
        echo "[synth_v2] $(date -u +%FT%TZ) chunk $k done" >>"$out/synth.log"
      done
    ) &
    echo $! >"$pidfile"
    echo "[synth_v2] started pid $(cat "$pidfile"); log: $out/synth.log"
    ;;
  stop)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      pkill -TERM -P "$(cat "$pidfile")" || true
      kill -TERM "$(cat "$pidfile")" || true
    fi
    pkill -TERM -f "fluorosam-train synth --bodies all" || true
    rm -f "$pidfile"
    echo "[synth_v2] stopped"
    ;;
  *) echo "usage: $0 start [FIRST] [COUNT] | stop" >&2; exit 2 ;;
esac
