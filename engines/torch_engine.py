"""PyTorch eager back end: the reference every other back end is checked against."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, EngineError, GraphDims


def has_batchnorm(module: nn.Module) -> bool:
    """Whether any BatchNorm layer is left to fold (eval-mode BN is an affine op per channel)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: FluoroSAM, device: str | torch.device = "cpu", fuse: bool = True) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dims = GraphDims.of(self.model)
        self.image_encoder = self.model.image_encoder
        # The conv encoders (small, v2 Lite) fold their BatchNorms; the official Swin build's
        # neck keeps its own (its layout must stay key-for-key the checkpoint's) and is not copied.
        foldable = self.model.cfg.image_encoder.kind in ("small", "lite")
        self.fused = fuse and foldable and has_batchnorm(self.image_encoder)
        if self.fused:
            # Fold BatchNorm into the convs on a private copy: the model itself stays trainable
            # and its state dict unchanged, while the frame path saves one op per conv.
            self.image_encoder = copy.deepcopy(self.image_encoder).fuse_for_inference()
            if has_batchnorm(self.image_encoder):
                raise EngineError("fuse_for_inference left BatchNorm layers in the image encoder")

    @torch.inference_mode()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(x.to(self.device))

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.device
        return self.model.decode(
            embedding.to(d),
            tokens.to(d),
            None if point_coords is None else point_coords.to(d),
            None if point_labels is None else point_labels.to(d),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": str(self.device),
            "model": self.model.cfg.name,
            "batchnorm_folded": self.fused,
        }
