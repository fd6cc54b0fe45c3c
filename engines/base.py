"""The one interface every inference back end implements.

The node and the predictor only ever call ``encode_image`` once per frame and ``decode`` once
per frame with all active prompts; how a back end gets there (PyTorch eager, torch.compile and
CUDA graphs, ONNX Runtime, TensorRT) is its own business. Tensors cross the interface as torch
tensors on the CPU unless the back end states a device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class EngineError(RuntimeError):
    """A back end that cannot load or run; the message says precisely why."""


class Engine(ABC):
    name: str = "engine"

    @property
    @abstractmethod
    def img_size(self) -> int:
        """Side of the square, padded model input."""

    @property
    @abstractmethod
    def low_res_size(self) -> int:
        """Side of the low-resolution logits that decode returns."""

    @property
    def num_multimask_outputs(self) -> int:
        return 3

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
