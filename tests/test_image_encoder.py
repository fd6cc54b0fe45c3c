"""Image encoders: official key layout, golden numerics, a negative control, and the small encoder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from fluorosam_rt.model.config import (
    ImageEncoderConfig,
    SmallEncoderConfig,
    SwinConfig,
    golden_reduced,
    official_swin_l,
)
from fluorosam_rt.model.image_encoder import ImageEncoder, build_image_encoder
from fluorosam_rt.model.small_encoder import SmallEncoder
from fluorosam_rt.model.swin import relative_position_index, shift_window_mask

ATOL = 5e-5  # golden README: suggested tolerance for swin_stage* and image_embedding
PREFIX = "sam.image_encoder."


# ----------------------------------------------------------------------------- official key layout


def test_official_swin_l_keys_and_shapes_match_manifest(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "fluorosam_state_dict.json").read_text())["keys"]
    expected = {
        k[len("image_encoder.") :]: list(v) for k, v in manifest.items() if k.startswith("image_encoder.")
    }
    assert len(expected) == 421
    with torch.device("meta"):  # the 195M-parameter model is never materialised
        enc = ImageEncoder(official_swin_l().image_encoder)
    sd = enc.state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    idx_keys = [k for k in sd if k.endswith("relative_position_index")]
    assert len(idx_keys) == 24
    assert all(sd[k].dtype == torch.int64 for k in idx_keys)
    # The precomputed shift masks are runtime caches, not checkpoint content.
    assert not any("attn_mask" in k for k in sd)


def test_relative_position_index_formula() -> None:
    idx = relative_position_index(7)
    assert idx.dtype == torch.int64
    assert idx.shape == (49, 49)
    # token i = 7*row + col; index = (drow + 6) * 13 + (dcol + 6) with d = query - key
    assert idx[0, 0] == 6 * 13 + 6
    assert idx[0, 48] == 0  # query (0,0), key (6,6): drow = dcol = -6
    assert idx[48, 0] == 168
    assert idx[1, 7] == (0 - 1 + 6) * 13 + (1 - 0 + 6)  # query (0,1), key (1,0)


def test_shift_mask_regions() -> None:
    mask = shift_window_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert torch.all(mask[0] == 0)  # top-left window lies in one region
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    # bottom-right window mixes 4 regions: token (0,0) and (6,6) of that window differ
    assert mask[3, 0, 48] == -100.0
    assert mask[3, 0, 1] == 0.0  # columns 7 and 8 of the grid are both in [0, H-7)


# ----------------------------------------------------------------------------- golden fixture


@pytest.fixture(scope="module")
def golden_encoder(golden_state_dict: dict) -> ImageEncoder:
    enc = ImageEncoder(golden_reduced().image_encoder).eval()
    sd = {k[len(PREFIX) :]: v for k, v in golden_state_dict.items() if k.startswith(PREFIX)}
    assert len(sd) > 0
    enc.load_state_dict(sd, strict=True)
    return enc


@pytest.fixture(scope="module")
def golden_outputs(golden_encoder: ImageEncoder, golden_io: dict) -> dict[str, torch.Tensor]:
    x = golden_io["encoder_input"]
    with torch.no_grad():
        golden_encoder(x)  # warm-up: the README's first-forward platform glitch
        return golden_encoder.forward_intermediates(x)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_golden_swin_stages(golden_outputs: dict, golden_debug: dict, stage: int) -> None:
    ref = golden_debug[f"swin_stage{stage}"]
    out = golden_outputs[f"swin_stage{stage}"]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_golden_neck_prenorm(golden_outputs: dict, golden_debug: dict) -> None:
    out = golden_outputs["neck_out_prenorm"][:, :, ::8, ::8]
    torch.testing.assert_close(out, golden_debug["neck_out_prenorm_sub8"], atol=ATOL, rtol=0)


def test_golden_image_embedding(golden_outputs: dict, golden_io: dict) -> None:
    out = golden_outputs["image_embedding"]
    assert out.shape == (1, 256, 64, 64)
    torch.testing.assert_close(out, golden_io["image_embedding"], atol=ATOL, rtol=0)


def test_golden_forward_equals_intermediates(
    golden_encoder: ImageEncoder, golden_outputs: dict, golden_io: dict
) -> None:
    with torch.no_grad():
        out = golden_encoder(golden_io["encoder_input"])
    torch.testing.assert_close(out, golden_outputs["image_embedding"], atol=0, rtol=0)


def test_negative_control_concat_patch_merging_is_detected(
    golden_encoder: ImageEncoder, golden_io: dict
) -> None:
    """The paper's concat order must blow far past the tolerance, or the golden test proves nothing."""
    swin = golden_encoder.backbone.swin
    try:
        swin.set_concat_merging(True)
        with torch.no_grad():
            wrong = golden_encoder(golden_io["encoder_input"])
    finally:
        swin.set_concat_merging(False)
    diff = (wrong - golden_io["image_embedding"]).abs().max().item()
    assert diff > 1000 * ATOL


def test_negative_control_zeroed_bias_table_is_detected(
    golden_encoder: ImageEncoder, golden_io: dict
) -> None:
    w_msa = golden_encoder.backbone.swin.stages[3].blocks[1].attn.w_msa
    saved = w_msa.relative_position_bias_table.detach().clone()
    try:
        with torch.no_grad():
            w_msa.relative_position_bias_table.zero_()
            wrong = golden_encoder(golden_io["encoder_input"])
    finally:
        with torch.no_grad():
            w_msa.relative_position_bias_table.copy_(saved)
    assert (wrong - golden_io["image_embedding"]).abs().max().item() > 10 * ATOL


# ----------------------------------------------------------------------------- other input sizes


def _tiny_swin_cfg(img_size: int) -> ImageEncoderConfig:
    return ImageEncoderConfig(
        kind="swin",
        img_size=img_size,
        swin=SwinConfig(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)),
    )


@pytest.mark.parametrize("size", [224, 256])
def test_swin_encoder_other_sizes(size: int) -> None:
    """Non-448 inputs pad windows as mmdet does; the neck still resizes to 64x64."""
    torch.manual_seed(0)
    enc = ImageEncoder(_tiny_swin_cfg(448)).eval()
    with torch.no_grad():
        inter = enc.forward_intermediates(torch.randn(1, 3, size, size))
    for i in range(4):
        assert inter[f"swin_stage{i + 1}"].shape == (1, 16 * 2**i, size // 4 // 2**i, size // 4 // 2**i)
    assert inter["image_embedding"].shape == (1, 256, 64, 64)
    assert torch.isfinite(inter["image_embedding"]).all()


def test_swin_precomputed_mask_matches_on_the_fly() -> None:
    """Building for 256 (cached masks) and for 448 (masks computed per call) must agree at 256."""
    torch.manual_seed(0)
    a = ImageEncoder(_tiny_swin_cfg(256)).eval()
    b = ImageEncoder(_tiny_swin_cfg(448)).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- small encoder


def _small() -> ImageEncoder:
    torch.manual_seed(0)
    return build_image_encoder(ImageEncoderConfig(kind="small", img_size=256), out_dim=256)


@pytest.mark.parametrize("size", [256, 320])
def test_small_encoder_shapes(size: int) -> None:
    enc = _small().eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 256, size // 8, size // 8)
    # LayerNorm2d output: per-pixel zero mean / unit variance before the (identity-initialised) affine
    torch.testing.assert_close(out.mean(1), torch.zeros(2, size // 8, size // 8), atol=1e-4, rtol=0)


def test_small_encoder_embedding_size_matches_config() -> None:
    cfg = ImageEncoderConfig(kind="small", img_size=320)
    assert ImageEncoder(cfg).embedding_size == 40


def test_small_encoder_gradients_reach_every_parameter() -> None:
    """Every parameter trains: zero-init residual gammas get gradient at once, the rest after a step."""
    enc = _small().train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.randn(2, 256, 8, 8)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    zero_init = [n for n, p in enc.named_parameters() if n.endswith("bn.weight") and torch.all(p == 0)]
    assert len(zero_init) == 4  # the stride-1 residual blocks of depths (1, 2, 3, 2): 0 + 1 + 2 + 1
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(enc(x), target).backward()
        grads = dict(enc.named_parameters())
        assert all(grads[n].grad.abs().sum() > 0 for n in zero_init)
        if step == 0:
            opt.step()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert dead == []
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_small_encoder_learns_quickly() -> None:
    """A few SGD steps on a fixed batch must reduce the loss clearly (trainability smoke test)."""
    torch.manual_seed(0)
    enc = SmallEncoder(SmallEncoderConfig(), out_dim=32).train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.nn.functional.layer_norm(torch.randn(2, 8, 8, 32), (32,)).permute(0, 3, 1, 2)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(enc(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_small_encoder_deterministic() -> None:
    a, b = _small().eval(), _small().eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ya, yb, ya2 = a(x), b(x), a(x)
    assert torch.equal(ya, yb)  # same seed -> same weights -> same numbers
    assert torch.equal(ya, ya2)


def test_small_encoder_fused_matches_unfused() -> None:
    enc = _small().eval()
    # give the BNs non-trivial statistics so folding is actually exercised
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = enc(x)
        enc.small.fuse_for_inference()
        fused = enc(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("grad", [True, False])
def test_small_encoder_onnx_parity(grad: bool) -> None:
    """Both forward paths (autograd on: out of place; off: in-place LN/activations) export and agree."""
    import onnx
    import onnxruntime as ort

    enc = _small().eval()
    x = torch.randn(1, 3, 256, 256)
    buf = io.BytesIO()
    with torch.set_grad_enabled(grad):
        torch.onnx.export(
            enc, (x,), buf, opset_version=17, input_names=["image"], output_names=["embedding"], dynamo=False
        )
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    allowed = {"Conv", "HardSwish", "Add", "Sub", "Mul", "Div", "Sqrt", "ReduceMean", "Resize"}
    assert ops - {"Constant", "Identity"} <= allowed
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = enc(x)
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=0)
