"""GPU check for the lent H200: parity of the CUDA back ends and per-frame latency, one run.

For the official Swin-L architecture, the small default model and the v2 model (random weights:
timing and parity do not need trained ones) it compares, in the same process: fp32 eager, fp16 and bf16
eager, torch.compile (fp16) and torch.compile + CUDA graphs (fp16), and TensorRT where it
imports. Parity is against CPU fp32 PyTorch; latency is median and p99 of CUDA-event timings
after warm-up, for image encode and for decoding 1, 3 and 10 prompts. Results go to one JSON.

A wall-clock budget keeps the run inside the lease: variants that would start after it are
recorded as skipped rather than silently missing. ``--device cpu`` runs the same code on a CPU
(timed with perf_counter) so the script itself is tested where no GPU exists.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import ModelConfig, official_swin_l, realtime_v2, small_realtime
from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, GraphDims

# Mask agreement with CPU fp32 that each precision must reach (fraction of low-res pixels).
AGREEMENT_MIN = {"fp32": 0.999, "fp16": 0.98, "bf16": 0.97}
# --models names. v2's image embedding is 128 + 1024 channels wide (the high-res features are
# packed into it), so its encoder output and decoder input are not the prompt width.
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "small": small_realtime,
    "v2": realtime_v2,
    "official": official_swin_l,
    "tiny": lambda: small_realtime(128),
    "v2-tiny": lambda: realtime_v2(128),
}


def timer(device: torch.device, fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    """Median / p99 / mean in ms; CUDA events on a GPU so the GPU's time is what is measured."""
    for _ in range(warmup):
        fn()
    ms: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    s = sorted(ms)
    return {
        "median_ms": statistics.median(s),
        "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
        "mean_ms": statistics.fmean(s),
        "runs": len(s),
    }


def _variants(device: torch.device, compile_backend: str, with_compile: bool) -> list[tuple[str, str, dict]]:
    """(label, precision, TorchCompiledEngine kwargs); 'eager-fp32' is the plain TorchEngine."""
    out: list[tuple[str, str, dict]] = [("eager-fp32", "fp32", {})]
    cuda = device.type == "cuda"
    if cuda:
        out += [
            ("eager-fp16", "fp16", {"compile": False, "cuda_graphs": False}),
            ("eager-bf16", "bf16", {"compile": False, "cuda_graphs": False}),
        ]
    prec = "fp16" if cuda else "fp32"
    kw = {"compile": with_compile, "compile_backend": compile_backend, "cuda_graphs": False}
    out.append((f"{'compiled' if with_compile else 'padded'}-{prec}", prec, kw))
    if cuda:  # same engine object, graphs switched on: no second compilation
        out.append((f"{'compiled' if with_compile else 'padded'}-{prec}+cudagraphs", prec, {"reuse": True}))
    return out


def _parity(engine: Engine, ref: dict[str, torch.Tensor], precision: str) -> dict[str, Any]:
    emb = engine.encode_image(ref["x"])
    if tuple(emb.shape) != tuple(ref["emb"].shape):
        raise AssertionError(f"embedding {tuple(emb.shape)} != the model's {tuple(ref['emb'].shape)}")
    low, iou = engine.decode(emb, ref["tokens"], ref["coords"], ref["labels"])
    low2, _ = engine.decode(emb, ref["tokens"])
    low, iou, low2, emb = (t.float().cpu() for t in (low, iou, low2, emb))
    agree = min(
        float(((low > 0) == (ref["low"] > 0)).float().mean()),
        float(((low2 > 0) == (ref["low_text"] > 0)).float().mean()),
    )
    return {
        "max_abs_embedding": float((emb - ref["emb"]).abs().max()),
        "max_abs_logits": float(max((low - ref["low"]).abs().max(), (low2 - ref["low_text"]).abs().max())),
        "max_abs_iou": float((iou - ref["iou"]).abs().max()),
        "mask_agreement": agree,
        "agreement_min": AGREEMENT_MIN[precision],
        "ok": agree >= AGREEMENT_MIN[precision],
    }


@torch.inference_mode()
def _reference(model: FluoroSAM, k: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dims = GraphDims.of(model)
    s = dims.img_size
    x = torch.randn((1, 3, s, s), generator=g)
    tokens = torch.randn(dims.shapes("decoder", k)["tokens"], generator=g)  # prompt width
    coords = torch.rand((k, 2, 2), generator=g) * (s - 1)
    labels = torch.tensor([[1.0, 0.0]] * k)
    emb = model.encode_image(x)
    if tuple(emb.shape) != dims.shapes("encoder")["embedding"]:  # embedding_channels wide
        raise AssertionError(f"{model.cfg.name}: embedding {tuple(emb.shape)} != {dims.shapes('encoder')}")
    low, iou = model.decode(emb, tokens, coords.double(), labels)
    low_text, _ = model.decode(emb, tokens)
    return {
        "x": x,
        "tokens": tokens,
        "coords": coords,
        "labels": labels,
        "emb": emb,
        "low": low,
        "iou": iou,
        "low_text": low_text,
    }


def check_model(
    name: str, model: FluoroSAM, args: argparse.Namespace, deadline: float, device: torch.device
) -> dict[str, Any]:
    from .compiled_engine import TorchCompiledEngine
    from .torch_engine import TorchEngine

    ref = _reference(model)
    counts = [int(k) for k in args.prompts.split(",")]
    dims = GraphDims.of(model)
    s = dims.img_size
    x = torch.randn((1, 3, s, s), device=device)
    res: dict[str, Any] = {
        "config": model.cfg.name,
        "img_size": s,
        "embedding": list(dims.shapes("encoder")["embedding"]),
        "low_res_size": dims.low_res_size,
        "variants": {},
    }
    engine: Engine | None = None
    for label, precision, kw in _variants(device, args.compile_backend, not args.no_compile):
        if time.monotonic() > deadline:
            res["variants"][label] = {"skipped": "time budget exhausted"}
            continue
        t0 = time.monotonic()
        try:
            if kw.get("reuse") and isinstance(engine, TorchCompiledEngine):
                engine.cuda_graphs = True
            else:
                engine = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if label == "eager-fp32":
                    engine = TorchEngine(model.to(device), device)
                else:
                    engine = TorchCompiledEngine(model, device, precision=precision, **kw)
            assert engine is not None
            out: dict[str, Any] = {"parity_vs_cpu_fp32": _parity(engine, ref, precision)}
            out["encode"] = timer(device, lambda e=engine: e.encode_image(x), args.runs, args.warmup)
            emb = engine.encode_image(x)
            out["decode"] = {}
            for k in counts:
                tok = torch.randn(dims.shapes("decoder", k)["tokens"], device=device)
                out["decode"][str(k)] = timer(
                    device, lambda e=engine, t=tok, m=emb: e.decode(m, t), args.runs, args.warmup
                )
            out["frame_median_ms"] = {
                k: out["encode"]["median_ms"] + v["median_ms"] for k, v in out["decode"].items()
            }
            out["setup_and_timing_s"] = time.monotonic() - t0
            out["engine"] = engine.describe()
        except Exception as exc:  # recorded, so one failing variant does not lose the others
            out = {"error": f"{type(exc).__name__}: {exc}"}
        res["variants"][label] = out
        model.to("cpu")
    res["trt"] = _trt_section(model, device, ref)
    return res


def _trt_section(model: FluoroSAM, device: torch.device, ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    from .tensorrt_engine import probe_tensorrt

    why = probe_tensorrt()
    if why is not None:
        return {"status": "not run", "reason": why}
    try:
        import tempfile

        from .cache import EngineCache
        from .tensorrt_engine import TensorRTEngine

        with tempfile.TemporaryDirectory() as d:
            eng = TensorRTEngine(model, EngineCache(d), precision="fp16")
            return {"status": "ran", "parity_vs_cpu_fp32": _parity(eng, ref, "fp16")}
    except Exception as exc:
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--models",
        default="small,v2,official",
        help="comma list: small, v2, official; tiny and v2-tiny (128 px) for dry runs",
    )
    p.add_argument("--prompts", default="1,3,10")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no variant after this many seconds")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-compile", action="store_true", help="padded/bucketed path without torch.compile")
    p.add_argument("--out", default="engines/results/gpu_check.json")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in PRESETS]
    if unknown:
        print(f"gpu_check: unknown model(s) {unknown}; choose from {sorted(PRESETS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --device cpu",
            file=sys.stderr,
        )
        return 3
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "settings": vars(args),
        "timing": "CUDA events after warm-up" if device.type == "cuda" else "perf_counter after warm-up",
        "weights": "random init (timing and parity only)",
        "models": {},
    }
    for name in names:
        torch.manual_seed(0)
        model = build_model(PRESETS[name](), with_text_model=False).eval()
        report["models"][name] = check_model(name, model, args, deadline, device)
        del model
    report["wall_s"] = time.monotonic() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    for name, r in report["models"].items():
        print(f"== {name} ({r['img_size']} px)")
        for label, v in r["variants"].items():
            if "encode" not in v:
                print(f"  {label:<28} {v.get('skipped') or v.get('error')}")
                continue
            dec = " ".join(f"K={k}:{d['median_ms']:.2f}/{d['p99_ms']:.2f}" for k, d in v["decode"].items())
            par = v["parity_vs_cpu_fp32"]
            print(
                f"  {label:<28} enc {v['encode']['median_ms']:.2f}/{v['encode']['p99_ms']:.2f} ms"
                f"  dec {dec}  "
                f"agree {par['mask_agreement']:.4f} {'ok' if par['ok'] else 'FAIL'}"
            )
        print(f"  trt: {r['trt']}")
    print(f"wrote {out} in {report['wall_s']:.0f} s")
    failed = [
        (n, label)
        for n, r in report["models"].items()
        for label, v in r["variants"].items()
        if "error" in v or ("parity_vs_cpu_fp32" in v and not v["parity_vs_cpu_fp32"]["ok"])
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
