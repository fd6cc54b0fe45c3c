"""The two frame-path graphs every compiled back end runs: image encoder and prompt decoder.

They wrap a FluoroSAM so that exporters, torch.compile and CUDA-graph capture all see the same
fixed-signature functions. Two things differ from ``FluoroSAM.decode`` on purpose:

* point coordinates enter as float32, not float64: TensorRT has no float64 tensors and ONNX
  float64 arithmetic is slow on every runtime; the error this adds is ~1e-7 of the image side,
  far below one pixel, and the parity tests bound its effect on the logits;
* the dense positional encoding of the embedding grid is computed once, at wrap time, instead of
  on every decode; it only depends on the grid size.

The prompt encoder's point path always runs in float32 (its Fourier phases need the precision);
only the image encoder and mask decoder follow a reduced compute dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fluorosam_rt.model.sam import FluoroSAM


class FrameEncoder(nn.Module):
    """Preprocessed image [1, 3, S, S] float32 -> embedding [1, C, E, E] float32."""

    def __init__(self, model: FluoroSAM, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.dtype = dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image.to(self.dtype)).float()


class FrameDecoder(nn.Module):
    """Embedding [1, C, E, E] + tokens [K, C] (+ points [K, N, 2], labels [K, N]) -> masks, IoU.

    Outputs are float32 low-res logits [K, 3, L, L] and IoU [K, 3] whatever the compute dtype.
    Labels are float (1 positive, 0 negative, -1 padding) so one dtype crosses every runtime.
    """

    def __init__(self, model: FluoroSAM, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        pe = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.dtype = dtype
        s = pe.input_image_size
        self.register_buffer(
            "input_wh", torch.tensor([float(s[1]), float(s[0])], dtype=torch.float32), persistent=False
        )
        gauss = pe.pe_layer.positional_encoding_gaussian_matrix.detach().float().clone()
        self.register_buffer("gauss", gauss, persistent=False)
        with torch.no_grad():
            dense_pe = pe.get_dense_pe().detach().float().clone()
            no_mask = pe.dense_embedding().detach().float().clone()
            neg = pe.point_embeddings[0].weight.detach().float().clone()
            pos = pe.point_embeddings[1].weight.detach().float().clone()
            not_a_point = pe.not_a_point_embed.weight.detach().float().clone()
        self.register_buffer("dense_pe", dense_pe, persistent=False)
        self.register_buffer("no_mask", no_mask, persistent=False)
        self.register_buffer("neg_embed", neg, persistent=False)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.register_buffer("not_a_point", not_a_point, persistent=False)

    def point_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Float32 twin of PromptEncoder.point_tokens (pixel centres, appended padding point)."""
        k = coords.shape[0]
        coords = coords.float() + 0.5
        labels = labels.float()
        coords = torch.cat([coords, coords.new_zeros((k, 1, 2))], dim=1)
        labels = torch.cat([labels, labels.new_full((k, 1), -1.0)], dim=1)
        c = 2.0 * (coords / self.input_wh) - 1.0
        c = 2.0 * math.pi * (c @ self.gauss)
        emb = torch.cat([torch.sin(c), torch.cos(c)], dim=-1)
        lbl = labels.unsqueeze(-1)
        emb = torch.where(lbl == -1.0, self.not_a_point, emb)
        emb = emb + torch.where(lbl == 0.0, self.neg_embed, torch.zeros_like(self.neg_embed))
        emb = emb + torch.where(lbl == 1.0, self.pos_embed, torch.zeros_like(self.pos_embed))
        return emb

    def forward(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = tokens.float().unsqueeze(1)
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            sparse = torch.cat([sparse, self.point_tokens(point_coords, point_labels)], dim=1)
        d = self.dtype
        low_res, iou = self.mask_decoder(
            embedding.to(d), self.dense_pe.to(d), sparse.to(d), self.no_mask.to(d)
        )
        return low_res.float(), iou.float()
