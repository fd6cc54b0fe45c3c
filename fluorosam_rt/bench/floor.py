"""The compute floor: the model's FLOPs per frame over this CPU's sustained matmul rate.

Both are measured in the same run as the latencies they are compared with, so "measured time
over the floor" says how far the node is from what the arithmetic alone would cost here, load
included. FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions, 2 per
multiply-add); elementwise work is not counted, so the floor is a lower bound.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..model.sam import FluoroSAM


@torch.inference_mode()
def model_flops(model: FluoroSAM, prompt_counts: Sequence[int]) -> dict[int, dict[str, float]]:
    """FLOPs of one frame's image encode and K-prompt decode, per K."""
    model.eval()
    s = model.img_size
    x = torch.zeros(1, 3, s, s)
    with FlopCounterMode(display=False) as fc:
        emb = model.encode_image(x)
    encode = float(fc.get_total_flops())
    out = {}
    for k in prompt_counts:
        tokens = torch.zeros(k, model.cfg.prompt_encoder.embed_dim)
        with FlopCounterMode(display=False) as fc:
            model.decode(emb, tokens)
        decode = float(fc.get_total_flops())
        out[int(k)] = {
            "encode_gflops": encode / 1e9,
            "decode_gflops": decode / 1e9,
            "gflops": (encode + decode) / 1e9,
        }
    return out


@torch.inference_mode()
def matmul_gflops(seconds: float = 2.0, n: int = 512) -> dict[str, float]:
    """fp32 GEMM rate with torch's threads, in 0.1 s slices over ``seconds``.

    ``best_slice_gflops`` is the rate sustained over the best 0.1 s (hundreds of GEMMs), the
    closest this shared machine gets to its capability; ``sustained_gflops`` averages the whole
    run and so includes whatever else the machine was doing. n = 512 is the size of the model's
    larger layers.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    flop = 2.0 * n**3
    slices, total_flop, t_start = [], 0.0, time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.1:
            torch.mm(a, b)
            k += 1
        dt = time.perf_counter() - t0
        slices.append(k * flop / dt / 1e9)
        total_flop += k * flop
    total = time.perf_counter() - t_start
    slices.sort()
    return {
        "sustained_gflops": total_flop / total / 1e9,
        "median_slice_gflops": slices[len(slices) // 2],
        "best_slice_gflops": slices[-1],
        "n": n,
        "seconds": total,
        "threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def text_flops(text_encoder: Any, model: FluoroSAM) -> float:
    """GFLOPs to turn one prompt into its token: the text encoder plus the prompt MLP."""
    with FlopCounterMode(display=False) as fc:
        model.text_tokens(text_encoder.encode(["left lung"]))
    return float(fc.get_total_flops()) / 1e9


def floor_report(
    model: FluoroSAM, prompt_counts: Sequence[int], seconds: float = 2.0, text_encoder: Any = None
) -> dict[str, object]:
    """The JSON ``floor`` object: per-K FLOPs and floor, and the headline for K = 3 (or the first K).

    With the text encoder given, it also counts the naive baseline's FLOPs per frame (image
    once, then text + a one-prompt decode per prompt), whose ratio to the node's is the most a
    speed-up over the baseline can come from doing less arithmetic.
    """
    from .baseline import on_worker_thread

    flops = model_flops(model, prompt_counts)
    if text_encoder is not None:
        per_text = text_flops(text_encoder, model)
        one = model_flops(model, [1])[1]
        for k, v in flops.items():
            v["text_gflops_per_prompt"] = per_text
            v["baseline_gflops"] = one["encode_gflops"] + k * (per_text + one["decode_gflops"])
            v["baseline_over_node_flops"] = v["baseline_gflops"] / v["gflops"]
    mm = on_worker_thread(lambda: matmul_gflops(seconds))
    # The floor is a lower bound on time, so it uses the best rate this CPU sustained for a
    # 0.1 s slice in this run; the whole-run average (load included) is reported next to it.
    rate = mm["best_slice_gflops"]
    per_k = {str(k): {**v, "floor_ms": v["gflops"] / rate * 1e3} for k, v in flops.items()}
    head = per_k.get("3") or next(iter(per_k.values()))
    return {
        "model_gflops_per_frame": head["gflops"],
        "cpu_gflops": rate,
        "floor_ms": head["floor_ms"],
        "headline_prompts": 3 if "3" in per_k else int(next(iter(per_k))),
        "matmul": mm,
        "per_prompts": per_k,
    }
