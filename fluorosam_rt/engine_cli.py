"""``fluorosam-rt engine build|list|bench``: the engine cache and the back ends from the command line.

The CLI layer: it may load a model bundle, which `engines/` itself never does (engines take only
`fluorosam_rt.model`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from engines.base import EngineError
from engines.cache import EngineCache
from fluorosam_rt.model.sam import FluoroSAM


def load_engine_model(checkpoint: str | None, preset: str = "small", seed: int = 0) -> tuple[FluoroSAM, str]:
    """The model engines are built for: a checkpoint, the embedded default, or a random preset.

    Random weights are only good for timing and parity; the source string says so.
    """
    if checkpoint is not None or preset == "default":
        from fluorosam_rt.bundle import load_bundle

        b = load_bundle(checkpoint)
        return b.model.eval(), f"weights {b.source}"
    from fluorosam_rt.model.build import build_model
    from fluorosam_rt.model.config import golden_reduced, official_swin_l, small_realtime

    presets = {"small": small_realtime, "official": official_swin_l, "golden": golden_reduced}
    if preset not in presets:
        raise EngineError(f"unknown model preset {preset!r}; choose from default, {', '.join(presets)}")
    from fluorosam_rt.bundle import DEFAULT_MODEL_PATH

    if preset == "small" and DEFAULT_MODEL_PATH.is_file():
        return load_engine_model(None, "default")
    torch.manual_seed(seed)
    return build_model(presets[preset](), with_text_model=False).eval(), f"{preset} preset, random init"


def add_engine_parser(sub: argparse._SubParsersAction) -> None:
    eng = sub.add_parser("engine", help="build, list and benchmark inference engines")
    esub = eng.add_subparsers(dest="engine_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="model weights (default: embedded model, else random small)")
        p.add_argument(
            "--model", default="small", help="preset without --checkpoint: small, official, golden"
        )
        p.add_argument("--cache-dir", help="engine cache (default ~/.cache/fluorosam-rt/engines)")

    b = esub.add_parser("build", help="export ONNX graphs (and TensorRT plans where TensorRT exists)")
    common(b)
    b.add_argument("--backend", default="onnx", choices=["onnx", "trt"])
    b.add_argument("--precision", default="fp16", choices=["fp16", "fp32"], help="TensorRT precision")
    b.add_argument("--max-prompts", type=int, default=16, help="TensorRT profile's largest K")
    b.add_argument("--max-points", type=int, default=8, help="TensorRT profile's largest click count")
    b.set_defaults(func=cmd_engine_build)

    ls = esub.add_parser("list", help="show the engine cache")
    ls.add_argument("--cache-dir")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_engine_list)

    be = esub.add_parser("bench", help="CPU: torch against onnxruntime, side by side in one run")
    common(be)
    be.add_argument("--engines", default="torch,onnxruntime", help="comma list (first is the baseline)")
    be.add_argument("--prompts", default="1,3,10")
    be.add_argument("--runs", type=int, default=20)
    be.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0: defaults)")
    be.add_argument("--json", help="write results here")
    be.set_defaults(func=cmd_engine_bench)


def cmd_engine_build(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = EngineCache(args.cache_dir)
    model, source = load_engine_model(args.checkpoint, args.model)
    print(f"model {model.cfg.name} ({source}); cache {cache.root}")
    if args.backend == "onnx":
        from engines.onnx_graphs import ensure_onnx_graphs

        paths = ensure_onnx_graphs(model, cache)
    else:
        from engines.tensorrt_engine import ensure_trt_engines, probe_tensorrt
        from engines.trt_plan import TrtEnvironment

        why = probe_tensorrt()
        if why is not None:
            raise EngineError(f"cannot build TensorRT engines here: {why}")
        env = TrtEnvironment.detect()
        paths = ensure_trt_engines(model, cache, env, args.precision, args.max_prompts, args.max_points)
    for g, p in paths.items():
        print(f"{g:>15}: {p}")
    return 0


def cmd_engine_list(args: argparse.Namespace) -> int:
    cache = EngineCache(args.cache_dir)
    entries = cache.entries()
    if args.json:
        print(json.dumps({"cache": str(cache.root), "entries": entries}, indent=2))
        return 0
    print(f"engine cache {cache.root}: {len(entries)} entries")
    for e in entries:
        k = e["key"]
        where = (
            f" {k['gpu_name']} sm{k['compute_capability']} trt{k['trt_version']}"
            if k["kind"] == "trt"
            else ""
        )
        state = "ok" if e["intact"] else "MISSING/CORRUPT (will be rebuilt)"
        print(
            f"  {k['kind']:<4} {k['graph']:<15} model {k['model_hash'][:12]} {k['precision']}{where} "
            f"{e['bytes'] / 1e6:8.1f} MB  {e['created']}  {state}\n      {e['file']}"
        )
    return 0


def cmd_engine_bench(args: argparse.Namespace) -> int:
    from engines.bench import compare_engines, format_table
    from engines.select import EngineOptions, EngineSettings, create_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, source = load_engine_model(args.checkpoint, args.model)
    opts = EngineOptions(threads=args.threads, cache_dir=args.cache_dir)
    engines = {
        n: create_engine(EngineSettings(n, strict=True, options=opts), model, cuda=False)
        for n in args.engines.split(",")
    }
    counts = tuple(int(k) for k in args.prompts.split(","))
    print(f"model {model.cfg.name} ({source}), input {model.img_size} px", file=sys.stderr)
    res = compare_engines(engines, model.cfg.prompt_encoder.embed_dim, counts, args.runs)
    res["model"] = {"name": model.cfg.name, "source": source, "img_size": model.img_size}
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
