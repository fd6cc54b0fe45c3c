"""Per-frame latency of the model itself: image encode and batched K-prompt decode.

Answers two questions on the machine at hand: how long one frame takes for K = 1, 3, 10
prompts, and whether the image is really encoded once (a frame with 10 prompts must not cost
10 encodes). Numbers are medians of repeated runs after warm-up, measured side by side in one
process, so ratios are meaningful even on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds per run.

    CPU time is reported beside wall time because on a shared machine the wall clock mostly
    measures other people's jobs; with one thread, CPU time is the cost of the work itself.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def _stats(samples: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = samples
    s = sorted(wall)
    return {
        "median_ms": statistics.median(s),
        "p90_ms": s[min(len(s) - 1, round(0.9 * (len(s) - 1)))],
        "min_ms": s[0],
        "max_ms": s[-1],
        "cpu_median_ms": statistics.median(cpu),
        "runs": len(s),
    }


def _small_model(checkpoint: str | None, random_size: int | None = None):
    """The embedded model (or a given checkpoint); random_size times the architecture instead."""
    from .bundle import DEFAULT_MODEL_PATH
    from .checkpoint import load_native
    from .model.build import build_model
    from .model.config import small_realtime

    path = checkpoint or (str(DEFAULT_MODEL_PATH) if DEFAULT_MODEL_PATH.is_file() else None)
    if path and random_size is None:
        return load_native(path).model, f"weights {path}"
    torch.manual_seed(0)
    return build_model(small_realtime(random_size or 256)), "random init (timing only)"


def _official_model():
    from .model.build import build_model
    from .model.config import official_swin_l

    torch.manual_seed(0)
    # The CLIP tower is off the frame path; it is not built for timing.
    return build_model(official_swin_l(), with_text_model=False), "random init (timing only)"


@torch.inference_mode()
def bench_one(model: torch.nn.Module, prompt_counts: list[int], runs: int, warmup: int) -> dict[str, Any]:
    from tqdm import tqdm

    model.eval()
    s = model.img_size
    c = model.cfg.prompt_encoder.embed_dim
    x = torch.randn(1, 3, s, s)
    res: dict[str, Any] = {"img_size": s, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    bar = tqdm(total=1 + len(prompt_counts), desc=f"{model.cfg.name}", leave=False)
    res["encode"] = _stats(_time(lambda: model.encode_image(x), runs, warmup))
    bar.update()
    emb = model.encode_image(x)
    res["decode"] = {}
    for k in prompt_counts:
        tokens = torch.randn(k, c)
        res["decode"][str(k)] = _stats(_time(lambda t=tokens: model.decode(emb, t), runs, warmup))
        bar.update()
    bar.close()
    enc = res["encode"]["median_ms"]
    res["frame_ms"] = {k: enc + v["median_ms"] for k, v in res["decode"].items()}
    enc_cpu = res["encode"]["cpu_median_ms"]
    res["frame_cpu_ms"] = {k: enc_cpu + v["cpu_median_ms"] for k, v in res["decode"].items()}
    if "1" in res["frame_ms"] and "10" in res["frame_ms"]:
        res["ratio_10_vs_1"] = res["frame_ms"]["10"] / res["frame_ms"]["1"]
        res["ratio_10_vs_1_cpu"] = res["frame_cpu_ms"]["10"] / res["frame_cpu_ms"]["1"]
    return res


@torch.inference_mode()
def bench_end_to_end(model: torch.nn.Module, k: int, runs: int, warmup: int) -> dict[str, Any]:
    """Raw uint16 frame -> K masks at full size through the Predictor (no text encoding)."""
    from .predictor import Predictor
    from .prompts import Prompt, PromptCache

    class _NoText:  # the cache is pre-filled, so the text encoder must never run
        def identity(self) -> str:
            return "bench"

        def encode(self, texts):  # pragma: no cover - would be a benchmark bug
            raise AssertionError("text encoding on the frame path")

    cache = PromptCache("bench")
    texts = [f"structure {i}" for i in range(k)]
    cache.encode(texts, lambda t: torch.randn(len(t), model.cfg.prompt_encoder.embed_dim))
    pred = Predictor(model, _NoText(), cache=cache)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    frame = (rng.random((1024, 1024)) * 4000).astype(np.uint16)
    prompts = [Prompt(t) for t in texts]

    def run() -> None:
        pred.set_image(frame)
        pred.predict(prompts)

    return {"frame": "1024x1024 uint16", "prompts": k, **_stats(_time(run, runs, warmup))}


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    load = results["load_average_at_start"][0]
    table = Table(title=f"Model latency, median ms ({m['cpu']}, {m['threads']} threads, load {load:.1f})")
    cols = (
        "model",
        "clock",
        "encode ms",
        "decode K=1",
        "K=3",
        "K=10",
        "frame K=1",
        "K=3",
        "K=10",
        "K=10/K=1",
    )
    for col in cols:
        table.add_column(col, justify="right" if col not in ("model", "clock") else "left")
    for name, r in results["models"].items():
        d = r["decode"]
        for clock, key, frames, ratio in (
            ("wall", "median_ms", r["frame_ms"], r.get("ratio_10_vs_1")),
            ("cpu", "cpu_median_ms", r["frame_cpu_ms"], r.get("ratio_10_vs_1_cpu")),
        ):

            def cell(k: str, d: dict[str, Any] = d, key: str = key) -> str:
                return f"{d[k][key]:.1f}" if k in d else "-"

            def fcell(k: str, frames: dict[str, float] = frames) -> str:
                return f"{frames[k]:.1f}" if k in frames else "-"

            table.add_row(
                f"{name} ({r['img_size']} px)" if clock == "wall" else "",
                clock,
                f"{r['encode'][key]:.1f}",
                cell("1"),
                cell("3"),
                cell("10"),
                fcell("1"),
                fcell("3"),
                fcell("10"),
                f"{ratio:.2f}x" if ratio is not None else "-",
            )
    Console(width=160).print(table)
    for name, e in results.get("end_to_end", {}).items():
        print(
            f"{name}: raw {e['frame']} frame -> {e['prompts']} full-size masks: "
            f"median {e['median_ms']:.1f} ms wall, {e['cpu_median_ms']:.1f} ms CPU, "
            f"p90 {e['p90_ms']:.1f} ms ({e['runs']} runs)"
        )


def run_model_benchmark(args: argparse.Namespace) -> int:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    counts = [int(k) for k in args.prompts.split(",") if k]
    results: dict[str, Any] = {
        "load_average_at_start": list(os.getloadavg()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
        },
        "models": {},
        "end_to_end": {},
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "small":
            model, weights = _small_model(args.checkpoint, args.random_small)
            r = bench_one(model, counts, args.runs, warmup=5)
            results["end_to_end"][name] = bench_end_to_end(model, 3, args.runs, warmup=5)
        elif name == "official":
            model, weights = _official_model()
            r = bench_one(model, counts, args.official_runs, warmup=1)
        else:
            raise SystemExit(f"unknown model {name!r}; use small or official")
        r["weights"] = weights
        results["models"][model.cfg.name] = r
        del model
    _print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
