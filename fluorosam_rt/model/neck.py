"""EfficientViT-SAM style neck that fuses the four Swin stages into the 64x64 SAM embedding.

The module tree mirrors EfficientViT's ``SamNeck`` (``input_ops.i.op_list.0``, ``middle.op_list.i.main``,
``output_ops.0.op_list.0``) so the official FluoroSAM checkpoint loads strictly. Parameter-free ops
(the resize, the identity shortcut) hold no keys, so they are plain functions here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.config import SamNeckConfig

__all__ = ["ConvNorm", "FusedMBConv", "SamNeck"]


class ConvNorm(nn.Module):
    """Conv (same padding) -> optional BatchNorm -> optional activation, keys ``conv`` / ``norm``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        norm: bool = True,
        act: nn.Module | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = nn.BatchNorm2d(out_ch) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class _OpList(nn.Module):
    """EfficientViT's ``OpSequential``: only exists to reproduce the ``op_list.N`` key prefix."""

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class FusedMBConv(nn.Module):
    """Conv3x3 -> BN -> GELU(tanh) -> Conv1x1 -> BN (the residual add lives in ``_Residual``)."""

    def __init__(self, ch: int, expand_ratio: float = 1.0) -> None:
        super().__init__()
        mid = round(ch * expand_ratio)
        self.spatial_conv = ConvNorm(ch, mid, 3, act=nn.GELU(approximate="tanh"))
        self.point_conv = ConvNorm(mid, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class _Residual(nn.Module):
    def __init__(self, main: nn.Module) -> None:
        super().__init__()
        self.main = main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x


class SamNeck(nn.Module):
    """Project each stage to ``head_width``, bicubic-resize to ``out_size``, sum, refine, project out.

    ``in_channels`` are given deepest first (stage4, stage3, stage2, stage1), the official order;
    :meth:`forward` takes the backbone's natural order (stage1..stage4) and reverses it.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        cfg: SamNeckConfig,
        out_dim: int = 256,
        out_size: int = 64,
    ) -> None:
        super().__init__()
        self.out_size = out_size
        self.input_ops = nn.ModuleList(_OpList([ConvNorm(c, cfg.head_width, 1)]) for c in in_channels)
        self.middle = _OpList(
            [_Residual(FusedMBConv(cfg.head_width, cfg.expand_ratio)) for _ in range(cfg.head_depth)]
        )
        self.output_ops = nn.ModuleList(
            [_OpList([ConvNorm(cfg.head_width, out_dim, 1, norm=False, bias=True)])]
        )

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.out_size, self.out_size):
            return x  # EfficientViT skips the resize when the size already matches
        return F.interpolate(x, size=(self.out_size, self.out_size), mode="bicubic", align_corners=False)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: [stage1, stage2, stage3, stage4] -> [B, out_dim, out_size, out_size] (pre-norm)."""
        deepest_first = list(features)[::-1]
        if len(deepest_first) != len(self.input_ops):
            raise ValueError(f"SamNeck expects {len(self.input_ops)} features, got {len(deepest_first)}")
        branches = [self._resize(op(f)) for op, f in zip(self.input_ops, deepest_first)]
        # Right-nested sum s4 + (s3 + (s2 + s1)), the official evaluation order (float addition is
        # not associative, and the golden fixture is bitwise).
        x = branches[-1]
        for b in reversed(branches[:-1]):
            x = b + x
        x = self.middle(x)
        return self.output_ops[0](x)
