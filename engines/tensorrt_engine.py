"""TensorRT back end (``trt`` extra): plans built from the verified ONNX graphs.

NOT EXECUTED IN THIS PROJECT YET. No machine here can install TensorRT's builder (NVIDIA's
package index is unreachable, and the lent GPU image has no TensorRT). This module is written
against the TensorRT 10 Python API; everything around it that needs no TensorRT (keys, profile
shapes, binding plans, cache decisions, error paths) is tested, and its end-to-end test skips
where ``tensorrt`` does not import.

Flow: ONNX graph (from the cache) -> builder with one optimisation profile over K (and clicks),
fp16 if asked, a persistent timing cache -> serialised plan stored under a key holding GPU name,
compute capability, TensorRT version, precision and model hash. A plan whose key differs from
this machine's is rebuilt, never deserialised. At start-up every I/O tensor gets a device
buffer at its largest profile shape; calls only set input shapes and enqueue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, EngineError
from .cache import EngineCache, model_hash
from .export import GRAPHS
from .onnx_graphs import ensure_onnx_graphs
from .trt_plan import (
    Binding,
    GraphDims,
    ProfileShape,
    TrtEnvironment,
    binding_plan,
    call_shapes,
    profile_shapes,
    timing_cache_name,
    trt_key,
)

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 4 << 30
BuildFn = Callable[[Path, list[ProfileShape], str, Path], bytes]


def probe_tensorrt() -> str | None:
    """None if a TensorRT engine could load here, else precisely why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt package does not import ({exc}); install the 'trt' extra"
    if not torch.cuda.is_available():
        return "tensorrt imports, but torch.cuda.is_available() is False (no CUDA device or driver)"
    return None


def build_serialized_engine(
    onnx_path: Path, profiles: list[ProfileShape], precision: str, timing_cache: Path
) -> bytes:
    """ONNX file -> serialised TensorRT plan, reading and updating the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise EngineError(
                "fp16 requested, but this GPU has no fast fp16 path; build with --precision fp32"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    tcache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(tcache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def ensure_trt_engines(
    model: FluoroSAM,
    cache: EngineCache,
    env: TrtEnvironment,
    precision: str = "fp16",
    max_prompts: int = 16,
    max_points: int = 8,
    build_fn: BuildFn = build_serialized_engine,
    graphs: tuple[str, ...] = GRAPHS,
) -> dict[str, Path]:
    """Cached plans for exactly this model, GPU, TensorRT version and precision; builds misses.

    A cached plan with any differing key field is never returned, so it is never deserialised;
    the log says which fields differed, which is what a user needs to know after a GPU swap.
    """
    mhash = model_hash(model)
    dims = GraphDims.of(model)
    out: dict[str, Path] = {}
    onnx_paths: dict[str, Path] | None = None
    for g in graphs:
        key = trt_key(env, g, mhash, precision, max_prompts, max_points)
        hit = cache.lookup(key)
        if hit is not None:
            out[g] = hit
            continue
        for name, diff in cache.mismatches(key):
            if diff.keys() - {"model_hash"}:  # same weights, other environment: say so
                why = ", ".join(f"{f}: cached {a!r}, here {b!r}" for f, (a, b) in sorted(diff.items()))
                log.warning("not loading %s (%s); rebuilding", name, why)
        if onnx_paths is None:
            onnx_paths = ensure_onnx_graphs(model, cache, mhash=mhash)
        log.info("building TensorRT %s engine for %s (%s, K<=%d)", precision, g, env.gpu_name, max_prompts)
        profiles = profile_shapes(dims, g, max_prompts, max_points)
        plan = build_fn(onnx_paths[g], profiles, precision, cache.root / timing_cache_name(env))
        out[g] = cache.store(key, data=plan)
    return out


class _TrtGraph:
    """One deserialised plan, its execution context and its preallocated device buffers."""

    def __init__(self, runtime: Any, path: Path, plan: list[Binding], device: torch.device) -> None:
        import tensorrt as trt

        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {path.name}; delete it to force a rebuild")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {b.name for b in plan}
        if names != want:
            raise EngineError(f"{path.name}: engine tensors {sorted(names)} != expected {sorted(want)}")
        self.inputs = [b.name for b in plan if b.is_input]
        self.outputs = [b.name for b in plan if not b.is_input]
        for b in plan:
            expect = trt.TensorIOMode.INPUT if b.is_input else trt.TensorIOMode.OUTPUT
            if self.engine.get_tensor_mode(b.name) != expect:
                raise EngineError(f"{path.name}: tensor {b.name} has the wrong direction")
        # Flat buffers at the profile maximum: a smaller call views a prefix, so it stays
        # contiguous and the address set here never changes.
        self.buffers = {b.name: torch.empty(b.max_elements, dtype=torch.float32, device=device) for b in plan}
        for name, buf in self.buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())

    def __call__(
        self, shapes: dict[str, tuple[int, ...]], feeds: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream()
        for name in self.inputs:
            view = self.buffers[name][: _numel(shapes[name])].view(shapes[name])
            view.copy_(feeds[name], non_blocking=True)
            if not self.context.set_input_shape(name, shapes[name]):
                raise EngineError(f"TensorRT rejected shape {shapes[name]} for {name}")
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed")
        return [self.buffers[n][: _numel(shapes[n])].view(shapes[n]) for n in self.outputs]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TensorRTEngine(Engine):
    name = "trt"

    def __init__(
        self,
        model: FluoroSAM,
        cache: EngineCache | None = None,
        precision: str = "fp16",
        max_prompts: int = 16,
        max_points: int = 8,
    ) -> None:
        why = probe_tensorrt()
        if why is not None:
            raise EngineError(why)
        import tensorrt as trt

        self.device = torch.device("cuda")
        self.cache = cache or EngineCache()
        self.env = TrtEnvironment.detect()
        self.precision, self.max_prompts, self.max_points = precision, max_prompts, max_points
        self.dims = GraphDims.of(model)
        self._model_name = model.cfg.name
        paths = ensure_trt_engines(model, self.cache, self.env, precision, max_prompts, max_points)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.graphs = {
            g: _TrtGraph(self._runtime, p, binding_plan(self.dims, g, max_prompts, max_points), self.device)
            for g, p in paths.items()
        }

    @torch.inference_mode()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        shapes = self.dims.shapes("encoder")
        (emb,) = self.graphs["encoder"](shapes, {"image": x.to(self.device, torch.float32)})
        return emb.clone()

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d, f = self.device, torch.float32
        feeds = {"embedding": embedding.to(d, f), "tokens": tokens.to(d, f)}
        graph, n = "decoder", 0
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            graph, n = "decoder_points", point_coords.shape[1]
            feeds["point_coords"] = point_coords.to(d, f)
            feeds["point_labels"] = point_labels.to(d, f)
        shapes = call_shapes(self.dims, graph, tokens.shape[0], n, self.max_prompts, self.max_points)
        low, iou = self.graphs[graph](shapes, feeds)
        return low.clone(), iou.clone()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": f"cuda ({self.env.gpu_name}, sm {self.env.compute_capability})",
            "model": self._model_name,
            "precision": self.precision,
            "tensorrt": self.env.trt_version,
            "max_prompts": self.max_prompts,
            "cache": str(self.cache.root),
        }
