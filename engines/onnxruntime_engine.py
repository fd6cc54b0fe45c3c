"""ONNX Runtime back end (CPU): the fast path on machines without a GPU.

Thread settings matter more than anything else on a small CPU: ONNX Runtime's default uses
every core for intra-op parallelism and spins idle threads, which on a machine shared with a
video pipeline steals time from the capture thread. Both are exposed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, EngineError, GraphDims
from .cache import EngineCache, model_hash
from .onnx_graphs import ensure_onnx_graphs


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 1, allow_spinning: bool = False
) -> Any:
    """ORT session options for a latency-bound, one-request-at-a-time node.

    Spinning is off by default. The engine holds several sessions (encoder, decoder, decoder with
    points), each with its own intra-op pool, and a frame runs them back to back; with spinning on,
    the pool that just finished keeps its threads busy-waiting on the cores the next session (and
    the node's postprocess, geometry and publisher threads) needs. Measured on the 2-vCPU EPYC VM,
    2 intra-op threads, encoder then decoder per frame, medians of 40: v2 K=10 encode 17.7 ->
    7.8 ms, decode 25.0 -> 10.2 ms, CPU 87 -> 32 ms a frame; v1 K=10 decode 15.6 -> 8.7 ms. In the
    real node (``fluorosam-rt bench``, v2, 15 fps, runs 26 min apart on the quiet machine) K=10 p50
    went 142 -> 55 ms and node CPU 185 -> 112 %. Two engines in one process cannot show it side by
    side (each one's pools would spin against the other's), which is why no bench variant does.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(0, int(intra_op_threads))  # 0: ORT picks (physical cores)
    so.inter_op_num_threads = max(1, int(inter_op_threads))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return so


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(
        self,
        model: FluoroSAM,
        cache: EngineCache | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(
                f"onnxruntime is not installed ({exc}); "
                "install the 'onnx' extra: pip install 'fluorosam-rt[onnx]'"
            ) from exc
        self.dims = GraphDims.of(model)
        self._model_name = model.cfg.name
        self.cache = cache or EngineCache()
        self.model_hash = model_hash(model)
        self.paths: dict[str, Path] = ensure_onnx_graphs(model, self.cache, mhash=self.model_hash)
        self.threads = (intra_op_threads, inter_op_threads)
        self.allow_spinning = allow_spinning
        so = session_options(intra_op_threads, inter_op_threads, allow_spinning)
        self.providers = list(providers)
        try:
            self.sessions = {
                g: ort.InferenceSession(str(p), so, providers=self.providers) for g, p in self.paths.items()
            }
        except Exception as exc:  # ORT raises its own exception types per failure
            raise EngineError(f"onnxruntime could not load the graphs in {self.cache.root}: {exc}") from exc

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        (emb,) = self.sessions["encoder"].run(None, {"image": self._np(x)})
        return torch.from_numpy(emb)

    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = {"embedding": self._np(embedding), "tokens": self._np(tokens)}
        graph = "decoder"
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            graph = "decoder_points"
            feeds["point_coords"] = self._np(point_coords)
            feeds["point_labels"] = self._np(point_labels)
        low, iou = self.sessions[graph].run(None, feeds)
        return torch.from_numpy(low), torch.from_numpy(iou)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": "cpu",
            "model": self._model_name,
            "model_hash": self.model_hash[:12],
            "providers": self.providers,
            "intra_op_threads": self.threads[0],
            "inter_op_threads": self.threads[1],
            "allow_spinning": self.allow_spinning,
            "cache": str(self.cache.root),
        }
