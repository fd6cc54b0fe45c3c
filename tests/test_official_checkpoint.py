"""Official FluoroSAM checkpoints: every manifest key loads strictly; the golden model reproduces
the official numbers end to end; bad checkpoints fail with a clear report."""

from __future__ import annotations

import json

import pytest
import torch

from fluorosam_rt.checkpoint import (
    CheckpointError,
    load_native,
    load_official,
    read_official_state_dict,
    save_native,
)
from fluorosam_rt.model.config import golden_reduced
from fluorosam_rt.predictor import Predictor
from fluorosam_rt.preprocess import PreprocessInfo
from fluorosam_rt.prompts import Prompt
from fluorosam_rt.text.clip import ClipTextEncoder


def _manifest(reference_dir):
    return json.loads((reference_dir / "fluorosam_state_dict.json").read_text())


def _random_official_checkpoint(manifest: dict) -> dict:
    """A Lightning-style checkpoint with every manifest key, shape and dtype, random values.

    CLIP tensors are fp16 as a CUDA-trained release most likely stores them.
    """
    gen = torch.Generator().manual_seed(0)
    fp16_keys = set()
    for key, details in manifest["key_details"].items():
        if details.get("dtype_if_clip_loaded_on_cuda") == "float16":
            fp16_keys.add(key)
    sd = {}
    for key, shape in manifest["keys"].items():
        dtype = manifest["key_details"][key]["dtype"]
        if dtype == "int64":
            t = torch.randint(0, 100, shape, generator=gen) if shape else torch.tensor(3)
        elif dtype == "bool":
            t = torch.tensor(True)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
            if key in fp16_keys:
                t = t.half()
        sd["sam." + key] = t
    return {"state_dict": sd, "epoch": 3, "global_step": 1000}


@pytest.fixture(scope="module")
def official_loaded(reference_dir):
    manifest = _manifest(reference_dir)
    ckpt = _random_official_checkpoint(manifest)
    model, report = load_official(ckpt["state_dict"])
    return manifest, ckpt, model, report


def test_manifest_keys_load_strictly(official_loaded):
    manifest, ckpt, model, report = official_loaded
    assert manifest["num_keys"] == 729
    assert report.ok, report.summary()
    assert len(report.loaded) == 729
    assert not report.missing
    assert not report.unexpected
    assert not report.mismatched
    model_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model_keys == {k: tuple(v) for k, v in manifest["keys"].items()}
    # The fp16 CLIP tensors were cast, and values arrived intact.
    assert any(src == "float16" for _, src, _ in report.cast)
    key = "prompt_encoder.text_model.text_projection"
    torch.testing.assert_close(model.state_dict()[key], ckpt["state_dict"]["sam." + key].float())
    key = "image_encoder.backbone.swin.stages.2.blocks.17.attn.w_msa.relative_position_bias_table"
    assert torch.equal(model.state_dict()[key], ckpt["state_dict"]["sam." + key])


def test_official_config_inferred_from_shapes(official_loaded):
    _, _, model, _ = official_loaded
    cfg = model.cfg
    assert cfg.image_encoder.swin.embed_dims == 192
    assert cfg.image_encoder.swin.depths == (2, 2, 18, 2)
    assert cfg.image_encoder.swin.num_heads == (6, 12, 24, 48)
    assert cfg.prompt_encoder.codebook_size == 8192
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads) == (512, 12, 8)


def test_strict_load_reports_every_problem(reference_dir):
    manifest = _manifest(reference_dir)
    cfg = golden_reduced()
    from fluorosam_rt.model.build import build_model

    sd = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    del sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    sd["mask_decoder.extra.weight"] = torch.zeros(3)
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    with pytest.raises(CheckpointError) as err:
        load_official(sd, cfg=cfg)
    msg = str(err.value)
    assert "positional_encoding_gaussian_matrix" in msg
    assert "mask_decoder.extra.weight" in msg
    assert "no_mask_embed" in msg
    assert "--allow-partial" in msg
    _model, report = load_official(sd, cfg=cfg, allow_partial=True)
    assert report.missing == ["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert report.unexpected == ["mask_decoder.extra.weight"]
    assert [k for k, _, _ in report.mismatched] == ["prompt_encoder.no_mask_embed.weight"]
    assert manifest  # the manifest fixture is present


def test_checkpoint_without_clip_needs_clip_weights(golden_state_dict, tmp_path):
    sd = {k: v for k, v in golden_state_dict.items() if not k.startswith("sam.prompt_encoder.text_model.")}
    with pytest.raises(CheckpointError, match="clip-weights"):
        load_official({"state_dict": sd}["state_dict"], cfg=golden_reduced())
    clip = {
        k[len("sam.prompt_encoder.text_model.") :]: v.half()
        for k, v in golden_state_dict.items()
        if k.startswith("sam.prompt_encoder.text_model.")
    }
    clip_path = tmp_path / "clip.pt"
    torch.save(clip, clip_path)
    _model, report = load_official(sd, cfg=golden_reduced(), clip_weights=clip_path)
    assert report.ok


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_official_state_dict(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_official_state_dict(bad)
    lst = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_official_state_dict(lst)


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    model, report = load_official(golden_dir / "golden_checkpoint.pt", cfg=golden_reduced())
    assert report.ok, report.summary()
    assert len(report.loaded) == 385
    return model


def test_golden_end_to_end(golden_model, golden_io):
    """Image embedding, CLIP feature, token before/after VQ, logits, IoU and chosen mask."""
    model = golden_model
    enc = ClipTextEncoder(model.prompt_encoder.text_model)
    with torch.no_grad():
        model.encode_image(golden_io["encoder_input"])  # warm-up (see golden README)
        emb = model.encode_image(golden_io["encoder_input"])
    torch.testing.assert_close(emb, golden_io["image_embedding"], atol=5e-5, rtol=0)

    predictor = Predictor(model, enc)
    predictor.set_embedding(emb, PreprocessInfo(original_hw=(448, 448), resized_hw=(448, 448), scale=1.0))
    for case in ("text0", "text1", "text2", "text0_2points"):
        text = golden_io[f"{case}/prompt"]
        feat = enc.encode([text])
        torch.testing.assert_close(feat, golden_io[f"{case}/clip_text_feature"], atol=5e-5, rtol=0)
        with torch.no_grad():
            h = model.prompt_encoder.clip_mlp(feat)
        torch.testing.assert_close(h, golden_io[f"{case}/clip_mlp_out"], atol=5e-5, rtol=0)
        points, labels = (), ()
        if case.endswith("points"):
            points = tuple(tuple(p) for p in golden_io[f"{case}/point_coords"][0].tolist())
            labels = tuple(int(v) for v in golden_io[f"{case}/point_labels"][0].tolist())
        prompt = Prompt(text, points, labels)
        (result,) = predictor.predict([prompt], return_logits=True)
        assert torch.equal(predictor.cache.lookup([text]), golden_io[f"{case}/vq_out"])
        low, iou = predictor.predict_low_res([prompt])
        torch.testing.assert_close(low, golden_io[f"{case}/low_res_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(iou, golden_io[f"{case}/iou_predictions"], atol=1e-6, rtol=0)
        assert result.best_index == int(golden_io[f"{case}/best_index"])
        assert result.score == pytest.approx(float(golden_io[f"{case}/best_iou"]), abs=1e-6)
        # The full-size resize is OpenCV's (fluorosam_rt/postprocess.py), whose bilinear source
        # coordinates are not torch's float32 ones: the fixture's note gives atol 1e-4 for that case.
        torch.testing.assert_close(
            torch.from_numpy(result.logits), golden_io[f"{case}/final_mask"], atol=1e-4, rtol=0
        )


def test_native_round_trip(golden_model, tmp_path, golden_io):
    path = save_native(
        golden_model, tmp_path / "m.safetensors", {"kind": "clip"}, {"presence_threshold": 0.1}
    )
    nm = load_native(path)
    assert nm.report.ok
    assert nm.meta["presence_threshold"] == 0.1
    assert nm.model.cfg == golden_model.cfg
    with torch.no_grad():
        a = golden_model.decode(golden_io["image_embedding"], golden_io["text1/vq_out"])[0]
        b = nm.model.decode(golden_io["image_embedding"], golden_io["text1/vq_out"])[0]
    assert torch.equal(a, b)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a fluorosam-rt native checkpoint"):
        load_native(tmp_path / "other.safetensors")
