"""PyTorch compiled back end: torch.compile, reduced precision and CUDA-graph capture.

This is the fastest GPU path that exists on every machine with PyTorch (TensorRT is often not
installable). The steady state of a node is the same few shapes over and over: one image of a
fixed size and K prompts. So:

* K is padded up to a bucket (1, 2, 4, 8, 16, 32). Prompts are independent rows of the decoder,
  so padding rows only costs their compute and is sliced off; it bounds recompilations and
  CUDA graphs to one per bucket (and click count) instead of one per K.
* On CUDA each (bucket, clicks) shape is captured once into a CUDA graph over static input and
  output buffers; a frame then costs two copies in, one replay and a copy out, with no Python
  or kernel-launch overhead in between.
* fp16/bf16 apply to the image encoder and mask decoder; the click encoding stays float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, EngineError, GraphDims
from .graphs import FrameDecoder, FrameEncoder

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_for(k: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket holding k prompts; above the largest bucket, k itself (no padding)."""
    if k < 1:
        raise ValueError("need at least one prompt")
    for b in buckets:
        if b >= k:
            return b
    return k


def _pad_rows(t: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_full((rows - t.shape[0], *t.shape[1:]), fill)
    return torch.cat([t, pad], dim=0)


class _Captured:
    """One CUDA graph and the static buffers it reads and writes."""

    def __init__(self, fn: Callable[..., Any], static_inputs: list[torch.Tensor], warmup: int = 3) -> None:
        self.inputs = static_inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # compiles / autotunes outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> Any:
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.outputs


class TorchCompiledEngine(Engine):
    name = "torch-compiled"

    def __init__(
        self,
        model: FluoroSAM,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = True,
        cuda_graphs: bool | None = None,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        k_buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; choose from {sorted(PRECISIONS)}")
        on_cuda = self.device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise EngineError("torch-compiled on CUDA requested, but torch.cuda.is_available() is False")
        if not on_cuda and precision != "fp32":
            raise EngineError(f"precision {precision} needs a CUDA device; on CPU only fp32 is supported")
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise EngineError("CUDA graphs need a CUDA device")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self.k_buckets = tuple(sorted(k_buckets))
        self.compile_backend = compile_backend
        # A private copy: casting to fp16 and folding BatchNorm (small and v2 encoders) must not
        # change the caller's (prompt-path, trainable) model.
        m = copy.deepcopy(model).eval().to(self.device)
        m.image_encoder.fuse_for_inference()
        m.image_encoder.to(self.dtype)
        m.mask_decoder.to(self.dtype)
        self._model_name = m.cfg.name
        self.dims = GraphDims.of(m)
        self.encoder = FrameEncoder(m, self.dtype).eval()
        self.decoder = FrameDecoder(m, self.dtype).to(self.device).eval()
        self._enc: Callable[..., Any] = self.encoder
        self._dec: Callable[..., Any] = self.decoder
        if compile:
            try:
                self._enc = torch.compile(
                    self.encoder, backend=compile_backend, mode=compile_mode, dynamic=False
                )
                self._dec = torch.compile(
                    self.decoder, backend=compile_backend, mode=compile_mode, dynamic=False
                )
            except Exception as exc:  # torch.compile raises backend-specific errors
                raise EngineError(f"torch.compile is unavailable here: {exc}") from exc
        self._graphs: dict[tuple, _Captured] = {}

    def _run(self, key: tuple, fn: Callable[..., Any], args: list[torch.Tensor]) -> Any:
        if not self.cuda_graphs:
            return fn(*args)
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._graphs[key] = _Captured(fn, [a.clone() for a in args])
        return cap(*args)

    @torch.inference_mode()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        out = self._run(("enc", tuple(x.shape)), self._enc, [x])
        return out.clone() if self.cuda_graphs else out

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = tokens.shape[0]
        rows = bucket_for(k, self.k_buckets)
        d = self.device
        args = [embedding.to(d, torch.float32), _pad_rows(tokens.to(d, torch.float32), rows)]
        n = 0
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            n = point_coords.shape[1]
            args.append(_pad_rows(point_coords.to(d, torch.float32), rows))
            args.append(_pad_rows(point_labels.to(d, torch.float32), rows, fill=1.0))
        low, iou = self._run(("dec", rows, n, tuple(embedding.shape)), self._dec, args)
        return low[:k].clone(), iou[:k].clone()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": str(self.device),
            "model": self._model_name,
            "precision": self.precision,
            "compiled": self.compiled,
            "compile_backend": self.compile_backend if self.compiled else None,
            "cuda_graphs": self.cuda_graphs,
            "k_buckets": list(self.k_buckets),
            "captured_graphs": len(self._graphs),
        }
