"""The one interface every inference back end implements.

The node and the predictor only ever call ``encode_image`` once per frame and ``decode`` once
per frame with all active prompts; how a back end gets there (PyTorch eager, torch.compile and
CUDA graphs, ONNX Runtime, TensorRT) is its own business. Tensors cross the interface as torch
tensors on the CPU unless the back end states a device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fluorosam_rt.model.sam import FluoroSAM

Shape = tuple[int, ...]


class EngineError(RuntimeError):
    """A back end that cannot load or run; the message says precisely why."""


@dataclass(frozen=True)
class GraphDims:
    """The model sizes the graphs' shapes are made of.

    ``embed_dim`` is the prompt tokens' width; ``embedding_channels`` the image embedding's,
    which is wider when the encoder packs high-resolution features into it (v2: 128 + 1024).
    """

    img_size: int
    embed_dim: int
    embedding_channels: int
    embedding_size: int
    low_res_size: int
    num_masks: int

    @classmethod
    def of(cls, model: FluoroSAM) -> GraphDims:
        return cls(
            img_size=model.img_size,
            embed_dim=model.cfg.prompt_encoder.embed_dim,
            embedding_channels=model.embedding_channels,
            embedding_size=model.cfg.image_encoder.embedding_size,
            low_res_size=model.low_res_size,
            num_masks=model.mask_decoder.num_multimask_outputs,
        )

    def shapes(self, graph: str, k: int = 1, n: int = 1) -> dict[str, Shape]:
        """Every I/O tensor's shape for K prompts with N clicks each."""
        s, e, l, m = self.img_size, self.embedding_size, self.low_res_size, self.num_masks
        c, ce = self.embed_dim, self.embedding_channels
        if graph == "encoder":
            return {"image": (1, 3, s, s), "embedding": (1, ce, e, e)}
        out = {
            "embedding": (1, ce, e, e),
            "tokens": (k, c),
            "low_res_logits": (k, m, l, l),
            "iou": (k, m),
        }
        if graph == "decoder_points":
            out["point_coords"] = (k, n, 2)
            out["point_labels"] = (k, n)
        elif graph != "decoder":
            raise ValueError(f"unknown graph {graph!r}; choose from encoder, decoder, decoder_points")
        return out


class Engine(ABC):
    """Subclasses set ``dims`` (from the model they run) and implement the two frame-path calls."""

    name: str = "engine"
    dims: GraphDims

    @property
    def img_size(self) -> int:
        """Side of the square, padded model input."""
        return self.dims.img_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution logits that decode returns."""
        return self.dims.low_res_size

    @property
    def num_multimask_outputs(self) -> int:
        return self.dims.num_masks

    @abstractmethod
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input [1, 3, S, S] float32 -> image embedding [1, C, E, E]."""

    @abstractmethod
    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's embedding and K cached prompt tokens [K, C] -> ([K, 3, L, L], [K, 3]).

        Points are (x, y) in model-input pixels [K, N, 2] with labels [K, N] (1 / 0).
        """

    def describe(self) -> dict[str, Any]:
        """What the node reports on its status socket."""
        return {"engine": self.name}
