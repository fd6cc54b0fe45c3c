"""Mask decoder: two-way transformer, transposed-conv upscaling, hypernetwork masks, IoU head.

Key layout matches FluoroSAM's ``TravelMaskDecoder``. The number of x2 upscaling stages is
configurable: the official build uses 3 (64 -> 512 logits); the real-time model may use fewer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d
from .config import MaskDecoderConfig
from .transformer import TwoWayTransformer


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
    def __init__(self, transformer_dim: int, cfg: MaskDecoderConfig) -> None:
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
        self.upscale_factor = 2**cfg.upscale_stages
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

        image_embeddings [1, C, H, W], image_pe [1, C, H, W], sparse [K, T, C],
        dense [1 or K, C, H, W]. Returns multimask low-res logits [K, 3, H*f, W*f] and the
        predicted IoU [K, 3] (no sigmoid, as in the official model).
        """
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
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred[:, 1:]
