"""Mask decoder: two-way transformer, transposed-conv upscaling, hypernetwork masks, IoU head.

Key layout matches FluoroSAM's ``TravelMaskDecoder``. The number of x2 upscaling stages is
configurable: the official build uses 3 (64 -> 512 logits); the real-time model may use fewer.

With ``high_res_features`` (the v2 model, off by default) the image embedding carries, after its
C channels, high-resolution encoder features [c, L, L] at the logits' resolution L (reshaped into
the embedding grid, see :func:`pack_high_res`). As in HQ-SAM they are added to every prompt's
upscaled features right before the hypernetwork's dot product, so the mask sees edges the coarse
token grid cannot hold. When L is ``high_res_scale`` times the upscaler's output, the upscaled
features are first resized bilinearly to L.

Both the resize and the dot product are linear, so hyper . (resize(U) + F) is computed as
resize(hyper . U) + hyper . F: the resize acts on 3 mask channels instead of c feature channels,
the upscaled part stays in the upscaler's blocked order and the high-res part in image order, so
no large tensor is ever rearranged; per prompt the path costs a [3, c] x [c, L*L] product. That
is what lets the per-prompt upscaler stop at x4 (the third x2 stage doubled the K = 10 decode on
the 2-core CPU) while the logits reach half the input. No parameters: the keys do not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d
from .config import MaskDecoderConfig
from .transformer import TwoWayTransformer


def pack_high_res(features: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, c, L, L] high-res features -> [B, c*(L/grid)**2, grid, grid], a pure reshape.

    The features travel inside the frame's one embedding tensor (concatenated after the C
    embedding channels), so every engine, the predictor and the node keep passing one tensor.
    The reshape keeps memory order; :func:`unpack_high_res` undoes it exactly.
    """
    b, c, hh, ww = features.shape
    return features.reshape(b, c * (hh // grid) * (ww // grid), grid, grid)


def unpack_high_res(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_high_res`: [B, c*f*f, h, w] -> [B, c, h*f, w*f]."""
    b, cf, h, w = packed.shape
    f = math.isqrt(cf // channels)
    return packed.reshape(b, channels, h * f, w * f)


def upscale_channels(dim: int, stages: int) -> int:
    """Channels of the upscaler's output (see :func:`_upscaling`)."""
    return dim // 8 if stages >= 1 else dim


def _upscaling(dim: int, stages: int) -> tuple[nn.Sequential, int]:
    """[ConvT, LN2d, GELU] per stage except the last, which is [ConvT, GELU].

    Channel plan: official 3 stages 256 -> 64 -> 64 -> 32 (dim/4, dim/4, dim/8); with 2 stages
    it is SAM's dim/4 -> dim/8. Returns the module and its output channel count.
    """
    if stages < 1:
        raise ValueError("upscale_stages must be >= 1")
    channels = [dim // 4] * (stages - 1) + [dim // 8]
    mods: list[nn.Module] = []
    c_in = dim
    for i, c_out in enumerate(channels):
        mods.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2))
        if i < stages - 1:
            mods.append(LayerNorm2d(c_out, eps=1e-6))
        mods.append(nn.GELU())
        c_in = c_out
    return nn.Sequential(*mods), channels[-1]


class MaskDecoder(nn.Module):
    def __init__(self, transformer_dim: int, cfg: MaskDecoderConfig, high_res_scale: int = 1) -> None:
        """high_res_scale: resolution of the high-res features over the upscaler's (1 or 2)."""
        super().__init__()
        self.transformer_dim = transformer_dim
        self.num_multimask_outputs = cfg.num_multimask_outputs
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(
            depth=cfg.depth,
            embedding_dim=transformer_dim,
            num_heads=cfg.num_heads,
            mlp_dim=cfg.mlp_dim,
            attention_downsample_rate=cfg.attention_downsample,
        )
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        # The official checkpoint stores 4 "travel" tokens that inference never reads. They are
        # kept (when configured) only so that checkpoint loads strictly with nothing left over.
        self.travel_tokens = (
            nn.Embedding(cfg.num_travel_tokens, transformer_dim) if cfg.num_travel_tokens else None
        )
        self.output_upscaling, up_channels = _upscaling(transformer_dim, cfg.upscale_stages)
        self.upscale_stages = cfg.upscale_stages
        if high_res_scale not in (1, 2) or (high_res_scale != 1 and not cfg.high_res_features):
            raise ValueError(f"high_res_scale must be 1, or 2 with high_res_features; got {high_res_scale}")
        self.high_res_scale = high_res_scale
        # logits side / embedding-grid side
        self.upscale_factor = 2**cfg.upscale_stages * high_res_scale
        self.high_res_channels = up_channels if cfg.high_res_features else 0
        self.embedding_channels = transformer_dim + self.high_res_channels * self.upscale_factor**2
        self.mask_output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, up_channels, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, cfg.iou_head_hidden, self.num_mask_tokens, cfg.iou_head_depth
        )

    def upscale_blocked(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run ``output_upscaling`` on image tokens [B, h*w, C] in sub-pixel ("blocked") order.

        Every layer of the upscaler is per-pixel: a stride-2, 2x2 transposed conv maps one input
        pixel to its own 2x2 output block, and LayerNorm2d and GELU act on each pixel alone. So
        the whole chain can run as matmuls on [pixels, channels] without ever rearranging the
        feature maps; the result's rows are ordered (i, j, dy1, dx1, dy2, dx2, ...) and only the
        final masks (a few channels) are rearranged into an image. Same weights, same math as
        the NCHW Sequential; on CPU it avoids the slow deconvolution kernel, five elementwise
        passes per LayerNorm2d and two large pixel-shuffle copies.

        Returns [B, h*w*4**stages, C'] features.
        """
        x = tokens
        for mod in self.output_upscaling:
            if isinstance(mod, nn.ConvTranspose2d):
                b, n, cin = x.shape
                cout = mod.out_channels
                wmat = mod.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # ci -> (dy, dx, co)
                bias = mod.bias.repeat(4)
                x = torch.addmm(bias, x.reshape(-1, cin), wmat).reshape(b, n * 4, cout)
            elif isinstance(mod, LayerNorm2d):
                x = F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)
            elif isinstance(mod, nn.GELU):
                x = F.gelu(x, approximate=mod.approximate)
            else:  # pragma: no cover - the Sequential is built by _upscaling above
                raise TypeError(f"unexpected upscaling layer {type(mod).__name__}")
        return x

    def unblock(self, masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, M, h*w*4**s] in blocked order -> [B, M, h*2**s, w*2**s] images."""
        s = self.upscale_stages
        b, m, _ = masks.shape
        x = masks.reshape(b, m, h, w, *([2, 2] * s))
        # dims: b, m, i, j, (dy1, dx1), (dy2, dx2), ... -> b, m, i, dy1, dy2, ..., j, dx1, dx2, ...
        dys = [4 + 2 * k for k in range(s)]
        dxs = [5 + 2 * k for k in range(s)]
        x = x.permute(0, 1, 2, *dys, 3, *dxs)
        f = 2**s
        return x.reshape(b, m, h * f, w * f)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode K prompts against one frame.

        image_embeddings [1, C (+ high-res channels), H, W], image_pe [1, C, H, W], sparse
        [K, T, C], dense [1 or K, C, H, W]. Returns multimask low-res logits [K, 3, H*f, W*f]
        and the predicted IoU [K, 3] (no sigmoid, as in the official model).
        """
        if image_embeddings.shape[1] != self.embedding_channels:
            raise ValueError(
                f"image embedding has {image_embeddings.shape[1]} channels, the decoder expects "
                f"{self.embedding_channels}"
            )
        high_res = None
        if self.high_res_channels:
            high_res = unpack_high_res(image_embeddings[:, self.transformer_dim :], self.high_res_channels)
            image_embeddings = image_embeddings[:, : self.transformer_dim]
        k = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(k, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings + dense_prompt_embeddings
        hs, src_tokens = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        h, w = image_embeddings.shape[-2:]
        upscaled = self.upscale_blocked(src_tokens)
        # Multimask output keeps mask tokens 1..3 and IoU entries 1..3, as in the official model.
        # Mask 0 is never used, so its hypernetwork and mask product are not computed at all.
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.mask_output_hypernetworks_mlps) if i],
            dim=1,
        )
        masks = self.unblock(hyper_in @ upscaled.transpose(1, 2), h, w)
        if high_res is not None:  # hyper . (resize(U) + F) = resize(hyper . U) + hyper . F
            if self.high_res_scale != 1:
                masks = F.interpolate(masks, scale_factor=float(self.high_res_scale), mode="bilinear")
            masks = masks + (hyper_in @ high_res.flatten(2)).reshape(masks.shape)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred[:, 1:]
