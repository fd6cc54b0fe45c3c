"""The decoder's fast upscaling equals the plain NCHW transposed-conv Sequential it replaces."""

from __future__ import annotations

import pytest
import torch

from fluorosam_rt.model.config import MaskDecoderConfig
from fluorosam_rt.model.mask_decoder import MaskDecoder


@pytest.mark.parametrize(("stages", "dim", "h", "w"), [(1, 64, 5, 7), (2, 128, 8, 8), (3, 64, 4, 6)])
def test_blocked_upscaling_matches_nchw_sequential(stages, dim, h, w):
    torch.manual_seed(stages)
    md = MaskDecoder(dim, MaskDecoderConfig(upscale_stages=stages, num_heads=4, mlp_dim=64)).eval()
    for p in md.output_upscaling.parameters():  # non-trivial LayerNorm affine and biases
        p.data.add_(torch.randn_like(p) * 0.3)
    tokens = torch.randn(3, h * w, dim)
    with torch.no_grad():
        ref = md.output_upscaling(tokens.transpose(1, 2).reshape(3, dim, h, w))
        feats = md.upscale_blocked(tokens)  # [B, N, C] in blocked order
        got = md.unblock(feats.transpose(1, 2), h, w)
    assert got.shape == ref.shape == (3, ref.shape[1], h * 2**stages, w * 2**stages)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_unblock_is_a_permutation():
    md = MaskDecoder(64, MaskDecoderConfig(upscale_stages=2, num_heads=4, mlp_dim=64))
    x = torch.arange(2 * 3 * 4 * 16, dtype=torch.float32).reshape(2, 3, 4 * 16)
    img = md.unblock(x, 2, 2)
    assert img.shape == (2, 3, 8, 8)
    assert torch.equal(img.flatten(2).sort(dim=-1).values, x.sort(dim=-1).values)
