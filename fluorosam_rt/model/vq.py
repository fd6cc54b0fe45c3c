"""Vector quantisation of the text token onto a learned codebook.

FluoroSAM snaps the projected text feature to its Euclidean-nearest codeword, so that many
phrasings of one structure collapse onto one prompt token. The module keeps the state-dict
layout of vector-quantize-pytorch (``_codebook.embed`` and friends) for checkpoint
compatibility, but the forward is our own: at eval it is an exact gather of the codeword.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Codebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(1, codebook_size, dim) * 0.1)
        # Buffers that the official library keeps for EMA updates. They are unused at inference
        # and by our training (the codebook is learned by gradient), but they are part of the
        # official state dict, so they are kept for strict loading.
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        self.register_buffer("embed_avg", self.embed.detach().clone())


class VectorQuantizer(nn.Module):
    """Nearest-codeword snap. ``enabled`` switches the stage off without changing weights."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = _Codebook(codebook_size, dim)
        self.enabled = True

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed[0]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the Euclidean-nearest codeword for each row of x [N, D].

        Uses ||x||^2 + ||e||^2 - 2 x.e, the same expansion as the official library, so ties
        and near-ties resolve the same way.
        """
        e = self.codebook
        d2 = x.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1)[None, :] - 2.0 * (x @ e.t())
        return d2.clamp_min(1e-8).argmin(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise x [..., D]. Returns (tokens, commitment loss).

        In training the output carries gradients to both the codebook (through the gather) and
        the input (straight-through); its value is still exactly the codeword.
        """
        if not self.enabled:
            return x, x.new_zeros(())
        flat = x.reshape(-1, x.shape[-1])
        idx = self.nearest(flat)
        q = self.codebook[idx].reshape(x.shape)
        if not self.training:
            return q, x.new_zeros(())
        commit = F.mse_loss(x, q.detach())
        codebook_loss = F.mse_loss(q, x.detach())
        q_st = q + (x - x.detach())
        return q_st, commit + codebook_loss
