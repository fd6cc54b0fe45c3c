"""Per-frame latency of the model itself: image encode and batched K-prompt decode.

Answers two questions on the machine at hand: how long one frame takes for K = 1, 3, 10
prompts, and whether the image is really encoded once (a frame with 10 prompts must not cost
10 encodes). The real-time models (the embedded one, v2 variants) run through the node's own
engine (``--engine torch|onnxruntime``), interleaved round by round in one process, so their
ratios are meaningful even on a noisy machine; end to end (raw 1024 x 1024 uint16 frame -> full
size masks through the Predictor) reports p99 too.
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


def _pct(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _stats(samples: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = samples
    s = sorted(wall)
    return {
        "median_ms": statistics.median(s),
        "p90_ms": _pct(s, 0.9),
        "p99_ms": _pct(s, 0.99),
        "min_ms": s[0],
        "max_ms": s[-1],
        "cpu_median_ms": statistics.median(cpu),
        "cpu_p99_ms": _pct(sorted(cpu), 0.99),
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


def _v2_model(spec: str):
    """``v2[:SIZE[:STRIDE[:BLOCKS]]]``: the v2 architecture (realtime_v2), random init, for timing."""
    from .model.build import build_model
    from .model.config import realtime_v2

    try:
        args = [int(v) for v in spec.split(":")[1:]]
    except ValueError as exc:
        raise SystemExit(f"bad model spec {spec!r}: use v2[:SIZE[:STRIDE[:BLOCKS]]]") from exc
    if len(args) > 3:
        raise SystemExit(f"bad model spec {spec!r}: use v2[:SIZE[:STRIDE[:BLOCKS]]]")
    torch.manual_seed(0)
    return build_model(realtime_v2(*args)), "random init (timing only)"


def _official_model():
    from .model.build import build_model
    from .model.config import official_swin_l

    torch.manual_seed(0)
    # The CLIP tower is off the frame path; it is not built for timing.
    return build_model(official_swin_l(), with_text_model=False), "random init (timing only)"


def _engine(model: torch.nn.Module, name: str, threads: int, cache_dir: str | None):
    """The node's own frame path: TorchEngine (BatchNorm folded where the encoder allows) or ORT."""
    if name == "onnxruntime":
        from engines.cache import EngineCache
        from engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model, EngineCache(cache_dir), intra_op_threads=threads)
    if name == "torch":
        from engines.torch_engine import TorchEngine

        return TorchEngine(model)
    raise SystemExit(f"unknown engine {name!r}; use torch or onnxruntime")


def _predictor(model: torch.nn.Module, engine: Any, k: int) -> tuple[Any, list[Any]]:
    """A Predictor whose prompt cache already holds k prompts (text encoding is off the frame path)."""
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
    pred = Predictor(model, _NoText(), cache=cache, engine=engine)  # type: ignore[arg-type]
    return pred, [Prompt(t) for t in texts]


def _interleaved(
    cells: dict[str, dict[str, Callable[[], Any]]], runs: dict[str, int], warmup: int
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Wall and CPU ms per cell and model; each round runs every model once per cell, in turn.

    Interleaving makes a noisy, shared machine slow all models alike, so side-by-side ratios
    stay meaningful even when the absolute numbers drift.
    """
    for fns in cells.values():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    out = {c: {m: ([], []) for m in fns} for c, fns in cells.items()}
    for r in range(max(runs.values())):
        for cell, fns in cells.items():
            if r >= runs[cell]:
                continue
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                out[cell][name][0].append((time.perf_counter() - t0) * 1e3)
                out[cell][name][1].append((time.process_time() - c0) * 1e3)
    return out


@torch.inference_mode()
def bench_side_by_side(
    models: dict[str, tuple[torch.nn.Module, str]],
    prompt_counts: list[int],
    e2e_counts: list[int],
    runs: int,
    e2e_runs: int,
    engine: str = "torch",
    threads: int = 0,
    cache_dir: str | None = None,
    warmup: int = 3,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encode, K-prompt decode and raw-frame -> masks for several models, interleaved.

    End to end is the Predictor on a 1024 x 1024 uint16 frame: preprocessing, one encode, one
    batched decode, full-size masks (no text encoding, no publishing).
    """
    rng = np.random.default_rng(0)
    frame = (rng.random((1024, 1024)) * 4000).astype(np.uint16)
    cells: dict[str, dict[str, Callable[[], Any]]] = {"encode": {}}
    cells.update({f"decode {k}": {} for k in prompt_counts})
    cells.update({f"e2e {k}": {} for k in e2e_counts})
    info: dict[str, dict[str, Any]] = {}
    for name, (model, weights) in models.items():
        model.eval()
        eng = _engine(model, engine, threads, cache_dir)
        s = model.img_size
        x = torch.randn(1, 3, s, s)
        emb = eng.encode_image(x)
        cells["encode"][name] = lambda e=eng, x=x: e.encode_image(x)
        for k in prompt_counts:
            tok = torch.randn(k, model.cfg.prompt_encoder.embed_dim)
            cells[f"decode {k}"][name] = lambda e=eng, t=tok, emb=emb: e.decode(emb, t)
        for k in e2e_counts:
            pred, prompts = _predictor(model, eng, k)
            cells[f"e2e {k}"][name] = lambda p=pred, ps=prompts: (p.set_image(frame), p.predict(ps))
        info[name] = {
            "img_size": s,
            "low_res_size": model.low_res_size,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "weights_mb_fp32": sum(
                t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()
            )
            / 1e6,
            "weights": weights,
            "engine": engine,
            "config": model.cfg.name,
        }
    runs_per = {c: (e2e_runs if c.startswith("e2e") else runs) for c in cells}
    times = _interleaved(cells, runs_per, warmup)
    results: dict[str, Any] = {}
    e2e: dict[str, Any] = {}
    for name, meta in info.items():
        r = dict(meta)
        r["encode"] = _stats(times["encode"][name])
        r["decode"] = {str(k): _stats(times[f"decode {k}"][name]) for k in prompt_counts}
        enc, enc_cpu = r["encode"]["median_ms"], r["encode"]["cpu_median_ms"]
        r["frame_ms"] = {k: enc + v["median_ms"] for k, v in r["decode"].items()}
        r["frame_cpu_ms"] = {k: enc_cpu + v["cpu_median_ms"] for k, v in r["decode"].items()}
        if "1" in r["frame_ms"] and "10" in r["frame_ms"]:
            r["ratio_10_vs_1"] = r["frame_ms"]["10"] / r["frame_ms"]["1"]
            r["ratio_10_vs_1_cpu"] = r["frame_cpu_ms"]["10"] / r["frame_cpu_ms"]["1"]
        results[name] = r
        e2e[name] = {
            str(k): {"frame": "1024x1024 uint16", "prompts": k, **_stats(times[f"e2e {k}"][name])}
            for k in e2e_counts
        }
    return results, e2e


@torch.inference_mode()
def bench_one(model: torch.nn.Module, prompt_counts: list[int], runs: int, warmup: int) -> dict[str, Any]:
    """Sequential timing of one model in PyTorch eager (used for the slow official model)."""
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


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    load = results["load_average_at_start"][0]
    table = Table(
        title=f"Model latency, median ms ({m['cpu']}, {m['threads']} threads, engine {m['engine']}, "
        f"load {load:.1f})"
    )
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
                f"{name} ({r['img_size']} px -> {r.get('low_res_size', '?')} px logits)"
                if clock == "wall"
                else "",
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
    for name, per_k in results.get("end_to_end", {}).items():
        for e in per_k.values():
            print(
                f"{name}: raw {e['frame']} frame -> {e['prompts']} full-size masks: "
                f"wall median {e['median_ms']:.1f} / p90 {e['p90_ms']:.1f} / p99 {e['p99_ms']:.1f} / max "
                f"{e['max_ms']:.1f} ms; CPU median {e['cpu_median_ms']:.1f} / p99 {e['cpu_p99_ms']:.1f} ms "
                f"({e['runs']} runs)"
            )


def run_model_benchmark(args: argparse.Namespace) -> int:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    counts = [int(k) for k in args.prompts.split(",") if k]
    e2e_counts = [int(k) for k in args.e2e_prompts.split(",") if k]
    engine = getattr(args, "engine", "torch")
    results: dict[str, Any] = {
        "load_average_at_start": list(os.getloadavg()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
            "engine": engine,
        },
        "models": {},
        "end_to_end": {},
    }
    realtime: dict[str, tuple[torch.nn.Module, str]] = {}
    official = False
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "small":
            model, weights = _small_model(args.checkpoint, args.random_small)
            realtime[f"small ({model.cfg.name})"] = (model, weights)
        elif name == "v2" or name.startswith("v2:"):
            model, weights = _v2_model(name)
            realtime[name] = (model, weights)
        elif name == "official":
            official = True
        else:
            raise SystemExit(f"unknown model {name!r}; use small, v2[:SIZE[:STRIDE]] or official")
    if realtime:
        # ORT threads follow --threads only when given (0: ORT's own choice, as the node's default)
        res, e2e = bench_side_by_side(
            realtime, counts, e2e_counts, args.runs, args.e2e_runs, engine, args.threads, args.cache_dir
        )
        results["models"].update(res)
        results["end_to_end"].update(e2e)
    if official:
        model, weights = _official_model()
        r = bench_one(model, counts, args.official_runs, warmup=1)
        r["weights"] = weights
        r["engine"] = "torch (eager)"
        results["models"][model.cfg.name] = r
        del model
    results["load_average_at_end"] = list(os.getloadavg())
    _print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0
