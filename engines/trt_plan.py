"""TensorRT build and binding plans, as plain data: everything about TensorRT that needs no GPU.

What each graph's tensors are called, which shapes the optimisation profiles cover, how big the
preallocated device buffers must be and which cache key an engine gets are all decided here,
so they are unit-tested on any machine. tensorrt_engine.py only feeds these plans to TensorRT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import GraphDims
from .cache import EngineKey
from .export import graph_io

TRT_PRECISIONS = ("fp16", "fp32")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileShape:
    name: str
    min: Shape
    opt: Shape
    max: Shape


def profile_shapes(
    dims: GraphDims, graph: str, max_prompts: int, max_points: int = 8, opt_prompts: int = 3
) -> list[ProfileShape]:
    """One optimisation profile over K (and N): min 1, opt a typical frame, max the cap.

    TensorRT picks kernels for ``opt`` and guarantees correctness from ``min`` to ``max``; a
    node that decodes 3 prompts most of the time should be tuned for 3.
    """
    if max_prompts < 1 or max_points < 1:
        raise ValueError("max_prompts and max_points must be >= 1")
    opt_k = max(1, min(opt_prompts, max_prompts))
    opt_n = min(2, max_points)
    inputs, _ = graph_io(graph)
    lo, mid, hi = (
        dims.shapes(graph, 1, 1),
        dims.shapes(graph, opt_k, opt_n),
        dims.shapes(graph, max_prompts, max_points),
    )
    return [ProfileShape(name, lo[name], mid[name], hi[name]) for name in inputs]


@dataclass(frozen=True)
class Binding:
    name: str
    is_input: bool
    max_shape: Shape

    @property
    def max_elements(self) -> int:
        return math.prod(self.max_shape)

    @property
    def nbytes(self) -> int:
        return 4 * self.max_elements  # every graph tensor is float32 at the boundary


def binding_plan(dims: GraphDims, graph: str, max_prompts: int, max_points: int = 8) -> list[Binding]:
    """The device buffers to allocate once: each I/O tensor at its largest profile shape.

    A call with K < max uses the first K*... elements of the same buffer (viewed with the
    call's shape, so it stays contiguous); addresses never change after start-up.
    """
    inputs, outputs = graph_io(graph)
    hi = dims.shapes(graph, max_prompts, max_points)
    return [Binding(n, True, hi[n]) for n in inputs] + [Binding(n, False, hi[n]) for n in outputs]


def call_shapes(
    dims: GraphDims, graph: str, k: int, n: int, max_prompts: int, max_points: int
) -> dict[str, Shape]:
    """Shapes for one call, refusing those the profile does not cover (TensorRT would fail)."""
    if not 1 <= k <= max_prompts:
        raise ValueError(
            f"{k} prompts is outside the engine's profile 1..{max_prompts}; rebuild with --max-prompts"
        )
    if graph == "decoder_points" and not 1 <= n <= max_points:
        raise ValueError(f"{n} clicks is outside the engine's profile 1..{max_points}")
    return dims.shapes(graph, k, n)


@dataclass(frozen=True)
class TrtEnvironment:
    """What a TensorRT plan is tied to besides the weights."""

    gpu_name: str
    compute_capability: str
    trt_version: str

    @classmethod
    def detect(cls) -> TrtEnvironment:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        major, minor = torch.cuda.get_device_capability()
        return cls(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__)


def trt_key(
    env: TrtEnvironment, graph: str, mhash: str, precision: str, max_prompts: int, max_points: int
) -> EngineKey:
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {TRT_PRECISIONS}, not {precision!r}")
    return EngineKey(
        kind="trt",
        graph=graph,
        model_hash=mhash,
        precision=precision,
        gpu_name=env.gpu_name,
        compute_capability=env.compute_capability,
        trt_version=env.trt_version,
        max_prompts=max_prompts if graph != "encoder" else 0,
        max_points=max_points if graph == "decoder_points" else 0,
    )


def timing_cache_name(env: TrtEnvironment) -> str:
    """Timing caches are per GPU model and TensorRT version, shared across models."""
    from .cache import _slug

    return (
        f"timing-{_slug(env.gpu_name)}-sm{env.compute_capability.replace('.', '')}-trt{env.trt_version}.cache"
    )
