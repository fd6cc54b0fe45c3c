"""The v2 image encoder: EfficientNet-Lite0 trunk, FPN neck, and high-resolution features.

Output, one tensor per frame (so every engine, the predictor and the node pass it around as
before): ``[B, C + c * f * f, E, E]``, the first C channels the SAM image embedding, the rest the
high-resolution features [B, c, E*f, E*f] at half the input (the logits' resolution; f = 8 at
stride 16), reshaped into the grid (:func:`~fluorosam_rt.model.mask_decoder.pack_high_res`).
The mask decoder adds them to every prompt's upscaled features before its hypernetwork dot
product (HQ-SAM's idea: early encoder features restore the detail a coarse token grid cannot
hold, so a 1-2 px K-wire survives). They are computed once per frame here, never per prompt.

Neck: a top-down FPN over strides 8/16/32 at ``embed_stride`` (the stride-32 branch brings
global context for whole-organ prompts, stride 8 the edges), one residual Fused-MBConv refinement
(cheap on a 16 x 16 grid), a 1x1 projection and LayerNorm2d, as SAM's encoders end.

High-res features: 1x1 projections of the stride-2 (16 ch) and stride-4 (24 ch) trunk features
to ``c`` channels, summed at stride 2 (the stride-4 branch nearest-upsampled), a depthwise 3x3 +
ReLU6 to smooth the blocking, and a zero-initialised 1x1 output, so a freshly built decoder starts
exactly as without the path and learns how much detail to take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.config import LiteEncoderConfig
from fluorosam_rt.model.efficientnet_lite import ConvBNReLU6, EfficientNetLite0
from fluorosam_rt.model.mask_decoder import pack_high_res
from fluorosam_rt.model.small_encoder import ConvBNAct, FusedMBConv, _LayerNorm2d

__all__ = ["HighResSpec", "LiteEncoder"]


@dataclass(frozen=True)
class HighResSpec:
    """What the decoder needs: ``channels`` features at ``factor`` x the grid (half the input)."""

    channels: int
    factor: int


class _HighRes(nn.Module):
    """Stride-2 + stride-4 trunk features -> [B, c, S/2, S/2] detail features (see module doc)."""

    def __init__(self, c2: int, c4: int, out: int) -> None:
        super().__init__()
        self.proj2 = ConvBNReLU6(c2, out, 1, act=False)
        self.proj4 = ConvBNReLU6(c4, out, 1, act=False)
        self.smooth = ConvBNReLU6(out, out, 3, groups=out)
        self.out = nn.Conv2d(out, out, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f2: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        x = self.proj2(f2)
        up = F.interpolate(self.proj4(f4), scale_factor=2.0, mode="nearest")
        x = x.add_(up) if not torch.is_grad_enabled() else x + up
        return self.out(self.smooth(x))


class LiteEncoder(nn.Module):
    """EfficientNet-Lite0 -> FPN embedding [B, out_dim, S/stride, S/stride] (+ packed high-res features)."""

    def __init__(
        self, cfg: LiteEncoderConfig, out_dim: int, img_size: int, high_res: HighResSpec | None
    ) -> None:
        super().__init__()
        if cfg.embed_stride not in (8, 16):
            raise ValueError(f"lite encoder embed_stride must be 8 or 16, got {cfg.embed_stride}")
        if img_size % 32:
            raise ValueError(f"lite encoder img_size must be a multiple of 32, got {img_size}")
        grid = img_size // cfg.embed_stride
        if high_res is not None and grid * high_res.factor != img_size // 2:
            raise ValueError(f"high-res features are at half the input: grid {grid} x {high_res.factor}")
        self.embed_stride = cfg.embed_stride
        self.grid = grid
        self.trunk = EfficientNetLite0(num_blocks=cfg.trunk_blocks)
        c2, c4, c8, c16, c32 = self.trunk.feature_channels
        n = cfg.neck_dim
        self.lat32 = ConvBNAct(c32, n, 1, act=False)
        self.lat16 = ConvBNAct(c16, n, 1, act=False)
        # At stride 16 the stride-8 features enter through a strided 3x3 conv; at stride 8 a 1x1.
        self.lat8 = (
            ConvBNAct(c8, n, 3, stride=2, act=False)
            if cfg.embed_stride == 16
            else ConvBNAct(c8, n, 1, act=False)
        )
        self.refine = nn.Sequential(*[FusedMBConv(n, n, 1, 2.0) for _ in range(cfg.neck_blocks)])
        self.out_proj = nn.Conv2d(n, out_dim, 1)
        self.norm = _LayerNorm2d(out_dim)
        self.high_res = _HighRes(c2, c4, high_res.channels) if high_res else None

    @staticmethod
    def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.add_(b) if not torch.is_grad_enabled() else a + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2, f4, f8, f16, f32 = self.trunk(x)
        up = F.interpolate(self.lat32(f32), scale_factor=2.0, mode="nearest")
        p16 = self._add(self.lat16(f16), up)
        if self.embed_stride == 16:
            p = self._add(p16, self.lat8(f8))
        else:
            p = self._add(self.lat8(f8), F.interpolate(p16, scale_factor=2.0, mode="nearest"))
        emb = self.norm(self.out_proj(self.refine(p)))
        if self.high_res is None:
            return emb
        hq = pack_high_res(self.high_res(f2, f4), self.grid)
        return torch.cat([emb, hq], dim=1)

    @torch.no_grad()
    def fuse_for_inference(self) -> LiteEncoder:
        """Fold every BatchNorm into its conv (eval mode, in place); after loading weights only."""
        self.eval()
        for m in self.modules():
            if isinstance(m, (ConvBNAct, ConvBNReLU6)):
                m.fuse()
        return self
