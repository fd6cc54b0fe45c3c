"""Side-by-side latency of back ends for one model, in one process, interleaved.

Each timed round runs every engine once per cell, in turn, so a noisy, shared machine slows
all engines alike and their ratio stays meaningful; the medians of the rounds are reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .base import Engine


def _p(ms: list[float], q: float) -> float:
    s = sorted(ms)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def interleaved_times(
    cells: dict[str, dict[str, Callable[[], Any]]], runs: int, warmup: int = 2, gap_s: float = 0.01
) -> dict[str, dict[str, list[float]]]:
    """cells[cell][engine] -> callable; returns times in ms per cell and engine.

    ``gap_s`` of idle time (untimed) follows each call, as the gap between frames does in the
    node: threads an engine leaves busy-waiting after its call then settle instead of slowing the
    next engine's timed call, which would bias the comparison against whoever runs second.
    """
    for fns in cells.values():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    out: dict[str, dict[str, list[float]]] = {c: {e: [] for e in fns} for c, fns in cells.items()}
    for _ in range(runs):
        for cell, fns in cells.items():
            for eng, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                out[cell][eng].append((time.perf_counter() - t0) * 1e3)
                time.sleep(gap_s)
    return out


@torch.inference_mode()
def compare_engines(
    engines: dict[str, Engine], embed_dim: int, prompt_counts: tuple[int, ...] = (1, 3, 10), runs: int = 20
) -> dict[str, Any]:
    """Median/p90 per cell and engine, plus each engine's ratio to the first one."""
    first = next(iter(engines.values()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 3, first.img_size, first.img_size), generator=g)
    emb = first.encode_image(x)
    cells: dict[str, dict[str, Callable[[], Any]]] = {
        "encode": {n: (lambda e=e: e.encode_image(x)) for n, e in engines.items()}
    }
    for k in prompt_counts:
        tok = torch.randn((k, embed_dim), generator=g)
        cells[f"decode K={k}"] = {n: (lambda e=e, t=tok: e.decode(emb, t)) for n, e in engines.items()}
    for k in prompt_counts:  # a frame as the node runs it: the encoder, then at once the decoder
        tok = torch.randn((k, embed_dim), generator=g)
        cells[f"frame K={k}"] = {
            n: (lambda e=e, t=tok: e.decode(e.encode_image(x), t)) for n, e in engines.items()
        }
    times = interleaved_times(cells, runs)
    names = list(engines)
    table: dict[str, Any] = {}
    for cell, per in times.items():
        row = {
            n: {"median_ms": statistics.median(v), "p90_ms": _p(v, 0.9), "runs": len(v)}
            for n, v in per.items()
        }
        base = row[names[0]]["median_ms"]
        for n in names:
            row[n]["speedup_vs_" + names[0]] = base / row[n]["median_ms"]
        table[cell] = row
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "engines": {n: e.describe() for n, e in engines.items()},
        "runs": runs,
        "results": table,
    }


def format_table(res: dict[str, Any]) -> str:
    names = list(res["engines"])
    head = (
        f"{'cell':<14}"
        + "".join(f"{n + ' ms':>16}" for n in names)
        + f"{'ratio ' + names[0] + '/' + names[-1]:>26}"
    )
    lines = [head, "-" * len(head)]
    for cell, row in res["results"].items():
        vals = "".join(f"{row[n]['median_ms']:>16.2f}" for n in names)
        ratio = row[names[0]]["median_ms"] / row[names[-1]]["median_ms"]
        lines.append(f"{cell:<14}{vals}{ratio:>25.2f}x")
    m = res["machine"]
    lines.append(
        f"medians of {res['runs']} interleaved rounds; {m['cores']} cores, torch threads {m['torch_threads']}"
    )
    return "\n".join(lines)
