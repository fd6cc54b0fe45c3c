"""Prompt encoder and mask decoder against the official numbers (../shared/golden).

These tests start from the golden image embedding and CLIP text feature, so they check the
text-token path (MLP, VQ), points, dense PE and the two-way decoder independently of the
image and text encoders.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fluorosam_rt.model.config import golden_reduced
from fluorosam_rt.model.mask_decoder import MaskDecoder
from fluorosam_rt.model.prompt_encoder import PromptEncoder

CASES = ["text0", "text1", "text2", "text0_2points"]


@pytest.fixture(scope="module")
def parts(golden_state_dict):
    cfg = golden_reduced()
    pe = PromptEncoder(cfg.prompt_encoder, cfg.text.feature_dim, 64, 448)
    md = MaskDecoder(cfg.prompt_encoder.embed_dim, cfg.mask_decoder)
    for module, prefix in ((pe, "sam.prompt_encoder."), (md, "sam.mask_decoder.")):
        sd = {
            k[len(prefix) :]: v
            for k, v in golden_state_dict.items()
            if k.startswith(prefix) and not k.startswith("sam.prompt_encoder.text_model.")
        }
        missing, unexpected = module.load_state_dict(sd, strict=True)
        assert not missing
        assert not unexpected
    return pe.eval(), md.eval()


@pytest.mark.parametrize("case", CASES)
def test_text_token_path(parts, golden_io, case):
    pe, _ = parts
    with torch.no_grad():
        h = pe.clip_mlp(golden_io[f"{case}/clip_text_feature"])
        torch.testing.assert_close(h, golden_io[f"{case}/clip_mlp_out"], atol=5e-5, rtol=0)
        idx = pe.vq.nearest(golden_io[f"{case}/clip_mlp_out"])
        assert int(idx) == int(golden_io[f"{case}/vq_index"])
        q, _ = pe.vq(h)
        assert torch.equal(q, golden_io[f"{case}/vq_out"])


def test_dense_pe_and_no_mask(parts, golden_io, golden_debug):
    pe, _ = parts
    with torch.no_grad():
        dense_pe = pe.get_dense_pe()
        torch.testing.assert_close(dense_pe[:, :, 0, :], golden_debug["dense_pe_row0"], atol=2e-5, rtol=0)
        torch.testing.assert_close(dense_pe[:, :, ::8, ::8], golden_debug["dense_pe_sub8"], atol=2e-5, rtol=0)
        assert torch.equal(pe.dense_embedding().flatten(), golden_io["dense_embeddings_vector"])


def test_point_tokens(parts, golden_io):
    pe, _ = parts
    with torch.no_grad():
        sparse = pe.sparse_embeddings(
            golden_io["text0_2points/vq_out"],
            golden_io["text0_2points/point_coords"],
            golden_io["text0_2points/point_labels"],
        )
    torch.testing.assert_close(sparse, golden_io["text0_2points/sparse_embeddings"], atol=2e-5, rtol=0)


def _decode(parts, golden_io, case):
    pe, md = parts
    coords = golden_io.get(f"{case}/point_coords")
    labels = golden_io.get(f"{case}/point_labels")
    with torch.no_grad():
        sparse = pe.sparse_embeddings(golden_io[f"{case}/vq_out"], coords, labels)
        return md(golden_io["image_embedding"], pe.get_dense_pe(), sparse, pe.dense_embedding())


@pytest.mark.parametrize("case", CASES)
def test_decoder_matches_official(parts, golden_io, case):
    logits, iou = _decode(parts, golden_io, case)
    torch.testing.assert_close(logits, golden_io[f"{case}/low_res_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, golden_io[f"{case}/iou_predictions"], atol=1e-6, rtol=0)
    best = int(iou[0].argmax())
    assert best == int(golden_io[f"{case}/best_index"])
    # Official post-processing with original size 448: bilinear 512 -> 448 is the final mask.
    final = F.interpolate(logits[:, best : best + 1], (448, 448), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(final, golden_io[f"{case}/final_mask"], atol=1e-5, rtol=0)


def test_batched_prompts_equal_single(parts, golden_io):
    """Decoding three prompts in one batch gives each prompt's single-call result."""
    pe, md = parts
    tokens = torch.cat([golden_io[f"text{i}/vq_out"] for i in range(3)])
    with torch.no_grad():
        logits, iou = md(
            golden_io["image_embedding"], pe.get_dense_pe(), tokens[:, None], pe.dense_embedding()
        )
    for i in range(3):
        torch.testing.assert_close(logits[i : i + 1], golden_io[f"text{i}/low_res_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(iou[i : i + 1], golden_io[f"text{i}/iou_predictions"], atol=1e-6, rtol=0)


def test_vq_switch_off_passes_mlp_output(parts, golden_io):
    pe, _ = parts
    pe.vq.enabled = False
    try:
        with torch.no_grad():
            tok = pe.text_tokens(golden_io["text0/clip_text_feature"])[0]
        torch.testing.assert_close(tok, golden_io["text0/clip_mlp_out"], atol=5e-5, rtol=0)
        assert not torch.equal(tok, golden_io["text0/vq_out"])
    finally:
        pe.vq.enabled = True


def test_vq_training_gradients_reach_codebook_and_input(parts):
    pe, _ = parts
    vq = pe.vq
    vq.train()
    try:
        x = torch.randn(4, 256, requires_grad=True)
        q, loss = vq(x)
        assert torch.equal(q.detach(), vq.codebook[vq.nearest(x.detach())].detach())
        (q.sum() + loss).backward()
        assert x.grad is not None
        assert x.grad.abs().sum() > 0
        assert vq._codebook.embed.grad is not None
        assert vq._codebook.embed.grad.abs().sum() > 0
    finally:
        vq.eval()
        vq._codebook.embed.grad = None
