"""Prompt encoder: text feature -> one sparse token; points -> Fourier-feature tokens.

The text path is the heart of FluoroSAM: a frozen text encoder's feature goes through an MLP
(512 -> 512 -> 256, exact GELU) and is snapped onto a codebook. Text encoding itself is kept
out of this module's frame path: the node caches the final token per prompt.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .config import PromptEncoderConfig
from .vq import VectorQuantizer


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates (SAM's positional encoding)."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, h: int, w: int) -> torch.Tensor:
        """PE of every cell centre of an h x w grid, as [C, h, w]."""
        dev = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=dev, dtype=torch.float32)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x, y], dim=-1))
        return pe.permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords [..., 2] in input-pixel units (x, y), already shifted to pixel centres."""
        c = coords.clone()
        c[..., 0] = c[..., 0] / image_size[1]
        c[..., 1] = c[..., 1] / image_size[0]
        return self._pe_encoding(c.to(torch.float32))


class PromptEncoder(nn.Module):
    def __init__(
        self,
        cfg: PromptEncoderConfig,
        text_feature_dim: int,
        image_embedding_size: int,
        input_image_size: int,
        text_model: nn.Module | None = None,
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.embed_dim = d
        self.image_embedding_size = (image_embedding_size, image_embedding_size)
        self.input_image_size = (input_image_size, input_image_size)
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        # 0: negative point, 1: positive point, 2/3: box corners (unused by FluoroSAM).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, d) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, d)
        # SAM's mask-prompt downscaler. FluoroSAM never feeds a mask prompt; the weights are part
        # of its checkpoint and are kept so the official state dict loads strictly.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, d, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, d)
        # The official key name is kept for any text encoder; the MLP maps its feature to d.
        self.clip_mlp = MLP(text_feature_dim, cfg.text_hidden, d, 2, activation=nn.GELU)
        self.vq = VectorQuantizer(d, cfg.codebook_size) if cfg.use_vq else None
        # The official build nests the CLIP text tower here (prompt_encoder.text_model.*).
        self.text_model = text_model

    def get_dense_pe(self) -> torch.Tensor:
        """[1, C, H, W] positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(*self.image_embedding_size).unsqueeze(0)

    def dense_embedding(self) -> torch.Tensor:
        """[1, C, 1, 1] 'no mask' dense prompt; broadcasting replaces the official expand."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def text_tokens(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features [K, F] -> prompt tokens [K, C] (MLP then VQ) and the VQ loss."""
        h = self.clip_mlp(text_features.to(self.clip_mlp.layers[0].weight.dtype))
        if self.vq is None:
            return h, h.new_zeros(())
        return self.vq(h)

    def point_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Points in model-input pixels (x, y) [K, N, 2] with labels [K, N] -> tokens [K, N+1, C].

        As in the official model: +0.5 to reach pixel centres, a padding point with label -1 is
        appended (no box is ever given), label -1 uses ``not_a_point_embed``.
        """
        k = coords.shape[0]
        coords = coords.to(torch.float64) + 0.5
        pad_pt = torch.zeros((k, 1, 2), dtype=coords.dtype, device=coords.device)
        pad_lb = -torch.ones((k, 1), dtype=labels.dtype, device=labels.device)
        coords = torch.cat([coords, pad_pt], dim=1)
        labels = torch.cat([labels, pad_lb], dim=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        lbl = labels.to(torch.int64)[..., None]
        emb = torch.where(lbl == -1, self.not_a_point_embed.weight.to(emb.dtype), emb)
        emb = emb + torch.where(lbl == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(lbl == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def sparse_embeddings(
        self,
        text_tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[K, C] text tokens (+ optional points) -> sparse prompt [K, T, C]."""
        sparse = text_tokens.unsqueeze(1)
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            sparse = torch.cat(
                [sparse, self.point_tokens(point_coords, point_labels).to(sparse.dtype)], dim=1
            )
        return sparse
