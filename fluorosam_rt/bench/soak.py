"""The soak: 15 fps and 3 prompts for minutes, RSS and latency sampled every interval."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .harness import (
    PROMPT_TEXTS,
    BenchOptions,
    FlowLog,
    delta,
    join_cell,
    resolve_engines,
    start_group,
    stats,
    stop_group,
)
from .procs import memory_mb


def run_soak(
    work: Path,
    opts: BenchOptions,
    frames_dir: Path,
    checkpoint: str | None,
    bundle: Any,
    progress: Any = print,
) -> dict[str, Any]:
    """15 fps, 3 prompts for ``soak_minutes``: RSS and latency sampled every interval."""
    engines, _ = resolve_engines(
        BenchOptions(out_dir=opts.out_dir, engines=[opts.soak_engine or "onnxruntime"]), bundle.model
    )
    engine = engines[0] if engines else "torch"
    duration = opts.soak_minutes * 60
    g = start_group(
        work, "soak", opts, engine, 15.0, frames_dir, checkpoint, PROMPT_TEXTS[:3], duration + 300
    )
    samples = []
    flow = FlowLog(g.control)
    try:
        time.sleep(opts.warmup_s)
        t_begin = time.monotonic()
        s_prev, t_prev = stats(g.control), time.monotonic_ns()
        while time.monotonic() - t_begin < duration:
            time.sleep(min(opts.soak_interval_s, max(0.05, duration - (time.monotonic() - t_begin))))
            t_now = time.monotonic_ns()
            s_now = stats(g.control)
            flow.fetch()
            mem = memory_mb(g.node.pid)
            samples.append(
                {
                    "t_s": round(time.monotonic() - t_begin, 3),
                    "t0": t_prev,
                    "t1": t_now,
                    "rss_mb": mem["rss_mb"],
                    "peak_rss_mb": mem["peak_rss_mb"],
                    **delta(s_prev, s_now),
                }
            )
            progress(
                f"  soak {samples[-1]['t_s']:7.1f} s  RSS {mem['rss_mb']:.1f} MiB  "
                f"published {s_now['published']}  dropped {s_now['dropped_total']}"
            )
            s_prev, t_prev = s_now, t_now
    finally:
        final, sub_rows, counters = stop_group(g)
    frame_ids, ring = flow.arrays()
    for s in samples:
        j = join_cell(frame_ids, ring, sub_rows, s.pop("t0"), s.pop("t1"))
        s.update({k: j[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "joined") if k in j})
    whole = join_cell(frame_ids, ring, sub_rows, 0, 2**62)
    whole.pop("samples_ms", None)
    from .report import soak_summary

    return {
        "engine": engine,
        "fps": 15.0,
        "prompts": 3,
        "minutes": opts.soak_minutes,
        "interval_s": opts.soak_interval_s,
        "samples": samples,
        "overall": whole,
        "final": {**final, "subscriber": counters},
        "summary": soak_summary(samples, duration),
    }
