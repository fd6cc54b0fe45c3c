"""The project's small convolutional image encoder for the embedded real-time model.

Why this shape:

* The real-time node has a 33 ms frame budget on 2 CPU cores and still has to decode several prompts,
  so the encoder gets about a quarter of it. Fused-MBConv (a plain 3x3 conv + 1x1) is used at high
  resolution, where depthwise convolutions are memory-bound and slow on CPUs; inverted-residual
  MBConv (depthwise) is used at low resolution, where it saves most compute.
* The mask decoder wants one dense grid, so a light top-down FPN fuses strides 8/16/32 at stride 8:
  the stride-32 branch gives global context (whole-organ prompts such as "the lungs"), the stride-8
  branch keeps edges.
* It is trained from scratch on synthetic X-rays, so every block is residual with its last BN
  zero-initialised (each block starts as identity), BatchNorm is used everywhere, and the output ends
  in LayerNorm2d like SAM's encoders so the decoder sees unit-scale embeddings from step one.
* Only ONNX opset-17 primitives (Conv, BatchNormalization, HardSwish, Add, Resize-linear, ReduceMean)
  so the same graph runs in onnxruntime / TensorRT; no data-dependent control flow (deterministic).

:meth:`SmallEncoder.fuse_for_inference` folds every BatchNorm into its conv for deployment.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.common import LayerNorm2d, fold_batchnorm
from fluorosam_rt.model.config import SmallEncoderConfig

__all__ = ["SmallEncoder"]


def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


class _LayerNorm2d(LayerNorm2d):
    """Same function and keys as :class:`LayerNorm2d`, with fewer passes over memory.

    The output grid is the largest tensor in the encoder. The reference formula subtracts the mean
    twice and allocates ~5 full-size temporaries; on the 2-core VM every fresh 1 MB buffer costs page
    faults, so without autograd this works in place on its input (always a fresh conv output here).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            xc = x - x.mean(1, keepdim=True)
            inv = torch.rsqrt(xc.square().mean(1, keepdim=True) + self.eps)
            return torch.addcmul(self.bias[:, None, None], xc * inv, self.weight[:, None, None])
        # (torch.var_mean over the channel axis measured ~10x slower than this on the target CPU.)
        x = x.sub_(x.mean(1, keepdim=True))
        x = x.mul_(torch.rsqrt(x.square().mean(1, keepdim=True).add_(self.eps)))
        return x.mul_(self.weight[:, None, None]).add_(self.bias[:, None, None])


class ConvBNAct(nn.Module):
    """Conv -> BN -> (Hardswish); BN can be folded into the conv after training."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        k: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        zero_gamma: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_ch)
        self.act = act
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if zero_gamma:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        # In place only without autograd (hardswish's backward needs its input); saves an allocation.
        return F.hardswish(x, inplace=not torch.is_grad_enabled()) if self.act else x

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv weights and bias."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fold_batchnorm(self.conv, self.bn)
            self.bn = nn.Identity()


def _residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, accumulated into y (a fresh block output) when autograd is off."""
    return y.add_(x) if not torch.is_grad_enabled() else x + y


class FusedMBConv(nn.Module):
    """3x3 conv (expand, maybe strided) -> 1x1 project; residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float) -> None:
        super().__init__()
        mid = _divisible(in_ch * expand)
        self.residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNAct(in_ch, mid, 3, stride)
        self.project = ConvBNAct(mid, out_ch, 1, act=False, zero_gamma=self.residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.expand(x))
        return _residual(x, y) if self.residual else y


class MBConv(nn.Module):
    """1x1 expand -> depthwise 3x3 (maybe strided) -> 1x1 project; residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float) -> None:
        super().__init__()
        mid = _divisible(in_ch * expand)
        self.residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNAct(in_ch, mid, 1)
        self.dw = ConvBNAct(mid, mid, 3, stride, groups=mid)
        self.project = ConvBNAct(mid, out_ch, 1, act=False, zero_gamma=self.residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return _residual(x, y) if self.residual else y


class SmallEncoder(nn.Module):
    """Conv stem + 4 stages (strides 4/8/16/32) + top-down FPN at stride 8 + LayerNorm2d.

    Input [B, 3, S, S] with S a multiple of 32 (normalised like the official model); output
    [B, out_dim, S/8, S/8]. Stages 1-2 use Fused-MBConv, stages 3-4 MBConv.
    """

    def __init__(
        self,
        cfg: SmallEncoderConfig,
        out_dim: int = 256,
        in_chans: int = 3,
        fpn_dim: int | None = None,
        expand: tuple[float, ...] = (2.0, 2.0, 3.0, 3.0),
        repeat_expand: tuple[float, ...] = (2.0, 1.0, 3.0, 3.0),
    ) -> None:
        super().__init__()
        if len(cfg.widths) != 4 or len(cfg.depths) != 4:
            raise ValueError("SmallEncoderConfig needs 4 widths and 4 depths (strides 4, 8, 16, 32)")
        w, d = cfg.widths, cfg.depths
        stem_ch = _divisible(w[0] * 2 / 3)
        fpn_dim = fpn_dim or w[2]
        self.stem = ConvBNAct(in_chans, stem_ch, 3, 2)
        stages = []
        prev = stem_ch
        for i, (ch, depth) in enumerate(zip(w, d)):
            block = FusedMBConv if i < 2 else MBConv
            blocks = [block(prev, ch, 2, expand[i])]
            rep = repeat_expand[i]
            blocks += [block(ch, ch, 1, rep) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = ch
        self.stages = nn.ModuleList(stages)
        # Top-down FPN over strides 8/16/32 (stages 2, 3, 4).
        self.lateral = nn.ModuleList(ConvBNAct(c, fpn_dim, 1, act=False) for c in w[1:])
        self.smooth = ConvBNAct(fpn_dim, fpn_dim, 3, groups=fpn_dim)
        self.out_proj = nn.Conv2d(fpn_dim, out_dim, 1)
        self.norm = _LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p8, p16, p32 = (lat(f) for lat, f in zip(self.lateral, feats[1:]))
        # Nearest 2x (as in the original FPN): exact for any multiple-of-32 input, a plain ONNX Resize,
        # and the depthwise 3x3 smoothing after the merge removes the blocking.
        p16 = _residual(F.interpolate(p32, scale_factor=2.0, mode="nearest"), p16)
        p8 = _residual(F.interpolate(p16, scale_factor=2.0, mode="nearest"), p8)
        return self.norm(self.out_proj(self.smooth(p8)))

    def _conv_bn(self) -> Iterator[ConvBNAct]:
        return (m for m in self.modules() if isinstance(m, ConvBNAct))

    @torch.no_grad()
    def fuse_for_inference(self) -> SmallEncoder:
        """Fold BatchNorms into convs (in place, eval mode): one op and one buffer fewer per conv.

        Changes the state_dict layout, so do it after loading weights and never before training.
        """
        self.eval()
        for m in self._conv_bn():
            m.fuse()
        return self
