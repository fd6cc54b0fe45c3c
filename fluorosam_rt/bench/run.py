"""``fluorosam-rt bench``: one benchmark run, whichever kind, from options to the written report.

The dispatcher above the leaves: the sweep (runner.py), the soak (soak.py) and the subscriber-fault
run (faults.py) each build on the harness (harness.py) and know nothing of each other.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import (
    SUM_TOLERANCE_MS,
    BenchOptions,
    code_version,
    fps_label,
    machine_info,
    prepare_frames,
    prepare_model,
)
from .procs import load_average
from .runner import run_sweep


def run_bench(opts: BenchOptions, progress: Any = print) -> dict[str, Any]:
    """The whole benchmark; returns the result dict and writes JSON, plots and the report."""
    import torch

    from . import report

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fsam-bench-"))
    try:
        result: dict[str, Any] = {
            "version": 1,
            "command": opts.argv,
            "code": code_version(),
            "machine": machine_info(),
        }
        t_start = time.monotonic()
        progress(f"machine: {result['machine']['cpu']}, load {result['machine']['load_before']}")
        bundle, checkpoint, weights = prepare_model(opts, work)
        frames_dir, frames, frames_desc = prepare_frames(opts, work)
        result["config"] = {
            "quick": opts.quick,
            "weights": weights,
            "model": bundle.model.cfg.name,
            "frames": frames_desc,
            "rates": [fps_label(r) for r in opts.rates],
            "prompts": opts.prompts,
            "warmup_s": opts.warmup_s,
            "measure_s": opts.measure_s,
            "downsample": opts.downsample,
            "mask_encoding": opts.mask_encoding,
            "threads": opts.threads or torch.get_num_threads(),
            "stage_sum_tolerance_ms": SUM_TOLERANCE_MS,
        }
        if opts.soak_minutes:
            from .soak import run_soak

            result["soak"] = run_soak(work, opts, frames_dir, checkpoint, bundle, progress)
        elif opts.faults:
            from .faults import run_faults

            result["faults"] = run_faults(work, opts, frames_dir, checkpoint, bundle, progress)
        else:
            run_sweep(work, opts, bundle, checkpoint, weights, frames_dir, frames, result, progress)
        result["machine"]["load_after"] = load_average()
        result["elapsed_s"] = time.monotonic() - t_start
        report.write_all(result, opts.out_dir, opts.report)
        return result
    finally:
        if not opts.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
