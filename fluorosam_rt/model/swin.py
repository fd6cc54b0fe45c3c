"""Swin Transformer backbone, numerically equivalent to mmdet 3.3's ``SwinTransformer``.

The official FluoroSAM checkpoint was trained with mmdet's Swin, so this module reproduces its
state_dict layout key for key (``patch_embed.projection``, ``stages.i.blocks.j.attn.w_msa.*``,
``ffn.layers.0.0`` / ``ffn.layers.1``, ``stages.i.downsample.{norm,reduction}``, ``norm0..3``) and its
two behaviours that differ from the original Swin paper code:

* patch merging gathers each 2x2 block in ``nn.Unfold`` order (channel index ``4c + 2dy + dx``), not
  the paper's ``[x00, x10, x01, x11]`` concatenation; loading official weights into the paper order
  silently scrambles every stage after the first;
* feature maps whose side is not a multiple of the window are zero-padded bottom/right before
  windowing (also in unshifted blocks, and the padded tokens are *not* masked), instead of shrinking
  the window.

Written from the published description of the architecture; no code was taken from mmdet/timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.config import SwinConfig

__all__ = ["PatchMerging", "SwinBlock", "SwinTransformer", "WindowMSA", "shift_window_mask"]

_MASK_VALUE = -100.0  # mmdet's cross-region penalty; a finite value, not -inf, so it must match exactly.


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) pair of a w x w window.

    Kept as a persistent buffer because the official checkpoint stores it; it is
    ``(drow + w - 1) * (2w - 1) + (dcol + w - 1)`` with d = query - key.
    """
    coords = torch.arange(window_size)
    rows = coords.repeat_interleave(window_size)  # row of token t (row-major window)
    cols = coords.repeat(window_size)
    drow = rows[:, None] - rows[None, :]
    dcol = cols[:, None] - cols[None, :]
    return (drow + window_size - 1) * (2 * window_size - 1) + (dcol + window_size - 1)


def shift_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive mask [nW, w*w, w*w] for a cyclically shifted grid of (already padded) size H x W.

    After the roll, a window can contain tokens from up to four spatially unrelated regions; tokens
    from different regions get -100 so they effectively do not attend to each other.
    """
    region = torch.zeros(height, width, device=device)
    bounds = ((0, -window_size), (-window_size, -shift_size), (-shift_size, None))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region[slice(h0, h1), slice(w0, w1)] = label
            label += 1
    windows = _partition(region[None, :, :, None], window_size).squeeze(-1)  # [nW, w*w]
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASK_VALUE)


def _partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w*w, C]; windows row-major, tokens row-major inside a window."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unpartition(x: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    """Inverse of :func:`_partition`."""
    c = x.shape[-1]
    x = x.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


class WindowMSA(nn.Module):
    """Multi-head self-attention inside a window with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """[heads, N, N] bias, gathered from the table each call so training updates the table."""
        n = self.window_size * self.window_size
        idx = self.relative_position_index.reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B*nW, N, C] windows; mask: optional additive [nW, N, N] (shifted blocks).

        Explicit matmul-softmax-matmul rather than F.scaled_dot_product_attention: at N = 49 with an
        additive mask the fused CPU kernel measured ~1.4x slower here, and this also keeps the
        official order of additions ((q*scale)k^T + bias, then + mask).
        """
        bw, n, c = x.shape
        d = c // self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*nW, heads, N, d]
        attn = torch.matmul(q * d**-0.5, k.transpose(-2, -1))
        attn = attn + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        out = torch.matmul(attn.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class ShiftWindowMSA(nn.Module):
    """Pads to whole windows, optionally rolls by ``shift``, and runs window attention.

    Holds only ``w_msa`` in the state_dict (the official key is ``attn.w_msa.*``). The shift mask for
    the build resolution is precomputed as a non-persistent buffer; other resolutions compute it on
    the fly.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, resolution: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.w_msa = WindowMSA(dim, num_heads, window_size)
        self._mask_hw = 0
        if self.shift_size:
            padded = -(-resolution // window_size) * window_size
            self._mask_hw = padded
            self.register_buffer(
                "attn_mask", shift_window_mask(padded, padded, window_size, self.shift_size), persistent=False
            )

    def _mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        if hp == wp == self._mask_hw:
            return self.attn_mask
        return shift_window_mask(hp, wp, self.window_size, self.shift_size, device)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = hw
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = self._mask(hp, wp, x.device)
        x = _unpartition(self.w_msa(_partition(x, ws), mask), ws, b, hp, wp)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :h, :w, :]
        return x.reshape(b, h * w, c)


class FFN(nn.Module):
    """Linear -> GELU -> Linear, nested so the keys read ``layers.0.0`` and ``layers.1`` as in mmcv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SwinBlock(nn.Module):
    """Pre-norm transformer block on tokens [B, H*W, C]; odd blocks of a stage use shifted windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        shift: bool,
        resolution: int,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftWindowMSA(dim, num_heads, window_size, shift, resolution)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 space-to-depth (nn.Unfold channel order) -> LN(4C) -> Linear(4C -> 2C, no bias).

    ``concat_order=True`` switches to the original Swin paper order; it exists only so tests can show
    that the golden comparison detects that mistake.
    """

    def __init__(self, dim: int, concat_order: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.concat_order = concat_order

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:  # mmdet pads bottom/right ("corner" adaptive padding)
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.view(b, h // 2, 2, w // 2, 2, c)  # b, i, dy, j, dx, c
        # unfold order: index c*4 + dy*2 + dx; paper concat order: index dx*2C + dy*C + c
        order = (0, 1, 3, 4, 2, 5) if self.concat_order else (0, 1, 3, 5, 2, 4)
        x = x.permute(order)
        x = x.reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.reduction(self.norm(x)), (h // 2, w // 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection + LN, padding bottom/right when the side is not a multiple."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinStage(nn.Module):
    """A sequence of blocks plus the optional patch merging that follows it."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        resolution: int,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, mlp_ratio, shift=i % 2 == 1, resolution=resolution)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, tuple[int, int]]:
        """Returns (next-stage tokens, their hw, this stage's tokens before merging, their hw)."""
        for blk in self.blocks:
            x = blk(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        x_down, hw_down = self.downsample(x, hw)
        return x_down, hw_down, x, hw


class SwinTransformer(nn.Module):
    """Hierarchical Swin backbone returning the four normed stage outputs (NCHW, strides 4..32).

    ``img_size`` only decides which resolution gets its shift masks precomputed; any input whose side
    is a multiple of 32 (and others, via padding) works.
    """

    def __init__(self, cfg: SwinConfig, img_size: int = 448, in_chans: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(in_chans, cfg.embed_dims, cfg.patch_size)
        n = len(cfg.depths)
        self.num_features = [cfg.embed_dims * 2**i for i in range(n)]
        res = -(-img_size // cfg.patch_size)
        stages = []
        for i in range(n):
            stages.append(
                SwinStage(
                    self.num_features[i],
                    cfg.depths[i],
                    cfg.num_heads[i],
                    cfg.window_size,
                    cfg.mlp_ratio,
                    res,
                    downsample=i < n - 1,
                )
            )
            res = -(-res // 2)
        self.stages = nn.ModuleList(stages)
        for i, c in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def set_concat_merging(self, enabled: bool) -> None:
        """Switch every patch merging to the paper's concat order (negative tests only)."""
        for stage in self.stages:
            if stage.downsample is not None:
                stage.downsample.concat_order = enabled

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, 3, H, W] normalised image -> [stage1, stage2, stage3, stage4] as [B, C_i, H_i, W_i]."""
        x, hw = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw_next, out, out_hw = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            b, _, c = out.shape
            outs.append(out.view(b, out_hw[0], out_hw[1], c).permute(0, 3, 1, 2).contiguous())
            hw = hw_next
        return outs
