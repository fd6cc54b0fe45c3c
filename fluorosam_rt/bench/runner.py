"""The sweep: real node and subscriber processes per (engine, rate), prompts switched live.

Per (engine, source rate) one ``fluorosam-rt serve`` process and one subscriber process are
started; the prompt count is then changed over the control socket (the node's normal path), and
each prompt count gets a warm-up and a measurement window. Everything a cell reports is taken
at the window's edges (accounting, CPU time, peak RSS) or joined afterwards (latencies), so the
benchmark itself does nothing on the node's CPU while a window is open. The processes and the
joining are the harness's (harness.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    PROMPT_TEXTS,
    UNTHROTTLED_FPS,
    BenchOptions,
    FlowLog,
    delta,
    fps_label,
    join_cell,
    prepare_model,
    resolve_engines,
    set_prompts,
    start_group,
    stats,
    stop_group,
)
from .procs import cpu_seconds, memory_mb, reset_peak_rss

# --------------------------------------------------------------------------- the sweep


def run_group(
    work: Path,
    opts: BenchOptions,
    engine: str,
    rate: float,
    frames_dir: Path,
    checkpoint: str | None,
    progress: Any = print,
    label: str = "",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All prompt counts for one engine and rate; (cells, the node's final accounting).

    ``label`` names the model in progress lines when two models are compared.
    """
    per_cell = opts.warmup_s + opts.measure_s + 5
    budget = 120 + per_cell * len(opts.prompts) * 3
    g = start_group(
        work,
        f"{label + '-' if label else ''}{engine}-{fps_label(rate)}",
        opts,
        engine,
        rate,
        frames_dir,
        checkpoint,
        PROMPT_TEXTS[: opts.prompts[0]],
        budget,
    )
    windows = []
    flow = FlowLog(g.control)
    try:
        from ..service.control import send_command

        status = send_command(g.control, {"cmd": "status"}, timeout=30)["status"]
        actual = status["engine"].get("engine", engine)
        for k in opts.prompts:
            set_prompts(g.control, PROMPT_TEXTS[:k])
            progress(
                f"  {label + ' ' if label else ''}{engine:<12} {fps_label(rate):>11} fps  {k:>2} prompts: "
                f"warm-up {opts.warmup_s:g} s"
            )
            time.sleep(opts.warmup_s)
            s0, c0, cs0 = stats(g.control), cpu_seconds(g.node.pid), cpu_seconds(g.sub.pid)
            peak_reset = reset_peak_rss(g.node.pid)
            t0, w0 = time.monotonic_ns(), time.monotonic()
            time.sleep(opts.measure_s)
            t1, w1 = time.monotonic_ns(), time.monotonic()
            s1, c1, cs1 = stats(g.control), cpu_seconds(g.node.pid), cpu_seconds(g.sub.pid)
            mem, sub_mem = memory_mb(g.node.pid), memory_mb(g.sub.pid)
            flow.fetch()
            wall = w1 - w0
            windows.append(
                {
                    "engine": engine,
                    "engine_actual": actual,
                    "fps": rate or None,
                    "fps_label": fps_label(rate),
                    "source_fps": rate or UNTHROTTLED_FPS,
                    "prompts": k,
                    "window_s": wall,
                    "t0": t0,
                    "t1": t1,
                    **delta(s0, s1),
                    "cpu_pct_node": 100 * (c1 - c0) / wall,
                    "cpu_pct_subscriber": 100 * (cs1 - cs0) / wall,
                    "peak_rss_mb": mem["peak_rss_mb"],
                    "peak_rss_scope": "window" if peak_reset else "process lifetime",
                    "rss_mb": mem["rss_mb"],
                    "subscriber_peak_rss_mb": sub_mem["peak_rss_mb"],
                }
            )
    finally:
        final, sub_rows, counters = stop_group(g)
    frame_ids, ring = flow.arrays()
    cells = []
    for w in windows:
        t0, t1 = w.pop("t0"), w.pop("t1")
        joined = join_cell(frame_ids, ring, sub_rows, t0, t1)
        w["throughput_fps"] = w["published"] / w["window_s"]
        w.update(joined)
        w["not_received_by_subscriber"] = joined["node_published_in_window"] - joined["joined"]
        cells.append(w)
    final["subscriber"] = counters
    return cells, final


@dataclass
class _Sweep:
    """One model's part of a sweep: what it runs and what it measured."""

    label: str
    bundle: Any
    checkpoint: str | None
    weights: str
    floor: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)
    finals: list[dict[str, Any]] = field(default_factory=list)


def _attach_baseline_and_floor(cells: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    """Each cell's speed-up over its own model's naive baseline and its ratio to that model's floor."""
    for c in cells:
        b = c.pop("_baseline", None)
        fl = floor["per_prompts"].get(str(c["prompts"]))
        if b and "p50_ms" in c:
            c["baseline_p50_ms"] = b["p50_ms"]
            c["baseline_p99_ms"] = b["p99_ms"]
            c["speedup_p50"] = b["p50_ms"] / c["p50_ms"]
        if fl and "p50_ms" in c:
            c["floor_ms"] = fl["floor_ms"]
            c["compute_over_floor"] = c["node_compute_mean_ms"] / fl["floor_ms"]
            c["p50_over_floor"] = c["p50_ms"] / fl["floor_ms"]


def run_sweep(
    work: Path,
    opts: BenchOptions,
    bundle: Any,
    checkpoint: str | None,
    weights: str,
    frames_dir: Path,
    frames: list[Any],
    result: dict[str, Any],
    progress: Any = print,
) -> None:
    """Every (engine, rate) group of the sweep, with its naive baseline and floor, into result."""
    from . import report
    from .baseline import NaiveBaseline, time_baseline
    from .floor import floor_report

    engines, skipped = resolve_engines(opts, bundle.model)
    # One sweep per model; with --compare-checkpoint the second model's group runs right
    # after the first's for every engine and rate (compare.py pairs them).
    sweeps = [_Sweep("A" if opts.compare_checkpoint else "", bundle, checkpoint, weights)]
    if opts.compare_checkpoint:
        b_bundle, b_ckpt, b_weights = prepare_model(opts, work, opts.compare_checkpoint)
        sweeps.append(_Sweep("B", b_bundle, b_ckpt, b_weights))
        b_engines, b_skipped = resolve_engines(opts, b_bundle.model)
        skipped.update({f"{e} (model B)": why for e, why in b_skipped.items()})
        engines = [e for e in engines if e in b_engines]
    result["config"]["engines"] = engines
    result["config"]["engines_skipped"] = skipped
    if opts.geometry:
        from .geometry import run_geometry_bench

        result["geometry"] = run_geometry_bench(
            bundle, frames, PROMPT_TEXTS[: max(opts.prompts)], opts.quick, progress
        )
    progress("floor: counting FLOPs and timing matmul ...")
    for sw in sweeps:
        sw.floor = floor_report(
            sw.bundle.model, opts.prompts, opts.floor_seconds, text_encoder=sw.bundle.text_encoder
        )
    for engine in engines:
        for rate in opts.rates:
            for sw in sweeps:
                # The baseline runs just before each group, paced at the group's rate, so the
                # two see the same machine minutes apart rather than a sweep apart.
                progress(
                    f"  {sw.label + ' ' if sw.label else ''}baseline     {fps_label(rate):>11} fps  "
                    f"naive loop, {opts.baseline_frames} frames per prompt count"
                )
                base = NaiveBaseline(sw.bundle.model, sw.bundle.text_encoder)
                bl = {
                    str(k): time_baseline(base, frames, PROMPT_TEXTS[:k], opts.baseline_frames, rate=rate)
                    for k in opts.prompts
                }
                sw.baseline[f"{engine}@{fps_label(rate)}"] = bl
                c, final = run_group(
                    work, opts, engine, rate, frames_dir, sw.checkpoint, progress, label=sw.label
                )
                for cell in c:
                    cell["_baseline"] = bl.get(str(cell["prompts"]))
                sw.cells += c
                sw.finals.append({"engine": engine, "fps_label": fps_label(rate), **final})
    for sw in sweeps:
        _attach_baseline_and_floor(sw.cells, sw.floor)
    first = sweeps[0]
    result["floor"], result["baseline"] = first.floor, first.baseline
    result["cells"] = first.cells
    result["node_runs"] = first.finals
    result["targets"] = report.targets(result)
    if len(sweeps) > 1:
        from .compare import latency_targets, side_by_side

        b = sweeps[1]
        result["compare"] = {
            "model": b.bundle.model.cfg.name,
            "weights": b.weights,
            "floor": b.floor,
            "baseline": b.baseline,
            "cells": b.cells,
            "node_runs": b.finals,
            "targets": latency_targets(b.cells),
            "first_targets": latency_targets(first.cells),
        }
        result["side_by_side"] = side_by_side(first.cells, b.cells)
